r"""The inversion step at the paper's shapes on an accelerator: seconds per step at every token count of
SMI's schedule, the dense / sparse ratio they give, and the chip's measured bf16 matmul TFLOP/s.

  python benchmarks/inversion_step_paper.py            # ViT-Ti/16, 224 px, 128 images, 5 teachers, bf16

One JSON line per figure. The step is the bank's own (`inversion.make_inversion_step`, SMI's
prune schedule 196 -> 137 -> 95 -> 66 -> 46 patch tokens) with random-initialised teachers (their
weights do not change the time); each count compiles once, then the median of `--repeats` calls
is taken (compilation excluded; `benchmarks/run.py`'s `inversion_step_seconds`). The ratio
weights the per-count times by SMI's 4000-iteration schedule (`run.smi_weighted_speedup`); run.py
--only sparse_vs_dense gives the same figure at the CPU shapes (32 px, patch 4). The matmul
TFLOP/s is the measured peak that MFU figures of the same machine are read against.
"""
import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import run as bench  # noqa: E402  (benchmarks/run.py: timing helpers, teachers, SMI schedule)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from fedmitr_jax import config_base  # noqa: E402  (the teachers_mode choices)
from fedmitr_jax.models import vit  # noqa: E402
from fedmitr_jax.server import inversion  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="Ti/16")
  parser.add_argument("--image", type=int, default=224)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--teachers", type=int, default=5)
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--teachers_mode", default="loop", choices=config_base.CHOICES["inversion.teachers_mode"])
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--matmul", type=int, nargs="*", default=[8192, 16384], help="bf16 matmul sizes (none: skip)")
  args = parser.parse_args()
  print(json.dumps({"devices": str(jax.devices()), "jax": jax.__version__}), flush=True)
  for n in args.matmul:
    tflops = bench.jax_matmul_gflops(jnp.bfloat16, n=n, repeats=10) / 1e3
    print(json.dumps({"matmul_bf16_n": n, "tflop_per_s": round(tflops, 1)}), flush=True)

  # run.py's helpers read the shapes from its module globals
  bench.IMAGE, bench.BATCH, bench.TEACHERS = args.image, args.batch, args.teachers
  model, teachers = bench.teachers_for(args.variant, num=args.teachers, dtype=jnp.dtype(args.dtype))
  counts = inversion.keep_counts(vit.num_patches(args.variant, args.image), len(bench.SMI_STOPS), 0.3)
  seconds = {}
  for n in [counts[0], counts[-1], *counts[1:-1]]:  # the two ends first: the ratio's extremes
    start = time.time()
    seconds[n], _ = bench.inversion_step_seconds(model, teachers, n, args.repeats, mode=args.teachers_mode,
                                                 flops=False)  # FLOPs: the dry run's
    print(json.dumps({"tokens": n, "step_s": round(seconds[n], 5),
                      "with_compile_s": round(time.time() - start, 1)}), flush=True)
  print(json.dumps({"counts": counts, "smi_weighted_dense_over_sparse":
                    round(bench.smi_weighted_speedup(seconds, counts), 3)}), flush=True)


if __name__ == "__main__":
  main()
