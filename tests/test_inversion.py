import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmitr_jax import config_base
from fedmitr_jax.models import patches, vit
from fedmitr_jax.server import ensemble, inversion


def _teachers(num=3, classes=10, image_size=16, variant="test/4", seed=0):
  model = vit.build_vit(variant, classes, image_size=image_size)
  base = vit.init_params(model, jax.random.key(seed), image_size)
  keys = jax.random.split(jax.random.key(seed + 1), num)
  # Distinct, non-trivial teachers (the zero-initialised head would make every output uniform).
  stacked = jax.vmap(lambda k: jax.tree.map(
      lambda p: p + 0.2 * jax.random.normal(jax.random.fold_in(k, p.size), p.shape), base))(keys)
  return model, stacked, jnp.full((num,), 1.0 / num)


def _cfg(**overrides):
  cfg = config_base.base_config().inversion
  cfg.iterations, cfg.stops, cfg.log_every = 8, (2, 4, 6), 100
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def test_keep_counts_follow_smi():
  assert inversion.keep_counts(64, 4, 0.3) == [64, 44, 30, 21, 14]
  assert inversion.keep_counts(196, 4, 0.3) == [196, 137, 95, 66, 46]  # ~24% kept at 224 px


@pytest.mark.slow  # 10-16 s; the fast tier covers the same code in test_stages / test_robust_ensemble
def test_ensemble_averages_probabilities_not_logits():
  model, stacked, w = _teachers()
  x = jax.random.normal(jax.random.key(5), (4, 16, 16, 3))
  out = ensemble.ensemble_outputs(model, stacked, w, x, need_attention=True, need_tokens=True)
  logits = jnp.stack([model.apply({"params": jax.tree.map(lambda p: p[k], stacked)}, x)[0] for k in range(3)])
  np.testing.assert_allclose(jnp.exp(out["log_probs"]), jax.nn.softmax(logits, -1).mean(0), rtol=1e-5)
  assert not np.allclose(out["probs"], jax.nn.softmax(logits.mean(0), -1), atol=1e-4)
  vmapped = ensemble.ensemble_outputs(model, stacked, w, x, mode="vmap", need_attention=True, need_tokens=True)
  for key in out:
    np.testing.assert_allclose(out[key], vmapped[key], rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # ~10 s quiet: two ensemble compilations and three reference applies
def test_logit_target_space_is_the_softmax_of_the_weighted_mean_logits():
  model, stacked, w = _teachers()
  w = jnp.asarray([0.5, 0.3, 0.2])
  x = jax.random.normal(jax.random.key(6), (4, 16, 16, 3))
  out = ensemble.ensemble_outputs(model, stacked, w, x, target_space="logit")
  logits = jnp.stack([model.apply({"params": jax.tree.map(lambda p: p[k], stacked)}, x)[0] for k in range(3)])
  np.testing.assert_allclose(out["log_probs"], jax.nn.log_softmax(jnp.tensordot(w, logits, axes=1), -1),
                             rtol=1e-5, atol=1e-6)
  prob_space = ensemble.ensemble_outputs(model, stacked, w, x)
  np.testing.assert_allclose(out["probs"], prob_space["probs"])  # the soft labels stay prob-space
  assert not np.allclose(out["log_probs"], prob_space["log_probs"], atol=1e-4)


def test_step_changes_only_kept_patches_and_stays_in_range():
  model, stacked, w = _teachers()
  cfg = _cfg()
  state = inversion.init_state(cfg, jax.random.key(0), 4, 16, 16)
  keep = jnp.array([[0, 5, 10, 15]] * 4, jnp.int32)
  state = state.replace(keep_idx=keep)
  step = jax.jit(inversion.make_inversion_step(model, cfg, 16))
  labels = jnp.arange(4, dtype=jnp.int32)
  new = state
  for t in range(3):  # several steps: Adam momentum must not leak into frozen patches either
    new, _ = step(new, labels, stacked, w, jax.random.key(t))
  moved = np.asarray(jnp.abs(new.pixels - state.pixels).reshape(4, 4, 4, 4, 4, 3).sum(axis=(2, 4, 5)))
  moved = moved.reshape(4, 16)
  kept_mask = np.asarray(patches.index_to_mask(keep, 16))
  assert (moved[~kept_mask] == 0).all()
  assert (moved[kept_mask] > 0).all()
  assert float(new.pixels.max()) <= 1.0 and float(new.pixels.min()) >= -1.0


@pytest.mark.slow
def test_sparse_stages_really_forward_fewer_tokens():
  """Real token dropping: the compiled step of a later stage costs fewer FLOPs."""
  model, stacked, w = _teachers(variant="test/2")
  cfg = _cfg()
  step = jax.jit(inversion.make_inversion_step(model, cfg, 16))
  labels = jnp.zeros(4, jnp.int32)
  flops = []
  for n in (64, 14):
    state = inversion.init_state(cfg, jax.random.key(0), 4, 16, 64)
    state = state.replace(keep_idx=state.keep_idx[:, :n])
    cost = step.lower(state, labels, stacked, w, jax.random.key(0)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops.append(cost["flops"])
  assert flops[1] < 0.35 * flops[0]


def test_prune_keeps_top_attention_patches():
  model, stacked, w = _teachers()
  cfg = _cfg()
  x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
  keep = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16))
  kept = inversion.make_prune(model, cfg)(x, keep, stacked, w, 5)
  att = ensemble.ensemble_outputs(model, stacked, w, x, need_attention=True)["cls_attention"]
  expected = np.sort(np.argsort(-np.asarray(att), axis=1)[:, :5], axis=1)
  np.testing.assert_array_equal(np.asarray(kept), expected)


