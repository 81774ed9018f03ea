r"""What a robust ensemble rule and screening cost in time, on the default job's shapes.

  python benchmarks/ensemble_rules.py --repeats 8    # K = 5 and 10 teachers, ~7 min on a 2-core CPU
  python benchmarks/ensemble_rules.py --clients 5 --rules median

One JSON line per figure. For each K: the bank's inversion step (`inversion.make_inversion_step`,
the default job's ViT Mu/4, 64 images of 32 px) with the teachers combined by each
`eval.ensemble_rule`, at every patch-token count the default schedule visits (64 -> 44 -> 30 ->
21 -> 14), and each rule's time over the mean's over a whole sparse bank (> 1 is slower). The
rules are timed in turn, one call each per round, and each takes its median over the rounds, so a
machine that slows down mid-run slows every rule alike. The mean is timed twice, as two separate
compilations (`mean_again`): that ratio is the control, the measurement noise. `agreement` adds
the agreement of the batch's own softmaxes (O(K B C) arithmetic per step). Robust rules also guard each
teacher's input gradient (`ensemble.finite_input_grad`), which is part of what is measured. Then
screening, once per run (`pipeline.run_screening`: the probe predictions and the parameter
distances), in seconds (compilation included) and as a share of the sparse
bank's inversion (4 batches x 100 iterations, the default job's).
"""
import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import run as bench  # noqa: E402  (benchmarks/run.py: timing helpers, teachers)
import jax  # noqa: E402
import numpy as np  # noqa: E402

from fedmitr_jax import config_base, pipeline  # noqa: E402
from fedmitr_jax.models import vit  # noqa: E402
from fedmitr_jax.server import ensemble, inversion  # noqa: E402

RULES = ("mean", "median", "trimmed_mean", "agreement")
CONTROL_SUFFIX = "_again"


def screening_seconds(model, teachers, cfg) -> float:
  """Wall time of the server's screening (`pipeline.run_screening`), compilation included: it runs
  once per server run."""
  start = time.perf_counter()
  pipeline.run_screening(cfg, model, teachers, [1] * jax.tree.leaves(teachers)[0].shape[0])
  return time.perf_counter() - start


def interleaved_seconds(calls: dict, repeats: int) -> dict:
  """{name: median seconds} of `calls` ({name: (jitted fn, args)}), timed one call each per round."""
  for fn, args in calls.values():
    for _ in range(2):  # compile, then warm
      jax.block_until_ready(fn(*args))
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, (fn, args) in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--clients", type=int, nargs="+", default=[5, 10])
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--variant", default="Mu/4", help="the default job's ViT (configs/cifar10_cpu.py)")
  parser.add_argument("--batch", type=int, default=64, help="images per inversion batch (the default job's)")
  parser.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES, help="mean is always timed")
  args = parser.parse_args()
  rules = ["mean"] + [r for r in args.rules if r != "mean"]
  timed = rules + ["mean" + CONTROL_SUFFIX]  # the control: the mean again, compiled on its own
  cfg = config_base.base_config()
  variant, batch, iterations, batches = args.variant, args.batch, cfg.inversion.iterations, 4  # cifar10_cpu.py
  bench.IMAGE, bench.BATCH = cfg.dataset.image_size, batch
  counts = inversion.keep_counts(vit.num_patches(variant, bench.IMAGE), len(cfg.inversion.stops),
                                 cfg.inversion.drop_ratio)
  stop_iterations = [0, *cfg.inversion.stops, iterations]
  print(json.dumps({"devices": str(jax.devices()), "variant": variant, "batch": batch, "counts": counts}), flush=True)
  for num in args.clients:
    bench.TEACHERS = num
    model, teachers = bench.teachers_for(variant, num=num)
    seconds = {name: {} for name in timed}
    for n in counts:
      calls = {name: bench.inversion_step_call(model, teachers, n, rule=ensemble.Rule(
                   name.removesuffix(CONTROL_SUFFIX), float(cfg.eval.trim_fraction))) for name in timed}
      for name, t in interleaved_seconds(calls, args.repeats).items():
        seconds[name][n] = t
    for name in timed:
      print(json.dumps({"clients": num, "rule": name,
                        "step_ms": {n: round(1e3 * t, 2) for n, t in seconds[name].items()}}), flush=True)
    # A bank's inversion: each count runs between two stops.
    bank = {name: sum(s[n] * (stop_iterations[i + 1] - stop_iterations[i]) for i, n in enumerate(counts))
            for name, s in seconds.items()}
    for name in timed[1:]:
      bench.emit(f"{name}_over_mean_inversion_K{num}", bank[name] / bank["mean"],
                 how="sparse bank's inversion time, each step timed at its token count")
    screen = screening_seconds(model, teachers, cfg)
    bench.emit(f"screening_seconds_K{num}", screen, bank_seconds=round(batches * bank["mean"], 1),
               share_of_sparse_bank=round(screen / (batches * bank["mean"]), 4))


if __name__ == "__main__":
  main()
