import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from fedmitr_jax import config_base, sharding
from fedmitr_jax.models import patches, vit
from fedmitr_jax.server import distill, synthetic_bank


def _bank(n=16, classes=5, patches_n=16, teachers=3, seed=0):
  rng = np.random.default_rng(seed)
  probs = rng.dirichlet(np.ones(classes), size=(n, patches_n)).astype(np.float32)
  masks = np.zeros((n, patches_n), bool)
  masks[:, :4] = True
  return {"images": rng.uniform(-1, 1, (n, 16, 16, 3)).astype(np.float32),
          "labels": (np.arange(n) % classes).astype(np.int32), "masks": masks,
          "teacher_logits": rng.normal(size=(n, teachers, classes)).astype(np.float32),
          "token_probs": probs}


def _cfg(**kw):
  cfg = config_base.base_config().distill
  cfg.batch_size, cfg.epochs, cfg.log_every = 8, 2.0, 100
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def test_relabel_loss_matches_hand_computation():
  bank = _bank(n=2)
  rng = np.random.default_rng(1)
  cls_logits = rng.normal(size=(2, 5)).astype(np.float32)
  token_logits = rng.normal(size=(2, 16, 5)).astype(np.float32)
  tau, beta = 4.0, 0.5
  loss, terms = distill.relabel_loss(cls_logits, token_logits, bank, tau=tau, beta=beta, relabel_target="token")

  def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  t = softmax(bank["teacher_logits"] / tau).mean(1)
  kd = tau ** 2 * np.mean(np.sum(t * (np.log(t) - np.log(softmax(cls_logits / tau))), -1))
  log_s = np.log(softmax(token_logits))
  per_token = np.where(bank["masks"],
                       -np.take_along_axis(log_s, bank["labels"][:, None, None], -1)[..., 0],
                       -np.sum(bank["token_probs"] * log_s, -1))
  np.testing.assert_allclose(float(terms["kd"]), kd, rtol=1e-5)
  np.testing.assert_allclose(float(loss), kd + beta * per_token.mean(), rtol=1e-5)
  kd_only, _ = distill.relabel_loss(cls_logits, token_logits, bank, tau=tau, beta=0.0, relabel_target="token")
  np.testing.assert_allclose(float(kd_only), kd, rtol=1e-5)
  image_level, _ = distill.relabel_loss(cls_logits, token_logits, bank, tau=tau, beta=beta, relabel_target="image")
  assert not np.isclose(float(image_level), float(loss))


def test_background_temperature_sharpens_only_the_background_targets():
  """T = 1 is the stored targets exactly; T = 0.25 trains the background on q^4 / sum q^4 and
  leaves the kept tokens' hard term and the KD term as they were."""
  bank = _bank(n=2)
  rng = np.random.default_rng(2)
  cls_logits = rng.normal(size=(2, 5)).astype(np.float32)
  token_logits = rng.normal(size=(2, 16, 5)).astype(np.float32)
  kw = dict(tau=4.0, beta=0.5, relabel_target="token")
  plain = distill.relabel_loss(cls_logits, token_logits, bank, **kw)
  same = distill.relabel_loss(cls_logits, token_logits, bank, background_temperature=1.0, **kw)
  assert float(plain[0]) == float(same[0])
  loss, terms = distill.relabel_loss(cls_logits, token_logits, bank, background_temperature=0.25, **kw)
  q = bank["token_probs"].astype(np.float64) ** 4
  q /= q.sum(-1, keepdims=True)
  log_s = np.asarray(jax.nn.log_softmax(token_logits, -1), np.float64)
  background = ~bank["masks"]
  np.testing.assert_allclose(float(terms["token_bg"]), np.sum(-np.sum(q * log_s, -1)[background]) / background.sum(),
                             rtol=1e-5)
  np.testing.assert_allclose(float(terms["token_fg"]), float(plain[1]["token_fg"]), rtol=1e-6)
  np.testing.assert_allclose(float(terms["kd"]), float(plain[1]["kd"]), rtol=1e-6)


