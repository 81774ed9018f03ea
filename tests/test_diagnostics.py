"""Token diagnostics, per-class accuracy and the per-class heat map (fedmitr_jax/diagnostics.py)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import Mesh
from scipy.linalg import hadamard

from fedmitr_jax import config_base, diagnostics, evaluate, pipeline, sharding
from fedmitr_jax.data import datasets
from fedmitr_jax.models import vit

IMAGE_SIZE, NUM_CLASSES = 16, 3  # test/8 at 16 px: 4 patch tokens, width 32


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _entropy(p):
  return float(-(p * np.log(p)).sum(-1).mean())


def _known_params(model, token_logits, cls_logits):
  """Parameters whose outputs do not depend on the image: token i's logits are token_logits[i]
  and the CLS logits are cls_logits. Every block adds zero to the residual stream (zero output
  projections), the patch embedding is zero, so token i is its position embedding, a balanced
  +-1 Hadamard row that the final LayerNorm leaves (almost) unchanged; the head maps row i to
  token_logits[i] (Hadamard rows are orthogonal with squared norm 32)."""
  shapes = jax.eval_shape(lambda: vit.init_params(model, jax.random.key(0), IMAGE_SIZE))
  # Every kernel and bias zero, every LayerNorm scale one.
  params = traverse_util.unflatten_dict({k: (np.ones if k[-1] == "scale" else np.zeros)(v.shape, np.float32)
                                         for k, v in traverse_util.flatten_dict(shapes).items()})
  rows = hadamard(32).astype(np.float32)[1:]  # rows 1.. are balanced: mean 0, variance 1
  params["pos_embedding"] = rows[:4][None]
  params["cls"] = rows[4][None, None]
  table = np.concatenate([token_logits, cls_logits[None]])  # [5, C]
  params["head"]["kernel"] = rows[:5].T @ table / 32.0
  return params


def _stack(*trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def test_token_diagnostics_of_a_model_with_known_token_logits():
  model = vit.build_vit("test/8", NUM_CLASSES, image_size=IMAGE_SIZE)
  tokens_a = np.array([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 4.0]], np.float32)
  tokens_b = np.array([[0.0, 0.0, 0.0], [0.0, 5.0, 0.0], [2.0, 0.0, 0.0], [0.0, 3.0, 0.0]], np.float32)
  cls_a, cls_b = np.array([0.0, 1.0, 0.0], np.float32), np.array([0.0, 0.0, 3.0], np.float32)
  client_params = _stack(_known_params(model, tokens_a, cls_a), _known_params(model, tokens_b, cls_b))
  weights = np.array([0.25, 0.75])
  images = np.random.default_rng(0).integers(0, 256, (7, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
  labels = np.array([0, 1, 2, 2, 2, 1, 0], np.int32)
  diag = diagnostics.teacher_diagnostics(model, client_params, images, labels, batch_size=8,
                                         weights=weights, num_classes=NUM_CLASSES)
  # By hand: every image gets the same token distributions.
  p_a, p_b = _softmax(tokens_a), _softmax(tokens_b)
  p_ens = 0.25 * p_a + 0.75 * p_b
  label_share = np.bincount(labels, minlength=3) / len(labels)  # [2/7, 2/7, 3/7]
  for row, p in zip(diag["clients"] + [diag["ensemble"]], (p_a, p_b, p_ens)):
    assert row["token_entropy"] == pytest.approx(_entropy(p), abs=1e-5)
    # token i is right on the images labelled argmax(p_i): the mean over tokens of that label's share
    assert row["token_acc"] == pytest.approx(label_share[p.argmax(-1)].mean(), abs=1e-6)
  # token argmaxes: client a (0, 1, 2, 2) -> (2/7 + 2/7 + 3/7 + 3/7) / 4; written out once
  assert diag["clients"][0]["token_acc"] == pytest.approx(10 / 28, abs=1e-6)
  # CLS: client a says class 1 everywhere, client b class 2; the ensemble (weight 0.75 on b) says 2
  assert diag["clients"][0]["test_acc"] == pytest.approx(2 / 7)
  assert diag["clients"][0]["per_class"] == [0.0, 1.0, 0.0]
  assert diag["clients"][1]["per_class"] == [0.0, 0.0, 1.0]
  assert diag["ensemble"]["test_acc"] == pytest.approx(3 / 7)
  assert diag["ensemble"]["per_class"] == [0.0, 0.0, 1.0]


def test_uniform_tokens_give_log_c_entropy():
  model = vit.build_vit("test/8", NUM_CLASSES, image_size=IMAGE_SIZE)
  zeros = np.zeros((4, NUM_CLASSES), np.float32)
  params = _known_params(model, zeros, np.zeros(NUM_CLASSES, np.float32))
  images = np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  # Two clients and batch 8, the shapes of the test above: its compilation is reused.
  diag = diagnostics.teacher_diagnostics(model, _stack(params, params), images, np.array([0, 1], np.int32), 8,
                                         np.array([0.5, 0.5]), NUM_CLASSES)
  assert diag["ensemble"]["token_entropy"] == pytest.approx(np.log(NUM_CLASSES), abs=1e-6)


@pytest.mark.slow
def test_diagnostics_match_a_direct_computation_on_a_random_model():
  """Image-dependent outputs, a batch size that leaves a padded tail, unequal weights: the
  batched, jitted pass equals numpy on the whole set at once and `evaluate`'s predictions."""
  model = vit.build_vit("test/8", NUM_CLASSES, image_size=IMAGE_SIZE)
  rng = np.random.default_rng(1)

  init = jax.jit(lambda key: vit.init_params(model, key, IMAGE_SIZE))

  def random_client(seed):
    params = init(jax.random.key(seed))
    head = dict(params["head"], kernel=jnp.asarray(rng.normal(0, 1.0, params["head"]["kernel"].shape),
                                                   jnp.float32))
    return dict(params, head=head)

  clients = [random_client(s) for s in range(2)]
  images = rng.integers(0, 256, (23, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
  labels = rng.integers(0, NUM_CLASSES, 23).astype(np.int32)
  weights = np.array([0.7, 0.3])
  diag = diagnostics.teacher_diagnostics(model, _stack(*clients), images, labels, 8, weights, NUM_CLASSES)

  cls_probs, token_probs = [], []
  apply = jax.jit(lambda p, x: model.apply({"params": p}, datasets.normalize(x)))
  for params in clients:
    logits, out = apply(params, images)
    cls_probs.append(_softmax(np.asarray(logits, np.float64)))
    token_probs.append(_softmax(np.asarray(out["token_logits"], np.float64)))
  ensemble_tokens = sum(w * p for w, p in zip(weights, token_probs))
  for k, params in enumerate(clients):
    row = diag["clients"][k]
    assert row["token_entropy"] == pytest.approx(_entropy(token_probs[k]), abs=1e-5)
    assert row["token_acc"] == pytest.approx((token_probs[k].argmax(-1) == labels[:, None]).mean())
    assert row["test_acc"] == evaluate.accuracy(model, params, images, labels, 8)
    predictions = evaluate.predicted_labels(model, params, images, 8)
    assert row["per_class"] == diagnostics.per_class_accuracy(predictions, labels, NUM_CLASSES)
  assert diag["ensemble"]["token_entropy"] == pytest.approx(_entropy(ensemble_tokens), abs=1e-5)
  ensemble_hits = ensemble_tokens.argmax(-1) == labels[:, None]
  assert diag["ensemble"]["token_acc"] == pytest.approx(ensemble_hits.mean())
  ensemble_predictions = sum(w * p for w, p in zip(weights, cls_probs)).argmax(-1)
  assert diag["ensemble"]["test_acc"] == pytest.approx((ensemble_predictions == labels).mean())



@pytest.mark.slow
def test_evaluation_split_over_8_devices_equals_one_device():
  """Test batches split over the 8-device mesh (the last one padded) give the predictions,
  accuracies and token diagnostics of the same passes on a one-device mesh."""
  assert jax.device_count() == 8
  model = vit.build_vit("test/8", NUM_CLASSES, image_size=IMAGE_SIZE)
  init = jax.jit(lambda key: vit.init_params(model, key, IMAGE_SIZE))
  rng = np.random.default_rng(2)
  clients = [dict(p, head=dict(p["head"], kernel=rng.normal(0, 1.0, p["head"]["kernel"].shape).astype(np.float32)))
             for p in (init(jax.random.key(s)) for s in range(2))]
  images = rng.integers(0, 256, (20, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)  # 8 + 8 + 4 (padded)
  labels = rng.integers(0, NUM_CLASSES, 20).astype(np.int32)
  one_device = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  runs = [(evaluate.predicted_labels(model, clients[0], images, 8, mesh=mesh),
           diagnostics.teacher_diagnostics(model, _stack(*clients), images, labels, 8, [0.6, 0.4], NUM_CLASSES,
                                           mesh=mesh)) for mesh in (sharding.data_mesh(), one_device)]
  (split_predictions, split_diag), (one_predictions, one_diag) = runs
  np.testing.assert_array_equal(split_predictions, one_predictions)
  assert len(set(split_predictions)) > 1  # a model that says one class everywhere would prove little
  for a, b in zip(split_diag["clients"] + [split_diag["ensemble"]], one_diag["clients"] + [one_diag["ensemble"]]):
    assert a["test_acc"] == b["test_acc"] and a["per_class"] == b["per_class"]
    np.testing.assert_allclose([a["token_entropy"], a["token_acc"]], [b["token_entropy"], b["token_acc"]],
                               rtol=1e-6)
  assert split_diag["clients"][0]["test_acc"] == evaluate.accuracy_of(split_predictions, labels)


def test_per_class_accuracy_against_a_hand_count():
  labels = np.array([0, 0, 0, 1, 1, 3, 3, 3, 3])
  predictions = np.array([0, 1, 0, 1, 0, 3, 0, 3, 2])
  # class 0: 2 of 3; class 1: 1 of 2; class 2: no test example; class 3: 2 of 4
  assert diagnostics.per_class_accuracy(predictions, labels, 4) == [2 / 3, 0.5, None, 0.5]


def _diag_results():
  row = lambda acc, per_class, entropy, token_acc: {"test_acc": acc, "per_class": per_class,
                                                   "token_entropy": entropy, "token_acc": token_acc}
  teachers = {"clients": [row(0.5, [1.0, 0.0], 0.6, 0.4), row(0.5, [0.0, 1.0], 0.5, 0.7)],
              "ensemble": row(0.75, [1.0, 0.5], 0.55, 0.6)}
  per_class = {"fedavg": [0.25, None], "ensemble": [1.0, 0.5]}
  return diagnostics.summary(teachers, per_class, ("cat", "dog"))


def test_summary_and_heat_map_rows(tmp_path):
  diag = _diag_results()
  assert diag["uniform_entropy"] == pytest.approx(np.log(2))
  assert diag["ensemble"] == {"token_entropy": 0.55, "token_acc": 0.6}
  table = diagnostics.per_class_table(diag)
  assert list(table) == ["fedavg", "ensemble", "client 0", "client 1"]
  assert table["client 1"] == [0.0, 1.0]
  path = tmp_path / "per_class.png"
  diagnostics.save_per_class_heatmap(table, diag["class_names"], path)
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
  with pytest.raises(ValueError, match="3 class names for 2 columns"):
    diagnostics.save_per_class_heatmap(table, ("a", "b", "c"), tmp_path / "bad.png")


def test_results_markdown_has_the_diagnostics_table(tmp_path):
  results = {"methods": {"fedavg": {"test_acc": 0.25}}, "clients": [{"test_acc": 0.5, "num_examples": 3}] * 2,
             "diagnostics": _diag_results()}
  evaluate.write_results_markdown(results, tmp_path / "results.md")
  text = (tmp_path / "results.md").read_text()
  assert "| teacher | token entropy (nats; uniform = 0.693) | token acc (%) |" in text
  assert "| client 1 | 0.500 | 70.00 |" in text and "| ensemble | 0.550 | 60.00 |" in text


@pytest.mark.slow
def test_one_client_run_reports_its_accuracy_and_diagnostics(tmp_path):
  """num_clients=1 (configs/central_gate.py): one client holds every example, FedAvg and the
  ensemble are that client, and the run writes its diagnostics and heat map."""
  rng = np.random.default_rng(0)
  dataset = datasets.Dataset(
      train_images=rng.integers(0, 256, (40, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
      train_labels=(np.arange(40) % NUM_CLASSES).astype(np.int32),
      test_images=rng.integers(0, 256, (12, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
      test_labels=(np.arange(12) % NUM_CLASSES).astype(np.int32),
      class_names=("a", "b", "c"), name="random")
  c = config_base.base_config()
  c.methods = ("fedavg", "ensemble")
  c.dataset.image_size = IMAGE_SIZE
  c.partition.method = "iid"
  c.partition.num_clients = 1
  c.model.variant = "test/8"
  c.clients.epochs, c.clients.batch_size = 1.0, 16
  c.eval.batch_size = 8
  results = pipeline.run(c, dataset, tmp_path)
  assert [row["num_examples"] for row in results["clients"]] == [40]
  client = results["clients"][0]["test_acc"]
  assert results["methods"]["fedavg"]["test_acc"] == client == results["methods"]["ensemble"]["test_acc"]
  diag = results["diagnostics"]
  assert diag["ensemble"]["token_entropy"] == pytest.approx(diag["clients"][0]["token_entropy"], abs=1e-6)
  assert diag["per_class"]["fedavg"] == diag["clients"][0]["per_class"]
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["diagnostics"]["class_names"] == ["a", "b", "c"]
  for name in ("per_class.png", "partition.png", "results.md"):
    assert (tmp_path / name).stat().st_size > 0, name


def test_bank_targets_against_a_hand_computation():
  """Two images, three patches, two classes: image_acc / entropies / token accuracies by hand."""
  half, sure = [0.5, 0.5], [0.9, 0.1]
  bank = {"labels": np.array([0, 1], np.int32),
          "masks": np.array([[True, False, False], [True, True, False]]),
          # teacher 0 says class 0, teacher 1 says class 1 with the same margin: image 0 ties
          # (mean [0.5, 0.5], argmax 0 = its label), image 1 favours class 1 under both teachers
          "teacher_logits": np.array([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 2.0], [0.0, 2.0]]], np.float32),
          "token_probs": np.array([[sure, half, [0.2, 0.8]], [[0.1, 0.9], sure, half]], np.float32)}
  row = diagnostics.bank_targets(bank)
  h = lambda p: -sum(x * np.log(x) for x in p)
  p1 = 1 / (1 + np.exp(-2.0))
  assert row["images"] == 2 and row["kept_share"] == pytest.approx(0.5)
  assert row["image_acc"] == pytest.approx(1.0)
  assert row["image_entropy"] == pytest.approx((np.log(2) + h([1 - p1, p1])) / 2, rel=1e-5)
  # kept: image 0 patch 0 (argmax 0 = label 0), image 1 patches 0 (argmax 1 = label) and 1 (argmax 0)
  assert row["token_acc_kept"] == pytest.approx(2 / 3)
  assert row["token_entropy_kept"] == pytest.approx((h(sure) + h([0.1, 0.9]) + h(sure)) / 3, rel=1e-5)
  # dropped: image 0 patches 1 (tie: argmax 0 = label) and 2 (argmax 1), image 1 patch 2 (tie: 0)
  assert row["token_acc_dropped"] == pytest.approx(1 / 3)
  assert row["token_entropy_dropped"] == pytest.approx((np.log(2) + h([0.2, 0.8]) + np.log(2)) / 3, rel=1e-5)
  every = diagnostics.bank_targets({**bank, "masks": np.ones((2, 3), bool)})
  assert every["token_acc_dropped"] is None and every["token_entropy_dropped"] is None
