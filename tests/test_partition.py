"""Tests for fedmitr_jax.data.partition on synthetic labels (10 classes x 500 examples)."""
import json
import os

import numpy as np
import pytest

from fedmitr_jax import config_base
from fedmitr_jax.data import partition

LABELS = np.repeat(np.arange(10), 500)
KW = dict(alpha=0.5, classes_per_client=2, min_client_examples=10)


def _parts(method, seed=0, num_clients=5, labels=LABELS, **kw):
  return partition.partition_indices(labels, num_clients, method, seed=seed, **{**KW, **kw})


def _mean_entropy(parts, labels=LABELS):
  counts = partition.class_counts(labels, parts, 10).astype(float)
  p = counts / counts.sum(1, keepdims=True)
  return float(np.mean(-np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=1)))


@pytest.mark.parametrize("method", partition.METHODS)
def test_deterministic_in_seed(method):
  # 10 clients: with classes_per_client each class then has 2 holders, so the seed matters.
  a, b, c = (_parts(method, seed=s, num_clients=10) for s in (3, 3, 4))
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("method", partition.METHODS)
def test_sorted_disjoint_and_covering(method):
  parts = _parts(method, num_clients=7)
  assert len(parts) == 7
  assert all(p.dtype == np.int64 and (np.diff(p) > 0).all() for p in parts)
  joined = np.concatenate(parts)
  assert len(np.unique(joined)) == len(joined)  # disjoint
  # Covering: classes_per_client too, as 7 clients x 2 classes hold all 10 classes.
  assert np.array_equal(np.sort(joined), np.arange(len(LABELS)))


def test_iid_near_equal_sizes():
  sizes = [len(p) for p in _parts("iid", num_clients=7)]
  assert max(sizes) - min(sizes) <= 1


def _niid_bench_reference(labels, num_clients, alpha, min_size_required, seed):
  """The DENSE / NIID-Bench loop, transcribed with a Generator in place of np.random."""
  rng, n, min_size = np.random.default_rng(seed), len(labels), 0
  while min_size < min_size_required:
    idx_batch = [[] for _ in range(num_clients)]
    for k in range(10):
      idx_k = rng.permutation(np.where(labels == k)[0])
      proportions = rng.dirichlet(np.repeat(alpha, num_clients))
      proportions = np.array([p * (len(idx_j) < n / num_clients) for p, idx_j in zip(proportions, idx_batch)])
      proportions = proportions / proportions.sum()
      proportions = (np.cumsum(proportions) * len(idx_k)).astype(int)[:-1]
      idx_batch = [idx_j + idx.tolist() for idx_j, idx in zip(idx_batch, np.split(idx_k, proportions))]
      min_size = min(len(idx_j) for idx_j in idx_batch)
  return [np.sort(np.asarray(b, np.int64)) for b in idx_batch]


@pytest.mark.parametrize("alpha, num_clients, seed", [(0.1, 5, 0), (0.05, 10, 1), (1.0, 20, 2)])
def test_dirichlet_matches_niid_bench_reference(alpha, num_clients, seed):
  ours = _parts("dirichlet", seed=seed, num_clients=num_clients, alpha=alpha, min_client_examples=30)
  ref = _niid_bench_reference(LABELS, num_clients, alpha, 30, seed)
  assert all(np.array_equal(x, y) for x, y in zip(ours, ref))


def test_dirichlet_respects_min_size_and_skew_grows_as_alpha_shrinks():
  skewed = _parts("dirichlet", num_clients=10, alpha=0.1, min_client_examples=50)
  assert min(len(p) for p in skewed) >= 50
  flat = _parts("dirichlet", num_clients=10, alpha=100.0)
  assert _mean_entropy(skewed) < _mean_entropy(flat) - 0.5
  assert _mean_entropy(flat) > 0.95 * np.log(10)


def test_dirichlet_unreachable_min_size_raises_instead_of_looping():
  labels = np.repeat(np.arange(10), 10)  # 100 examples, 10 clients each needing all 10 of N/K
  with pytest.raises(partition.PartitionError, match=r"^partition\.min_client_examples:"):
    _parts("dirichlet", num_clients=10, labels=labels, alpha=0.01, min_client_examples=10)


def test_classes_per_client_gives_exactly_k_classes():
  for k in (1, 2, 3):
    counts = partition.class_counts(LABELS, _parts("classes_per_client", classes_per_client=k), 10)
    assert ((counts > 0).sum(1) == k).all()
    for i in range(5):  # client i holds classes (i*k + j) % C
      assert set(np.flatnonzero(counts[i])) == {(i * k + j) % 10 for j in range(k)}
  # 10 clients x 2 classes: every class held by 2 clients, split evenly (250 + 250).
  counts = partition.class_counts(LABELS, _parts("classes_per_client", num_clients=10), 10)
  assert sorted(set(counts[counts > 0].tolist())) == [250]


@pytest.mark.parametrize("overrides, field", [
    (dict(alpha=0.0), "partition.alpha"),
    (dict(alpha=-1.0), "partition.alpha"),
    (dict(num_clients=0), "partition.num_clients"),
    (dict(num_clients=6000), "partition.num_clients"),
    (dict(method="pathological"), "partition.method"),
    (dict(method="classes_per_client", classes_per_client=11), "partition.classes_per_client"),
    (dict(method="classes_per_client", classes_per_client=0), "partition.classes_per_client"),
    (dict(min_client_examples=2000), "partition.min_client_examples"),
])
def test_config_errors_name_the_field(overrides, field):
  cfg = config_base.base_config().partition
  cfg.update(overrides)
  pattern = "^" + field.replace(".", r"\.") + ":"
  with pytest.raises(partition.PartitionError, match=pattern) as e:
    partition.check_partition_config(cfg, num_train_examples=len(LABELS), num_classes=10)
  assert "\n" not in str(e.value)
  with pytest.raises(partition.PartitionError, match=pattern):
    partition.partition_indices(LABELS, cfg.num_clients, cfg.method, alpha=cfg.alpha,
                                classes_per_client=cfg.classes_per_client, seed=0,
                                min_client_examples=cfg.min_client_examples)


def test_default_config_passes():
  partition.check_partition_config(config_base.base_config().partition)
  partition.check_partition_config(config_base.base_config().partition, 50_000, 10)


def test_report_files(tmp_path):
  parts = _parts("dirichlet", alpha=0.3)
  counts = partition.class_counts(LABELS, parts, 10)
  assert counts.shape == (5, 10) and counts.sum() == len(LABELS)
  names = [f"class{c}" for c in range(10)]
  partition.save_partition_report(counts, names, str(tmp_path / "run"))
  with open(tmp_path / "run/partition.json") as f:
    report = json.load(f)
  assert report["class_counts"] == counts.tolist() and report["class_names"] == names
  assert report["client_sizes"] == [len(p) for p in parts]
  png = tmp_path / "run/partition.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 5000
