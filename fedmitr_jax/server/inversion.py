"""Stage 3: sparse model inversion of the client ensemble (server side, data-free).

Pixels x (normalised space) are optimised with Adam so the ensemble classifies them as target
labels y, under a total-variation prior. At the stop iterations the kept patch tokens are ranked
by the last block's CLS-to-patch attention (mean over heads and teachers) and only the top
(1 - drop_ratio) survive: from then on only they are forwarded (a gather after the position
embedding, so the forward pass really shrinks) and only their pixels change. Every stage has a
static token count, so each stage is one compilation. Dense inversion is the same loop, no stops.

The iterations between two stops run as one compiled loop (`make_inversion_loop`): the random
numbers (fold_in of the iteration), the best iterate and the non-finite check stay in the graph,
and the host only sees the loop's end, split at the log points (one dispatch per log_every
iterations instead of several per iteration).
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedmitr_jax import guards, sharding
from fedmitr_jax.data import datasets
from fedmitr_jax.models import patches
from fedmitr_jax.progress import Progress, chunks
from fedmitr_jax.server import ensemble


def keep_counts(num_patches: int, num_stops: int, drop_ratio: float) -> list[int]:
  """Tokens kept in each stage: N, then floor((1 - r) * previous) at each stop (SMI)."""
  counts = [num_patches]
  for _ in range(num_stops):
    counts.append(max(1, int(counts[-1] * (1.0 - drop_ratio))))
  return counts


def active_stops(cfg, sparse: bool) -> list[int]:
  """The stop iterations that fall inside the run (none for dense inversion)."""
  return sorted(s for s in cfg.stops if 0 < s < cfg.iterations) if sparse else []


def tv_l2(x):
  """DeepInversion's smoothness prior: L2 norms of neighbour differences (4 directions)."""
  d1 = x[:, :, :-1] - x[:, :, 1:]
  d2 = x[:, :-1, :] - x[:, 1:, :]
  d3 = x[:, 1:, :-1] - x[:, :-1, 1:]
  d4 = x[:, :-1, :-1] - x[:, 1:, 1:]
  return sum(jnp.sqrt(jnp.sum(d * d)) for d in (d1, d2, d3, d4))


@flax.struct.dataclass
class InversionState:
  pixels: jnp.ndarray       # [B, H, W, 3] current images, normalised space
  opt_state: any
  keep_idx: jnp.ndarray     # [B, n] patch indices still being inverted (static n per stage)
  best_pixels: jnp.ndarray  # best iterate of the current stage, per image
  best_ce: jnp.ndarray      # [B]


def _adam(cfg):
  return optax.adam(cfg.lr, b1=cfg.beta1, b2=cfg.beta2)


def init_state(cfg, rng, batch: int, image_size: int, num_patches: int) -> InversionState:
  # N(0, 1) in normalised space, clipped to the valid range now (not at the first step) so a
  # patch frozen later keeps exactly the pixels it had when it was dropped.
  pixels = jnp.clip(jax.random.normal(rng, (batch, image_size, image_size, 3), jnp.float32),
                    datasets.PIXEL_MIN, datasets.PIXEL_MAX)
  keep_idx = jnp.broadcast_to(jnp.arange(num_patches, dtype=jnp.int32), (batch, num_patches))
  return InversionState(pixels=pixels, opt_state=_adam(cfg).init(pixels), keep_idx=keep_idx,
                        best_pixels=jnp.copy(pixels), best_ce=jnp.full((batch,), jnp.inf))


