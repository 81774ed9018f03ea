"""Stage 3 runner: builds a synthetic bank (several inverted batches) on disk, resumably.

Every finished batch is saved on its own (progress step b + 1 holds batch b only, so a save
writes one batch, not the bank so far), and a killed synthesis reloads the saved batches and
resumes at the next one. Each batch has its own seeded targets and initial pixels (fold_in of the
batch number), so a resumed bank equals an uninterrupted one.

`inversion.parallel_batches` = G > 1 inverts G batches at once (`inversion.synthesize_group`) on
a ('batches', 'data') mesh, each batch split over D / G devices; every batch keeps its own seeds, so
the bank is G = 1's up to float rounding, and each batch still has its own save.

The images and soft targets (REAL_KEYS) are stored in `inversion.bank_dtype`: the inversion runs
in float32 and each finished batch is rounded once, before it is saved, so the saved batches, the
finished bank and the arrays distillation puts on the devices are the same values.
"""

import jax
import jax.numpy as jnp
import numpy as np

from fedmitr_jax import checkpoints, sharding
from fedmitr_jax.progress import log
from fedmitr_jax.server import inversion

BANK_KEYS = ("images", "labels", "masks", "teacher_logits", "token_probs")
REAL_KEYS = ("images", "teacher_logits", "token_probs")  # held in bank_dtype; labels, masks exact


def bank_dtype(cfg) -> np.dtype:
  """numpy dtype of the bank's REAL_KEYS for `inversion.bank_dtype` (bfloat16: ml_dtypes')."""
  return np.dtype(jnp.bfloat16 if cfg.bank_dtype == "bfloat16" else np.float32)


def bank_shapes(cfg, num_patches: int, num_classes: int, num_teachers: int, image_size: int) -> dict:
  """{key: (shape, dtype)} of a bank of cfg.num_batches x cfg.batch_size images."""
  n, real = cfg.num_batches * cfg.batch_size, bank_dtype(cfg)
  return {"images": ((n, image_size, image_size, 3), real), "labels": ((n,), np.dtype(np.int32)),
          "masks": ((n, num_patches), np.dtype(bool)),
          "teacher_logits": ((n, num_teachers, num_classes), real),
          "token_probs": ((n, num_patches, num_classes), real)}


def _empty_bank(cfg, model, num_classes, num_teachers, image_size):
  num_patches = (image_size // model.patch_size) ** 2
  shapes = bank_shapes(cfg, num_patches, num_classes, num_teachers, image_size)
  return {**{key: np.zeros(shape, dtype) for key, (shape, dtype) in shapes.items()},
          "batches_done": np.zeros((), np.int32)}


def saved_batches(manager) -> int:
  """How many batches, from the first, have a complete save (a kill mid-save leaves only an
  unfinished temporary folder, which Orbax does not list)."""
  steps, done = set(manager.all_steps()), 0
  while done + 1 in steps:
    done += 1
  return done


def build_bank(name: str, inverter: inversion.Inverter, client_params, weights, *, num_classes,
               seed, sparse: bool, store):
  """Returns (bank dict of numpy arrays, facts). `name` is the stage name ('inversion_sparse').
  One `inverter` serves both banks, so the dense-shaped steps they share compile once."""
  model, cfg, image_size = inverter.model, inverter.cfg, inverter.image_size
  num_teachers = len(weights)
  template = _empty_bank(cfg, model, num_classes, num_teachers, image_size)
  if store.is_done(name):
    log(f"[{name}] loaded from checkpoint")
    return store.load_result(name, checkpoints.abstract_like(template)), store.load_facts(name)
  groups = cfg.parallel_batches
  if groups == 1:
    mesh = sharding.data_mesh()
    shard = sharding.batch_sharder(mesh, cfg.batch_size, "inversion.batch_size")
  else:
    mesh = sharding.group_mesh(groups)
    shard = sharding.group_sharder(mesh)
  client_params = sharding.replicate(mesh, client_params)
  weights = sharding.replicate(mesh, np.asarray(weights, np.float32))
  base_rng = jax.random.fold_in(jax.random.key(seed), 3)  # stream 3: synthesis
  bank, rows_of = template, lambda b: slice(b * cfg.batch_size, (b + 1) * cfg.batch_size)
  batch_template = checkpoints.abstract_like({key: bank[key][rows_of(0)] for key in BANK_KEYS})
  # Same seeds for the dense and sparse banks: they differ only by the stops.
  labels_of = lambda b: inversion.balanced_labels(seed * 100_003 + b, cfg.batch_size, num_classes)
  with store.progress_manager(name, max_to_keep=None) as manager:  # every batch's save is kept
    done = saved_batches(manager)
    for b in range(done):
      saved = checkpoints.restore(manager, b + 1, batch_template)
      for key in BANK_KEYS:
        bank[key][rows_of(b)] = np.asarray(saved[key])
    bank["batches_done"] = np.int32(done)
    seconds = []
    if done:
      log(f"[{name}] resuming after {done}/{cfg.num_batches} batches")

    def keep(b, out, batch_seconds):  # batch b's arrays into the bank and its own save (step b + 1)
      out = {key: np.asarray(out[key], bank[key].dtype) for key in BANK_KEYS}  # rounded once, here
      for key in BANK_KEYS:
        bank[key][rows_of(b)] = out[key]
      bank["batches_done"] = np.int32(b + 1)
      seconds.append(batch_seconds)
      manager.save(b + 1, args=checkpoints.standard_save(out))
      # A batch takes seconds to minutes; waiting for its save to land costs nothing and means a
      # kill at any later point resumes after this batch.
      manager.wait_until_finished()

    # A group starts at a multiple of G: a kill between two saves of one group redoes that group,
    # and only its unsaved batches are kept (the saved ones stay as loaded).
    for first in range(done // groups * groups, cfg.num_batches, groups):
      if groups == 1:
        out, facts = inversion.synthesize_batch(
            inverter, client_params, weights, labels_of(first), jax.random.fold_in(base_rng, first),
            sparse=sparse, stage_name=f"{name} {first + 1}/{cfg.num_batches}", shard=shard)
        keep(first, out, facts["seconds"])
        continue
      batches = range(first, first + groups)
      out, facts = inversion.synthesize_group(
          inverter, client_params, weights, np.stack([labels_of(b) for b in batches]),
          [jax.random.fold_in(base_rng, b) for b in batches], sparse=sparse,
          stage_name=f"{name} {first + 1}-{first + groups}/{cfg.num_batches}", shard=shard)
      for g, b in enumerate(batches):
        if b >= done:  # a group's batches ran together: each is credited an equal share of its time
          keep(b, {key: out[key][g] for key in BANK_KEYS}, facts["seconds"] / groups)
    manager.wait_until_finished()
  facts = {"seconds": float(sum(seconds)), "seconds_per_batch": seconds,
           "tokens_per_stage": inversion.keep_counts(template["masks"].shape[1],
                                                     len(inversion.active_stops(cfg, sparse)), cfg.drop_ratio),
           "iterations": cfg.iterations, "images": int(len(bank["labels"])),
           "mean_kept_fraction": float(bank["masks"].mean()),
           "devices": mesh.size,  # the bank was made on this many devices (all processes')
           "parallel_batches": groups}
  store.save_result(name, bank, facts)
  log(f"[{name}] {facts['images']} images in {facts['seconds']:.1f} s, tokens per stage "
      f"{facts['tokens_per_stage']}")
  return bank, facts
