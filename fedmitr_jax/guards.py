"""Stops a stage whose loss stopped being finite, before a bad state is saved.

The loss stays on the device: each step folds "is it finite?" into the first bad step number
(one tiny jitted op, no host sync), and the host looks at it only before a save and at the end
of the stage. A NaN therefore never reaches a checkpoint: the last good save stays the newest.
"""
import jax
import jax.numpy as jnp


class NonFiniteError(RuntimeError):
  """A stage's loss became NaN or infinite."""


def first_bad_step(first_bad, step, loss):
  """Pure: `first_bad` (-1 while every loss was finite) after seeing step `step`'s loss. A compiled
  loop carries it through its iterations and hands it back to `FiniteGuard.first_bad`."""
  bad = ~jnp.all(jnp.isfinite(loss))
  return jnp.where((first_bad < 0) & bad, step, first_bad)


_first_bad = jax.jit(first_bad_step)


class FiniteGuard:
  def __init__(self, stage: str, lr_field: str):
    self.stage, self.lr_field = stage, lr_field
    self.first_bad = jnp.array(-1, jnp.int32)  # a compiled loop may carry it and assign it back

  def update(self, step: int, loss) -> None:
    """`step`: the 1-based number of the step that produced `loss`."""
    self.first_bad = _first_bad(self.first_bad, jnp.int32(step), loss)

  def check(self, last_save=None) -> None:
    """Raises NonFiniteError (naming the stage, the step and the save kept) if a loss was bad."""
    bad = int(self.first_bad)
    if bad < 0:
      return
    kept = f"its last good save (step {last_save}) is kept" if last_save else "nothing of it was saved"
    raise NonFiniteError(f"[{self.stage}] the loss became non-finite at step {bad}; the stage stopped and "
                         f"{kept}; lower {self.lr_field} (or check the input) and rerun")
