r"""Pretrains a client-sized ViT on formula-driven fractal images: no natural image is ever seen.

  python -m fedmitr_jax.pretrain --config configs/pretrain_fractal.py --workdir /tmp/pre \
      [--config.model.variant=Mi/4]

Every step renders a fresh batch (fedmitr_jax/data/fractal.py) and trains two heads at once: the
CLS head on the image's multi-hot class label (sigmoid BCE) and the token head on every patch's
exact label, one of the fractal classes or background (CE; token labeling with an exact annotator,
as SegRCDB). The head and token head are dropped; the encoder is written to W/backbone.npz, which
`--config.model.pretrained_path=W/backbone.npz` of the main pipeline loads for any class count.

Outputs: W/backbone.npz, W/pretrain.json (config, losses, wall time, render and train rates) and
W/fractal_samples.png. Resumable: a killed run restarts from its last save with identical results
(the batch of step t is a pure function of (seed, t), and the step has no other randomness).
"""
import pathlib

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from fedmitr_jax import checkpoints, config_base, guards, metrics
from fedmitr_jax.checkpoints import StageStore, write_json_atomic
from fedmitr_jax.client import training
from fedmitr_jax.data import datasets, fractal
from fedmitr_jax.models import pretrained, vit
from fedmitr_jax.progress import Progress, log
from fedmitr_jax.validate import InputError

STAGE = "pretrain"


def check_config(config) -> None:
  f, p = config.fractal, config.pretrain
  try:
    vit.build_vit(config.model.variant, 2, image_size=f.image_size)
    vit.compute_dtype(config.model.dtype)
  except ValueError as e:
    raise InputError(str(e)) from None
  optimizers = config_base.CHOICES["clients.optimizer"]
  checks = [
      (p.optimizer in optimizers, "pretrain.optimizer",
       f"'{p.optimizer}' is unknown; use one of {list(optimizers)}"),
      (f.num_classes >= 1, "fractal.num_classes", f"{f.num_classes} must be at least 1"),
      (f.max_instances >= 1, "fractal.max_instances", f"{f.max_instances} must be at least 1"),
      (f.points_per_class >= 64, "fractal.points_per_class", f"{f.points_per_class} is under 64"),
      (0 < f.scale[0] <= f.scale[1] <= 1, "fractal.scale", f"{tuple(f.scale)} is not 0 < low <= high <= 1"),
      (0 < f.patch_threshold <= 1, "fractal.patch_threshold", f"{f.patch_threshold} is not in (0, 1]"),
      (0 <= f.background_share[0] < f.background_share[1] <= 1, "fractal.background_share",
       f"{tuple(f.background_share)} is not 0 <= low < high <= 1"),
      (p.steps >= 1 and p.batch_size >= 1, "pretrain.steps", "steps and batch_size must be positive"),
      (p.lr > 0, "pretrain.lr", f"{p.lr} must be positive"),
      (p.checkpoint_every_steps >= 1 and p.log_every >= 1, "pretrain.checkpoint_every_steps",
       "checkpoint_every_steps and log_every must be positive"),
  ]
  for ok, field, what in checks:
    if not ok:
      raise InputError(f"{field}: {what}; fix the config")


# ---- model and step ------------------------------------------------------------------------------


def build_model(config):
  """Both heads get num_classes + 1 outputs (a ViT has one class count): the token head needs the
  background class; the CLS head's last output is unused. Neither head leaves this module."""
  return vit.build_vit(config.model.variant, config.fractal.num_classes + 1,
                       image_size=config.fractal.image_size, separate_token_head=True,
                       dtype=vit.compute_dtype(config.model.dtype))