def make_inversion_step(model, cfg, image_size: int, rule: ensemble.Rule = ensemble.MEAN):
  """step(state, labels, client_params, weights, rng) -> (state, metrics); pure and jittable.
  `rule` combines the teachers (ensemble.combine)."""
  patch, tx = model.patch_size, _adam(cfg)
  num_patches = (image_size // patch) ** 2

  def loss_fn(pixels, keep_idx, labels, client_params, weights, rng):
    augmented, positions = patches.random_roll_flip(rng, pixels, keep_idx, patch_size=patch,
                                                    max_shift=cfg.jitter_patches, flip=cfg.flip)
    out = ensemble.ensemble_outputs(model, client_params, weights, augmented, keep_idx=positions,
                                    mode=cfg.teachers_mode, rule=rule, target_space=cfg.target_space)
    ce = -jnp.take_along_axis(out["log_probs"], labels[:, None], axis=1)[:, 0]
    loss = ce.mean() + cfg.tv_weight * tv_l2(pixels) + cfg.l2_weight * jnp.mean(pixels ** 2)
    return loss, ce

  def step(state: InversionState, labels, client_params, weights, rng):
    (loss, ce), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.pixels, state.keep_idx, labels, client_params, weights, rng)
    # The loss was measured on the current pixels: keep them if they are this image's best so far.
    better = ce < state.best_ce
    best_pixels = jnp.where(better[:, None, None, None], state.pixels, state.best_pixels)
    best_ce = jnp.where(better, ce, state.best_ce)
    updates, opt_state = tx.update(grads, state.opt_state, state.pixels)
    # Frozen (dropped) patches: Adam's momentum would still move them, so mask the update.
    frozen = patches.patch_pixel_mask(patches.index_to_mask(state.keep_idx, num_patches), image_size, patch)
    pixels = jnp.clip(state.pixels + updates * frozen, datasets.PIXEL_MIN, datasets.PIXEL_MAX)
    new = state.replace(pixels=pixels, opt_state=opt_state, best_pixels=best_pixels, best_ce=best_ce)
    return new, {"loss": loss, "ce": ce.mean()}

  return step


def make_inversion_loop(model, cfg, image_size: int, rule: ensemble.Rule = ensemble.MEAN):
  """loop(state, labels, client_params, weights, rng, start, stop, first_bad) -> (state, metrics,
  first_bad): iterations start..stop-1 of one stage (a fixed token count) in one lax.fori_loop.
  Iteration `it` draws its augmentation from fold_in(rng, it), as the per-step loop did, and
  `first_bad` (guards.first_bad_step) records the first iteration whose loss was not finite.
  `metrics` are the last iteration's. start/stop are traced: one compilation per token count."""
  step = make_inversion_step(model, cfg, image_size, rule)

  def loop(state: InversionState, labels, client_params, weights, rng, start, stop, first_bad):
    def body(it, carry):
      state, _, first_bad = carry
      state, metrics = step(state, labels, client_params, weights, jax.random.fold_in(rng, it))
      return state, metrics, guards.first_bad_step(first_bad, it + 1, metrics["loss"])

    no_metrics = {"loss": jnp.zeros((), jnp.float32), "ce": jnp.zeros((), jnp.float32)}
    return jax.lax.fori_loop(start, stop, body, (state, no_metrics, first_bad))

  return loop


def make_prune(model, cfg, rule: ensemble.Rule = ensemble.MEAN):
  """prune(pixels, keep_idx, client_params, weights, n_keep) -> the top-n_keep of keep_idx by
  ensemble CLS attention, sorted by position."""

  return jax.jit(make_prune_fn(model, cfg, rule), static_argnums=4)


def make_prune_fn(model, cfg, rule: ensemble.Rule = ensemble.MEAN):
  """make_prune's function, not jitted (the grouped inverter vmaps it)."""

  def prune(pixels, keep_idx, client_params, weights, n_keep):
    out = ensemble.ensemble_outputs(model, client_params, weights, pixels, keep_idx=keep_idx,
                                    mode=cfg.teachers_mode, need_attention=True, rule=rule)
    _, top = jax.lax.top_k(out["cls_attention"], n_keep)
    return jnp.sort(jnp.take_along_axis(keep_idx, top, axis=1), axis=1)

  return prune


def make_soft_labels(model, cfg, rule: ensemble.Rule = ensemble.MEAN):
  """Final ensemble outputs on whole images: per-teacher image logits (combined later, by the
  distillation loss) and the combined per-token probs."""
  return jax.jit(make_soft_labels_fn(model, cfg, rule))


