"""One-line progress reports for long stages: step, rate, ETA and the latest metrics."""
import time

import jax


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
  def __init__(self, stage: str, total_steps: int, items_per_step: int, unit: str = "img",
                start_step: int = 0):
    self.stage, self.total, self.items, self.unit = stage, total_steps, items_per_step, unit
    self.start_step, self.start_time = start_step, time.perf_counter()

  def report(self, step: int, **metrics) -> None:
    done = step - self.start_step
    elapsed = max(time.perf_counter() - self.start_time, 1e-9)
    rate = done * self.items / elapsed
    eta = (self.total - step) * elapsed / max(done, 1)
    shown = " ".join(f"{k}={float(v):.4g}" for k, v in metrics.items())
    log(f"[{self.stage}] step {step}/{self.total} {rate:.1f} {self.unit}/s ETA {eta / 60:.1f} min "
        f"{shown}")

  def elapsed(self) -> float:
    return time.perf_counter() - self.start_time
