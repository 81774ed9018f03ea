"""Fractal pretraining: the backbone file loads into clients bit-exactly, a stopped run resumes to the
same result, bad configs fail in one line, and the clients' token loss is off by default."""
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from fedmitr_jax import config_base, pretrain
from fedmitr_jax.client import training
from fedmitr_jax.data import fractal
from fedmitr_jax.models import pretrained, vit

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import pretrain_smoke  # noqa: E402


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def test_backbone_loads_into_a_10_class_client_bit_exact(tmp_path):
  config = config_base.pretrain_config()
  config.model.variant = "Mu/4"
  model = pretrain.build_model(config)  # 101 outputs and a token head
  source = vit.init_params(model, jax.random.key(3), 32)
  rng = np.random.default_rng(0)  # random values everywhere, so a swapped or zero leaf shows
  source = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 1, x.shape), x.dtype), source)
  pretrained.save_backbone(source, tmp_path / "backbone.npz")

  client = vit.build_vit("Mu/4", 10, image_size=32)
  init = vit.init_params(client, jax.random.key(1), 32)
  loaded = _flat(pretrained.load_pretrained(str(tmp_path / "backbone.npz"), init, variant="Mu/4"))
  saved, fresh = _flat(source), _flat(init)
  assert set(loaded) == set(fresh)
  for name, value in loaded.items():
    if name.startswith("head/"):  # never transferred: the client keeps its own zero-init head
      np.testing.assert_array_equal(value, fresh[name])
    else:
      assert value.dtype == saved[name].dtype
      np.testing.assert_array_equal(value, saved[name], err_msg=name)
  files = np.load(tmp_path / "backbone.npz")
  assert not [k for k in files.files if "head" in k]


def _smoke_config(**pretrain_fields):
  config = pretrain_smoke.get_config()
  config.unlock()
  for key, value in pretrain_fields.items():
    config.pretrain[key] = value
  return config


class _Stop(Exception):
  pass


@pytest.mark.slow
def test_stopped_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
  config = _smoke_config(prefetch=2)
  full = pretrain.run(config, tmp_path / "full")
  assert full["steps"] == 6 and full["resumed_at"] == 0

  original = fractal.FractalRenderer.batch

  def stop_at_step_5(self, seed, step, size):  # a kill after the save of step 4
    if step == 5 and size == config.pretrain.batch_size:
      raise _Stop()
    return original(self, seed, step, size)

  monkeypatch.setattr(fractal.FractalRenderer, "batch", stop_at_step_5)
  with pytest.raises(_Stop):
    pretrain.run(config, tmp_path / "stopped")
  assert not (tmp_path / "stopped" / "backbone.npz").exists()
  monkeypatch.setattr(fractal.FractalRenderer, "batch", original)
  resumed = pretrain.run(config, tmp_path / "stopped")
  assert resumed["resumed_at"] == 4
  a, b = np.load(tmp_path / "full" / "backbone.npz"), np.load(tmp_path / "stopped" / "backbone.npz")
  assert a.files == b.files
  for name in a.files:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  assert resumed["final"] == full["final"]  # the losses of steps 5-6 are the same numbers


@pytest.mark.slow
def test_entry_point_writes_backbone_report_and_picture(tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "fedmitr_jax.pretrain", "--config", "configs/pretrain_smoke.py",
         "--workdir", str(workdir)]
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "[pretrain] step 6/6" in done.stdout and "img/s" in done.stdout
  report = json.loads((workdir / "pretrain.json").read_text())
  assert report["steps"] == 6 and report["render_img_per_s"] > 0 and report["train_img_per_s"] > 0
  assert np.isfinite(report["final"]["token_ce"]) and report["config"]["fractal"]["num_classes"] == 8
  assert (workdir / "fractal_samples.png").stat().st_size > 1000
  # A second run finds the finished stage and writes the same backbone.
  first = dict(np.load(workdir / "backbone.npz"))
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0 and "loaded from checkpoint" in again.stdout
  for name, value in np.load(workdir / "backbone.npz").items():
    np.testing.assert_array_equal(value, first[name])


