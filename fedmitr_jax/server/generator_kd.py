"""The generator-based baselines of the FedMITR paper's tables: DENSE and Co-Boosting.

Both alternate, for `rounds` rounds, (1) synthesis: a freshly initialised generator G and its
latent codes z are trained for `g_steps` Adam steps against the client ensemble E and the current
student S, and the lowest-loss batch joins an image pool; (2) distillation: the student takes
KD steps on batches of the pool with the ensemble's soft labels. They differ in the losses:

  DENSE (Zhang et al. 2022, zj-jayzhang/DENSE `AdvSynthesizer`, `kd_train`):
    L_G  = oh CE(E(aug G(z)), y) + adv L_adv,
    L_adv = -mean_b[ 1{argmax S != argmax E} KL(S || E) ]     (make S and E disagree)
    KD   = T^2 KL(E_T(aug x) || S_T(aug x)), T = 20;  E = mean of client logits.
  Co-Boosting (Dai et al. 2024, rong-dai/Co-Boosting `coboost.py`, `cb_kd_train`):
    L_G  = mean_b[(1 - p_Ew(y|x))^hs CE(E_w(x), y)] - adv mean_b KL_3(S || E_w)  (hard samples)
    E_w  = sum_k w_k f_k / sum_k w_k, w re-weighted each round by a signed-gradient step on the
           pool's CE, projected to w0 + [-1, 1] and [0, 1];
    KD   = T^2 KL(E_w,T(x') || S_T(x')), T = 4, x' = x + eps sign(grad_x r . softmax(E_w(x)/4))
           with r ~ U(-1, 1) (on-the-fly diversification, ODS).
ViTs have no BatchNorm, so the BN-statistics term of both papers is absent (as in our
inversion). Budgets are tied to the relabel methods': the pool holds as many images as a
synthetic bank (rounds = inversion.num_batches of inversion.batch_size) and the student takes as
many steps (distill.epochs over the bank), spread evenly over the rounds, with distill's
optimiser. State is saved after every round, so a killed run resumes at the next round.
"""
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedmitr_jax import checkpoints, guards
from fedmitr_jax.data import augment
from fedmitr_jax.progress import log, Progress
from fedmitr_jax.server import distill, ensemble, inversion

METHODS = ("dense", "coboosting")


class Generator(nn.Module):
  """The DCGAN-style generator of DENSE / Co-Boosting (`datafree/models/generator.py`)."""
  image_size: int
  ngf: int = 64

  @nn.compact
  def __call__(self, z):
    s = self.image_size // 4
    bn = functools.partial(nn.BatchNorm, use_running_average=False, momentum=0.9, epsilon=1e-5)
    x = nn.Dense(2 * self.ngf * s * s, kernel_init=nn.initializers.normal(0.02))(z)
    x = bn()(x.reshape(-1, s, s, 2 * self.ngf))
    for features in (2 * self.ngf, self.ngf):
      x = jax.image.resize(x, (x.shape[0], 2 * x.shape[1], 2 * x.shape[2], x.shape[3]), "nearest")
      x = nn.Conv(features, (3, 3), kernel_init=nn.initializers.normal(0.02))(x)
      x = nn.leaky_relu(bn()(x), 0.2)
    x = nn.Conv(3, (3, 3), kernel_init=nn.initializers.normal(0.02))(x)
    return 2.0 * nn.sigmoid(x) - 1.0  # sigmoid image in [0, 1], in our normalised [-1, 1] space


@flax.struct.dataclass
class GenState:
  params: any
  z: jnp.ndarray
  opt_state: any
  best_images: jnp.ndarray
  best_loss: jnp.ndarray


def ensemble_logits(model, client_params, weights, images, mode, rule=ensemble.MEAN):
  """The baselines' ensemble: the weighted mean of client *logits* (DENSE's `Ensemble_A`,
  Co-Boosting's E_w), not our mean of softmaxes; a robust `rule` combines the logits instead
  (and ignores the weights, so Co-Boosting's re-weighting then has nothing to move)."""
  logits, _ = ensemble.per_teacher(model, client_params, images, None, False, mode,
                                   guard_grads=rule.name != "mean")
  return ensemble.combine(logits, rule, space="logit", weights=weights)


def kl(p_logits, q_logits, t):
  """Mean over the batch of KL(softmax(p/t) || softmax(q/t))."""
  p = jax.nn.log_softmax(p_logits / t, -1)
  return jnp.sum(jnp.exp(p) * (p - jax.nn.log_softmax(q_logits / t, -1)), -1)


