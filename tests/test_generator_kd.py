"""DENSE and Co-Boosting pieces: generator, losses, ensemble re-weighting, ODS, a resumed run."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmitr_jax import checkpoints, config_base
from fedmitr_jax.models import vit
from fedmitr_jax.server import generator_kd


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
  reweight = generator_kd.make_reweight(cfg, model, "loop", batch_size=4)
  w = reweight(w0, w0, images, labels, stacked, round_index=2)
  step = cfg.reweight_lr * cfg.reweight_decay ** 2
  np.testing.assert_allclose(np.abs(np.asarray(w - w0)), step, rtol=1e-5)
  # Far from w0 the projection holds w within w0 + [-1, 1] and [0, 1].
  far = reweight(jnp.array([0.0, 1.0, 5.0]), w0, images, labels, stacked, round_index=0)
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


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(tmp_path):
  """A run stopped after round 1 of 2 and resumed ends with the same student as one that ran
  straight through. Co-Boosting: its state (pool, student, ensemble weights) is DENSE's plus w."""
  method = "coboosting"
  config = _tiny_config()
  teacher, stacked = _teachers()
  student = vit.build_vit("test/8", 4, image_size=16, separate_token_head=True)
  init = vit.init_params(student, jax.random.key(7), 16)
  weights = jnp.full((3,), 1 / 3)

  def run(directory, cfg):
    with checkpoints.StageStore(directory).progress_manager("s", max_to_keep=1) as manager:
      return generator_kd.train(method, cfg, teacher, student, stacked, weights,
                                jax.tree.map(jnp.copy, init), stage="s", manager=manager)

  straight, facts = run(tmp_path / "a", config)
  assert facts["rounds"] == 2 and facts["kd_steps"] == 4
  # "Kill" after round 1: a run that saved round 1 of the same 2-round plan, then resumes.
  one_round = _tiny_config()
  original_save = checkpoints.ocp.CheckpointManager.save
  calls = []

  def save_then_stop(self, step, *args, **kwargs):
    original_save(self, step, *args, **kwargs)
    calls.append(step)
    raise KeyboardInterrupt

  checkpoints.ocp.CheckpointManager.save = save_then_stop
  try:
    with pytest.raises(KeyboardInterrupt):
      run(tmp_path / "b", one_round)
  finally:
    checkpoints.ocp.CheckpointManager.save = original_save
  assert calls == [1]
  resumed, _ = run(tmp_path / "b", one_round)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
