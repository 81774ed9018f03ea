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


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; progress lines are ours
  if os.environ.get("FEDMITR_DISTRIBUTED") == "1":  # TPU pods / multi-process: before any JAX call
    import jax
    jax.distributed.initialize()
  import jax  # noqa: E402  (imported after distributed init on purpose)

  from fedmitr_jax import run_setup, pipeline
  config, workdir = _CONFIG.value, _WORKDIR.value
  try:
    dataset = run_setup.prepare(config, workdir)  # validates everything before a stage starts
  except run_setup.InputError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  pipeline.run(config, dataset, workdir)


if __name__ == "__main__":
  app.run(main)
