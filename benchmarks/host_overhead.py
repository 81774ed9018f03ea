r"""Share of each hot loop's wall time spent outside compiled computation, at the default job's shapes.

  python benchmarks/host_overhead.py [--repeats 3] [--loops inversion,distillation,clients]

For inversion (one sparse batch, synthesize_batch), distillation (train_student) and client
training (train_clients_vmap), each run through the package's own runner after a warm-up that
absorbs compilation, against the same number of steps inside one compiled lax.fori_loop on a
fixed batch (no host work at all: the compute floor):
  host_share = 1 - floor / wall
It counts everything the runner does besides the steps: Python per iteration, dispatches,
host gathers and transfers, logging syncs, and (inversion) the prunes and the final soft labels,
which are a few forward passes out of 100 iterations. Only public runner signatures are used,
so the same file measures an older checkout of the package (put it in that checkout's benchmarks/).
Shapes: the default job's (configs/cifar10_cpu.py): Mu/4 at 32 px, 5 teachers/clients, batch 64,
10 classes, 100 inversion iterations with stops 10/20/30/40, 80 distillation steps on a
256-image bank, 30 client steps.
"""
import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fedmitr_jax import config_base  # noqa: E402
from fedmitr_jax.client import training  # noqa: E402
from fedmitr_jax.models import vit  # noqa: E402
from fedmitr_jax.server import distill, inversion  # noqa: E402

VARIANT, IMAGE, CLASSES, K, BATCH = "Mu/4", 32, 10, 5, 64


def timed(fn):
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def compiled_floor(step, carry, steps):
  """Seconds of `steps` calls of step(carry, t) -> carry inside one compiled fori_loop."""
  loop = jax.jit(lambda c, n: jax.lax.fori_loop(0, n, lambda t, c: step(c, t), c))
  jax.block_until_ready(loop(carry, 1))  # compile (n is traced: one compilation)
  return timed(lambda: loop(carry, steps))


def inversion_share():
  model = vit.build_vit(VARIANT, CLASSES, image_size=IMAGE)
  keys = jax.random.split(jax.random.key(0), K)
  teachers = jax.vmap(lambda k: vit.init_params(model, k, IMAGE))(keys)
  teachers = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(1), p.shape), teachers)
  weights = jnp.full((K,), 1.0 / K)
  cfg = config_base.base_config().inversion
  cfg.batch_size, cfg.log_every = BATCH, 25
  inverter = inversion.Inverter(model, cfg, IMAGE)
  labels = inversion.balanced_labels(0, BATCH, CLASSES)
  run = lambda seed: inversion.synthesize_batch(inverter, teachers, weights, labels, jax.random.key(seed),
                                                sparse=True, stage_name="bench")[0]["images"]
  run(0)  # compiles every stage
  wall = timed(lambda: run(1))
  step = inversion.make_inversion_step(model, cfg, IMAGE)
  num_patches = vit.num_patches(VARIANT, IMAGE)
  counts = inversion.keep_counts(num_patches, len(cfg.stops), cfg.drop_ratio)
  bounds = [0, *cfg.stops, cfg.iterations]
  floor = 0.0
  for n, a, b in zip(counts, bounds[:-1], bounds[1:]):
    state = inversion.init_state(cfg, jax.random.key(2), BATCH, IMAGE, num_patches)
    state = state.replace(keep_idx=state.keep_idx[:, :n])
    floor += compiled_floor(
        lambda s, t: step(s, jnp.asarray(labels), teachers, weights, jax.random.fold_in(jax.random.key(3), t))[0],
        state, b - a)
  return wall, floor


def distill_share():
  model = vit.build_vit(VARIANT, CLASSES, image_size=IMAGE, separate_token_head=True)
  params = vit.init_params(model, jax.random.key(0), IMAGE)
  n, patches_n = 256, vit.num_patches(VARIANT, IMAGE)
  r = np.random.default_rng(0)
  bank = {"images": r.uniform(-1, 1, (n, IMAGE, IMAGE, 3)).astype(np.float32),
          "labels": r.integers(0, CLASSES, n).astype(np.int32), "masks": r.random((n, patches_n)) < 0.25,
          "teacher_logits": r.normal(size=(n, K, CLASSES)).astype(np.float32),
          "token_probs": r.dirichlet(np.ones(CLASSES), (n, patches_n)).astype(np.float32)}
  cfg = config_base.base_config().distill
  cfg.epochs, cfg.batch_size = 20.0, BATCH
  run = lambda: distill.train_student(model, cfg, bank, params, seed=0, stage="bench")[0]
  run()  # compiles
  wall = timed(run)
  total = distill.plan_steps(n, BATCH, cfg.epochs)
  tx = distill.make_optimizer(cfg, total)
  step = distill.make_distill_step(model, tx, cfg)
  state = distill.StudentState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))
  batch = {k: jnp.asarray(v[:BATCH]) for k, v in bank.items()}
  floor = compiled_floor(lambda s, t: step(s, batch, jax.random.fold_in(jax.random.key(1), t))[0], state, total)
  return wall, floor


def clients_share(steps=30):
  model = vit.build_vit(VARIANT, CLASSES, image_size=IMAGE)
  cfg = config_base.base_config().clients
  tx = training.make_optimizer(cfg)
  init = vit.init_params(model, jax.random.key(0), IMAGE)
  r = np.random.default_rng(0)
  size = K * steps * BATCH
  images = r.integers(0, 256, (size, IMAGE, IMAGE, 3), dtype=np.uint8)
  labels = r.integers(0, CLASSES, size).astype(np.int32)
  parts = np.split(np.arange(size), K)
  plan = training.plan_batches(parts, BATCH, 1.0, seed=0)  # `steps` full steps per client
  step = training.make_client_train_step(model, tx, cfg)
  rngs = training.client_rngs(0, K)
  fresh = lambda: training.stack_copies(training.init_client_state(init, tx), K)
  run = lambda p: training.train_clients_vmap(step, fresh(), images, labels, p, rngs, log_every=50)
  run(training.BatchPlan(index=plan.index[:, :1], mask=plan.mask[:, :1], steps=np.ones(K, int)))  # compiles
  wall = timed(lambda: run(plan))
  vstep = jax.vmap(step)
  idx = plan.index[:, 0]
  args = (jnp.asarray(images[idx]), jnp.asarray(labels[idx]), jnp.asarray(plan.mask[:, 0]),
          jnp.asarray(plan.steps, jnp.int32))
  floor = compiled_floor(lambda s, t: vstep(s, *args, jax.vmap(jax.random.fold_in, (0, None))(rngs, t))[0],
                         fresh(), steps)
  return wall, floor


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=3, help="best of this many measurements per loop")
  parser.add_argument("--loops", default="inversion,distillation,clients", help="which loops to measure")
  args = parser.parse_args()
  measures = {"inversion": inversion_share, "distillation": distill_share, "clients": clients_share}
  for name in args.loops.split(","):
    measure = measures[name]
    runs = [measure() for _ in range(args.repeats)]
    shares = [1 - floor / wall for wall, floor in runs]
    best = int(np.argmin(shares))
    print(json.dumps({"figure": f"host_share_{name}", "value": round(shares[best], 4),
                      "wall_s": round(runs[best][0], 2), "compiled_floor_s": round(runs[best][1], 2),
                      "all": [round(s, 4) for s in shares]}), flush=True)


if __name__ == "__main__":
  main()
