"""Everything before the first stage: validate the config and data, then record the run.

All checks run before anything is written, so bad input stops with one line naming the field
and the fix, and leaves no half-written stage in the workdir.
"""
import importlib.metadata
import json
import pathlib
import platform
import subprocess

import jax
from etils import epath

from fedmitr_jax import checkpoints, config_base, sharding
from fedmitr_jax.data import datasets, partition as partition_lib
from fedmitr_jax.models import pretrained, vit
from fedmitr_jax.progress import log

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets",
            "ml-collections", "chex", "numpy")


class InputError(ValueError):
  """Bad config or data, found before any stage ran."""


def check_config(config) -> None:
  """Checks that need no data."""
  try:
    datasets.check_dataset_config(config.dataset)
    partition_lib.check_partition_config(config.partition)
    vit.build_vit(config.model.variant, 2, image_size=config.dataset.image_size)
    vit.compute_dtype(config.model.dtype)
  except ValueError as e:
    raise InputError(str(e)) from None
  for field, allowed in config_base.CHOICES.items():
    section, name = field.split(".")
    if config[section][name] not in allowed:
      raise InputError(f"{field}: '{config[section][name]}' is unknown; use one of {list(allowed)}")
  unknown = [m for m in config.methods if m not in config_base.ALL_METHODS]
  if unknown:
    raise InputError(f"methods: {unknown} unknown; choose from {list(config_base.ALL_METHODS)}")
  try:  # data-parallel stages split their batch over every device
    sharding.check_divisible(config.inversion.batch_size, "inversion.batch_size")
    sharding.check_divisible(config.distill.batch_size, "distill.batch_size")
  except sharding.ShardingError as e:
    raise InputError(str(e)) from None
  bank = config.inversion.num_batches * config.inversion.batch_size
  if bank < config.distill.batch_size:
    raise InputError(f"distill.batch_size: {config.distill.batch_size} is larger than the synthetic "
                     f"bank ({bank} images); lower it or raise inversion.num_batches")
  if config.clients.epochs <= 0 or config.clients.batch_size < 1:
    raise InputError("clients.epochs and clients.batch_size must be positive; fix the config")


def prepare(config, workdir):
  """Validates config and data, then writes config.json and metadata.json. Returns the dataset."""
  check_config(config)
  try:
    dataset = datasets.load_dataset(config.dataset, seed=config.seed)
    partition_lib.check_partition_config(config.partition, len(dataset.train_labels), dataset.num_classes)
    if config.model.pretrained_path:  # a wrong file fails here, not after the partition stage
      check_pretrained(config, dataset.num_classes)
  except ValueError as e:
    raise InputError(str(e)) from None
  workdir = epath.Path(workdir)  # a local folder or a bucket path (gs://...)
  resolved = config.to_dict()
  saved_config = workdir / "config.json"
  if saved_config.exists():
    changed = changed_fields(json.loads(saved_config.read_text()), json.loads(json.dumps(resolved)))
    if changed:
      raise InputError(f"workdir: {workdir} holds a run with a different config (fields {changed}); "
                       "use a new --workdir, or delete this one to start over")
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoints.write_json_atomic(saved_config, resolved)
    checkpoints.write_json_atomic(workdir / "metadata.json", run_metadata())
  log(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} over "
      f"{jax.process_count()} process(es); dataset {dataset.name}: {len(dataset.train_labels)} train, "
      f"{len(dataset.test_labels)} test, {dataset.num_classes} classes")
  return dataset


def check_pretrained(config, num_classes: int) -> None:
  """Maps the weights file onto the client model; shapes come from eval_shape (no init compute)."""
  model = vit.build_vit(config.model.variant, num_classes, image_size=config.dataset.image_size,
                        dtype=vit.compute_dtype(config.model.dtype))
  shapes = jax.eval_shape(lambda: vit.init_params(model, jax.random.key(0), config.dataset.image_size))
  pretrained.load_pretrained(config.model.pretrained_path, shapes, variant=config.model.variant,
                               input_norm=config.model.pretrained_input_norm)


# Fields that may change on an existing workdir: `methods` only picks which method stages run
# (each is its own stage), so adding a method to a finished run runs just the new one.
MAY_CHANGE = ("methods",)


def changed_fields(saved: dict, current: dict) -> list:
  """Fields whose value differs from the run saved in the workdir.

  A field the saved run does not have was added to the code after it; its default is required to
  keep the old behaviour, so it is not a change (a sweep can then be extended with new methods).
  """
  return sorted(k for k in _diff_keys(saved, current) if k.split(".")[0] not in MAY_CHANGE)


def _diff_keys(saved, current, prefix=""):
  for key in saved:
    x, y = saved[key], current.get(key)
    if isinstance(x, dict) and isinstance(y, dict):
      yield from _diff_keys(x, y, f"{prefix}{key}.")
    elif x != y:
      yield prefix + key


def run_metadata() -> dict:
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  try:
    repo = pathlib.Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                            text=True, timeout=10).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    commit = None
  return {"packages": versions, "python": platform.python_version(), "git_commit": commit,
          "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
          "process_count": jax.process_count(), "backend": jax.default_backend()}
