r"""Two or more sweeps side by side: one table and one figure (a panel per method, a line per sweep).

  python -m fedmitr_jax.sweep_compare \
      --sweep "pretrained=/tmp/sweeps/cifar10_cpu_pretrained/sweep.json" \
      --sweep "from scratch=/tmp/sweeps/cifar10_cpu_full/sweep.json" \
      --rows fedavg,ensemble,sparse_kd,fedmitr,coboosting --out /tmp/pretrained_vs_scratch

Each `--sweep` is LABEL=PATH to a `sweep.json` written by `fedmitr_jax.sweep` (mean ± std over
seeds per method and alpha). Writes OUT.md (a row per method, a column per alpha and sweep) and
OUT.png. The gain row ("fedmitr - best other data-free") is always added as the last panel.
"""
import math
import sys

from absl import app, flags
from etils import epath

from fedmitr_jax import entry, sweep_report

_SWEEP = flags.DEFINE_multi_string("sweep", None, "LABEL=PATH of a sweep.json; two or more.")
_ROWS = flags.DEFINE_list("rows", ["fedavg", "ensemble", "dense_kd", "sparse_kd", "fedmitr", "coboosting"],
                          "Methods to compare (rows of sweep.json).")
_OUT = flags.DEFINE_string("out", None, "Output path without extension: OUT.md and OUT.png.")
flags.mark_flags_as_required(["sweep", "out"])


def parse_sweeps(specs) -> dict:
  """{label: table} from LABEL=PATH strings."""
  from fedmitr_jax import validate
  sweeps = {}
  for spec in specs:
    label, sep, path = spec.partition("=")
    if not sep or not label or not path:
      raise validate.InputError(f"--sweep: '{spec}' is not LABEL=PATH (e.g. --sweep pretrained=W/sweep.json)")
    if not epath.Path(path).exists():
      raise validate.InputError(f"--sweep: {path} does not exist; run fedmitr_jax.sweep (or its "
                                "--report_only) to write it")
    sweeps[label] = sweep_report.read_json(path)
  if len(sweeps) < 2:
    raise validate.InputError("--sweep: give two or more sweeps to compare")
  return sweeps


def check_rows(sweeps: dict, rows) -> None:
  from fedmitr_jax import validate
  for label, table in sweeps.items():
    known = set(next(iter(table.values())))
    missing = [r for r in rows if r not in known]
    if missing:
      raise validate.InputError(f"--rows: {', '.join(missing)} not in sweep '{label}' (its rows: "
                                f"{', '.join(sorted(known))})")


def write_markdown(sweeps: dict, rows, path) -> None:
  alphas = sorted({a for table in sweeps.values() for a in table})
  columns = [(a, label) for a in alphas for label in sweeps]
  lines = ["| method | " + " | ".join(f"{label}, α = {a:g}" for a, label in columns) + " |",
           "|---|" + "---|" * len(columns)]
  for row in list(rows) + [sweep_report.GAIN_ROW]:
    cells = []
    for a, label in columns:
      value = sweeps[label].get(a, {}).get(row, (math.nan, math.nan, 0))
      cells.append(sweep_report.cell(value, signed=row == sweep_report.GAIN_ROW))
    lines.append(f"| {row} | " + " | ".join(cells) + " |")
  lines += ["", "Test accuracy (%), mean ± std over each sweep's seeds; the gain is per seed, then averaged."]
  epath.Path(path).write_text("\n".join(lines) + "\n")


def save_plot(sweeps: dict, rows, path) -> None:
  import matplotlib.pyplot as plt
  panels = list(rows) + [sweep_report.GAIN_ROW]
  ncols = min(3, len(panels))
  nrows = -(-len(panels) // ncols)
  alphas = sorted({a for table in sweeps.values() for a in table})
  fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 2.7 * nrows), squeeze=False)
  for i, (ax, row) in enumerate(zip(axes.flat, panels)):
    for label, table in sweeps.items():
      points = [(a, table[a][row]) for a in sorted(table) if row in table[a] and table[a][row][2] > 0]
      if points:
        xs, entries = zip(*points)
        ax.errorbar(xs, [e[0] for e in entries], yerr=[e[1] for e in entries], marker="o", capsize=3,
                    label=label)
    if row == sweep_report.GAIN_ROW:
      ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_title(row, fontsize=9)
    ax.set_xticks(alphas)
    ax.grid(alpha=0.3)
    if i + ncols >= len(panels):  # the lowest panel of its column
      ax.set_xlabel("Dirichlet α")
  for ax in axes.flat[len(panels):]:
    ax.axis("off")
  axes[0][0].set_ylabel("test accuracy (%)")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  with epath.Path(path).open("wb") as f:
    fig.savefig(f, format="png", dpi=110)
  plt.close(fig)


def main(argv) -> None:
  del argv
  from fedmitr_jax import validate
  try:
    sweeps = parse_sweeps(_SWEEP.value)
    check_rows(sweeps, _ROWS.value)
  except validate.InputError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(entry.EXIT_BAD_INPUT)
  out = epath.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  table, figure = out.parent / (out.name + ".md"), out.parent / (out.name + ".png")
  write_markdown(sweeps, _ROWS.value, table)
  save_plot(sweeps, _ROWS.value, figure)
  print(table.read_text(), flush=True)


if __name__ == "__main__":
  app.run(main)
