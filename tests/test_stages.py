"""Fast unit tests of the stage helpers the end-to-end runs use: the synthetic bank stage, student
stages, evaluation, the NaN guard and the bank picture, on a tiny ViT (test/8 at 16 px, 4 patches)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmitr_jax import checkpoints, config_base, diagnostics, evaluate, guards, metrics, plots
from fedmitr_jax.models import vit
from fedmitr_jax.server import data_free, inversion, synthetic_bank


def _teachers(num=3, classes=4):
  model = vit.build_vit("test/8", classes, image_size=16)
  base = vit.init_params(model, jax.random.key(0), 16)
  keys = jax.random.split(jax.random.key(1), num)
  stacked = jax.vmap(lambda k: jax.tree.map(
      lambda p: p + 0.2 * jax.random.normal(jax.random.fold_in(k, p.size), p.shape), base))(keys)
  return model, stacked


def test_bank_stage_fills_every_batch_reports_metrics_and_reloads(tmp_path):
  model, stacked = _teachers(num=2)
  cfg = config_base.base_config().inversion
  cfg.num_batches, cfg.batch_size, cfg.iterations, cfg.stops, cfg.log_every = 2, 8, 2, (1,), 1
  inverter = inversion.Inverter(model, cfg, 16)
  store = checkpoints.StageStore(tmp_path / "work")
  with metrics.recording(tmp_path / "work", curves=False):
    bank, facts = synthetic_bank.build_bank("inversion_sparse", inverter, stacked, [0.5, 0.5],
                                            num_classes=4, seed=0, sparse=True, store=store)
  assert facts["images"] == 16 and facts["tokens_per_stage"] == [4, 2] and len(facts["seconds_per_batch"]) == 2
  assert facts["devices"] == jax.device_count() == 8  # every batch split over the whole mesh
  assert bank["images"].shape == (16, 16, 16, 3) and int(bank["batches_done"]) == 2
  assert (bank["masks"].sum(1) == 2).all()  # one stop: 30% of the 4 patches dropped, rounded
  assert np.bincount(bank["labels"], minlength=4).tolist() == [4, 4, 4, 4]
  np.testing.assert_allclose(bank["token_probs"].sum(-1), 1.0, rtol=1e-5)
  assert np.abs(bank["images"]).max() <= 1.0 and not (bank["images"][:8] == bank["images"][8:]).all()
  table = metrics.read_metrics(tmp_path / "work" / metrics.METRICS_FILE)
  assert sorted(table) == ["inversion_sparse 1/2", "inversion_sparse 2/2"]
  assert [row["tokens"] for row in table["inversion_sparse 2/2"].values()] == [4, 2]
  again, again_facts = synthetic_bank.build_bank("inversion_sparse", inverter, stacked, [0.5, 0.5],
                                                 num_classes=4, seed=0, sparse=True, store=store)
  assert again_facts == json.loads(json.dumps(facts))
  for key in synthetic_bank.BANK_KEYS:
    np.testing.assert_array_equal(np.asarray(again[key]), bank[key])
  plots.save_bank_grid(bank, ["a", "b", "c", "d"], "test/8", tmp_path / "bank.png", per_class=2)
  assert (tmp_path / "bank.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_bfloat16_bank_is_the_float32_bank_rounded_once_and_survives_its_checkpoints(tmp_path):
  """inversion.bank_dtype='bfloat16': the same inversion, each batch rounded once before its save;
  the finished bank reloads in bfloat16, and so does a bank rebuilt from its per-batch saves."""
  model, stacked = _teachers(num=2)
  cfg = config_base.base_config().inversion
  cfg.num_batches, cfg.batch_size, cfg.iterations, cfg.stops, cfg.log_every = 2, 8, 2, (1,), 1
  inverter = inversion.Inverter(model, cfg, 16)  # reads no bank_dtype: one compilation serves both banks
  build = lambda store: synthetic_bank.build_bank("inversion_sparse", inverter, stacked, [0.5, 0.5],
                                                  num_classes=4, seed=0, sparse=True, store=store)
  full, _ = build(checkpoints.StageStore(tmp_path / "float32"))
  cfg.bank_dtype = "bfloat16"
  store = checkpoints.StageStore(tmp_path / "bfloat16")
  half, facts = build(store)
  reloaded, _ = build(store)  # the finished stage, from its result checkpoint
  (tmp_path / "bfloat16" / "stages" / "inversion_sparse" / "DONE").unlink()
  rebuilt, _ = build(store)  # unfinished again: every batch comes back from its own save
  assert facts["images"] == 16 and all(half[k].dtype == jnp.bfloat16 for k in synthetic_bank.REAL_KEYS)
  for key in synthetic_bank.BANK_KEYS:
    rounded = full[key].astype(jnp.bfloat16) if key in synthetic_bank.REAL_KEYS else full[key]
    for bank in (half, reloaded, rebuilt):
      assert np.asarray(bank[key]).dtype == rounded.dtype, key
      np.testing.assert_array_equal(np.asarray(bank[key]), rounded, err_msg=key)
  assert half["images"].nbytes * 2 == full["images"].nbytes


def test_student_stage_trains_once_then_loads(tmp_path):
  store = checkpoints.StageStore(tmp_path)
  init = {"w": jnp.zeros((3,)), "b": jnp.ones((2, 2))}
  calls = []

  def train(params, manager):
    calls.append(manager is not None)
    return jax.tree.map(lambda p: p + 1.5, params), {"seconds": 0.25, "steps": 3}

  params, facts = data_free.load_or_train(store, "distill_x", init, train)
  loaded, loaded_facts = data_free.load_or_train(store, "distill_x", init, train)
  assert calls == [True] and store.is_done("distill_x")
  assert loaded_facts == facts == {"seconds": 0.25, "steps": 3}
  np.testing.assert_array_equal(np.asarray(loaded["w"]), np.full((3,), 1.5))
  np.testing.assert_array_equal(np.asarray(loaded["b"]), np.full((2, 2), 2.5))


def test_student_init_starts_from_fedavg_with_its_head_as_token_head():
  config = config_base.base_config()
  config.dataset.image_size, config.model.variant = 16, "test/8"
  student = vit.build_vit("test/8", 4, image_size=16, separate_token_head=True)
  fedavg = vit.init_params(vit.build_vit("test/8", 4, image_size=16), jax.random.key(3), 16)
  params = data_free.student_init(config, student, fedavg)
  np.testing.assert_array_equal(np.asarray(params["token_head"]["kernel"]), np.asarray(fedavg["head"]["kernel"]))
  assert params["head"]["kernel"] is not fedavg["head"]["kernel"]  # fresh buffers: the step donates them
  config.distill.init = "random"
  shapes = jax.tree.map(jnp.shape, data_free.student_init(config, student, fedavg))
  assert shapes == jax.tree.map(jnp.shape, vit.init_params(student, jax.random.key(0), 16))


def test_evaluation_of_clients_ensemble_and_fedavg():
  model, stacked = _teachers(num=2)
  images = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)  # 10: a padded batch
  forward = jax.jit(lambda params: model.apply({"params": params}, evaluate.datasets.normalize(images))[0])
  logits = [np.asarray(forward(jax.tree.map(lambda p: p[k], stacked))) for k in range(2)]
  weights = np.array([0.25, 0.75], np.float32)
  ensemble_labels = (weights[:, None, None] * np.stack([jax.nn.softmax(x) for x in logits])).sum(0).argmax(-1)
  teachers = diagnostics.teacher_diagnostics(model, stacked, images, ensemble_labels, 8, weights, num_classes=4)
  assert teachers["ensemble"]["test_acc"] == 1.0
  assert [row["test_acc"] for row in teachers["clients"]] == \
      [float((x.argmax(-1) == ensemble_labels).mean()) for x in logits]
  first = jax.tree.map(lambda p: p[0], stacked)
  assert evaluate.accuracy(model, first, images, logits[0].argmax(-1), 8) == 1.0
  np.testing.assert_allclose(evaluate.client_weights([10, 30], "data_size"), [0.25, 0.75])
  np.testing.assert_allclose(evaluate.client_weights([10, 30], "uniform"), [0.5, 0.5])
  averaged = evaluate.fedavg_params(stacked, weights)
  np.testing.assert_allclose(averaged["head"]["kernel"],
                             0.25 * stacked["head"]["kernel"][0] + 0.75 * stacked["head"]["kernel"][1], rtol=1e-5, atol=1e-7)


def test_guard_names_the_stage_the_first_bad_step_and_the_kept_save():
  guard = guards.FiniteGuard("distill_x", "distill.lr")
  guard.update(1, jnp.array(0.5))
  guard.check(last_save=None)  # all finite: nothing raised
  guard.update(2, jnp.array([1.0, jnp.nan]))
  guard.update(3, jnp.array(jnp.inf))
  with pytest.raises(guards.NonFiniteError, match=r"^\[distill_x\] the loss became non-finite at step 2; "
                                                   r".*last good save \(step 1\) is kept; lower distill.lr"):
    guard.check(last_save=1)
  with pytest.raises(guards.NonFiniteError, match="nothing of it was saved"):
    guard.check()


@pytest.mark.slow  # two banks and a resume (~several s on 2 shared cores)
def test_parallel_batches_bank_equals_one_batch_at_a_time_and_resumes(tmp_path):
  """inversion.parallel_batches=2: the 2 batches run side by side on a ('batches', 'data') = 2 x 4
  mesh, each with its own targets and random stream, so the bank is G=1's up to float rounding;
  each batch still has its own save, and a kill after the group's first save resumes to the same
  bank."""
  import shutil
  model, stacked = _teachers(num=2)
  cfg = config_base.base_config().inversion
  cfg.num_batches, cfg.batch_size, cfg.iterations, cfg.stops, cfg.log_every = 2, 8, 3, (1, 2), 1
  cfg.drop_ratio = 0.5  # 4 -> 2 -> 1 patches: two prunes
  inverter = inversion.Inverter(model, cfg, 16)
  build = lambda store: synthetic_bank.build_bank("inversion_sparse", inverter, stacked, [0.5, 0.5],
                                                  num_classes=4, seed=0, sparse=True, store=store)
  one, _ = build(checkpoints.StageStore(tmp_path / "one"))
  cfg.parallel_batches = 2
  two, facts = build(checkpoints.StageStore(tmp_path / "two"))
  assert facts["devices"] == 8 and facts["parallel_batches"] == 2 and len(facts["seconds_per_batch"]) == 2
  assert facts["tokens_per_stage"] == [4, 2, 1]
  # Masks come from top-k of CLS attention; with these teachers no two patches tie within rounding,
  # so the kept patches are the same. The vmapped, differently split computation rounds differently
  # (measured: 1 of 12288 pixels off by 1.6e-5 after 3 Adam steps, which divide by the gradient's
  # size and so magnify rounding in small gradients); 1e-4 bounds it.
  np.testing.assert_array_equal(two["labels"], one["labels"])
  np.testing.assert_array_equal(two["masks"], one["masks"])
  for key in synthetic_bank.REAL_KEYS:
    np.testing.assert_allclose(two[key], one[key], rtol=1e-4, atol=1e-4, err_msg=key)
  assert not np.allclose(two["images"][:8], two["images"][8:])  # each batch has its own stream
  progress = tmp_path / "two/stages/inversion_sparse/progress"
  assert sorted(p.name for p in progress.iterdir() if p.name.isdigit()) == ["1", "2"]
  # Killed between the group's two saves: the group is redone, batch 1 stays as saved.
  shutil.copytree(progress / "1", tmp_path / "killed/stages/inversion_sparse/progress/1")
  resumed, resumed_facts = build(checkpoints.StageStore(tmp_path / "killed"))
  assert len(resumed_facts["seconds_per_batch"]) == 1 and int(resumed["batches_done"]) == 2
  for key in synthetic_bank.BANK_KEYS:
    np.testing.assert_array_equal(resumed[key], two[key], err_msg=key)
