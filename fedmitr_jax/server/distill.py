"""Stage 4: token-relabel distillation of the ensemble into a global ViT, data-parallel.

  L = tau^2 KL(E_tau(x) || softmax(S_cls(x)/tau))
      + beta * mean_i [ m_i CE(S_i(x), y) + (1 - m_i) SoftCE(S_i(x), q_i(x)) ]

m_i = 1 for patches the sparse inversion kept (they learn the generated label y); the others are
relabelled by the ensemble: q_i is its per-token soft label, or (relabel_target='image') its
image-level soft label. beta = 0 gives plain KD on the CLS head (dense_kd / sparse_kd).
The student has an LV-ViT-style separate token head. The batch is split over a 'data' mesh axis
and parameters are replicated; XLA inserts the gradient all-reduce.

The bank lives on the devices for the whole stage (replicated, in the dtype the synthesis saved it
in, `inversion.bank_dtype`: float32, or bfloat16 at half the bytes; the step casts its batch to
float32, so a bfloat16 bank changes the stored values only, and the batches are bit-for-bit the
host-gathered ones either way). The steps up to the next log or save point run as one compiled
loop that receives only their example indices and gathers each batch on the device (one dispatch
per chunk instead of a host gather and transfer per step).
"""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from fedmitr_jax import checkpoints, guards, sharding
from fedmitr_jax.client import training
from fedmitr_jax.models import patches
from fedmitr_jax.progress import chunks, log, Progress
from fedmitr_jax.server import ensemble
from fedmitr_jax.server.synthetic_bank import BANK_KEYS


@flax.struct.dataclass
class StudentState:
  params: any
  opt_state: any
  step: jnp.ndarray


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
  warmup = max(1, int(cfg.warmup_fraction * total_steps))
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(total_steps, warmup + 1))
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=training.decay_mask))


def sharpen(probs, temperature: float):
  """probs^(1/T), renormalised over the last axis; T = 1 returns `probs` unchanged (the paper)."""
  if temperature == 1.0:
    return probs
  logp = jnp.log(jnp.maximum(probs, 1e-12)) / temperature
  return jax.nn.softmax(logp, -1)


def relabel_loss(cls_logits, token_logits, batch, *, tau, beta, relabel_target, rule=ensemble.MEAN,
                 teacher_weights=None, background_temperature=1.0):
  """Returns (loss, terms). Token arrays are in the order of the bank's patch indices.
  The bank's per-teacher logits [B, K, C] are combined by `rule` (ensemble.combine); the mean
  rule with `teacher_weights` None is the plain mean over teachers. `background_temperature` T
  sharpens the background tokens' soft targets (q^(1/T), renormalised; 1 = the stored targets):
  an ensemble of non-IID clients gives flat per-token labels whose argmax is mostly right
  (docs/diagnostics.md, bank targets)."""
  combine = lambda probs: ensemble.combine(probs, rule, space="prob", weights=teacher_weights, axis=1)
  teacher_soft = combine(jax.nn.softmax(batch["teacher_logits"] / tau, -1))  # [B, C]
  student_log = jax.nn.log_softmax(cls_logits / tau, -1)
  kd = tau ** 2 * jnp.sum(teacher_soft * (jnp.log(teacher_soft + 1e-12) - student_log), -1).mean()
  terms = {"kd": kd}
  loss = kd
  if beta:
    token_log = jax.nn.log_softmax(token_logits, -1)  # [B, N, C]
    hard = -jnp.take_along_axis(token_log, batch["labels"][:, None, None], axis=-1)[..., 0]
    if relabel_target == "token":
      q = batch["token_probs"]
    else:  # the image-level ensemble label (T = 1) on every background token
      q = combine(jax.nn.softmax(batch["teacher_logits"], -1))[:, None, :]
    soft = -jnp.sum(sharpen(q, background_temperature) * token_log, -1)
    m = batch["masks"].astype(jnp.float32)
    terms["token_fg"] = jnp.sum(m * hard) / jnp.maximum(m.sum(), 1.0)
    terms["token_bg"] = jnp.sum((1 - m) * soft) / jnp.maximum((1 - m).sum(), 1.0)
    token = jnp.mean(m * hard + (1 - m) * soft)
    terms["token"] = token
    loss = loss + beta * token
  return loss, terms


def as_float32(batch: dict) -> dict:
  """The batch's real-valued arrays in float32 (a bfloat16 bank's images and soft targets: the
  loss is computed in float32); float32 and integer/bool arrays pass unchanged."""
  narrow = lambda x: jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != jnp.float32
  return {k: v.astype(jnp.float32) if narrow(v) else v for k, v in batch.items()}


