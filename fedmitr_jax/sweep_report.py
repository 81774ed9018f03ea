"""The sweep's table and plot: method x alpha, mean ± std over seeds, and fedmitr's gain.

Pure functions of the runs' `results.json` contents, so a table can be rebuilt at any time from
whatever runs have finished.
"""
import csv
import io
import json
import math

import matplotlib
from etils import epath

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Methods that are not data-free: the references fedmitr is not compared against for "the gain".
NOT_DATA_FREE = ("fedavg", "ensemble")
GAIN_ROW = "fedmitr - best other data-free"


def mean_std(values):
  n = len(values)
  if n == 0:
    return math.nan, math.nan
  mean = sum(values) / n
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
  return mean, std


def per_run_gain(methods: dict):
  """fedmitr minus the best other data-free method of the same run (percentage points)."""
  others = [m["test_acc"] for name, m in methods.items() if name not in NOT_DATA_FREE + ("fedmitr",)]
  if "fedmitr" not in methods or not others:
    return None
  return 100 * (methods["fedmitr"]["test_acc"] - max(others))


def aggregate(runs: dict, methods) -> dict:
  """runs: {(alpha, seed): results dict}. Returns {alpha: {row: (mean, std, n)}} in percent.

  Rows are the methods (in `methods` order), "clients (mean)" and the gain row; the gain is
  computed per seed (paired: same clients, same teachers) and then averaged.
  """
  table = {}
  for alpha in sorted({a for a, _ in runs}):
    seeds = sorted(s for a, s in runs if a == alpha)
    rows = {}
    for name in methods:
      values = [100 * runs[alpha, s]["methods"][name]["test_acc"] for s in seeds
                if name in runs[alpha, s]["methods"]]
      rows[name] = (*mean_std(values), len(values))
    client_means = [100 * sum(c["test_acc"] for c in runs[alpha, s]["clients"]) / len(runs[alpha, s]["clients"])
                    for s in seeds]
    rows["clients (mean)"] = (*mean_std(client_means), len(client_means))
    gains = [g for g in (per_run_gain(runs[alpha, s]["methods"]) for s in seeds) if g is not None]
    rows[GAIN_ROW] = (*mean_std(gains), len(gains))
    table[alpha] = rows
  return table


DIAGNOSTIC_ROWS = {  # row -> (path in results.json's "diagnostics", key, scale)
    # the teachers on real test images
    "clients token acc (%)": ("clients", "token_acc", 100.0),
    "ensemble token acc (%)": ("ensemble", "token_acc", 100.0),
    "clients token entropy (nats)": ("clients", "token_entropy", 1.0),
    "ensemble token entropy (nats)": ("ensemble", "token_entropy", 1.0),
    # the sparse bank's stored targets on its own images (diagnostics.bank_targets)
    "sparse bank: ensemble on its images, acc (%)": ("banks.sparse", "image_acc", 100.0),
    "sparse bank: dropped-token labels, acc (%)": ("banks.sparse", "token_acc_dropped", 100.0),
    "sparse bank: dropped-token labels, entropy (nats)": ("banks.sparse", "token_entropy_dropped", 1.0),
}


def _diagnostic(diagnostics: dict, path: str):
  """The entry at a dotted `path` of a run's "diagnostics", or None where the run lacks it."""
  for part in path.split("."):
    if not isinstance(diagnostics, dict) or part not in diagnostics:
      return None
    diagnostics = diagnostics[part]
  return diagnostics


def aggregate_diagnostics(runs: dict) -> dict:
  """{alpha: {row: (mean, std, n)}} of the teachers' per-token evidence over seeds (rows:
  DIAGNOSTIC_ROWS; a "clients" value is first averaged over the run's clients). Runs without
  a row's diagnostics (older results, a run without a sparse bank) are left out of its count."""
  table = {}
  for alpha in sorted({a for a, _ in runs}):
    seeds = [s for a, s in sorted(runs) if a == alpha and "diagnostics" in runs[a, s]]
    rows = {}
    for row, (path, key, scale) in DIAGNOSTIC_ROWS.items():
      values = []
      for s in seeds:
        entry = _diagnostic(runs[alpha, s]["diagnostics"], path)
        entries = entry if isinstance(entry, list) else [entry]
        if entry is None or any(e.get(key) is None for e in entries):  # older run, or no such bank
          continue
        values.append(scale * sum(e[key] for e in entries) / len(entries))
      rows[row] = (*mean_std(values), len(values))
    table[alpha] = rows
  return table


