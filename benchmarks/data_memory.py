r"""Peak host memory of loading a config's dataset (the figures in docs/data.md).

  /usr/bin/time -v python benchmarks/data_memory.py [--config configs/paper_cifar10.py:data=shared] \
      [--cache_dir D] [--image_size N] [--read_all]

Loads both splits through datasets.load_dataset and prints the shapes, the time and the peak
resident set size (ru_maxrss); --read_all then reads every pixel once (a memory-mapped cache
counts only the pages read). A first run with an empty --cache_dir includes the decoding.
"""
import argparse
import importlib.util
import pathlib
import resource
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from fedmitr_jax.data import datasets  # noqa: E402


def peak_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/paper_cifar10.py:data=shared")
  parser.add_argument("--cache_dir", default="")
  parser.add_argument("--image_size", type=int, default=0, help="override dataset.image_size")
  parser.add_argument("--read_all", action="store_true")
  args = parser.parse_args()
  path, _, arg = args.config.partition(":")
  spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config(arg).dataset
  cfg.cache_dir = args.cache_dir or cfg.cache_dir
  cfg.image_size = args.image_size or cfg.image_size
  started = time.perf_counter()
  ds = datasets.load_dataset(cfg)
  print(f"{cfg.kind} at image_size {cfg.image_size}: train {ds.train_images.shape} "
        f"({type(ds.train_images).__name__}), test {ds.test_images.shape}; "
        f"{time.perf_counter() - started:.1f} s; peak RSS {peak_gib():.2f} GiB", flush=True)
  if args.read_all:
    int(ds.train_images.sum(dtype=np.uint64)) + int(ds.test_images.sum(dtype=np.uint64))
    print(f"after reading every pixel once: peak RSS {peak_gib():.2f} GiB", flush=True)


if __name__ == "__main__":
  main()
