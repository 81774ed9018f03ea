"""Everything before the first stage: validate the config and data, then record the run.

All checks run before anything is written, so bad input stops with one line naming the field
and the fix, and leaves no half-written stage in the workdir.
"""
import difflib
import importlib.metadata
import importlib.util
import json
import math
import pathlib
import platform
import subprocess
from typing import Any, Callable, NamedTuple

import jax
from etils import epath

from fedmitr_jax import checkpoints, config_base, sharding
from fedmitr_jax.client import attacks
from fedmitr_jax.data import datasets, partition as partition_lib
from fedmitr_jax.models import pretrained, vit
from fedmitr_jax.progress import log
from fedmitr_jax.server import ensemble

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets",
            "ml-collections", "chex", "numpy")


class InputError(ValueError):
  """Bad config or data, found before any stage ran."""


def check_config(config) -> None:
  """Checks that need no data: every field against its rule in FIELD_RULES, then the checks that
  span fields (patch size, device count, bank size) and the dataset paths."""
  for field, rule in FIELD_RULES.items():
    value = config
    for key in field.split("."):
      value = value[key]
    if isinstance(rule, Rule):
      message = None if rule.ok(value) else (
          f"{field}: {value!r} is not allowed; use {rule.allowed} (default {_DEFAULTS[field]!r})")
    else:
      message = rule(value, config)
    if message:
      raise InputError(message)
  try:
    datasets.check_dataset_config(config.dataset)
    partition_lib.check_partition_config(config.partition)
    vit.build_vit(config.model.variant, 2, image_size=config.dataset.image_size)
    attacks.check_attack_config(config.attack, config.partition.num_clients)
    ensemble.rule_from_config(config.eval)
  except ValueError as e:
    raise InputError(str(e)) from None
  try:  # data-parallel stages split their batch over every device
    # With inversion.parallel_batches = G > 1 a bank batch splits over D / G devices (its rule
    # checks that); the generator baselines still split their inversion.batch_size over all D.
    if config.inversion.parallel_batches == 1 or set(config.methods) & set(config_base.GENERATOR_METHODS):
      sharding.check_divisible(config.inversion.batch_size, "inversion.batch_size")
    sharding.check_divisible(config.distill.batch_size, "distill.batch_size")
    if config.clients.mode == "loop":  # 'vmap' always finds a mesh shape (sharding.client_mesh_shape)
      sharding.check_divisible(config.clients.batch_size, "clients.batch_size")
    sharding.check_divisible(config.eval.batch_size, "eval.batch_size")
  except sharding.ShardingError as e:
    raise InputError(str(e)) from None
  bank = config.inversion.num_batches * config.inversion.batch_size
  if bank < config.distill.batch_size:
    raise InputError(f"distill.batch_size: {config.distill.batch_size} is larger than the synthetic "
                     f"bank ({bank} images); lower it or raise inversion.num_batches")
  if config.log.tensorboard and importlib.util.find_spec("tensorboardX") is None:
    raise InputError("log.tensorboard: tensorboardX is not installed; pip install tensorboardX (or the "
                     "package's [tensorboard] extra), or set --config.log.tensorboard=False")


# ---- one rule per config field ----------------------------------------------------------------
# A value either means what its comment in config_base says or stops the run before any stage. A
# Rule is (ok(value), the allowed values in words); a function (value, config) -> message | None
# covers fields whose rule reads another field or names the nearest valid choice.
class Rule(NamedTuple):
  ok: Callable[[Any], bool]
  allowed: str


def _is_number(v) -> bool:  # bools are ints in Python, but True is never meant as a learning rate
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _int_at_least(low: int) -> Rule:
  return Rule(lambda v: _is_int(v) and v >= low, f"an int >= {low}")


POSITIVE = Rule(lambda v: _is_number(v) and v > 0, "a finite number > 0")
NON_NEGATIVE = Rule(lambda v: _is_number(v) and v >= 0, "a finite number >= 0")
FRACTION = Rule(lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)")
UNIT = Rule(lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]")
FLAG = Rule(lambda v: isinstance(v, bool), "True or False")
TEXT = Rule(lambda v: isinstance(v, str), "a string")
NAME = Rule(lambda v: isinstance(v, str) and bool(v), "a non-empty string")


def _choice(field: str):
  allowed = config_base.CHOICES[field]

  def check(value, config):
    if value in allowed:
      return None
    return f"{field}: {value!r} is unknown;{_did_you_mean(value, allowed)} use one of {list(allowed)}"
  return check


