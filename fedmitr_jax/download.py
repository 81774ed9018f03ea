r"""Downloads a dataset file once, checked against its pinned sha256, for machines without network.

  python -m fedmitr_jax.download cifar10 [--dir D]

On a machine with network this writes D/cifar-10-binary.tar.gz (default D: the repo's data/
folder, where `dataset.kind=cifar10` looks for a local copy). Copy it into data/ of the checkout on
the offline machine. The logic is in fedmitr_jax/data/download.py.
"""
import argparse
import os
import sys

from fedmitr_jax.data import download

REPO_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
DATASETS = ("cifar10",)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m fedmitr_jax.download", description=__doc__.split("\n")[0])
  parser.add_argument("dataset", choices=DATASETS)
  parser.add_argument("--dir", default=REPO_DATA, help="folder to write into (default: the repo's data/)")
  parser.add_argument("--url", default="", help="another address of the same file (a mirror); the "
                      "pinned checksum still applies")
  args = parser.parse_args(argv)
  spec = download.pinned(args.dataset)
  try:
    path = download.fetch(spec, os.path.expanduser(args.dir), args.url)
  except (download.DownloadError, OSError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 1
  print(f"{path}: {spec.size} bytes, sha256 {spec.sha256} (verified)", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
