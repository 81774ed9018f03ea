r"""One inversion step over K teachers: vmap over the stacked teachers vs a loop unrolled in jit.

  python benchmarks/teachers_vmap_vs_loop.py [--variant Mu/4] [--teachers 5] [--batch 64]

Times the jitted step (compilation excluded, median of --repeats) for dense (all tokens) and for
the last sparse stage of SMI's schedule; prints one JSON line per figure.
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

from fedmitr_jax import config_base, inversion  # noqa: E402
from fedmitr_jax.models import vit  # noqa: E402


def time_step(model, cfg, teachers, weights, batch, image_size, tokens, repeats):
  step = jax.jit(inversion.make_inversion_step(model, cfg, image_size))
  num_patches = (image_size // model.patch_size) ** 2
  state = inversion.init_state(cfg, jax.random.key(0), batch, image_size, num_patches)
  state = state.replace(keep_idx=state.keep_idx[:, :tokens])
  labels = jnp.asarray(inversion.balanced_labels(0, batch, 10))
  state, _ = step(state, labels, teachers, weights, jax.random.key(0))  # compile
  jax.block_until_ready(state)
  times = []
  for r in range(repeats):
    start = time.perf_counter()
    state, m = step(state, labels, teachers, weights, jax.random.key(r))
    jax.block_until_ready(m)
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--variant", default="Mu/4")
  parser.add_argument("--teachers", type=int, default=5)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--image-size", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  model = vit.build_vit(args.variant, 10, image_size=args.image_size)
  base = vit.init_params(model, jax.random.key(0), args.image_size)
  teachers = jax.tree.map(lambda p: jnp.stack([p] * args.teachers), base)
  weights = jnp.full((args.teachers,), 1.0 / args.teachers)
  num_patches = (args.image_size // model.patch_size) ** 2
  smallest = inversion.keep_counts(num_patches, 4, 0.3)[-1]
  for tokens in (num_patches, smallest):
    seconds = {}
    for mode in ("loop", "vmap"):
      cfg = config_base.base_config().inversion
      cfg.teachers_mode = mode
      seconds[mode] = time_step(model, cfg, teachers, weights, args.batch, args.image_size, tokens,
                                args.repeats)
      print(json.dumps({"figure": f"inversion_step_seconds_{mode}_{tokens}tokens",
                        "value": round(seconds[mode], 4)}))
    print(json.dumps({"figure": f"teachers_vmap_vs_loop_{tokens}tokens",
                      "value": round(seconds["loop"] / seconds["vmap"], 3),
                      "note": ">1 means vmap is faster"}))


if __name__ == "__main__":
  main()
