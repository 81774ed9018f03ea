"""Training curves a user can plot: every progress report of a run as one JSON line.

  <workdir>/metrics.jsonl   {"stage": "distill_fedmitr", "step": 40, "loss": 1.93, "kd": 1.2, ...}
  <workdir>/tensorboard/    the same scalars as TensorBoard events (--config.log.tensorboard=True)
  <workdir>/curves.png      each stage's losses against step, drawn from metrics.jsonl

`progress.Progress.report` calls `record`, which writes to the writer of the run in progress (set
by `recording`), so every loop that reports progress lands here. Only process 0 writes. A resumed
stage appends and may repeat steps it had reported before the interruption: readers keep the last
row of each (stage, step).
"""
import contextlib
import io
import json
import math
import pathlib

import jax
from etils import epath

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"

# Metrics drawn in curves.png: the losses the loops report (clients' and distillation's 'loss', the
# inversion's 'ce', distillation's 'kd' and token terms, the generator baselines' 'g_loss' / 'kd').
# Accuracies, token counts and ensemble weights stay in the file but are not losses.
LOSS_NAMES = ("loss", "ce", "kd", "token", "token_fg", "token_bg")


def is_loss(name: str) -> bool:
  return name in LOSS_NAMES or name.endswith("_loss")


class MetricsWriter:
  """Appends rows to <workdir>/metrics.jsonl (and TensorBoard events when asked); on any process
  but 0 it writes nothing, so multi-process runs keep one file."""

  def __init__(self, workdir, tensorboard: bool = False):
    self.workdir = epath.Path(workdir)
    self.path = self.workdir / METRICS_FILE
    self.enabled = jax.process_index() == 0
    self._events = None
    # Object stores (gs://) have no append: there the file is rewritten whole on each row (it is
    # small: one row per progress report).
    self._appendable = "://" not in str(workdir)
    self._lines = None
    if not self.enabled:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    if self._appendable:
      _end_with_newline(pathlib.Path(self.path))  # a run killed mid-line leaves a fragment
    else:
      self._lines = self.path.read_text().splitlines() if self.path.exists() else []
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
      except ImportError:
        raise ValueError("log.tensorboard: tensorboardX is not installed; pip install tensorboardX (or the "
                         "package's [tensorboard] extra), or set --config.log.tensorboard=False") from None
      self._events = SummaryWriter(str(self.workdir / TENSORBOARD_DIR))

  def write(self, stage: str, step: int, values: dict) -> None:
    if not self.enabled:
      return
    row = {"stage": stage, "step": int(step), **{k: float(v) for k, v in values.items()}}
    if self._appendable:
      with open(self.path, "a") as f:  # opened per row: a kill loses at most the row being written
        f.write(json.dumps(row) + "\n")
    else:
      self._lines.append(json.dumps(row))
      self.path.write_text("\n".join(self._lines) + "\n")
    if self._events is not None:
      for name, value in row.items():
        if name not in ("stage", "step"):
          self._events.add_scalar(tensorboard_tag(stage, name), value, int(step))

  def close(self) -> None:
    if self._events is not None:
      self._events.close()
      self._events = None


def _end_with_newline(path: pathlib.Path) -> None:
  if path.exists() and path.stat().st_size > 0:
    with path.open("rb+") as f:
      f.seek(-1, 2)
      if f.read(1) != b"\n":
        f.write(b"\n")


def tensorboard_tag(stage: str, name: str) -> str:
  """'inversion_sparse 1/2', 'loss' -> 'inversion_sparse/loss/1_of_2': TensorBoard groups charts by
  the part before the first '/', so a stage's batches (or looped clients) share one group; tags
  hold only [A-Za-z0-9_./-] (tensorboardX replaces anything else)."""
  base, _, part = stage.partition(" ")
  return f"{base}/{name}" + (f"/{part.replace('/', '_of_').replace(' ', '_')}" if part else "")


_active: MetricsWriter | None = None


def record(stage: str, step: int, values: dict) -> None:
  """Writes a row to the run in progress; outside a run (unit tests, notebooks) does nothing."""
  if _active is not None:
    _active.write(stage, step, values)


@contextlib.contextmanager
def recording(workdir, tensorboard: bool = False, curves: bool = True):
  """Routes every `record` (every progress report) to <workdir>/metrics.jsonl for the duration;
  at a clean end draws <workdir>/curves.png from the whole file (earlier, resumed runs included)."""
  global _active
  writer = MetricsWriter(workdir, tensorboard)
  previous, _active = _active, writer
  try:
    yield writer
  finally:
    _active = previous
    writer.close()
  if curves and writer.enabled:
    save_curves(writer.path, writer.workdir / CURVES_FILE)


def read_metrics(path) -> dict:
  """{stage: {step: {metric: value}}}, steps in order; the last row of a (stage, step) wins. Lines
  that are not a complete row (a run killed while writing) are skipped."""
  table = {}
  path = epath.Path(path)
  if not path.exists():
    return table
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
      stage, step = row.pop("stage"), int(row.pop("step"))
    except (ValueError, KeyError, TypeError, AttributeError):
      continue
    table.setdefault(stage, {})[step] = {k: float(v) for k, v in row.items()}
  return {stage: dict(sorted(steps.items())) for stage, steps in table.items()}


def stage_groups(table: dict) -> dict:
  """Stages grouped by name without their part label: 'inversion_sparse 1/2' and '... 2/2' (or
  'clients 0', 'clients 1' of looped clients) share one panel, in the order they first ran."""
  groups = {}
  for stage in table:
    groups.setdefault(stage.partition(" ")[0], []).append(stage)
  return groups


def save_curves(metrics_path, png_path) -> bool:
  """Draws one panel per stage with its losses against step; a stage run in parts (inversion
  batches, looped clients) draws one line per part in its loss's colour. Returns False (and
  writes nothing) when the file has no loss to draw."""
  table = read_metrics(metrics_path)
  panels = {}
  for group, stages in stage_groups(table).items():
    names = sorted({k for stage in stages for row in table[stage].values() for k in row if is_loss(k)})
    lines = {name: [_points(table[stage], name) for stage in stages] for name in names}
    lines = {name: [p for p in parts if p] for name, parts in lines.items()}
    if any(lines.values()):
      panels[group] = (len(stages), lines)
  if not panels:
    return False
  import matplotlib  # here, not at import: progress.py imports this module in every process
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cols = min(3, len(panels))
  rows = math.ceil(len(panels) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
  for ax, (group, (num_parts, lines)) in zip(axes.flat, panels.items()):
    for colour, (name, parts) in enumerate(lines.items()):
      for i, points in enumerate(parts):
        steps, values = zip(*points)
        ax.plot(steps, values, color=f"C{colour}", linewidth=1.2, alpha=1.0 if len(parts) == 1 else 0.6,
                marker="." if len(points) < 30 else None, label=name if i == 0 else None)
    ax.set_title(group if num_parts == 1 else f"{group} ({num_parts} parts)", fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  fig.tight_layout()
  png_path = epath.Path(png_path)
  png_path.parent.mkdir(parents=True, exist_ok=True)
  picture = io.BytesIO()  # through epath, so a gs:// workdir gets its picture too
  fig.savefig(picture, format="png", dpi=100)
  png_path.write_bytes(picture.getvalue())
  plt.close(fig)
  return True


def _points(steps: dict, name: str) -> list:
  return [(step, row[name]) for step, row in steps.items() if name in row and math.isfinite(row[name])]
