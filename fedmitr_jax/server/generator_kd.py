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
optimiser. State is saved after every round (the student, the ensemble weights and only that
round's new pool rows; every round's save is kept), so a killed run rebuilds the pool from the
saves and resumes at the next round.

Data-parallel on the 'data' mesh (sharding.py), like distillation: the generator's batch (z, its
labels, the round's best images and z's Adam moments) is split over the devices and everything
else (generator, student and client parameters, ensemble weights) is replicated. Its BatchNorm
then normalises over the global batch (XLA all-reduces the statistics), the same math as on one
device. The pool lives on the devices, replicated (like distillation's bank: every device gathers
its own share of a KD batch locally, with no cross-device traffic; split, each random batch would
need an all-to-all). A round's KD steps run as one compiled loop that receives only their pool
rows, and the Co-Boosting re-weighting pass reads the pool on the device too.
"""
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedmitr_jax import checkpoints, guards, sharding
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
  return ensemble.combine(logits, rule, space="logit",
                          weights=ensemble.weights_on_inputs(rule, weights, logits))


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


def make_generator_step(method, cfg, generator, teacher, student, mode, batch: int, mesh: Mesh,
                        rule=ensemble.MEAN):
  """(init, step), both jitted on `mesh`: init(rng) -> a fresh GenState of `batch` examples;
  step(state, labels, client_params, weights, student_params, rng) -> (state, loss). The
  per-example parts of the state and the labels are split over 'data', the rest replicated."""
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

  def init(rng):
    z_rng, g_rng = jax.random.split(rng)
    z = jax.random.normal(z_rng, (batch, cfg.z_dim))
    params = generator.init(g_rng, z)["params"]
    images = jnp.zeros((batch, generator.image_size, generator.image_size, 3))
    return GenState(params=params, z=z, opt_state=tx.init((params, z)), best_images=images,
                    best_loss=jnp.array(jnp.inf))

  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  state_sharding = gen_state_sharding(tx, jax.eval_shape(init, jax.random.key(0)), mesh)
  return (jax.jit(init, out_shardings=state_sharding),
          jax.jit(step, in_shardings=(state_sharding, split) + (replicated,) * 4,
                  out_shardings=(state_sharding, replicated), donate_argnums=0))


def gen_state_sharding(tx, state: GenState, mesh: Mesh) -> GenState:
  """Where each leaf of a GenState lives: z, best_images and z's optimiser moments split over
  'data' (one row per example); the generator's parameters, their moments and the scalars
  replicated. optax.tree_map_params finds the copies of (params, z) inside the optimiser state."""
  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  per_param = (jax.tree.map(lambda _: replicated, state.params), split)
  opt_state = optax.tree_map_params(tx, lambda _, where: where, state.opt_state, per_param,
                                    transform_non_params=lambda _: replicated)
  return GenState(params=per_param[0], z=split, opt_state=opt_state, best_images=split,
                  best_loss=replicated)


def ods_perturb(teacher, client_params, weights, images, rng, *, eps, tau, mode, rule=ensemble.MEAN):
  """Output-diversified sampling (Co-Boosting's KD): one signed-gradient step of size eps that
  moves the ensemble's tempered softmax along a random direction r ~ U(-1, 1)^C."""
  r = jax.random.uniform(rng, (images.shape[0], teacher.num_classes), minval=-1.0, maxval=1.0)
  direction = jax.grad(lambda x: jnp.sum(
      r * jax.nn.softmax(ensemble_logits(teacher, client_params, weights, x, mode, rule) / tau)))(images)
  return images + eps * jnp.sign(direction)


def make_kd_step(method, cfg, tx, teacher, student, mode, rule=ensemble.MEAN):
  """step(state, images, client_params, weights, rng) -> (state, loss); pure, not jitted."""
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

  return step


def jit_sharded_kd_step(step, mesh: Mesh):
  """One KD step under jit with its images split over 'data' (what the dry run measures)."""
  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  return jax.jit(step, in_shardings=(replicated, split) + (replicated,) * 3,
                 out_shardings=(replicated, replicated), donate_argnums=0)


def jit_kd_round(step, mesh: Mesh):
  """kd_round(state, pool, idx, client_params, weights, rng, round_number, first_bad) ->
  (state, last loss, first_bad): one round's KD steps in one lax.fori_loop. Step k trains on
  pool[idx[k]] (gathered on the device, then split over 'data') with fold_in(rng, 100_000 + k);
  `first_bad` (guards.first_bad_step) records `round_number` if a loss was not finite. The pool
  and state are replicated, idx [steps, batch] split along the batch."""
  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

  def kd_round(state, pool, idx, client_params, weights, rng, round_number, first_bad):
    def body(k, carry):
      state, _, first_bad = carry
      images = jax.lax.with_sharding_constraint(jnp.take(pool, idx[k], axis=0), split)
      state, loss = step(state, images, client_params, weights, jax.random.fold_in(rng, 100_000 + k))
      return state, loss, guards.first_bad_step(first_bad, round_number, loss)

    images = jax.ShapeDtypeStruct((idx.shape[1],) + pool.shape[1:], pool.dtype)
    loss = jax.eval_shape(step, state, images, client_params, weights, rng)[1]
    return jax.lax.fori_loop(0, idx.shape[0], body, (state, jnp.zeros(loss.shape, loss.dtype), first_bad))

  return jax.jit(kd_round, in_shardings=(replicated, replicated, NamedSharding(mesh, P(None, "data")))
                 + (replicated,) * 5, out_shardings=replicated, donate_argnums=0)


def make_reweight(cfg, teacher, mode, batch_size: int, mesh: Mesh, rule=ensemble.MEAN):
  """Co-Boosting's ensemble re-weighting: one signed-gradient step of the pool's CE in w.
  reweight(weights, initial, pool_images, pool_labels, filled, client_params, round_index): the
  gradient is summed over the first `filled` pool rows in batches of `batch_size` (split over
  'data'; the last batch's rows past `filled` are masked out), in one compiled loop."""
  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

  def pool_grad(weights, images, labels, filled, client_params):
    def batch_grad(i, total):
      rows = i * batch_size + jnp.arange(batch_size)
      real = rows < filled
      rows = jax.lax.with_sharding_constraint(jnp.where(real, rows, 0), split)
      x, y = jnp.take(images, rows, axis=0), jnp.take(labels, rows, axis=0)
      ce = lambda w: jnp.sum(real * optax.softmax_cross_entropy_with_integer_labels(
          ensemble_logits(teacher, client_params, w, x, mode, rule), y))
      return total + jax.grad(ce)(weights)

    return jax.lax.fori_loop(0, (filled + batch_size - 1) // batch_size, batch_grad, jnp.zeros_like(weights))

  pool_grad = jax.jit(pool_grad, in_shardings=(replicated,) * 5, out_shardings=replicated)

  def reweight(weights, initial, pool_images, pool_labels, filled, client_params, round_index):
    grad = pool_grad(weights, pool_images, pool_labels, filled, client_params)
    w = weights - cfg.reweight_lr * cfg.reweight_decay ** round_index * jnp.sign(grad)
    return jnp.clip(initial + jnp.clip(w - initial, -1.0, 1.0), 0.0, 1.0)

  return reweight


def pool_batch(filled: int, batch: int, seed: int, round_index: int, step: int) -> np.ndarray:
  """Pool rows for one KD step: a seeded per-round permutation of the filled rows, cycled."""
  order = np.random.default_rng([seed, round_index]).permutation(filled)
  return order[(step * batch + np.arange(batch)) % filled]


def round_indices(filled: int, batch: int, seed: int, round_index: int, steps: int) -> np.ndarray:
  """[steps, batch] pool rows of one round's KD steps (pool_batch of each)."""
  return np.stack([pool_batch(filled, batch, seed, round_index, k) for k in range(steps)]).astype(np.int32)


def add_to_pool(pool_images, pool_labels, images, labels, start):
  """The pool with a round's `images` / `labels` written at rows start.. (jitted in `train`)."""
  return (jax.lax.dynamic_update_slice_in_dim(pool_images, images.astype(pool_images.dtype), start, 0),
          jax.lax.dynamic_update_slice_in_dim(pool_labels, labels.astype(pool_labels.dtype), start, 0))


def train(method, config, teacher, student, client_params, weights, init_params, *, stage, manager,
          rule=ensemble.MEAN, mesh: Mesh | None = None):
  """Runs the method on `mesh` (all devices by default); returns (student params, replicated on
  the mesh, and facts). Resumes from `manager`'s last round. `rule` combines the teachers'
  logits (ensemble.combine)."""
  cfg, inv, dcfg = config.generator_kd, config.inversion, config.distill
  rounds, batch, num_classes = inv.num_batches, inv.batch_size, student.num_classes
  mesh = mesh or sharding.data_mesh()
  sharding.check_divisible(batch, "inversion.batch_size")  # the generator's batch
  sharding.check_divisible(dcfg.batch_size, "distill.batch_size")  # the KD batch
  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  image_size = config.dataset.image_size
  total_kd = distill.plan_steps(rounds * batch, dcfg.batch_size, dcfg.epochs)
  kd_per_round = -(-total_kd // rounds)
  tx = distill.make_optimizer(dcfg, kd_per_round * rounds)
  generator = Generator(image_size, cfg.ngf)
  mode = inv.teachers_mode
  gen_init, gen_step = make_generator_step(method, cfg, generator, teacher, student, mode, batch, mesh, rule)
  kd_round = jit_kd_round(make_kd_step(method, cfg, tx, teacher, student, mode, rule), mesh)
  reweight = make_reweight(cfg, teacher, mode, dcfg.batch_size, mesh, rule)
  client_params = sharding.replicate_anywhere(mesh, client_params)
  initial_w = sharding.replicate(mesh, np.asarray(weights, np.float32))
  empty_pool = jax.jit(lambda: (jnp.zeros((rounds * batch, image_size, image_size, 3), jnp.float32),
                                jnp.zeros((rounds * batch,), jnp.int32)), out_shardings=replicated)
  add = jax.jit(add_to_pool, in_shardings=(replicated, replicated, split, split, replicated),
                out_shardings=replicated, donate_argnums=(0, 1))
  pool_images, pool_labels = empty_pool()  # the pool, on the devices
  # Save r holds round r's new pool rows, not the whole pool (which would rewrite the pool every
  # round: 16 x 2.3 GiB at paper scale); the manager keeps every round's save (max_to_keep=None)
  # and a resume rebuilds the pool from all of them, then continues from the newest.
  state = {
      "student": sharding.replicate_anywhere(mesh, distill.StudentState(
          params=init_params, opt_state=tx.init(init_params), step=jnp.zeros((), jnp.int32))),
      "weights": initial_w,
      "images": jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32, sharding=split),
      "labels": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=split),
      "rounds_done": np.zeros((), np.int32),
  }
  saved_rounds = sorted(manager.all_steps())
  if saved_rounds:
    if saved_rounds != list(range(1, saved_rounds[-1] + 1)):
      raise ValueError(f"{stage}: round saves {saved_rounds} are not every round from 1; the stage's "
                       "progress folder is not from this version: delete it to run the stage again")
    for saved_round in saved_rounds:
      state = checkpoints.restore(manager, saved_round, checkpoints.abstract_like(state))
      pool_images, pool_labels = add(pool_images, pool_labels, state["images"], state["labels"],
                                     (saved_round - 1) * batch)
    log(f"[{stage}] resuming after {int(state['rounds_done'])}/{rounds} rounds")
  # Copies: the KD loop donates its state, and the caller's initial parameters must stay valid.
  student_state = jax.tree.map(jnp.copy, state["student"])
  w = state["weights"]
  rng = jax.random.fold_in(jax.random.key(config.seed), 6)  # stream 6: generator baselines
  progress = Progress(stage, rounds, batch, unit="img synthesised", start_step=int(state["rounds_done"]))
  guard = guards.FiniteGuard(stage, "generator_kd.lr_g or distill.lr")
  guard.first_bad = sharding.replicate(mesh, guard.first_bad)
  for r in range(int(state["rounds_done"]), rounds):
    round_rng = jax.random.fold_in(rng, r)
    round_labels = sharding.put_global(inversion.balanced_labels(config.seed * 100_003 + r, batch, num_classes),
                                       split)
    gen = gen_init(jax.random.fold_in(round_rng, 0))  # DENSE re-initialises G every round
    for g in range(cfg.g_steps):
      gen, g_loss = gen_step(gen, round_labels, client_params, w, student_state.params,
                             jax.random.fold_in(round_rng, 1 + g))
      guard.update(r + 1, g_loss)
    pool_images, pool_labels = add(pool_images, pool_labels, gen.best_images, round_labels, r * batch)
    filled = (r + 1) * batch
    if method == "coboosting" and r > 0:
      w = reweight(w, initial_w, pool_images, pool_labels, filled, client_params, r)
    idx = round_indices(filled, dcfg.batch_size, config.seed, r, kd_per_round)
    student_state, kd_loss, guard.first_bad = kd_round(
        student_state, pool_images, sharding.put_global(idx, NamedSharding(mesh, P(None, "data"))),
        client_params, w, round_rng, r + 1, guard.first_bad)
    guard.check(manager.latest_step())  # steps are counted in rounds here
    state.update(student=student_state, weights=w, images=gen.best_images, labels=round_labels,
                 rounds_done=np.int32(r + 1))
    manager.save(r + 1, args=checkpoints.standard_save(state))
    progress.step_done()
    progress.report(r + 1, g_loss=gen.best_loss, kd=kd_loss, **(
        {"w_min": jnp.min(w), "w_max": jnp.max(w)} if method == "coboosting" else {}))
  manager.wait_until_finished()
  return student_state.params, {"seconds": progress.elapsed(), "rounds": rounds, "devices": mesh.size,
                                "g_steps": cfg.g_steps, "kd_steps": kd_per_round * rounds,
                                "ensemble_weights": sharding.to_host(w).tolist()}