@pytest.mark.slow
def test_synthesize_sparse_and_dense_banks():
  model, stacked, w = _teachers()
  cfg = _cfg()
  inverter = inversion.Inverter(model, cfg, 16)
  labels = inversion.balanced_labels(0, 8, 10)
  sparse, facts = inversion.synthesize_batch(inverter, stacked, w, labels, jax.random.key(0),
                                             sparse=True, stage_name="test")
  assert facts["tokens_per_stage"] == [16, 11, 7, 4]
  assert (sparse["masks"].sum(1) == 4).all()
  assert sparse["teacher_logits"].shape == (8, 3, 10) and sparse["token_probs"].shape == (8, 16, 10)
  np.testing.assert_allclose(sparse["token_probs"].sum(-1), 1.0, rtol=1e-5)
  dense, dfacts = inversion.synthesize_batch(inverter, stacked, w, labels, jax.random.key(0),
                                             sparse=False, stage_name="test")
  assert dfacts["tokens_per_stage"] == [16]
  assert (dense["masks"].sum(1) == 4).all()  # dense_mask='attention': ranked once at the end
  # Inversion moves the ensemble towards the targets.
  log_p0 = ensemble.ensemble_outputs(model, stacked, w, jax.random.normal(jax.random.key(0), (8, 16, 16, 3)))
  log_p1 = ensemble.ensemble_outputs(model, stacked, w, jnp.asarray(dense["images"]))
  ce = lambda out: -np.mean(np.take_along_axis(np.asarray(out["log_probs"]), labels[:, None], 1))
  assert ce(log_p1) < ce(log_p0)


def test_balanced_labels():
  labels = inversion.balanced_labels(3, 25, 10)
  assert np.bincount(labels, minlength=10).min() == 2 and np.bincount(labels).max() == 3


@pytest.mark.slow
def test_synthesis_sharded_over_8_devices_equals_one_device():
  from fedmitr_jax import sharding
  assert jax.device_count() == 8
  model, stacked, w = _teachers()
  cfg = _cfg(iterations=4, stops=(2,))
  inverter = inversion.Inverter(model, cfg, 16)
  labels = inversion.balanced_labels(0, 16, 10)
  one, _ = inversion.synthesize_batch(inverter, stacked, w, labels, jax.random.key(0), sparse=True,
                                      stage_name="one")
  shard = sharding.batch_sharder(sharding.data_mesh(), 16, "inversion.batch_size")
  many, _ = inversion.synthesize_batch(inverter, sharding.replicate(sharding.data_mesh(), stacked), w,
                                       labels, jax.random.key(0), sparse=True, stage_name="eight",
                                       shard=shard)
  np.testing.assert_array_equal(one["masks"], many["masks"])
  np.testing.assert_allclose(one["images"], many["images"], atol=1e-4)


