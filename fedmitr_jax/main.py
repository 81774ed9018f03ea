r"""Runs a FedMITR experiment end to end, resuming from the workdir's checkpoints.

  python -m fedmitr_jax.main --config configs/cifar10_cpu.py --workdir /tmp/run \
      [--config.partition.alpha=0.3]
  python -m fedmitr_jax.main --config configs/paper_cifar10.py --workdir gs://bucket/run \
      --dry_run --chip=v6e    # compile every stage's step, print FLOPs and memory; runs nothing

Stages: partition -> client training -> sparse inversion -> token-relabel distillation -> evaluate.
The workdir may be a local folder or a `gs://` path. Exit codes: 2 bad input, 3 a loss became
NaN/inf, 4 disk full (fedmitr_jax/entry.py).
"""
from absl import flags
from ml_collections import config_flags

from fedmitr_jax import entry

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, results and pictures go (a folder "
                               "or gs://bucket/path).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Compile each stage's step on the current devices with "
                             "abstract inputs and print its FLOPs, steps and memory per device as JSON "
                             "lines; loads no data and writes nothing.")
_CHIP = flags.DEFINE_enum("chip", None, ["v5e", "v6e", "h100", "h200"], "Dry run: the chip the run's "
                          "hours are projected for (default: each of them).")
_MFU = flags.DEFINE_float("mfu", 0.4, "Dry run: the fraction of the chip's peak bf16 FLOP/s assumed.")
flags.mark_flags_as_required(["config", "workdir"])


def run_experiment() -> None:
  config, workdir = _CONFIG.value, _WORKDIR.value
  if _DRY_RUN.value:
    from fedmitr_jax import dry_run
    dry_run.report(config, chip=_CHIP.value, mfu=_MFU.value)
    return
  from fedmitr_jax import pipeline, validate
  dataset = validate.prepare(config, workdir)  # validates everything before a stage starts
  pipeline.run(config, dataset, workdir)


if __name__ == "__main__":
  entry.run(run_experiment, _WORKDIR)