def make_distill_step(model, tx, cfg, rule=ensemble.MEAN, teacher_weights=None):
  """step(state, batch, rng) -> (state, metrics); pure, one compilation for all steps. The batch
  may hold a bfloat16 bank's rows: they are cast to float32 first (as_float32)."""
  patch = model.patch_size

  def loss_fn(params, batch, rng):
    batch = as_float32(batch)
    images = batch["images"]
    if cfg.zero_background:  # SMI-style: the student sees only the inverted foreground
      images = images * patches.patch_pixel_mask(batch["masks"], images.shape[1], patch)
    all_idx = jnp.broadcast_to(jnp.arange(batch["masks"].shape[1], dtype=jnp.int32), batch["masks"].shape)
    # Patch-aligned roll + flip; `positions` makes the student return tokens in bank order, so the
    # token labels and masks move with the pixels without being permuted.
    augmented, positions = patches.random_roll_flip(rng, images, all_idx, patch_size=patch,
                                                    max_shift=cfg.shift_patches, flip=cfg.flip)
    cls_logits, out = model.apply({"params": params}, augmented, keep_idx=positions)
    return relabel_loss(cls_logits, out["token_logits"], batch, tau=cfg.tau, beta=cfg.beta,
                        relabel_target=cfg.relabel_target, rule=rule, teacher_weights=teacher_weights,
                        background_temperature=cfg.background_temperature)

  def step(state: StudentState, batch, rng):
    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return StudentState(params=params, opt_state=opt_state, step=state.step + 1), {"loss": loss, **terms}

  return step


def held_dtype(dtype) -> np.dtype:
  """The dtype the devices hold a bank array of `dtype` in: bfloat16 as its uint16 bits. XLA:CPU
  widens a bfloat16 operand of the compiled loop to float32 as a whole (a float32 copy of the bank
  on each device, in its memory analysis), while an integer operand is gathered in place; each
  gathered batch is turned back into bfloat16 (from_bits)."""
  return np.dtype(np.uint16) if dtype == jnp.bfloat16 else np.dtype(dtype)


def as_bits(array: np.ndarray) -> np.ndarray:
  """A bank array as the devices hold it (held_dtype): a numpy view, no copy."""
  return array.view(held_dtype(array.dtype))


def from_bits(x: jnp.ndarray) -> jnp.ndarray:
  """Inverse of as_bits on the device: a bank's uint16 array is bfloat16 bits (labels are int32,
  masks bool: no bank array is uint16 otherwise)."""
  return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


def batch_dtype(x) -> np.dtype:
  """The dtype from_bits gives a batch gathered from the held bank array `x`."""
  return np.dtype(jnp.bfloat16) if x.dtype == jnp.uint16 else np.dtype(x.dtype)


def make_bank_loop(step, mesh):
  """loop(state, bank, idx, rng, start, stop, first_bad) -> (state, metrics, first_bad): steps
  start..stop-1 in one lax.fori_loop. Step t trains on bank[idx[t - start]] (gathered on the
  device, then split over 'data' like a host-fed batch) with fold_in(rng, t); `first_bad`
  (guards.first_bad_step) records the first step whose loss was not finite. idx: [L, B] with
  L >= stop - start (rows past the chunk are padding); start/stop are traced, so every chunk
  shares one compilation."""
  split = NamedSharding(mesh, P("data"))

  def loop(state, bank, idx, rng, start, stop, first_bad):
    def body(t, carry):
      state, _, first_bad = carry
      rows = jax.lax.dynamic_index_in_dim(idx, t - start, keepdims=False)
      batch = {k: jax.lax.with_sharding_constraint(from_bits(jnp.take(bank[k], rows, axis=0)), split)
               for k in BANK_KEYS}
      state, metrics = step(state, batch, jax.random.fold_in(rng, t))
      return state, metrics, guards.first_bad_step(first_bad, t + 1, metrics["loss"])

    metrics = jax.eval_shape(step, state, {k: jax.ShapeDtypeStruct((idx.shape[1],) + bank[k].shape[1:],
                                                                   batch_dtype(bank[k])) for k in BANK_KEYS},
                             rng)[1]
    no_metrics = jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metrics)
    return jax.lax.fori_loop(start, stop, body, (state, no_metrics, first_bad))

  return loop