@pytest.mark.slow  # ~8 s: the fast tier keeps the step and stage tests of the same loop
def test_compiled_loop_equals_the_per_step_loop_bit_for_bit():
  """One lax.fori_loop over a stage gives exactly what one jitted call per iteration gave."""
  model, stacked, w = _teachers()
  cfg = _cfg()
  state = inversion.init_state(cfg, jax.random.key(0), 8, 16, 16)
  state = state.replace(keep_idx=state.keep_idx[:, 3:14])  # a sparse stage: 11 tokens
  labels = jnp.asarray(inversion.balanced_labels(0, 8, 10))
  rng = jax.random.key(3)
  step = jax.jit(inversion.make_inversion_step(model, cfg, 16))
  expected = state
  for it in range(2, 7):
    expected, metrics = step(expected, labels, stacked, w, jax.random.fold_in(rng, it))
  loop = jax.jit(inversion.make_inversion_loop(model, cfg, 16))
  got, got_metrics, first_bad = loop(state, labels, stacked, w, rng, 2, 7, jnp.int32(-1))
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(metrics["loss"]) == float(got_metrics["loss"]) and int(first_bad) == -1
  # A non-finite loss is recorded in the graph, at the 1-based number of its iteration.
  poisoned = state.replace(pixels=state.pixels.at[0, 0, 0, 0].set(jnp.nan))
  _, _, first_bad = loop(poisoned, labels, stacked, w, rng, 2, 7, jnp.int32(-1))
  assert int(first_bad) == 3


@pytest.mark.slow  # 10-16 s; the fast tier covers the same code in test_stages / test_robust_ensemble
def test_synthesis_stops_on_a_non_finite_loss():
  from fedmitr_jax import guards
  model, stacked, w = _teachers()
  cfg = _cfg(lr=float("nan"))  # NaN pixels after the first update: the second loss is NaN
  inverter = inversion.Inverter(model, cfg, 16)
  labels = inversion.balanced_labels(0, 8, 10)
  try:
    inversion.synthesize_batch(inverter, stacked, w, labels, jax.random.key(0), sparse=True, stage_name="nan")
  except guards.NonFiniteError as e:
    assert "non-finite at step 2;" in str(e) and "inversion.lr" in str(e)
  else:
    raise AssertionError("a NaN synthesis finished")


@pytest.mark.slow  # 10-16 s; the fast tier covers the same code in test_stages / test_robust_ensemble
def test_bank_saves_one_batch_per_save_and_resumes_to_the_same_bank(tmp_path):
  import shutil
  from fedmitr_jax import checkpoints
  from fedmitr_jax.server import synthetic_bank
  model, stacked, w = _teachers()
  cfg = _cfg(iterations=4, stops=(2,), num_batches=3, batch_size=8)
  inverter = inversion.Inverter(model, cfg, 16)
  build = lambda store: synthetic_bank.build_bank("inversion_sparse", inverter, stacked, w, num_classes=10,
                                                  seed=0, sparse=True, store=store)
  full, _ = build(checkpoints.StageStore(tmp_path / "full"))
  progress = tmp_path / "full/stages/inversion_sparse/progress"
  assert sorted(p.name for p in progress.iterdir() if p.name.isdigit()) == ["1", "2", "3"]
  with checkpoints.StageStore(tmp_path / "full").progress_manager("inversion_sparse", None) as manager:
    saved = checkpoints.restore(manager, 2, None)
  assert saved["images"].shape == (8, 16, 16, 3)  # the batch alone, not the bank so far
  np.testing.assert_array_equal(saved["images"], full["images"][8:16])
  # Killed after batch 1's save: batches 2 and 3 are redone and the bank is the same.
  stage = tmp_path / "killed/stages/inversion_sparse"
  shutil.copytree(progress / "1", stage / "progress/1")
  resumed, facts = build(checkpoints.StageStore(tmp_path / "killed"))
  assert len(facts["seconds_per_batch"]) == 2
  for key in synthetic_bank.BANK_KEYS:
    np.testing.assert_array_equal(full[key], resumed[key])
  assert int(resumed["batches_done"]) == 3
