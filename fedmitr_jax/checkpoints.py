"""Per-stage checkpoints with Orbax, so a killed run resumes where it stopped.

Layout under the workdir:
  stages/<stage>/progress/<step>/   rolling saves while the stage runs (CheckpointManager)
  stages/<stage>/result/<0>/        the finished stage's output pytree
  stages/<stage>/result.json        small JSON facts about the result (sizes, timings)
  stages/<stage>/DONE               written last: a stage without it is redone or resumed
Orbax writes each step to a temporary folder and renames it when complete, so a kill during a
save leaves the previous save readable; DONE is written after the result save has finished.

Multi-process runs: every process calls every save and restore (Orbax's saves are collective);
Orbax writes numpy leaves and each shard of a replicated jax.Array once. It refuses a jax.Array
that lives on one process's devices only, so `standard_save` first turns such leaves (which every
process computed identically) into global arrays replicated over all devices. Only process 0
deletes a stale result or writes the JSON files, with barriers so the others never race it.

Paths are `etils.epath` paths (as Orbax's own), so the workdir may be a local folder or a bucket
(`gs://...`): everything here goes through epath, never through `open` or `os` directly.
"""
import errno
import json

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from fedmitr_jax import sharding


def absolute(path) -> epath.Path:
  """`path` made absolute, as Orbax wants it. A bucket path already is: epath's `absolute()` would
  turn 'gs://b/run' into '<cwd>/gs:/b/run'."""
  path = epath.Path(path)
  return path if "://" in str(path) else path.absolute()


def _manager(directory: epath.Path, max_to_keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(absolute(directory), options=options)


def abstract_like(tree):
  """Shape/dtype(/sharding) skeleton of `tree`: the restore target Orbax needs."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def savable(tree):
  """`tree` as Orbax saves it in a multi-process run: process-local jax.Arrays (client training
  returns a local copy of its states) become global replicated arrays, else Orbax raises 'Cannot
  serialize host local jax.Array ... in multi-host setting'.
  Global arrays and numpy pass unchanged; so does everything in a one-process run."""
  if jax.process_count() == 1:
    return tree
  mesh = sharding.data_mesh()
  return jax.tree.map(
      lambda x: sharding.replicate(mesh, x) if isinstance(x, jax.Array) and x.is_fully_addressable else x,
      tree)


def standard_save(tree) -> ocp.args.StandardSave:
  return ocp.args.StandardSave(savable(tree))


def barrier(name: str) -> None:
  """Every process waits here for the others (nothing to wait for in a one-process run)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class StageStore:
  """Saves and restores the outputs and in-progress state of named pipeline stages."""

  def __init__(self, workdir):
    self.root = epath.Path(workdir) / "stages"

  def _dir(self, stage: str) -> epath.Path:
    return self.root / stage

  # ---- finished stages -------------------------------------------------------------------
  def is_done(self, stage: str) -> bool:
    return (self._dir(stage) / "DONE").exists()

  def save_result(self, stage: str, tree, facts: dict | None = None) -> None:
    stale = self._dir(stage) / "result"
    if jax.process_index() == 0 and stale.exists():  # killed after the save, before DONE
      stale.rmtree()
    barrier(f"{stage}: stale result removed")  # before any process opens the folder again
    with _manager(self._dir(stage) / "result", max_to_keep=1) as manager:
      manager.save(0, args=standard_save(tree), force=True)
      manager.wait_until_finished()
    if jax.process_index() == 0:
      write_json_atomic(self._dir(stage) / "result.json", facts or {})
      write_json_atomic(self._dir(stage) / "DONE", {"stage": stage})
    barrier(f"{stage}: DONE written")  # no process goes on to read result.json before it exists

  def load_result(self, stage: str, abstract_tree):
    with _manager(self._dir(stage) / "result", max_to_keep=1) as manager:
      return manager.restore(0, args=ocp.args.StandardRestore(abstract_tree))

  def load_facts(self, stage: str) -> dict:
    return json.loads((self._dir(stage) / "result.json").read_text())

  # ---- stages in progress ----------------------------------------------------------------
  def progress_manager(self, stage: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """Rolling saves of an unfinished stage; use as a context manager."""
    return _manager(self._dir(stage) / "progress", max_to_keep)


def restore_latest(manager: ocp.CheckpointManager, abstract_tree):
  """Returns (step, tree) of the newest save, or (0, None) when there is none."""
  step = manager.latest_step()
  if step is None:
    return 0, None
  return step, restore(manager, step, abstract_tree)


def restore(manager: ocp.CheckpointManager, step: int, abstract_tree):
  """The tree saved at `step` (shapes and dtypes of `abstract_tree`)."""
  return manager.restore(step, args=ocp.args.StandardRestore(abstract_tree))


def write_json_atomic(path, obj) -> None:
  """Writes a temporary file, then renames it over `path`: a reader never sees half a file (on a
  bucket the rename is a copy, and the object appears whole)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2))
  tmp.replace(path)



# How a full disk (or a file-size limit / quota) shows up: OSError from Python writes, or a
# ValueError from TensorStore (Orbax's array writer) carrying the OS error code in its text.
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DISK_FULL_TEXT = tuple(f"os_error_code='{n}'" for n in _DISK_FULL_ERRNOS) + (
    "No space left on device", "File too large", "Disk quota exceeded")


def is_disk_full(error: BaseException) -> bool:
  """True if `error`, or any exception it was raised from, is a failed write for lack of space."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
      return True
    if any(text in str(error) for text in _DISK_FULL_TEXT):
      return True
    error = error.__cause__ or error.__context__
  return False
