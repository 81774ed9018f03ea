r"""What the synthetic banks of finished runs teach: `diagnostics.bank_targets` of each bank, one row
per (run, bank), for workdirs made before results.json recorded it (newer runs hold the same
figures under results.json "diagnostics" -> "banks").

  python benchmarks/bank_targets.py /tmp/sweeps/cifar10_cpu_pretrained/alpha0.1_seed*

The ensemble is the plain mean of the stored teacher logits' softmaxes (the default `mean` rule
with uniform weights; a run with other weights or rule records its own figures in results.json).
"""
import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from fedmitr_jax import diagnostics  # noqa: E402
from fedmitr_jax.checkpoints import StageStore  # noqa: E402

COLUMNS = ("image_acc", "image_entropy", "kept_share", "token_acc_kept", "token_entropy_kept",
           "token_acc_dropped", "token_entropy_dropped")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("workdirs", nargs="+")
  args = parser.parse_args()
  print("| run | bank | " + " | ".join(COLUMNS) + " |")
  print("|---|---|" + "---|" * len(COLUMNS))
  for workdir in args.workdirs:
    store = StageStore(workdir)
    for kind in ("dense", "sparse"):
      if not store.is_done(f"inversion_{kind}"):
        continue
      row = diagnostics.bank_targets(store.load_result(f"inversion_{kind}", None))
      print(json.dumps({"run": workdir, "bank": kind, **row}), file=sys.stderr)
      cells = ["-" if row[c] is None else f"{row[c]:.3f}" for c in COLUMNS]
      print(f"| {pathlib.Path(workdir).name} | {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
