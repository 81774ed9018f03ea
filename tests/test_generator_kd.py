"""DENSE and Co-Boosting pieces: generator, losses, ensemble re-weighting, ODS, a resumed run."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from fedmitr_jax import checkpoints, config_base, evaluate, sharding
from fedmitr_jax.models import vit
from fedmitr_jax.server import distill, generator_kd


def test_generator_makes_images_in_pixel_range():
  gen = generator_kd.Generator(image_size=16, ngf=8)
  z = jax.random.normal(jax.random.key(0), (4, 32))
  params = gen.init(jax.random.key(1), z)["params"]
  images, _ = gen.apply({"params": params}, z, mutable=["batch_stats"])
  assert images.shape == (4, 16, 16, 3)
  assert float(images.min()) >= -1.0 and float(images.max()) <= 1.0
  assert float(images.std()) > 0


def test_dense_adversarial_term_counts_only_disagreements():
  cfg = config_base.base_config().generator_kd
  labels = jnp.array([0, 1])
  teacher = jnp.array([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
  agree = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # same argmax: no adversarial push
  ce = float(jnp.mean(-jax.nn.log_softmax(teacher)[jnp.arange(2), labels]))
  assert float(generator_kd.generator_loss("dense", cfg, teacher, agree, labels)) == pytest.approx(ce, rel=1e-6)
  disagree = jnp.array([[0.0, 2.0, 0.0], [0.0, 1.0, 0.0]])  # first sample disagrees
  p, q = jax.nn.softmax(disagree[0]), jax.nn.softmax(teacher[0])
  kl0 = float(jnp.sum(p * (jnp.log(p) - jnp.log(q))))
  expected = ce - kl0 / 2
  assert float(generator_kd.generator_loss("dense", cfg, teacher, disagree, labels)) == pytest.approx(expected, rel=1e-5)


def test_coboosting_weights_hard_samples():
  cfg = config_base.base_config().generator_kd
  with cfg.unlocked():
    cfg.adv = 0.0
  labels = jnp.array([0, 1])
  teacher = jnp.array([[30.0, 0.0], [0.0, 0.0]])  # sample 0 is easy (p(y) ~ 1), sample 1 is not
  loss = float(generator_kd.generator_loss("coboosting", cfg, teacher, teacher, labels))
  # Only the hard sample counts: (1 - 0.5) * log 2, averaged over the batch of 2.
  assert loss == pytest.approx(0.5 * np.log(2) / 2, rel=1e-5)


def _teachers(num=3, classes=4, size=16):
  model = vit.build_vit("test/8", classes, image_size=size)
  params = [vit.init_params(model, jax.random.key(k), size) for k in range(num)]
  # Non-zero heads, so the teachers disagree and gradients flow.
  params = [dict(p, head={"kernel": jax.random.normal(jax.random.key(10 + k), p["head"]["kernel"].shape),
                          "bias": p["head"]["bias"]}) for k, p in enumerate(params)]
  return model, jax.tree.map(lambda *xs: jnp.stack(xs), *params)


def test_reweighting_is_a_projected_signed_step():
  cfg = config_base.base_config().generator_kd
  model, stacked = _teachers()
  images = jax.random.normal(jax.random.key(2), (8, 16, 16, 3))
  labels = jnp.arange(8) % 4
  w0 = jnp.full((3,), 1 / 3)
  reweight = generator_kd.make_reweight(cfg, model, "loop", 8, sharding.data_mesh())
  w = reweight(w0, w0, images, labels, 8, stacked, round_index=2)
  step = cfg.reweight_lr * cfg.reweight_decay ** 2
  np.testing.assert_allclose(np.abs(np.asarray(w - w0)), step, rtol=1e-5)
  # Far from w0 the projection holds w within w0 + [-1, 1] and [0, 1].
  far = reweight(jnp.array([0.0, 1.0, 5.0]), w0, images, labels, 8, stacked, round_index=0)
  assert float(far.min()) >= 0.0 and float(far.max()) <= 1.0


def test_ods_moves_every_pixel_by_eps():
  model, stacked = _teachers()
  images = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
  out = generator_kd.ods_perturb(model, stacked, jnp.full((3,), 1 / 3), images, jax.random.key(4),
                                 eps=0.5, tau=4.0, mode="loop")
  delta = np.abs(np.asarray(out - images))
  assert np.isin(np.round(delta, 5), [0.0, 0.5]).all() and (delta > 0).mean() > 0.9


def _tiny_config(rounds=2):
  c = config_base.base_config()
  c.dataset.image_size = 16
  c.model.variant = "test/8"
  c.inversion.num_batches, c.inversion.batch_size = rounds, 8
  c.distill.batch_size, c.distill.epochs = 8, 2.0
  c.generator_kd.g_steps, c.generator_kd.ngf, c.generator_kd.z_dim = 2, 8, 16
  return c


@pytest.mark.parametrize("field", ["inversion.batch_size", "distill.batch_size"])
def test_a_batch_the_devices_cannot_split_is_refused_before_anything_runs(field):
  """The generator's batch (inversion.batch_size) and the KD batch (distill.batch_size) are split
  over the 8 devices: 12 is refused by name before any compilation (no teachers are needed)."""
  config = _tiny_config()
  section, name = field.split(".")
  config[section][name] = 12
  student = vit.build_vit("test/8", 4, image_size=16, separate_token_head=True)
  with pytest.raises(sharding.ShardingError, match=rf"^{field}: 12 is not divisible by the 8 devices"):
    generator_kd.train("dense", config, None, student, None, None, None, stage="s", manager=None)
  with pytest.raises(sharding.ShardingError, match=r"^eval.batch_size: 12 is not divisible"):
    evaluate.predicted_labels(student, None, np.zeros((4, 16, 16, 3), np.uint8), 12)


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(tmp_path):
  """A run stopped after round 2 of 3 and resumed ends with the same student as one that ran
  straight through. Co-Boosting: its state (pool, student, ensemble weights) is DENSE's plus w.
  Each round's save holds only that round's pool rows, so the resume must rebuild rounds 1 and 2
  of the pool from two saves before round 3 reads (and re-weights over) all of it."""
  method = "coboosting"
  config = _tiny_config(rounds=3)
  teacher, stacked = _teachers()
  student = vit.build_vit("test/8", 4, image_size=16, separate_token_head=True)
  init = vit.init_params(student, jax.random.key(7), 16)
  weights = jnp.full((3,), 1 / 3)

  def run(directory, cfg):
    with checkpoints.StageStore(directory).progress_manager("s", max_to_keep=None) as manager:
      out = generator_kd.train(method, cfg, teacher, student, stacked, weights,
                               jax.tree.map(jnp.copy, init), stage="s", manager=manager)
      return out, manager.all_steps()

  (straight, facts), steps = run(tmp_path / "a", config)
  assert facts["rounds"] == 3 and facts["devices"] == 8 and sorted(steps) == [1, 2, 3]
  with checkpoints.StageStore(tmp_path / "a").progress_manager("s", max_to_keep=None) as manager:
    first = manager.restore(1)  # round 1's save: that round's 8 images, not the 24-image pool
    assert first["images"].shape == (8, 16, 16, 3) and first["labels"].shape == (8,)
  original_save = checkpoints.ocp.CheckpointManager.save
  calls = []

  def save_then_stop(self, step, *args, **kwargs):
    original_save(self, step, *args, **kwargs)
    calls.append(step)
    if step == 2:
      raise KeyboardInterrupt  # "killed" right after round 2's save

  checkpoints.ocp.CheckpointManager.save = save_then_stop
  try:
    with pytest.raises(KeyboardInterrupt):
      run(tmp_path / "b", config)
  finally:
    checkpoints.ocp.CheckpointManager.save = original_save
  assert calls == [1, 2]
  (resumed, _), _ = run(tmp_path / "b", config)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- data-parallel == one device ---------------------------------------------------------------
def _one_device_mesh():
  return Mesh(np.asarray(jax.devices()[:1]), ("data",))


def _assert_trees_close(a, b, rtol=1e-4, atol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(sharding.to_host(x), sharding.to_host(y), rtol=rtol, atol=atol)


@pytest.mark.slow
def test_sharded_generator_step_equals_one_device():
  """The generator's batch split over 8 devices: same images, loss and update as on one device
  (its BatchNorm normalises over the global batch either way)."""
  config = _tiny_config()
  cfg = config.generator_kd
  teacher, stacked = _teachers()
  student = vit.build_vit("test/8", 4, image_size=16, separate_token_head=True)
  student_params = vit.init_params(student, jax.random.key(7), 16)
  labels, weights = np.arange(8, dtype=np.int32) % 4, np.full((3,), 1 / 3, np.float32)
  results = []
  for mesh in (sharding.data_mesh(), _one_device_mesh()):
    init, step = generator_kd.make_generator_step("dense", cfg, generator_kd.Generator(16, cfg.ngf), teacher,
                                                  student, "loop", 8, mesh)
    state = init(jax.random.key(1))
    assert state.z.sharding.spec == P("data") and state.best_images.sharding.spec == P("data")
    losses = []
    for g in range(2):
      state, loss = step(state, labels, stacked, weights, student_params, jax.random.key(10 + g))
      losses.append(loss)
    results.append((state, losses))
  (sharded, sharded_losses), (one, one_losses) = results
  assert len(sharded.z.sharding.device_set) == 8
  _assert_trees_close((sharded.replace(params=None), sharded_losses), (one.replace(params=None), one_losses))
  # The biases of the layers that feed a BatchNorm get a zero gradient up to rounding (BN removes
  # any constant shift), and Adam scales that noise to steps of size ~lr_g in either direction:
  # the two runs' biases may be up to one such step per generator step apart each.
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(sharded.params), jax.tree.leaves(one.params)):
    before_bn = jax.tree_util.keystr(path).endswith("['bias']") and "Conv_2" not in jax.tree_util.keystr(path)
    np.testing.assert_allclose(sharding.to_host(x), sharding.to_host(y), rtol=1e-4,
                               atol=2 * 2 * 1.1 * cfg.lr_g if before_bn else 1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dense", "coboosting"])
def test_sharded_kd_round_equals_one_device(method):
  """A round of KD steps (Co-Boosting: with ODS and a re-weighting pass first) on 8 devices, its
  batches gathered from the pool on the device, ends where the same round on one device does."""
  config = _tiny_config()
  cfg = config.generator_kd
  assert method == "dense" or cfg.ods_eps > 0
  teacher, stacked = _teachers()
  student = vit.build_vit("test/8", 4, image_size=16, separate_token_head=True)
  init = vit.init_params(student, jax.random.key(7), 16)
  tx = distill.make_optimizer(config.distill, 4)
  pool = np.asarray(jax.random.uniform(jax.random.key(2), (16, 16, 16, 3), minval=-1.0, maxval=1.0))
  pool_labels = np.arange(16, dtype=np.int32) % 4
  idx = generator_kd.round_indices(12, 8, 0, 1, 2)  # 12 filled rows, 2 steps of 8
  w0 = np.full((3,), 1 / 3, np.float32)
  results = []
  for mesh in (sharding.data_mesh(), _one_device_mesh()):
    w = w0
    if method == "coboosting":  # 12 filled rows in batches of 8: the second batch is half masked
      w = generator_kd.make_reweight(cfg, teacher, "loop", 8, mesh)(w0, w0, pool, pool_labels, 12, stacked, 1)
    kd_round = generator_kd.jit_kd_round(generator_kd.make_kd_step(method, cfg, tx, teacher, student, "loop"),
                                         mesh)
    state = distill.StudentState(params=jax.tree.map(jnp.copy, init), opt_state=tx.init(init),
                                 step=jnp.zeros((), jnp.int32))
    results.append((w, kd_round(state, pool, idx, stacked, w, jax.random.key(3), 1, jnp.int32(-1))))
  (w8, (state8, loss8, bad8)), (w1, (state1, loss1, bad1)) = results
  np.testing.assert_array_equal(sharding.to_host(w8), sharding.to_host(w1))
  if method == "coboosting":  # the masked rows are not in the gradient: the same step as on 12 rows
    grad_sign = np.sign(sharding.to_host(w8) - w0)
    full = generator_kd.make_reweight(cfg, teacher, "loop", 8, _one_device_mesh())
    assert (grad_sign != 0).all()
    np.testing.assert_array_equal(full(w0, w0, pool[:12], pool_labels[:12], 12, stacked, 1), w8)
  assert int(state8.step) == int(state1.step) == 2 and int(bad8) == int(bad1) == -1
  _assert_trees_close((state8.params, loss8), (state1.params, loss1))
