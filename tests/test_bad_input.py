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