@pytest.mark.slow
def test_bad_config_is_one_line_exit_2_before_writing(tmp_path):
  workdir = tmp_path / "bad"
  cmd = [sys.executable, "-m", "fedmitr_jax.pretrain", "--config", "configs/pretrain_smoke.py",
         "--workdir", str(workdir), "--config.fractal.background_share=(0.9,0.2)"]
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 2
  assert done.stderr.strip().splitlines()[-1].startswith("error: fractal.background_share:")
  assert not workdir.exists()


@pytest.mark.parametrize("field,value", [("fractal.num_classes", 0), ("fractal.scale", (0.5, 0.2)),
                                         ("pretrain.optimizer", "lamb"), ("model.variant", "Mu/5")])
def test_check_config_names_the_field(field, value):
  config = _smoke_config()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(pretrain.InputError, match=field.replace(".", r"\.")):
    pretrain.check_config(config)


# ---- clients.token_loss_weight --------------------------------------------------------------


def _client_step(weight):
  cfg = config_base.base_config().clients
  cfg.token_loss_weight, cfg.crop_padding = weight, 0
  model = vit.build_vit("test/8", 4, image_size=16)
  tx = training.make_optimizer(cfg)
  state = training.init_client_state(vit.init_params(model, jax.random.key(0), 16), tx)
  # A trained-looking head (zero-init heads give every token the same uniform logits).
  rng = np.random.default_rng(0)
  state = state.replace(params=jax.tree.map(lambda x: jnp.asarray(x + rng.normal(0, 0.2, x.shape), x.dtype),
                                            state.params))
  images = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
  labels = rng.integers(0, 4, 8).astype(np.int32)
  mask = np.ones(8, bool)
  step = jax.jit(training.make_client_train_step(model, tx, cfg))
  new_state, metrics = step(state, images, labels, mask, jnp.int32(10), jax.random.key(1))
  return model, state, new_state, metrics, images, labels


def _plain_vit_step(model, tx, cfg):
  """The client step of a plain ViT (the paper's), written out: CE of the CLS head only."""
  from fedmitr_jax.data import augment, datasets

  def loss_fn(params, images, labels, mask):
    logits, _ = model.apply({"params": params}, images)
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(per_example * mask) / jnp.maximum(mask.sum(), 1)

  def step(state, images_u8, labels, mask, total_steps, rng):
    images = datasets.normalize(augment.random_crop_flip(rng, images_u8, cfg.crop_padding))
    loss, grads = jax.value_and_grad(loss_fn)(state.params, images, labels, mask)
    direction, _ = tx.update(grads, state.opt_state, state.params)
    lr = training.warmup_cosine_lr(cfg.lr, state.step, total_steps, cfg.warmup_fraction)
    return jax.tree.map(lambda p, d: p - lr * d, state.params, direction), loss, images

  return jax.jit(step)


def test_token_loss_weight_zero_is_the_plain_vit_step_and_positive_adds_the_token_term():
  model, state, plain_state, plain, images, labels = _client_step(0.0)
  cfg = config_base.base_config().clients
  cfg.crop_padding = 0
  params, loss, seen = _plain_vit_step(model, training.make_optimizer(cfg), cfg)(
      state, images, labels, np.ones(8, bool), jnp.int32(10), jax.random.key(1))
  assert float(plain["loss"]) == float(loss)  # bit-identical, not merely close
  for name, value in _flat(plain_state.params).items():
    np.testing.assert_array_equal(value, _flat(params)[name], err_msg=name)

  _, _, weighted_state, weighted, _, _ = _client_step(0.5)
  _, out = model.apply({"params": state.params}, seen)
  token_term = training.token_label_loss(out["token_logits"], labels).mean()
  assert float(token_term) > 0.1
  np.testing.assert_allclose(float(weighted["loss"]), float(loss) + 0.5 * float(token_term), rtol=1e-5)
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(weighted_state.params),
                                                         jax.tree.leaves(plain_state.params))]
  assert any(changed)
