"""Splits a training set among K clients: iid, Dirichlet label skew (DENSE / NIID-Bench), k classes each.

All splits are pure functions of (labels, config, seed), so a rerun rebuilds the same clients.
"""
import json

import numpy as np
from etils import epath

from fedmitr_jax import config_base

METHODS = config_base.CHOICES["partition.method"]
MAX_REDRAWS = 1000  # dirichlet: redraws allowed before min_client_examples is declared unreachable


class PartitionError(ValueError):
  """A partition config that cannot work; the message names the config field and the fix."""


def _check(method, num_clients, alpha, classes_per_client, min_client_examples,
           num_examples=None, num_classes=None) -> None:
  if method not in METHODS:
    raise PartitionError(f"partition.method: '{method}' is unknown; use one of {', '.join(METHODS)}")
  if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
    raise PartitionError(f"partition.num_clients: {num_clients!r} must be an int >= 1")
  if num_examples is not None and num_clients > num_examples:
    raise PartitionError(f"partition.num_clients: {num_clients} clients but only {num_examples} "
                         "training examples; use fewer clients or more data (dataset.max_train_examples)")
  if method == "dirichlet":
    if not alpha > 0:
      raise PartitionError(f"partition.alpha: {alpha!r} must be > 0 (0.1 = strong skew, 100 = near iid)")
    if min_client_examples < 0:
      raise PartitionError(f"partition.min_client_examples: {min_client_examples} must be >= 0")
    if num_examples is not None and min_client_examples * num_clients > num_examples:
      raise PartitionError(f"partition.min_client_examples: {min_client_examples} x {num_clients} "
                           f"clients exceeds the {num_examples} training examples; lower it")
  if method == "classes_per_client":
    top = num_classes if num_classes is not None else float("inf")
    if not isinstance(classes_per_client, (int, np.integer)) or not 1 <= classes_per_client <= top:
      raise PartitionError(f"partition.classes_per_client: {classes_per_client!r} must be an int in "
                           f"[1, {num_classes if num_classes is not None else 'num_classes'}]")


def check_partition_config(partition_config, num_train_examples: int | None = None,
                           num_classes: int | None = None) -> None:
  """Cheap checks that can run before anything is written (data sizes are checked when given)."""
  c = partition_config
  _check(c.method, c.num_clients, c.alpha, c.classes_per_client, c.min_client_examples,
         num_train_examples, num_classes)


def _dirichlet(labels, num_clients, alpha, min_client_examples, rng) -> list[np.ndarray]:
  """DENSE / NIID-Bench: per class, Dirichlet(alpha) shares over clients not yet holding N/K."""
  n, k = len(labels), num_clients
  for _ in range(MAX_REDRAWS):
    parts = [[] for _ in range(k)]
    for c in np.unique(labels):
      idx_c = rng.permutation(np.flatnonzero(labels == c))
      p = rng.dirichlet(np.full(k, alpha))
      is_open = np.array([len(part) < n / k for part in parts])  # clients below N/K samples
      p = p * is_open
      # A tiny alpha can leave every open client at p == 0, where the reference code divides by 0:
      # share evenly among the open clients instead.
      p = p / p.sum() if p.sum() > 0 else is_open / is_open.sum()
      cuts = (np.cumsum(p) * len(idx_c)).astype(int)[:-1]
      for part, piece in zip(parts, np.split(idx_c, cuts)):
        part.extend(piece.tolist())
    if min(len(part) for part in parts) >= min_client_examples:
      return [np.sort(np.asarray(part, np.int64)) for part in parts]
  raise PartitionError(f"partition.min_client_examples: no Dirichlet(alpha={alpha}) draw gave every "
                       f"client >= {min_client_examples} examples in {MAX_REDRAWS} tries; lower "
                       "partition.min_client_examples or num_clients, or raise partition.alpha")