def make_soft_labels_fn(model, cfg, rule: ensemble.Rule = ensemble.MEAN):
  """make_soft_labels' function, not jitted (the grouped inverter vmaps it)."""

  def soft_labels(pixels, client_params, weights):
    logits, out = ensemble.per_teacher(model, client_params, pixels, None, False, cfg.teachers_mode)
    token_probs = ensemble.combine(jax.nn.softmax(out["token_logits"], -1), rule, space="prob",
                                   weights=ensemble.weights_on_inputs(rule, weights, logits))
    return jnp.swapaxes(logits, 0, 1), token_probs  # [B, K, C], [B, N, C]

  return soft_labels


def balanced_labels(rng_seed: int, batch: int, num_classes: int) -> np.ndarray:
  """Class-balanced targets: each class equally often (up to one), in a seeded order."""
  labels = np.arange(batch) % num_classes
  return np.random.default_rng(rng_seed).permutation(labels).astype(np.int32)


class Inverter:
  """The jitted pieces of one inversion setup, compiled once and reused for every batch
  (one compilation per token count). The `group_*` pieces run G batches at once
  (`synthesize_group`): the same functions vmapped over a leading batch-number axis; jit compiles
  them lazily, so a run that never groups never compiles them."""

  def __init__(self, model, cfg, image_size: int, rule: ensemble.Rule = ensemble.MEAN):
    self.model, self.cfg, self.image_size = model, cfg, image_size
    self.loop = jax.jit(make_inversion_loop(model, cfg, image_size, rule), donate_argnums=0)
    self.prune = make_prune(model, cfg, rule)
    self.soft_labels = make_soft_labels(model, cfg, rule)
    # Per batch: state, labels, rng, first_bad; shared: client_params, weights, start, stop.
    self.group_loop = jax.jit(jax.vmap(make_inversion_loop(model, cfg, image_size, rule),
                                       in_axes=(0, 0, None, None, 0, None, None, 0)), donate_argnums=0)
    prune_fn = make_prune_fn(model, cfg, rule)
    self.group_prune = jax.jit(lambda pixels, keep_idx, client_params, weights, n_keep: jax.vmap(
        lambda p, k: prune_fn(p, k, client_params, weights, n_keep))(pixels, keep_idx), static_argnums=4)
    self.group_soft_labels = jax.jit(jax.vmap(make_soft_labels_fn(model, cfg, rule), in_axes=(0, None, None)))