def generator_loss(method, cfg, teacher_logits, student_logits, labels):
  """Per-batch generation loss (see the module docstring)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(teacher_logits, labels)
  if method == "dense":
    disagree = jnp.argmax(student_logits, -1) != jnp.argmax(teacher_logits, -1)
    adv = -jnp.mean(disagree * kl(student_logits, teacher_logits, 1.0))
    return cfg.oh * ce.mean() + cfg.adv * adv
  p_target = jnp.take_along_axis(jax.nn.softmax(teacher_logits, -1), labels[:, None], 1)[:, 0]
  hard = jax.lax.stop_gradient((1.0 - p_target) ** cfg.hard_sample_power)
  adv = -jnp.mean(kl(student_logits, teacher_logits, cfg.coboost_adv_tau))
  return jnp.mean(hard * ce) + cfg.adv * adv


def make_generator_step(method, cfg, generator, teacher, student, mode, rule=ensemble.MEAN):
  tx = optax.chain(optax.clip_by_global_norm(cfg.g_grad_clip), optax.adam(cfg.lr_g, b1=0.5, b2=0.999))

  def loss_fn(gen_and_z, labels, client_params, weights, student_params, rng):
    gen_params, z = gen_and_z
    images, _ = generator.apply({"params": gen_params}, z, mutable=["batch_stats"])
    augmented = augment.random_crop_flip(rng, images, cfg.crop_padding)
    t_logits = ensemble_logits(teacher, client_params, weights, augmented, mode, rule)
    s_logits, _ = student.apply({"params": student_params}, augmented)
    return generator_loss(method, cfg, t_logits, s_logits, labels), images

  def step(state: GenState, labels, client_params, weights, student_params, rng):
    (loss, images), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        (state.params, state.z), labels, client_params, weights, student_params, rng)
    better = loss < state.best_loss  # DENSE keeps the lowest-loss batch of the round
    updates, opt_state = tx.update(grads, state.opt_state, (state.params, state.z))
    params, z = optax.apply_updates((state.params, state.z), updates)
    return GenState(params=params, z=z, opt_state=opt_state,
                    best_images=jnp.where(better, images, state.best_images),
                    best_loss=jnp.where(better, loss, state.best_loss)), loss

  def init(rng, batch):
    z_rng, g_rng = jax.random.split(rng)
    z = jax.random.normal(z_rng, (batch, cfg.z_dim))
    params = generator.init(g_rng, z)["params"]
    images = jnp.zeros((batch, generator.image_size, generator.image_size, 3))
    return GenState(params=params, z=z, opt_state=tx.init((params, z)), best_images=images,
                    best_loss=jnp.array(jnp.inf))

  return init, jax.jit(step, donate_argnums=0)


def ods_perturb(teacher, client_params, weights, images, rng, *, eps, tau, mode, rule=ensemble.MEAN):
  """Output-diversified sampling (Co-Boosting's KD): one signed-gradient step of size eps that
  moves the ensemble's tempered softmax along a random direction r ~ U(-1, 1)^C."""
  r = jax.random.uniform(rng, (images.shape[0], teacher.num_classes), minval=-1.0, maxval=1.0)
  direction = jax.grad(lambda x: jnp.sum(
      r * jax.nn.softmax(ensemble_logits(teacher, client_params, weights, x, mode, rule) / tau)))(images)
  return images + eps * jnp.sign(direction)


def make_kd_step(method, cfg, tx, teacher, student, mode, rule=ensemble.MEAN):
  tau = cfg.dense_tau if method == "dense" else cfg.coboost_tau

  def loss_fn(student_params, images, client_params, weights, rng):
    aug_rng, ods_rng = jax.random.split(rng)
    images = augment.random_crop_flip(aug_rng, images, cfg.crop_padding)
    if method == "coboosting" and cfg.ods_eps:
      images = ods_perturb(teacher, client_params, weights, images, ods_rng, eps=cfg.ods_eps, tau=tau,
                           mode=mode, rule=rule)
    t_logits = ensemble_logits(teacher, client_params, weights, images, mode, rule)
    s_logits, _ = student.apply({"params": student_params}, images)
    return tau ** 2 * jnp.mean(kl(t_logits, s_logits, tau))

  def step(state: distill.StudentState, images, client_params, weights, rng):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, images, client_params, weights, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return distill.StudentState(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                                step=state.step + 1), loss

  return jax.jit(step, donate_argnums=0)


def make_reweight(cfg, teacher, mode, batch_size, rule=ensemble.MEAN):
  """Co-Boosting's ensemble re-weighting: one signed-gradient step of the pool's CE in w."""

  @jax.jit
  def grad_on_batch(weights, images, labels, client_params):
    ce = lambda w: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
        ensemble_logits(teacher, client_params, w, images, mode, rule), labels))
    return jax.grad(ce)(weights)

  def reweight(weights, initial, images, labels, client_params, round_index):
    grad = sum(grad_on_batch(weights, images[i:i + batch_size], labels[i:i + batch_size], client_params)
               for i in range(0, len(labels), batch_size))
    w = weights - cfg.reweight_lr * cfg.reweight_decay ** round_index * jnp.sign(grad)
    return jnp.clip(initial + jnp.clip(w - initial, -1.0, 1.0), 0.0, 1.0)

  return reweight