def _classes_per_client(labels, num_clients, k, rng) -> list[np.ndarray]:
  """Client i holds classes (i*k + j) % C, j < k; each class is split evenly among its holders."""
  num_classes = int(labels.max()) + 1
  held = [[(i * k + j) % num_classes for j in range(k)] for i in range(num_clients)]
  parts = [[] for _ in range(num_clients)]
  for c in range(num_classes):
    holders = [i for i in range(num_clients) if c in held[i]]
    idx_c = rng.permutation(np.flatnonzero(labels == c))
    for i, piece in zip(holders, np.array_split(idx_c, len(holders)) if holders else []):
      parts[i].extend(piece.tolist())
  return [np.sort(np.asarray(part, np.int64)) for part in parts]


def partition_indices(labels: np.ndarray, num_clients: int, method: str, *, alpha: float,
                      classes_per_client: int, seed: int, min_client_examples: int = 10
                      ) -> list[np.ndarray]:
  """Sorted int64 index arrays, one per client, disjoint; iid and dirichlet cover every example.

  classes_per_client leaves out classes no client holds (num_clients * k < num_classes).
  """
  labels = np.asarray(labels)
  num_classes = int(labels.max()) + 1 if len(labels) else 0
  _check(method, num_clients, alpha, classes_per_client, min_client_examples, len(labels), num_classes)
  rng = np.random.default_rng(seed)
  if method == "iid":
    parts = [np.sort(p).astype(np.int64) for p in np.array_split(rng.permutation(len(labels)), num_clients)]
  elif method == "dirichlet":
    parts = _dirichlet(labels, num_clients, alpha, min_client_examples, rng)
  else:
    parts = _classes_per_client(labels, num_clients, classes_per_client, rng)
  empty = [i for i, p in enumerate(parts) if len(p) == 0]
  if empty:  # an empty client cannot train; say so here rather than as a shape error later
    raise PartitionError(f"partition.num_clients: clients {empty[:5]} got no examples; use fewer "
                         "clients or more data (or raise partition.min_client_examples)")
  return parts


def class_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
  """int64 [K, C]: examples of class c held by client k."""
  return np.stack([np.bincount(np.asarray(labels)[p], minlength=num_classes) for p in parts])


def save_partition_report(counts: np.ndarray, class_names, out_dir: str) -> None:
  """Writes out_dir/partition.json and out_dir/partition.png (a clients x classes heat map)."""
  # The object API with an Agg canvas: no pyplot, so no global backend switch or open figures.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  counts = np.asarray(counts)
  num_clients, num_classes = counts.shape
  if len(class_names) != num_classes:
    raise PartitionError(f"partition: {len(class_names)} class names for {num_classes} count columns")
  out_dir = epath.Path(out_dir)  # a local folder or a bucket path (gs://...)
  out_dir.mkdir(parents=True, exist_ok=True)
  report = {"class_counts": counts.tolist(), "client_sizes": counts.sum(1).tolist(),
            "class_names": [str(c) for c in class_names]}
  (out_dir / "partition.json").write_text(json.dumps(report, indent=1))

  fig = Figure(figsize=(min(2 + 0.6 * num_classes, 40), min(1.5 + 0.4 * num_clients, 40)))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  image = ax.imshow(counts, cmap="Blues", aspect="auto")
  fig.colorbar(image, ax=ax, label="examples")
  if counts.size <= 2500:  # beyond that the numbers are unreadable anyway
    for (k, c), n in np.ndenumerate(counts):
      dark = n > 0.6 * counts.max()
      ax.text(c, k, str(n), ha="center", va="center", fontsize=7, color="white" if dark else "black")
  ax.set_xticks(range(num_classes), report["class_names"], rotation=45, ha="right", fontsize=8)
  ax.set_yticks(range(num_clients), [f"client {k} ({n})" for k, n in enumerate(report["client_sizes"])],
                fontsize=8)
  ax.set_xlabel("class")
  ax.set_title(f"{num_clients} clients, {num_classes} classes, {int(counts.sum())} examples")
  fig.tight_layout()
  with (out_dir / "partition.png").open("wb") as f:
    fig.savefig(f, format="png", dpi=100)
