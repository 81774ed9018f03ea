r"""Runs a FedMITR experiment end to end, resuming from the workdir's checkpoints.

  python -m fedmitr_jax.main --config configs/cifar10_cpu.py --workdir /tmp/run \
      [--config.partition.alpha=0.3]

Stages: partition -> client training -> sparse inversion -> token-relabel distillation -> evaluate.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, results and pictures go.")
flags.mark_flags_as_required(["config", "workdir"])


def distributed_args(env) -> dict:
  """Arguments for jax.distributed.initialize(). TPU pods, SLURM and Open MPI are detected by JAX
  itself; a plain multi-process launch (launch/gpu.sh, the loopback test) names the coordinator
  (JAX_COORDINATOR_ADDRESS, read by JAX) and the process count and id here."""
  if "FEDMITR_NUM_PROCESSES" not in env:
    return {}
  return {"num_processes": int(env["FEDMITR_NUM_PROCESSES"]), "process_id": int(env["FEDMITR_PROCESS_ID"])}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; progress lines are ours
  if os.environ.get("FEDMITR_DISTRIBUTED") == "1":  # TPU pods / multi-process: before any JAX call
    import jax
    jax.distributed.initialize(**distributed_args(os.environ))
  import jax  # noqa: E402  (imported after distributed init on purpose)

  from fedmitr_jax import checkpoints, guards, pipeline, validate
  config, workdir = _CONFIG.value, _WORKDIR.value
  try:
    dataset = validate.prepare(config, workdir)  # validates everything before a stage starts
    pipeline.run(config, dataset, workdir)
  except validate.InputError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  except guards.NonFiniteError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(3)
  except Exception as e:  # noqa: BLE001 (only a full disk is turned into a one-line error)
    if not checkpoints.is_disk_full(e):
      raise
    _exit_with_last_line(f"error: workdir: disk full while saving under {workdir} ({type(e).__name__}); "
                         "free space and rerun the same command: finished stages and the last "
                         "complete save are kept", code=4)


def _exit_with_last_line(message: str, code: int) -> None:
  """Writes `message` as the last line on stderr and exits at once. Orbax's background save
  threads can still be printing tracebacks of the same failed write (and would go on while the
  interpreter waits for them): stderr is pointed at /dev/null before the message is written to a
  copy of it, so nothing of theirs lands after it, and os._exit does not wait for them."""
  sys.stdout.flush()
  sys.stderr.flush()
  own_stderr = os.dup(2)
  os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
  os.write(own_stderr, (message + "\n").encode())
  os._exit(code)


if __name__ == "__main__":
  app.run(main)