def _did_you_mean(value, allowed) -> str:
  close = difflib.get_close_matches(str(value), allowed, n=3, cutoff=0.5)
  return f" did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _check_methods(methods, config):
  allowed = config_base.ALL_METHODS
  if not isinstance(methods, (tuple, list)) or not methods:
    return f"methods: {methods!r} is empty; list at least one of {list(allowed)}"
  unknown = [m for m in methods if m not in allowed]
  if unknown:
    return (f"methods: {unknown} unknown;{_did_you_mean(unknown[0], allowed)} "
            f"choose from {list(allowed)}")
  repeated = sorted({m for m in methods if methods.count(m) > 1})
  if repeated:
    return f"methods: {repeated} listed more than once; list each method once"
  return None


def _check_variant(variant, config):
  try:
    vit.parse_variant(variant)
  except ValueError as e:
    return str(e)
  return None


def _check_parallel_batches(groups, config):
  """G batches at once on a G x D/G mesh: G divides num_batches and D, batch_size splits over D/G."""
  inv, devices = config.inversion, jax.device_count()
  if not _is_int(groups) or groups < 1:
    return f"inversion.parallel_batches: {groups!r} is not allowed; use an int >= 1 (default 1)"
  if not _is_int(inv.num_batches) or inv.num_batches % groups:
    return (f"inversion.parallel_batches: {groups} does not divide inversion.num_batches = "
            f"{inv.num_batches}; use a divisor of it (1 runs one batch at a time)")
  if devices % groups:
    return (f"inversion.parallel_batches: {groups} does not divide the {devices} devices; "
            f"use a divisor of {devices} (1 runs one batch at a time)")
  if groups > 1 and _is_int(inv.batch_size) and inv.batch_size % (devices // groups):
    return (f"inversion.parallel_batches: inversion.batch_size = {inv.batch_size} does not split "
            f"over the {devices // groups} devices of each of the {groups} batches; pick "
            f"parallel_batches so that batch_size is a multiple of {devices} / parallel_batches")
  return None


def _check_stops(stops, config):
  """SMI's stops: iterations at which sparse inversion drops patches; () = it never drops (dense)."""
  last = config.inversion.iterations - 1
  increasing = all(a < b for a, b in zip(stops, stops[1:]))
  if all(_is_int(s) and 1 <= s <= last for s in stops) and increasing:
    return None
  return (f"inversion.stops: {tuple(stops)} is not allowed; use strictly increasing ints in [1, {last}] "
          f"(below inversion.iterations = {last + 1}), or () to never drop patches")


FIELD_RULES = {
    "seed": _int_at_least(0),
    "methods": _check_methods,
    "dataset.kind": _choice("dataset.kind"),
    "dataset.name": TEXT, "dataset.data_dir": TEXT, "dataset.root": TEXT, "dataset.tarball": TEXT,
    "dataset.cache_dir": TEXT,  # paths: checked against the disk by datasets.check_dataset_config
    "dataset.download_url": TEXT,  # "" = never download
    "dataset.train_split": NAME, "dataset.test_split": NAME,
    "dataset.image_size": _int_at_least(1),
    "dataset.max_train_examples": _int_at_least(0), "dataset.max_test_examples": _int_at_least(0),
    "partition.method": _choice("partition.method"),
    "partition.num_clients": _int_at_least(1),
    "partition.alpha": POSITIVE,
    "partition.classes_per_client": _int_at_least(1),  # <= the class count: checked with the data
    "partition.min_client_examples": _int_at_least(0),
    "model.variant": _check_variant,
    "model.pretrained_path": TEXT,
    "model.pretrained_input_norm": _choice("model.pretrained_input_norm"),
    "model.dtype": _choice("model.dtype"),
    "clients.mode": _choice("clients.mode"),
    "clients.epochs": POSITIVE,
    "clients.batch_size": _int_at_least(1),
    "clients.optimizer": _choice("clients.optimizer"),
    "clients.lr": POSITIVE,
    "clients.momentum": FRACTION,
    "clients.weight_decay": NON_NEGATIVE,
    "clients.warmup_fraction": FRACTION,
    "clients.grad_clip": POSITIVE,  # a clip norm of 0 scales every update to 0: nothing would train
    "clients.crop_padding": _int_at_least(0),
    "clients.checkpoint_every_steps": _int_at_least(1),
    "clients.log_every_steps": _int_at_least(1),
    "clients.token_loss_weight": NON_NEGATIVE,
    "inversion.num_batches": _int_at_least(1),
    "inversion.batch_size": _int_at_least(1),
    "inversion.iterations": _int_at_least(1),
    "inversion.stops": _check_stops,
    "inversion.drop_ratio": FRACTION,  # 1 would drop every patch at the first stop
    "inversion.lr": POSITIVE,
    "inversion.beta1": FRACTION, "inversion.beta2": FRACTION,
    "inversion.tv_weight": NON_NEGATIVE, "inversion.l2_weight": NON_NEGATIVE,
    "inversion.jitter_patches": _int_at_least(0),
    "inversion.flip": FLAG,
    "inversion.teachers_mode": _choice("inversion.teachers_mode"),
    "inversion.target_space": _choice("inversion.target_space"),
    "inversion.dense_mask": _choice("inversion.dense_mask"),
    "inversion.bank_dtype": _choice("inversion.bank_dtype"),
    "inversion.log_every": _int_at_least(1),
    "inversion.parallel_batches": _check_parallel_batches,
    "distill.epochs": POSITIVE,
    "distill.batch_size": _int_at_least(1),
    "distill.lr": POSITIVE,
    "distill.weight_decay": NON_NEGATIVE,
    "distill.warmup_fraction": FRACTION,
    "distill.grad_clip": POSITIVE,
    "distill.tau": POSITIVE,
    "distill.background_temperature": POSITIVE,
    "distill.beta": NON_NEGATIVE,
    "distill.relabel_target": _choice("distill.relabel_target"),
    "distill.zero_background": FLAG,
    "distill.shift_patches": _int_at_least(0),
    "distill.flip": FLAG,
    "distill.init": _choice("distill.init"),
    "distill.eval_token_weight": NON_NEGATIVE,
    "distill.checkpoint_every_steps": _int_at_least(1),
    "distill.log_every": _int_at_least(1),
    "generator_kd.g_steps": _int_at_least(1),
    "generator_kd.lr_g": POSITIVE,
    "generator_kd.z_dim": _int_at_least(1),
    "generator_kd.ngf": _int_at_least(1),
    "generator_kd.g_grad_clip": POSITIVE,
    "generator_kd.oh": NON_NEGATIVE, "generator_kd.adv": NON_NEGATIVE,
    "generator_kd.crop_padding": _int_at_least(0),
    "generator_kd.dense_tau": POSITIVE, "generator_kd.coboost_tau": POSITIVE,
    "generator_kd.coboost_adv_tau": POSITIVE,
    "generator_kd.hard_sample_power": NON_NEGATIVE,
    "generator_kd.reweight_lr": NON_NEGATIVE,  # 0 keeps the ensemble's weights uniform
    "generator_kd.reweight_decay": UNIT,
    "generator_kd.ods_eps": NON_NEGATIVE,  # 0 turns Co-Boosting's perturbation off
    "eval.batch_size": _int_at_least(1),
    "eval.ensemble_weighting": _choice("eval.ensemble_weighting"),
    "eval.fedavg_weighting": _choice("eval.fedavg_weighting"),
    "eval.trim_fraction": Rule(lambda v: _is_number(v) and 0 <= v < 0.5, "a number in [0, 0.5)"),
    "eval.screen_clients": FLAG,
    "eval.screen_z": POSITIVE,  # 3.5 is the usual cut-off of a robust z-score
    "eval.screen_probe_images": _int_at_least(2),
    "attack.num_malicious": _int_at_least(0),  # < partition.num_clients: attacks.check_attack_config
    "attack.scale": POSITIVE,
    "attack.noise_norm": NON_NEGATIVE,
    "log.tensorboard": FLAG,
}
for _field in config_base.CHOICES:  # a choice field added to CHOICES is checked without more code
  FIELD_RULES.setdefault(_field, _choice(_field))


def config_fields(config, prefix: str = "") -> dict:
  """{'section.name': value} for every leaf field of a config (FIELD_RULES has one rule each)."""
  fields = {}
  for key, value in config.items():
    if hasattr(value, "items"):
      fields.update(config_fields(value, f"{prefix}{key}."))
    else:
      fields[prefix + key] = value
  return fields


_DEFAULTS = config_fields(config_base.base_config())


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
# (each is its own stage), so adding a method to a finished run runs just the new one; `log` only
# picks where metrics are written.
MAY_CHANGE = ("methods", "log")


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