def pool_batch(filled: int, batch: int, seed: int, round_index: int, step: int) -> np.ndarray:
  """Pool rows for one KD step: a seeded per-round permutation of the filled rows, cycled."""
  order = np.random.default_rng([seed, round_index]).permutation(filled)
  return order[(step * batch + np.arange(batch)) % filled]


def train(method, config, teacher, student, client_params, weights, init_params, *, stage, manager,
          rule=ensemble.MEAN):
  """Runs the method; returns (student params, facts). Resumes from `manager`'s last round.
  `rule` combines the teachers' logits (ensemble.combine)."""
  cfg, inv, dcfg = config.generator_kd, config.inversion, config.distill
  rounds, batch, num_classes = inv.num_batches, inv.batch_size, student.num_classes
  image_size = config.dataset.image_size
  total_kd = distill.plan_steps(rounds * batch, dcfg.batch_size, dcfg.epochs)
  kd_per_round = -(-total_kd // rounds)
  tx = distill.make_optimizer(dcfg, kd_per_round * rounds)
  generator = Generator(image_size, cfg.ngf)
  mode = inv.teachers_mode
  gen_init, gen_step = make_generator_step(method, cfg, generator, teacher, student, mode, rule)
  kd_step = make_kd_step(method, cfg, tx, teacher, student, mode, rule)
  reweight = make_reweight(cfg, teacher, mode, dcfg.batch_size, rule)
  initial_w = jnp.asarray(weights, jnp.float32)
  state = {
      "student": distill.StudentState(params=init_params, opt_state=tx.init(init_params),
                                      step=jnp.zeros((), jnp.int32)),
      "weights": initial_w,
      "images": np.zeros((rounds * batch, image_size, image_size, 3), np.float32),
      "labels": np.zeros((rounds * batch,), np.int32),
      "rounds_done": np.zeros((), np.int32),
  }
  _, saved = checkpoints.restore_latest(manager, checkpoints.abstract_like(state))
  if saved is not None:
    state = dict(saved, images=np.asarray(saved["images"]), labels=np.asarray(saved["labels"]))
    log(f"[{stage}] resuming after {int(state['rounds_done'])}/{rounds} rounds")
  student_state, w = jax.tree.map(jnp.copy, state["student"]), state["weights"]
  rng = jax.random.fold_in(jax.random.key(config.seed), 6)  # stream 6: generator baselines
  progress = Progress(stage, rounds, batch, unit="img synthesised", start_step=int(state["rounds_done"]))
  guard = guards.FiniteGuard(stage, "generator_kd.lr_g or distill.lr")
  for r in range(int(state["rounds_done"]), rounds):
    round_rng = jax.random.fold_in(rng, r)
    labels = inversion.balanced_labels(config.seed * 100_003 + r, batch, num_classes)
    gen = gen_init(jax.random.fold_in(round_rng, 0), batch)  # DENSE re-initialises G every round
    for g in range(cfg.g_steps):
      gen, g_loss = gen_step(gen, labels, client_params, w, student_state.params,
                             jax.random.fold_in(round_rng, 1 + g))
      guard.update(r + 1, g_loss)
    rows = slice(r * batch, (r + 1) * batch)
    state["images"][rows], state["labels"][rows] = np.asarray(gen.best_images), labels
    filled = (r + 1) * batch
    if method == "coboosting" and r > 0:
      w = reweight(w, initial_w, state["images"][:filled], state["labels"][:filled], client_params, r)
    for k in range(kd_per_round):
      idx = pool_batch(filled, dcfg.batch_size, config.seed, r, k)
      student_state, kd_loss = kd_step(student_state, jnp.asarray(state["images"][idx]), client_params,
                                       w, jax.random.fold_in(round_rng, 100_000 + k))
      guard.update(r + 1, kd_loss)
    guard.check(manager.latest_step())  # steps are counted in rounds here
    state.update(student=student_state, weights=w, rounds_done=np.int32(r + 1))
    manager.save(r + 1, args=checkpoints.standard_save(state))
    progress.step_done()
    progress.report(r + 1, g_loss=gen.best_loss, kd=kd_loss, **(
        {"w_min": jnp.min(w), "w_max": jnp.max(w)} if method == "coboosting" else {}))
  manager.wait_until_finished()
  return student_state.params, {"seconds": progress.elapsed(), "rounds": rounds,
                                "g_steps": cfg.g_steps, "kd_steps": kd_per_round * rounds,
                                "ensemble_weights": np.asarray(w).tolist()}