def jit_bank_loop(step, mesh):
  """`make_bank_loop(step)` under jit: state and bank replicated, indices split over 'data'."""
  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "data"))
  return jax.jit(make_bank_loop(step, mesh), in_shardings=(replicated,) * 2 + (split,) + (replicated,) * 4,
                 out_shardings=replicated, donate_argnums=0)


def jit_sharded_step(step, mesh):
  """The step under jit with the batch split over 'data' and the state replicated."""
  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  return jax.jit(step, in_shardings=(replicated, split, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def plan_steps(bank_size: int, batch_size: int, epochs: float) -> int:
  if bank_size < batch_size:
    raise ValueError(f"distill.batch_size: {batch_size} is larger than the synthetic bank "
                     f"({bank_size} images); lower it or raise inversion.num_batches")
  return max(1, int(epochs * (bank_size // batch_size)))


@functools.lru_cache(maxsize=2)
def _epoch_order(bank_size: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(bank_size)


def batch_indices(bank_size: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Examples of `step`: epoch-wise seeded permutations (one per epoch, not per step), last
  partial batch dropped. A function of the step alone, so a resumed run sees the same batches."""
  epoch, within = divmod(step, bank_size // batch_size)
  return _epoch_order(bank_size, seed, epoch)[within * batch_size:(within + 1) * batch_size]


def train_student(model, cfg, bank, init_params, *, seed, stage, manager=None, mesh=None,
                  rule=ensemble.MEAN, teacher_weights=None):
  """Distils the bank into the student. `manager` (Orbax) gives periodic saves and resume.
  `rule` / `teacher_weights` combine the bank's per-teacher logits into KD targets."""
  mesh = mesh or sharding.data_mesh()
  sharding.check_divisible(cfg.batch_size, "distill.batch_size")
  bank_size = len(bank["labels"])
  total = plan_steps(bank_size, cfg.batch_size, cfg.epochs)
  tx = make_optimizer(cfg, total)
  state = StudentState(params=init_params, opt_state=tx.init(init_params), step=jnp.zeros((), jnp.int32))
  start = 0
  if manager is not None:
    start, saved = checkpoints.restore_latest(manager, checkpoints.abstract_like(state))
    state = saved if saved is not None else state
    if saved is not None:
      log(f"[{stage}] resuming at step {start}")
  # Copies: the step donates its state, and the caller's initial parameters must stay valid.
  state = sharding.replicate(mesh, jax.tree.map(jnp.copy, state))
  if teacher_weights is not None:
    teacher_weights = jnp.asarray(teacher_weights, jnp.float32)
  loop = jit_bank_loop(make_distill_step(model, tx, cfg, rule, teacher_weights), mesh)
  split = NamedSharding(mesh, P(None, "data"))
  # Once per stage; a bfloat16 bank travels as its bits (as_bits).
  device_bank = sharding.replicate(mesh, {k: as_bits(np.asarray(bank[k])) for k in BANK_KEYS})
  rng = jax.random.fold_in(jax.random.key(seed), 4)  # stream 4: distillation
  progress = Progress(stage, total, cfg.batch_size, start_step=start)
  guard = guards.FiniteGuard(stage, "distill.lr")
  # Placed as the loop returns it, so the first chunk does not compile the loop a second time.
  guard.first_bad = sharding.replicate(mesh, guard.first_bad)
  last_save = lambda: manager.latest_step() if manager is not None else None
  # One compiled call per chunk between log and save points; every chunk's indices are padded
  # to the longest chunk's length, so all chunks share one compilation.
  longest = min(cfg.log_every, cfg.checkpoint_every_steps, total)
  for first, end in chunks(start, total, cfg.log_every, cfg.checkpoint_every_steps):
    idx = np.zeros((longest, cfg.batch_size), np.int32)
    for t in range(first, end):
      idx[t - first] = batch_indices(bank_size, cfg.batch_size, t, seed)
    state, metrics, guard.first_bad = loop(state, device_bank, sharding.put_global(idx, split), rng,
                                           first, end, guard.first_bad)
    progress.step_done(end)  # the first chunk paid the compilation: rates count from its end
    if manager is not None and end % cfg.checkpoint_every_steps == 0:
      guard.check(last_save())  # never save a state that came from a NaN
      manager.save(end, args=checkpoints.standard_save(state))
    if end % cfg.log_every == 0 or end == total:
      progress.report(end, **jax.device_get(metrics))
  guard.check(last_save())
  if manager is not None:
    manager.wait_until_finished()
  # devices: every step's batch was split over this many devices (all processes' devices)
  return state.params, {"seconds": progress.elapsed(), "steps": total, "devices": mesh.size}
