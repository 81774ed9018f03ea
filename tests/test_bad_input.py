"""Bad input stops before any stage, with one line naming the field and the fix."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fedmitr_jax import config_base, validate

REPO = pathlib.Path(__file__).resolve().parents[1]


def _folder(root, classes=("a", "b"), per_class=6):
  for split in ("train", "test"):
    for c in classes:
      d = root / split / c
      d.mkdir(parents=True)
      for i in range(per_class):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(d / f"{i}.png")
  return root


def _config(tmp_path, **fields):
  c = config_base.base_config()
  c.dataset.kind, c.dataset.root, c.dataset.image_size = "folder", str(_folder(tmp_path / "data")), 8
  c.dataset.cache_dir = str(tmp_path / "cache")
  c.model.variant = "test/4"
  c.partition.num_clients, c.partition.min_client_examples = 2, 1
  for key, value in fields.items():
    section, name = key.split("__")
    c[section][name] = value
  return c


@pytest.mark.parametrize("fields,expected_field", [
    ({"dataset__root": "/nonexistent/data"}, "dataset.root"),
    ({"partition__alpha": 0.0}, "partition.alpha"),
    ({"partition__alpha": -1.0}, "partition.alpha"),
    ({"partition__num_clients": 50}, "partition.num_clients"),
    ({"model__variant": "test/3"}, "dataset.image_size"),
    ({"model__variant": "Huge/4"}, "model.variant"),
    ({"model__dtype": "float16"}, "model.dtype"),
    ({"partition__method": "pathological"}, "partition.method"),
    ({"clients__mode": "threads"}, "clients.mode"),
    ({"dataset__kind": "hub"}, "dataset.kind"),
    ({"distill__batch_size": 12}, "distill.batch_size"),  # 8 test devices
    ({"distill__init": "imagenet"}, "distill.init"),
    ({"distill__relabel_target": "patch"}, "distill.relabel_target"),
    ({"inversion__batch_size": 20}, "inversion.batch_size"),
    ({"inversion__num_batches": 1, "inversion__batch_size": 8, "distill__batch_size": 16}, "distill.batch_size"),
    ({"attack__num_malicious": 2}, "attack.num_malicious"),  # 2 clients: one must stay honest
    ({"attack__kind": "backdoor", "attack__num_malicious": 1}, "attack.kind"),
    ({"attack__kind": "noise", "attack__num_malicious": 1, "attack__noise_norm": 0.0},
     "attack.noise_norm"),
    ({"eval__ensemble_rule": "mode"}, "eval.ensemble_rule"),
    ({"eval__ensemble_rule": "trimmed_mean", "eval__trim_fraction": 0.5}, "eval.trim_fraction"),
    ({"eval__screen_z": 0.0}, "eval.screen_z"),
])
def test_bad_config_is_one_clear_line_and_writes_nothing(tmp_path, fields, expected_field):
  workdir = tmp_path / "work"
  with pytest.raises(validate.InputError) as err:
    validate.prepare(_config(tmp_path, **fields), workdir)
  message = str(err.value)
  assert expected_field in message and "\n" not in message
  assert not workdir.exists()


def test_empty_class_folder_and_unreadable_image(tmp_path):
  config = _config(tmp_path)
  (pathlib.Path(config.dataset.root) / "train" / "c").mkdir()
  with pytest.raises(validate.InputError, match="dataset.root"):
    validate.prepare(config, tmp_path / "work")
  config = _config(tmp_path / "second")
  (pathlib.Path(config.dataset.root) / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
  with pytest.raises(validate.InputError, match="broken.jpg"):
    validate.prepare(config, tmp_path / "work")
  assert not (tmp_path / "work").exists()


def test_good_config_records_the_run(tmp_path):
  dataset = validate.prepare(_config(tmp_path), tmp_path / "work")
  assert dataset.num_classes == 2 and dataset.train_images.shape == (12, 8, 8, 3)
  assert (tmp_path / "work" / "config.json").exists() and (tmp_path / "work" / "metadata.json").exists()


@pytest.mark.slow
def test_cli_unknown_config_key_and_bad_value_exit_nonzero(tmp_path):
  env = dict(os.environ, XLA_FLAGS="")
  base = [sys.executable, "-m", "fedmitr_jax.main", "--config", str(REPO / "configs/smoke.py"),
          "--workdir", str(tmp_path / "w")]
  typo = subprocess.run(base + ["--config.partition.alpah=0.3"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert typo.returncode != 0 and "alpah" in typo.stderr
  bad = subprocess.run(base + ["--config.partition.alpha=-0.5"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1].startswith("error: partition.alpha")
  assert not (tmp_path / "w").exists()


def test_unknown_method_is_refused(tmp_path):
  config = _config(tmp_path)
  config.methods = ("fedavg", "fedmitr", "fedprox")
  with pytest.raises(validate.InputError, match="methods: \\['fedprox'\\]"):
    validate.prepare(config, tmp_path / "work")


# ---- values that would run but cannot mean what was typed: one rule per config field ----------

STOPS_RANGE = ("use strictly increasing ints in [1, 99] (below inversion.iterations = 100), "
               "or () to never drop patches")
BAD_VALUES = [
    ("inversion.stops", (10, 20, 30, 200),
     f"inversion.stops: (10, 20, 30, 200) is not allowed; {STOPS_RANGE}"),
    ("inversion.stops", (10, 100), f"inversion.stops: (10, 100) is not allowed; {STOPS_RANGE}"),
    ("inversion.stops", (20, 10), f"inversion.stops: (20, 10) is not allowed; {STOPS_RANGE}"),
    ("inversion.stops", (10, 10, 20),
     f"inversion.stops: (10, 10, 20) is not allowed; {STOPS_RANGE}"),
    ("inversion.stops", (0, 10), f"inversion.stops: (0, 10) is not allowed; {STOPS_RANGE}"),
    ("clients.lr", -1e-3, "clients.lr: -0.001 is not allowed; use a finite number > 0 (default 0.001)"),
    ("clients.lr", float("nan"), "clients.lr: nan is not allowed; use a finite number > 0 (default 0.001)"),
    ("inversion.lr", -0.25, "inversion.lr: -0.25 is not allowed; use a finite number > 0 (default 0.25)"),
    ("distill.lr", 0.0, "distill.lr: 0.0 is not allowed; use a finite number > 0 (default 0.001)"),
    ("generator_kd.lr_g", float("inf"),
     "generator_kd.lr_g: inf is not allowed; use a finite number > 0 (default 0.001)"),
    ("inversion.drop_ratio", 1.0,
     "inversion.drop_ratio: 1.0 is not allowed; use a number in [0, 1) (default 0.3)"),
    ("inversion.drop_ratio", -0.1,
     "inversion.drop_ratio: -0.1 is not allowed; use a number in [0, 1) (default 0.3)"),
    ("clients.epochs", 0.0, "clients.epochs: 0.0 is not allowed; use a finite number > 0 (default 2.0)"),
    ("distill.epochs", -1.0, "distill.epochs: -1.0 is not allowed; use a finite number > 0 (default 20.0)"),
    ("clients.batch_size", 0, "clients.batch_size: 0 is not allowed; use an int >= 1 (default 64)"),
    ("inversion.batch_size", 0, "inversion.batch_size: 0 is not allowed; use an int >= 1 (default 64)"),
    ("distill.batch_size", -8, "distill.batch_size: -8 is not allowed; use an int >= 1 (default 64)"),
    ("eval.batch_size", 0, "eval.batch_size: 0 is not allowed; use an int >= 1 (default 512)"),
    ("inversion.iterations", 0, "inversion.iterations: 0 is not allowed; use an int >= 1 (default 100)"),
    ("inversion.num_batches", 0, "inversion.num_batches: 0 is not allowed; use an int >= 1 (default 2)"),
    ("generator_kd.g_steps", 0, "generator_kd.g_steps: 0 is not allowed; use an int >= 1 (default 30)"),
    ("distill.tau", 0.0, "distill.tau: 0.0 is not allowed; use a finite number > 0 (default 4.0)"),
    ("generator_kd.dense_tau", -20.0,
     "generator_kd.dense_tau: -20.0 is not allowed; use a finite number > 0 (default 20.0)"),
    ("distill.beta", -0.5, "distill.beta: -0.5 is not allowed; use a finite number >= 0 (default 0.5)"),
    ("clients.weight_decay", -0.05,
     "clients.weight_decay: -0.05 is not allowed; use a finite number >= 0 (default 0.05)"),
    ("distill.weight_decay", -1.0,
     "distill.weight_decay: -1.0 is not allowed; use a finite number >= 0 (default 0.05)"),
    ("clients.warmup_fraction", 1.0,
     "clients.warmup_fraction: 1.0 is not allowed; use a number in [0, 1) (default 0.05)"),
    ("distill.warmup_fraction", -0.1,
     "distill.warmup_fraction: -0.1 is not allowed; use a number in [0, 1) (default 0.05)"),
    ("clients.grad_clip", 0.0,
     "clients.grad_clip: 0.0 is not allowed; use a finite number > 0 (default 1.0)"),
    ("clients.momentum", 1.0, "clients.momentum: 1.0 is not allowed; use a number in [0, 1) (default 0.9)"),
    ("inversion.beta2", 1.0, "inversion.beta2: 1.0 is not allowed; use a number in [0, 1) (default 0.99)"),
    ("inversion.tv_weight", -1e-4,
     "inversion.tv_weight: -0.0001 is not allowed; use a finite number >= 0 (default 0.0001)"),
    ("inversion.jitter_patches", -1,
     "inversion.jitter_patches: -1 is not allowed; use an int >= 0 (default 1)"),
    ("distill.checkpoint_every_steps", 0,
     "distill.checkpoint_every_steps: 0 is not allowed; use an int >= 1 (default 100)"),
    ("inversion.log_every", 0, "inversion.log_every: 0 is not allowed; use an int >= 1 (default 25)"),
    ("generator_kd.reweight_decay", 1.5,
     "generator_kd.reweight_decay: 1.5 is not allowed; use a number in [0, 1] (default 0.99)"),
    ("generator_kd.ods_eps", -0.1, "generator_kd.ods_eps: -0.1 is not allowed; use a finite number >= 0 "
                                   "(default 0.03137254901960784)"),
    ("seed", -1, "seed: -1 is not allowed; use an int >= 0 (default 0)"),
    ("dataset.train_split", "",
     "dataset.train_split: '' is not allowed; use a non-empty string (default 'train')"),
    ("partition.alpha", -0.5, "partition.alpha: -0.5 is not allowed; use a finite number > 0 (default 0.1)"),
    ("methods", (), "methods: () is empty; list at least one of ['fedavg', 'ensemble', 'dense_kd', "
                    "'sparse_kd', 'dense_relabel', 'fedmitr', 'dense', 'coboosting']"),
    ("methods", ("fedavg", "fedmitr", "fedavg"),
     "methods: ['fedavg'] listed more than once; list each method once"),
    ("methods", ("fedavg", "fedmitt"), "methods: ['fedmitt'] unknown; did you mean 'fedmitr'? choose from "
                                      "['fedavg', 'ensemble', 'dense_kd', 'sparse_kd', 'dense_relabel', "
                                      "'fedmitr', 'dense', 'coboosting']"),
    ("clients.mode", "vamp",
     "clients.mode: 'vamp' is unknown; did you mean 'vmap'? use one of ['vmap', 'loop']"),
    ("clients.mode", "threads", "clients.mode: 'threads' is unknown; use one of ['vmap', 'loop']"),
    ("distill.relabel_target", "tokens",
     "distill.relabel_target: 'tokens' is unknown; did you mean 'token'? use one of ['token', 'image']"),
    ("dataset.kind", "tfd",
     "dataset.kind: 'tfd' is unknown; did you mean 'tfds'? use one of ['cifar10', 'shared_cifar10', 'folder', 'tfds']"),
    # Split over the 8 devices conftest gives (evaluation is data-parallel).
    ("eval.batch_size", 500, "eval.batch_size: 500 is not divisible by the 8 devices; set it to a multiple of 8"),
]


def _set(config, field, value):
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value


@pytest.mark.parametrize("field,value,line", BAD_VALUES, ids=[f"{f}={v!r}" for f, v, _ in BAD_VALUES])
def test_value_that_cannot_mean_what_was_typed_is_one_exact_line(tmp_path, field, value, line):
  config = _config(tmp_path)
  _set(config, field, value)
  with pytest.raises(validate.InputError) as err:
    validate.check_config(config)
  assert str(err.value) == line


def test_every_config_field_has_one_rule_and_its_default_passes(tmp_path):
  """A new field in config_base needs a rule in validate.FIELD_RULES (this fails until it has one)."""
  fields = set(validate.config_fields(config_base.base_config()))
  assert not fields - set(validate.FIELD_RULES), "fields without a rule in validate.FIELD_RULES"
  assert not set(validate.FIELD_RULES) - fields, "rules for fields config_base no longer has"
  validate.check_config(_config(tmp_path))  # every default, on a folder dataset that exists


@pytest.mark.parametrize("field,value", [
    ("inversion.stops", ()), ("inversion.stops", (1, 99)), ("inversion.drop_ratio", 0.0),
    ("distill.beta", 0.0), ("clients.weight_decay", 0.0), ("generator_kd.ods_eps", 0.0),
    ("clients.lr", 1e30), ("generator_kd.reweight_decay", 1.0),
])
def test_edge_values_inside_the_rules_pass(tmp_path, field, value):
  config = _config(tmp_path)
  _set(config, field, value)
  validate.check_config(config)


def test_loop_clients_batch_must_split_over_the_devices_vmap_needs_not(tmp_path):
  """Loop mode splits each client's batch over all 8 devices (conftest); vmap mode always finds a
  ('clients', 'data') mesh shape, at worst one client per device with its whole batch."""
  config = _config(tmp_path, clients__mode="loop", clients__batch_size=12)
  with pytest.raises(validate.InputError) as err:
    validate.check_config(config)
  assert str(err.value) == "clients.batch_size: 12 is not divisible by the 8 devices; set it to a multiple of 8"
  validate.check_config(_config(tmp_path / "vmap", clients__mode="vmap", clients__batch_size=12))


@pytest.mark.slow
def test_cli_out_of_range_value_stops_before_any_stage(tmp_path):
  """Through the entry point: exit code 2, the rule's line last on stderr, nothing in the workdir."""
  workdir = tmp_path / "w"
  command = [sys.executable, "-m", "fedmitr_jax.main", "--config", str(REPO / "configs/smoke.py"),
             "--workdir", str(workdir), "--config.inversion.stops=(2,4,60)"]
  run = subprocess.run(command, cwd=REPO, env=dict(os.environ, XLA_FLAGS=""), capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 2
  assert run.stderr.strip().splitlines()[-1] == (
      "error: inversion.stops: (2, 4, 60) is not allowed; use strictly increasing ints in [1, 7] "
      "(below inversion.iterations = 8), or () to never drop patches")
  assert not workdir.exists()


def test_parallel_batches_must_divide_the_bank_and_relaxes_the_batch_split(tmp_path):
  """inversion.parallel_batches = G: G divides num_batches and the 8 devices (conftest), and each
  batch splits over 8 / G devices only, so a batch of 12 is refused at G=1 and accepted at G=2."""
  config = _config(tmp_path / "a", inversion__num_batches=4, inversion__parallel_batches=3)
  with pytest.raises(validate.InputError) as err:
    validate.check_config(config)
  assert str(err.value) == ("inversion.parallel_batches: 3 does not divide inversion.num_batches = 4; "
                            "use a divisor of it (1 runs one batch at a time)")
  config = _config(tmp_path / "b", inversion__num_batches=4, inversion__parallel_batches=4,
                   inversion__batch_size=9)
  with pytest.raises(validate.InputError) as err:
    validate.check_config(config)
  assert str(err.value).startswith("inversion.parallel_batches: inversion.batch_size = 9 does not split "
                                   "over the 2 devices of each of the 4 batches")
  config = _config(tmp_path / "c", inversion__batch_size=12, distill__batch_size=8)
  with pytest.raises(validate.InputError, match="inversion.batch_size: 12 is not divisible by the 8"):
    validate.check_config(config)
  config.inversion.parallel_batches = 2
  validate.check_config(config)
  config.methods = ("fedmitr", "dense")  # the generator baselines split inversion.batch_size over all 8
  with pytest.raises(validate.InputError, match="inversion.batch_size: 12 is not divisible by the 8"):
    validate.check_config(config)
