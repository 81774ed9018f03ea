r"""What the synthetic banks of finished runs teach: `diagnostics.bank_targets` of each bank, one row
per (run, bank), for workdirs made before results.json recorded it (newer runs hold the same
figures under results.json "diagnostics" -> "banks").

  python benchmarks/bank_targets.py /tmp/sweeps/cifar10_cpu_pretrained/alpha0.1_seed*

After each run's rows, a JSON line: the dense inversion's final CE (mean over its batches, from
metrics.jsonl) and how thinly the clients cover the classes (mean over classes of -log of the
clients' mean per-class test accuracy), the two figures docs/results.md sets side by side.
The ensemble is the plain mean of the stored teacher logits' softmaxes (the default `mean` rule
with uniform weights; a run with other weights or rule records its own figures in results.json).
"""
import argparse
import json
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from fedmitr_jax import diagnostics  # noqa: E402
from fedmitr_jax.checkpoints import StageStore  # noqa: E402

def inversion_plateau(workdir) -> float | None:
  """Mean over the dense bank's batches of the inversion CE at each batch's last report (metrics.jsonl)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return None
  last = {}
  for line in path.read_text().splitlines():
    entry = json.loads(line)
    if str(entry.get("stage", "")).startswith("inversion_dense") and "ce" in entry:
      last[entry["stage"]] = entry["ce"]
  return sum(last.values()) / len(last) if last else None


def class_cover(workdir) -> float | None:
  """Mean over classes of -log(the clients' mean per-class test accuracy): how thinly they cover
  the classes (results.json diagnostics; None before a run has them)."""
  path = pathlib.Path(workdir) / "results.json"
  if not path.exists():
    return None
  clients = json.loads(path.read_text()).get("diagnostics", {}).get("clients")
  if not clients:
    return None
  per_class = [[a or 0.0 for a in c["per_class"]] for c in clients]
  cover = [sum(col) / len(col) for col in zip(*per_class)]
  return sum(-math.log(max(c, 1e-3)) for c in cover) / len(cover)


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
    plateau, cover = inversion_plateau(workdir), class_cover(workdir)
    print(json.dumps({"run": workdir, "dense_inversion_final_ce": plateau, "class_cover": cover}))


if __name__ == "__main__":
  main()