# Paired comparisons: two methods of the same run share clients (and, for the bank students, the
# bank), so their per-run difference isolates one design choice with less seed noise than the
# difference of the means. (label, method, minus)
PAIRED = (
    ("sparse bank vs dense bank (sparse_kd − dense_kd)", "sparse_kd", "dense_kd"),
    ("token relabel on the sparse bank (fedmitr − sparse_kd)", "fedmitr", "sparse_kd"),
    ("token relabel on the dense bank (dense_relabel − dense_kd)", "dense_relabel", "dense_kd"),
    ("both (fedmitr − dense_kd)", "fedmitr", "dense_kd"),
    ("Co-Boosting − dense_kd", "coboosting", "dense_kd"),
)


def paired_differences(runs: dict) -> dict:
  """{label: {(alpha, seed): percentage points}} for each PAIRED comparison whose two methods
  a run has; comparisons no run can make are left out."""
  table = {}
  for label, method, minus in PAIRED:
    diffs = {key: 100 * (r["methods"][method]["test_acc"] - r["methods"][minus]["test_acc"])
             for key, r in sorted(runs.items()) if method in r["methods"] and minus in r["methods"]}
    if diffs:
      table[label] = diffs
  return table


def write_paired_markdown(table: dict, path) -> None:
  """One column per run (alpha, seed), then the mean over runs."""
  keys = sorted({key for diffs in table.values() for key in diffs})
  lines = ["| comparison | " + " | ".join(f"α {a:g} s{s}" for a, s in keys) + " | mean |",
           "|---|" + "---|" * (len(keys) + 1)]
  for label, diffs in table.items():
    cells = [f"{diffs[k]:+.2f}" if k in diffs else "—" for k in keys]
    lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean_std(list(diffs.values()))[0]:+.2f} |")
  lines += ["", "Per-run differences of test accuracy (percentage points) between two methods of the same "
            "run (same clients; the bank students also share the bank)."]
  epath.Path(path).write_text("\n".join(lines) + "\n")


def cell(entry, signed=False) -> str:
  """A table cell: "mean ± std", "—" where no seed has the row."""
  mean, std, n = entry
  if n == 0:
    return "—"
  sign = "+" if signed and mean >= 0 else ""
  return f"{sign}{mean:.2f} ± {std:.2f}"


def write_markdown(table: dict, path, seeds_note: str, what: str = "Test accuracy (%)") -> None:
  alphas = sorted(table)
  rows = list(next(iter(table.values()))) if table else []
  lines = ["| method | " + " | ".join(f"α = {a:g}" for a in alphas) + " |",
           "|---|" + "---|" * len(alphas)]
  for row in rows:
    cells = [cell(table[a][row], signed=row == GAIN_ROW) for a in alphas]
    name = f"**{row}**" if row in ("fedmitr", GAIN_ROW) else row
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  gain_note = "; the gain is per seed, then averaged" if GAIN_ROW in rows else ""
  lines += ["", f"{what}, mean ± std over seeds ({seeds_note}){gain_note}."]
  epath.Path(path).write_text("\n".join(lines) + "\n")


def write_csv(table: dict, path) -> None:
  text = io.StringIO(newline="")
  writer = csv.writer(text)
  writer.writerow(["row", "alpha", "mean", "std", "num_seeds"])
  for alpha, rows in sorted(table.items()):
    for row, (mean, std, n) in rows.items():
      writer.writerow([row, alpha, f"{mean:.4f}", f"{std:.4f}", n])
  epath.Path(path).write_text(text.getvalue())


def save_plot(table: dict, path, title: str) -> None:
  alphas = sorted(table)
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  rows = [r for r in next(iter(table.values())) if r != GAIN_ROW]
  for row in rows:
    points = [(a, table[a][row]) for a in alphas if table[a][row][2] > 0]
    if not points:
      continue
    xs, entries = zip(*points)
    style = dict(linewidth=2.5, color="black") if row == "fedmitr" else {}
    if row in NOT_DATA_FREE or row == "clients (mean)":
      style = dict(linestyle="--")
    ax.errorbar(xs, [e[0] for e in entries], yerr=[e[1] for e in entries], marker="o", capsize=3,
                label=row, **style)
  ax.set_xlabel("Dirichlet α (larger = closer to IID)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_xticks(alphas)
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  with epath.Path(path).open("wb") as f:  # a local file or a bucket object
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)


def write_json(table: dict, path) -> None:
  out = {str(a): {row: {"mean": m, "std": s, "num_seeds": n} for row, (m, s, n) in rows.items()}
         for a, rows in table.items()}
  epath.Path(path).write_text(json.dumps(out, indent=1))


def read_json(path) -> dict:
  """The table `write_json` wrote: {alpha: {row: (mean, std, n)}}."""
  data = json.loads(epath.Path(path).read_text())
  return {float(a): {row: (e["mean"], e["std"], e["num_seeds"]) for row, e in rows.items()}
          for a, rows in data.items()}