def synthesize_batch(inverter: Inverter, client_params, weights, labels, rng, *, sparse: bool,
                     stage_name: str, shard=lambda x: x):
  """Inverts one batch. Returns numpy arrays: images, labels, masks [B, N] (kept patches),
  teacher_logits [B, K, C], token_probs [B, N, C], plus the seconds spent and tokens per stage."""
  model, cfg, image_size = inverter.model, inverter.cfg, inverter.image_size
  num_patches = (image_size // model.patch_size) ** 2
  state = jax.tree.map(shard, init_state(cfg, rng, len(labels), image_size, num_patches))
  pieces = (inverter.loop, inverter.prune, inverter.soft_labels,
            lambda keep_idx: patches.index_to_mask(keep_idx, num_patches))
  return _invert(inverter, pieces, state, shard(jnp.asarray(labels)), rng, client_params, weights,
                 sparse=sparse, stage_name=stage_name, first_bad=shard(jnp.array(-1, jnp.int32)),
                 images=len(labels))


def synthesize_group(inverter: Inverter, client_params, weights, labels, rngs, *, sparse: bool,
                     stage_name: str, shard=lambda x: x):
  """Inverts G batches at once: `labels` [G, B], `rngs` G keys, one per batch. Batch g is inverted
  exactly as `synthesize_batch(..., labels[g], rngs[g])` would (its own targets, initial pixels and
  augmentation stream), up to float rounding. `shard` places [G, ...] arrays (batch-number axis
  first). Returns synthesize_batch's arrays with a leading G axis, and the group's facts."""
  model, cfg, image_size = inverter.model, inverter.cfg, inverter.image_size
  num_patches = (image_size // model.patch_size) ** 2
  labels = np.asarray(labels)
  # Each batch's initial state built alone, then stacked: the same initial pixels as run alone.
  states = [init_state(cfg, rng, labels.shape[1], image_size, num_patches) for rng in rngs]
  state = jax.tree.map(lambda *xs: shard(jnp.stack(xs)), *states)
  pieces = (inverter.group_loop, inverter.group_prune, inverter.group_soft_labels,
            jax.vmap(lambda keep_idx: patches.index_to_mask(keep_idx, num_patches)))
  return _invert(inverter, pieces, state, shard(jnp.asarray(labels)), jnp.stack(rngs), client_params,
                 weights, sparse=sparse, stage_name=stage_name,
                 first_bad=shard(jnp.full((len(labels),), -1, jnp.int32)), images=labels.size)


def _batches_mean(x):
  """A group logs the mean over its batches; one batch logs its own value."""
  return jnp.mean(x) if jnp.ndim(x) else x


def _invert(inverter, pieces, state, labels, rng, client_params, weights, *, sparse, stage_name,
            first_bad, images):
  """The stages between stops of one batch (or a group of them: `pieces` vmapped, every array with
  a leading batch-number axis). `pieces` = (loop, prune, soft_labels, index_to_mask)."""
  model, cfg, image_size = inverter.model, inverter.cfg, inverter.image_size
  loop, prune, soft_labels, index_to_mask = pieces
  num_patches = (image_size // model.patch_size) ** 2
  stops = active_stops(cfg, sparse)
  counts = keep_counts(num_patches, len(stops), cfg.drop_ratio)
  progress = Progress(stage_name, cfg.iterations, images)
  guard = guards.FiniteGuard(stage_name, "inversion.lr")
  # Placed like the loop's output, so the first chunk does not compile the loop a second time.
  guard.first_bad = first_bad
  bounds = [0] + stops + [cfg.iterations]
  for stage, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
    if stage > 0:  # a stop: rank with the current pixels, keep the top, restart the best iterate
      keep = prune(state.pixels, state.keep_idx, client_params, weights, counts[stage])
      state = state.replace(keep_idx=keep, best_pixels=jnp.copy(state.pixels),
                            best_ce=jnp.full_like(state.best_ce, jnp.inf))
    for first, end in chunks(start, stop, cfg.log_every):
      state, metrics, guard.first_bad = loop(state, labels, client_params, weights, rng, first, end,
                                             guard.first_bad)
      progress.step_done(end)  # the first chunk paid the compilation: rates count from its end
      if end % cfg.log_every == 0 or end == cfg.iterations:
        progress.report(end, loss=_batches_mean(metrics["loss"]), ce=_batches_mean(metrics["ce"]),
                        tokens=counts[stage])
  if jnp.ndim(guard.first_bad):  # a group: the earliest bad step of any of its batches
    bad = guard.first_bad
    guard.first_bad = jnp.min(jnp.where(bad < 0, jnp.iinfo(jnp.int32).max, bad))
    guard.first_bad = jnp.where(guard.first_bad == jnp.iinfo(jnp.int32).max, -1, guard.first_bad)
  guard.check()  # the bank is saved per batch: a NaN batch never joins it
  # The best iterate of the last stage (dropped patches are identical across its iterates).
  final = state.best_pixels
  keep_idx = state.keep_idx
  if not sparse and cfg.dense_mask == "attention":
    # Dense inversion has no stops; for token relabel, rank its final image the same way.
    for n_keep in keep_counts(num_patches, len(active_stops(cfg, True)), cfg.drop_ratio)[1:]:
      keep_idx = prune(final, keep_idx, client_params, weights, n_keep)
  teacher_logits, token_probs = soft_labels(final, client_params, weights)
  jax.block_until_ready(token_probs)
  return {  # to_host: the whole batch on every process in multi-process runs
      "images": sharding.to_host(final), "labels": sharding.to_host(labels),
      "masks": sharding.to_host(index_to_mask(keep_idx)),
      "teacher_logits": sharding.to_host(teacher_logits), "token_probs": sharding.to_host(token_probs),
  }, {"seconds": progress.elapsed(), "tokens_per_stage": counts}