def make_train_step(model, tx, config):
  """step(state, images_u8, tokens, labels) -> (state, metrics); pure, no randomness."""
  p, num_classes = config.pretrain, config.fractal.num_classes

  def loss_fn(params, images, tokens, labels):
    cls_logits, out = model.apply({"params": params}, images)
    image_loss = optax.sigmoid_binary_cross_entropy(cls_logits[:, :num_classes], labels).sum(-1).mean()
    token_loss = optax.softmax_cross_entropy_with_integer_labels(out["token_logits"], tokens).mean()
    loss = p.image_loss_weight * image_loss + p.token_loss_weight * token_loss
    hit = out["token_logits"].argmax(-1) == tokens
    foreground = tokens < num_classes
    metrics = {"loss": loss, "image_bce": image_loss, "token_ce": token_loss, "token_acc": hit.mean(),
               "fg_token_acc": (hit & foreground).sum() / jnp.maximum(foreground.sum(), 1)}
    return loss, metrics

  def step(state: training.ClientState, images_u8, tokens, labels):
    images = datasets.normalize(images_u8)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, images, tokens, labels)
    direction, opt_state = tx.update(grads, state.opt_state, state.params)
    lr = training.warmup_cosine_lr(p.lr, state.step, p.steps, p.warmup_fraction)
    params = jax.tree.map(lambda w, d: w - lr * d, state.params, direction)
    return training.ClientState(params=params, opt_state=opt_state, step=state.step + 1), metrics

  return step


# ---- the run -------------------------------------------------------------------------------------


class RenderClock:
  """Images rendered and seconds spent rendering (in whichever thread renders)."""

  def __init__(self, renderer, seed: int, batch_size: int):
    self.renderer, self.seed, self.batch_size = renderer, seed, batch_size
    self.images, self.seconds = 0, 0.0

  def __call__(self, step: int) -> dict:
    started = time.perf_counter()
    batch = self.renderer.batch(self.seed, step, self.batch_size)
    self.seconds += time.perf_counter() - started
    self.images += self.batch_size
    return batch

  def rate(self) -> float:
    return self.images / max(self.seconds, 1e-9)


def image_seed(seed: int) -> int:
  """The images' stream, apart from the class systems' (seed itself) and the model init."""
  return seed * 1000 + 7


def run(config, workdir) -> dict:
  workdir = epath.Path(workdir)  # a local folder or a bucket path (gs://...)
  store = StageStore(workdir)
  p = config.pretrain
  model = build_model(config)
  spec = fractal.FractalSpec.from_config(config.fractal, patch_size=model.patch_size, seed=config.seed)
  started = time.perf_counter()
  renderer = fractal.FractalRenderer(spec)
  log(f"[{STAGE}] {spec.num_classes} fractal classes drawn in {time.perf_counter() - started:.1f} s")
  init = vit.init_params(model, jax.random.fold_in(jax.random.key(config.seed), 1), spec.image_size)
  tx = training.make_optimizer(p)
  state = training.init_client_state(init, tx)
  clock = RenderClock(renderer, image_seed(config.seed), p.batch_size)

  if store.is_done(STAGE):
    log(f"[{STAGE}] loaded from checkpoint")
    params = store.load_result(STAGE, checkpoints.abstract_like(state.params))
    facts = store.load_facts(STAGE)
  else:
    with metrics.recording(workdir):  # progress reports -> W/metrics.jsonl, W/curves.png
      params, facts = _train(config, model, tx, state, clock, store)
  if jax.process_index() == 0:
    pretrained.save_backbone(params, workdir / "backbone.npz")
    save_samples(renderer, clock.seed, p.sample_images, workdir / "fractal_samples.png")
    write_json_atomic(workdir / "pretrain.json", {**facts, "config": config.to_dict()})
  log(f"[{STAGE}] backbone written to {workdir / 'backbone.npz'}")
  return facts