def test_roll_flip_moves_patches_with_their_index():
  images = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
  idx = jnp.broadcast_to(jnp.arange(16), (3, 16))
  augmented, positions = patches.random_roll_flip(jax.random.key(4), images, idx, patch_size=4, max_shift=2)
  grid_patches = lambda x: x.reshape(3, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(3, 16, 4, 4, 3)
  orig, aug = grid_patches(images), grid_patches(augmented)
  for b in range(3):
    for i in range(16):
      p = int(positions[b, i])
      assert np.allclose(aug[b, p], orig[b, i]) or np.allclose(aug[b, p], orig[b, i][:, ::-1])


@pytest.mark.slow
def test_sharded_step_equals_single_device_step_without_retracing():
  assert jax.device_count() == 8, "conftest sets 8 CPU devices"
  model = vit.build_vit("test/4", 5, image_size=16, separate_token_head=True)
  cfg = _cfg()
  bank = _bank()
  params = vit.init_params(model, jax.random.key(0), 16)
  tx = distill.make_optimizer(cfg, 10)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = Mesh(np.asarray(devices), ("data",))
    state = distill.StudentState(params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                                 step=jnp.zeros((), jnp.int32))
    state = sharding.replicate(mesh, state)
    step = distill.make_distill_step(model, tx, cfg)
    traced = chex.assert_max_traces(step, n=1)
    jitted = distill.jit_sharded_step(traced, mesh)
    for t in range(3):
      batch = jax.device_put({k: v[t * 4 % 16:][:8] for k, v in bank.items()},
                             jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
      state, metrics = jitted(state, batch, jax.random.key(t))
    assert len(state.params["head"]["kernel"].sharding.device_set) == len(devices)
    results.append((jax.device_get(state.params), float(metrics["loss"])))
    chex.clear_trace_counter()
  for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)


def test_train_student_learns_the_bank_and_checks_batch():
  model = vit.build_vit("test/4", 5, image_size=16, separate_token_head=True)
  bank = _bank(n=32)
  params = vit.init_params(model, jax.random.key(0), 16)
  cfg = _cfg(epochs=15.0, lr=3e-3, beta=0.5)
  trained, facts = distill.train_student(model, cfg, bank, params, seed=0, stage="test")
  assert facts["steps"] == 60 and facts["devices"] == jax.device_count() == 8  # split over the whole mesh
  first = distill.relabel_loss(*_student_out(model, params, bank), bank, tau=4.0, beta=0.5, relabel_target="token")[0]
  last = distill.relabel_loss(*_student_out(model, trained, bank), bank, tau=4.0, beta=0.5, relabel_target="token")[0]
  assert float(last) < 0.92 * float(first)  # soft token targets leave an entropy floor
  with pytest.raises(sharding.ShardingError, match="distill.batch_size"):
    distill.train_student(model, _cfg(batch_size=12), bank, params, seed=0, stage="test")
  with pytest.raises(ValueError, match="distill.batch_size"):
    distill.train_student(model, _cfg(batch_size=64), bank, params, seed=0, stage="test")


def _student_out(model, params, bank):
  logits, out = model.apply({"params": params}, jnp.asarray(bank["images"]))
  return logits, out["token_logits"]


def test_device_bank_loop_equals_host_fed_steps_bit_for_bit():
  """train_student (bank on the device, chunks of steps in one compiled loop) reproduces one
  jitted step per batch gathered on the host, exactly, over 8 devices; chunks end at the log
  (every 3 steps) and save (every 4) points, so some are padded."""
  model = vit.build_vit("test/4", 5, image_size=16, separate_token_head=True)
  bank = _bank(n=32)
  params = vit.init_params(model, jax.random.key(0), 16)
  cfg = _cfg(epochs=3.0, log_every=3, checkpoint_every_steps=4)
  trained, facts = distill.train_student(model, cfg, bank, params, seed=0, stage="test")
  assert facts["steps"] == 12
  mesh = sharding.data_mesh()
  tx = distill.make_optimizer(cfg, 12)
  state = sharding.replicate(mesh, distill.StudentState(params=jax.tree.map(jnp.copy, params),
                                                        opt_state=tx.init(params), step=jnp.zeros((), jnp.int32)))
  step = distill.jit_sharded_step(distill.make_distill_step(model, tx, cfg), mesh)
  rng = jax.random.fold_in(jax.random.key(0), 4)
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  for t in range(12):
    idx = distill.batch_indices(32, 8, t, seed=0)
    state, _ = step(state, jax.device_put({k: v[idx] for k, v in bank.items()}, split), jax.random.fold_in(rng, t))
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(trained)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_bfloat16_bank_trains_a_student_close_to_the_float32_one():
  """The same 12 steps from a bank stored in bfloat16 (inversion.bank_dtype): the student differs
  from the float32 bank's by a small fraction of what training moved it."""
  model = vit.build_vit("test/4", 5, image_size=16, separate_token_head=True)
  bank = _bank(n=32)
  half = {k: v.astype(jnp.bfloat16) if k in synthetic_bank.REAL_KEYS else v for k, v in bank.items()}
  params = vit.init_params(model, jax.random.key(0), 16)
  cfg = _cfg(epochs=3.0, lr=3e-3, log_every=3, checkpoint_every_steps=4)
  full_trained, _ = distill.train_student(model, cfg, bank, params, seed=0, stage="float32")
  half_trained, _ = distill.train_student(model, cfg, half, params, seed=0, stage="bfloat16")
  flat = lambda tree: np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(tree)])
  moved = np.linalg.norm(flat(full_trained) - flat(params))
  apart = np.linalg.norm(flat(half_trained) - flat(full_trained))
  assert 0 < apart < 0.05 * moved, (apart, moved)
  predict = lambda params: np.argmax(_student_out(model, params, bank)[0], -1)
  assert (predict(full_trained) == predict(half_trained)).mean() >= 0.9
