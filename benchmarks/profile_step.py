r"""Where the distillation step's time goes: a jax.profiler trace, summed by XLA op kind.

  python benchmarks/profile_step.py [--variant Mi/4] [--steps 5]

Traces `--steps` steps of the jitted distillation step (batch 128, as benchmarks/run.py), reads
the Perfetto trace the profiler writes, and prints one JSON line per op kind (an XLA op name with
its numeric suffix removed: `dot`, `wrapped_reduce-window`, `copy_bitcast_fusion`, ...) with its
milliseconds per step and share of the summed op time, then a table. The sum can differ from the
wall time of a step: ops overlap on the two cores, and dispatch is not an op.
"""
import argparse
import collections
import glob
import gzip
import json
import pathlib
import re
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import run as bench  # noqa: E402
from fedmitr_jax import config_base  # noqa: E402
from fedmitr_jax.models import vit  # noqa: E402
from fedmitr_jax.server import distill


def op_times_by_kind(trace_dir, steps):
  path = glob.glob(f"{trace_dir}/**/*perfetto_trace.json.gz", recursive=True)[0]
  trace = json.load(gzip.open(path))
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  by_kind = collections.Counter()
  for event in events:
    name = event.get("name", "")
    # Skip Python frames ($...), the executor's own spans and the jit dispatch: ops only.
    if event.get("ph") != "X" or "dur" not in event or name.startswith("$") or "Execute" in name \
        or "PjitFunction" in name:
      continue
    by_kind[re.sub(r"[._]\d+$", "", name)] += event["dur"] / 1e3 / steps  # ms per step
  return by_kind


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="Mi/4")
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()
  model = vit.build_vit(args.variant, bench.CLASSES, image_size=bench.IMAGE, separate_token_head=True)
  params = vit.init_params(model, jax.random.key(0), bench.IMAGE)
  cfg = config_base.base_config().distill
  tx = distill.make_optimizer(cfg, 1000)
  state = distill.StudentState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))
  step = jax.jit(distill.make_distill_step(model, tx, cfg))
  batch = bench.distill_batch(vit.num_patches(args.variant, bench.IMAGE))
  for _ in range(3):
    jax.block_until_ready(step(state, batch, jax.random.key(0)))
  start = time.perf_counter()
  for _ in range(args.steps):
    jax.block_until_ready(step(state, batch, jax.random.key(0)))
  wall_ms = (time.perf_counter() - start) / args.steps * 1e3
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(args.steps):
        jax.block_until_ready(step(state, batch, jax.random.key(0)))
    by_kind = op_times_by_kind(trace_dir, args.steps)
  total = sum(by_kind.values())
  print(json.dumps({"model": args.variant, "step_wall_ms": round(wall_ms, 1), "op_sum_ms": round(total, 1)}))
  for kind, ms in by_kind.most_common(15):
    print(json.dumps({"kind": kind, "ms_per_step": round(ms, 2), "share": round(ms / total, 3)}))
  print(f"\n| op kind ({args.variant} distillation step) | ms/step | share |\n|---|---|---|")
  for kind, ms in by_kind.most_common(15):
    print(f"| {kind} | {ms:.1f} | {100 * ms / total:.0f}% |")


if __name__ == "__main__":
  main()
