"""One-line progress reports for long stages: step, rate, ETA and the latest metrics.

Every report's metrics also go to the run's metrics file (fedmitr_jax/metrics.py) while a run is
recording, so a loop that reports through `Progress` is plotted without doing anything else.
"""
import time

import jax

from fedmitr_jax import metrics as metrics_lib


def log(message: str) -> None:
  """Prints on process 0 only, so multi-host runs do not repeat every line."""
  if jax.process_index() == 0:
    print(message, flush=True)


def chunks(start: int, stop: int, *periods: int) -> list[tuple[int, int]]:
  """[start, stop) split after every multiple of each period (log points, save points): the
  pieces a compiled loop runs between two looks from the host."""
  if stop <= start:
    return []
  ends = sorted({e for p in periods for e in range((start // p + 1) * p, stop, p)} | {stop})
  return list(zip([start] + ends[:-1], ends))


class Progress:
  """Reports of one loop. Call `step_done()` after every step: rates and the ETA count from the end
  of the first step, so the compilation that step pays for does not make the rest look slow (a loop
  that never calls it gets rates measured from the start, compilation included)."""

  def __init__(self, stage: str, total_steps: int, items_per_step: int, unit: str = "img",
               start_step: int = 0):
    self.stage, self.total, self.items, self.unit = stage, total_steps, items_per_step, unit
    self.start_step, self.start_time = start_step, time.perf_counter()
    self._base_step, self._base_time = start_step, self.start_time  # where rates count from
    self._first_step_seen = False

  def step_done(self, step: int | None = None) -> None:
    """Marks the end of the first step (or, for a loop compiled over chunks of steps, of the first
    chunk, ending at `step`) run by this Progress; later calls cost nothing."""
    if not self._first_step_seen:
      self._first_step_seen = True
      self._base_step = self.start_step + 1 if step is None else step
      self._base_time = time.perf_counter()

  def report(self, step: int, **metrics) -> None:
    values = {k: float(v) for k, v in metrics.items()}
    done = step - self._base_step
    elapsed = time.perf_counter() - self._base_time
    if done > 0:
      rate = f"{done * self.items / max(elapsed, 1e-9):.1f} {self.unit}/s"
      eta = f"ETA {(self.total - step) * elapsed / done / 60:.1f} min"
    else:  # only the first (compiling) step so far: nothing to measure a rate on yet
      rate, eta = f"- {self.unit}/s", "ETA -"
    shown = " ".join(f"{k}={v:.4g}" for k, v in values.items())
    log(f"[{self.stage}] step {step}/{self.total} {rate} {eta} {shown}")
    metrics_lib.record(self.stage, step, values)

  def elapsed(self) -> float:
    return time.perf_counter() - self.start_time