def _train(config, model, tx, state, clock, store):
  p = config.pretrain
  step_fn = jax.jit(make_train_step(model, tx, config), donate_argnums=0)
  guard = guards.FiniteGuard(STAGE, "pretrain.lr")
  started = time.perf_counter()
  with store.progress_manager(STAGE) as manager:
    start, saved = checkpoints.restore_latest(manager, checkpoints.abstract_like(state))
    if saved is not None:
      state = saved
      log(f"[{STAGE}] resuming at step {start}")
    source = fractal.Prefetcher(clock, start, p.steps, p.prefetch) if p.prefetch else None
    progress = Progress(STAGE, p.steps, p.batch_size, start_step=start)
    window, last = [], {}
    try:
      for t in range(start, p.steps):
        batch = source.get(t) if source else clock(t)
        state, step_metrics = step_fn(state, batch["images"], batch["tokens"], batch["labels"])
        progress.step_done()
        guard.update(t + 1, step_metrics["loss"])
        window.append(step_metrics)
        if (t + 1) % p.checkpoint_every_steps == 0 and t + 1 < p.steps:
          guard.check(manager.latest_step())  # never save a state that came from a NaN
          manager.save(t + 1, args=checkpoints.standard_save(state))
        if (t + 1) % p.log_every == 0 or t + 1 == p.steps:
          last = {k: float(np.mean([m[k] for m in jax.device_get(window)])) for k in window[0]}
          window = []
          progress.report(t + 1, **last, render_img_s=clock.rate())
    finally:
      if source:
        source.close()
    guard.check(manager.latest_step())
    manager.wait_until_finished()
  seconds = time.perf_counter() - started
  done = p.steps - start
  facts = {"steps": p.steps, "resumed_at": start, "batch_size": p.batch_size,
           "final": last, "seconds": seconds,
           "train_img_per_s": done * p.batch_size / max(seconds, 1e-9),
           "seconds_per_step": seconds / max(done, 1),
           "render_img_per_s": clock.rate(),
           "num_classes": config.fractal.num_classes, "variant": config.model.variant}
  store.save_result(STAGE, state.params, facts)
  log(f"[{STAGE}] done in {seconds / 60:.1f} min")
  return state.params, facts


# ---- pictures ------------------------------------------------------------------------------------


def save_samples(renderer, seed: int, count: int, path) -> None:
  """Training images (the first `count` of step 0), each beside its per-patch labels: one colour
  per class present, background left grey, patch grid drawn."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  spec = renderer.spec
  batch = renderer.batch(seed, 0, count)
  grid, p = spec.image_size // spec.patch_size, spec.patch_size
  palette = plt.get_cmap("tab20")
  cols = min(count, 8)
  rows = -(-count // cols)
  fig, axes = plt.subplots(2 * rows, cols, figsize=(cols * 1.3, rows * 2.7), squeeze=False)
  for ax in axes.ravel():
    ax.set_xticks([]), ax.set_yticks([])
    ax.axis("off")
  for i in range(count):
    r, c = 2 * (i // cols), i % cols
    image, tokens = batch["images"][i], batch["tokens"][i].reshape(grid, grid)
    axes[r, c].imshow(image)
    present = [k for k in np.unique(tokens) if k != spec.num_classes]
    colours = np.full((grid, grid, 3), 0.5)
    for j, k in enumerate(present):
      colours[tokens == k] = palette(j % 20)[:3]
    overlay = 0.45 * image / 255.0 + 0.55 * np.kron(colours, np.ones((p, p, 1)))
    axes[r + 1, c].imshow(overlay)
    for line in range(1, grid):
      axes[r + 1, c].axhline(line * p - 0.5, color="white", lw=0.2)
      axes[r + 1, c].axvline(line * p - 0.5, color="white", lw=0.2)
    axes[r, c].axis("on")
    axes[r + 1, c].axis("on")
    axes[r, c].set_title(" ".join(str(k) for k in present), fontsize=6)
  fig.suptitle(f"fractal images (class ids above) and their patch labels (grey: background), "
               f"{spec.num_classes} classes", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ---- entry point ---------------------------------------------------------------------------------
if __name__ == "__main__":
  # Flags are defined here, not at import, so tests can import this module next to others. The
  # process setup, one-line errors and exit codes (2 bad input, 3 NaN, 4 disk full) are main's
  # (entry.py).
  from absl import flags
  from ml_collections import config_flags

  from fedmitr_jax import entry
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Pretraining config file.", lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, the backbone and pictures go.")
  flags.mark_flags_as_required(["config", "workdir"])

  def _pretrain():
    check_config(_CONFIG.value)
    run(_CONFIG.value, _WORKDIR.value)

  entry.run(_pretrain, _WORKDIR)
