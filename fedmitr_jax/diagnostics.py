"""Test-set diagnostics: how much class evidence the teachers' patch tokens carry, and which
classes each method gets right.

Token relabel distils the ensemble's per-token soft labels; they only teach the student something
when the teachers' patch tokens already say which class an image shows. On the real test images:

  token_entropy  mean over images and patch tokens of the entropy (nats) of the token's class
                 distribution; log(C) (2.303 for 10 classes) is a uniform guess, 0 a one-hot one
  token_acc      share of patch tokens whose most likely class is the image's label
  per_class      test accuracy on each class (of the CLS prediction, as `test_acc`)

A client's token distribution is softmax(head(token)), the classifier head applied to each patch
token (models/vit.py); the ensemble's is sum_k w_k softmax(head_k(token)) with the ensemble's
weights, the soft labels the synthetic bank stores (server/inversion.py `make_soft_labels`).

The pass is data-parallel like evaluate.py's: each test batch split over the 'data' mesh, the
client parameters replicated.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import entr
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedmitr_jax import evaluate, sharding
from fedmitr_jax.server import ensemble


def _teacher_batch(model, client_params, weights, members, images_u8, labels, image_size=None,
                   rule=ensemble.MEAN):
  """One test batch through every client (vmapped over the stacked axis). Returns the client
  softmaxes [K, B, C] and, per image, the mean over its tokens of the token entropy and of the
  token hit (argmax == label), for the K clients and then the ensemble: [K + 1, B] each."""

  x = evaluate.model_input(images_u8, image_size)  # resized once, shared by every client

  def one_client(params):
    logits, out = model.apply({"params": params}, x)
    return jax.nn.softmax(logits, -1), jax.nn.softmax(out["token_logits"], -1)

  probs, token_probs = jax.vmap(one_client)(client_params)        # [K, B, C], [K, B, n, C]
  ensemble_tokens = ensemble.combine(token_probs[members], rule, space="prob", weights=weights)  # [B, n, C]
  tokens = jnp.concatenate([token_probs, ensemble_tokens[None]])   # [K + 1, B, n, C]
  entropy = entr(tokens).sum(-1).mean(-1)                          # entr(p) = -p log p, 0 at p = 0
  hits = (tokens.argmax(-1) == labels[None, :, None]).mean(-1)
  return probs, entropy, hits


@functools.lru_cache(maxsize=8)
def jit_teacher_batch(model, mesh: Mesh, image_size: int | None = None, rule=ensemble.MEAN):
  """`_teacher_batch` under jit: (client_params, weights, members, images_u8, labels) with the
  images and labels split over 'data', the rest replicated; every output split along its batch
  axis (axis 1). Cached: one compilation per model, mesh and rule."""
  replicated, split, batch_axis_1 = (NamedSharding(mesh, P()), NamedSharding(mesh, P("data")),
                                     NamedSharding(mesh, P(None, "data")))
  return jax.jit(functools.partial(_teacher_batch, model, image_size=image_size, rule=rule),
                 in_shardings=(replicated,) * 3 + (split,) * 2, out_shardings=(batch_axis_1,) * 3)


def per_class_accuracy(predictions, labels, num_classes: int) -> list:
  """Accuracy on each class; None for a class with no test example (JSON has no NaN)."""
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  total = np.bincount(labels, minlength=num_classes)
  correct = np.bincount(labels[predictions == labels], minlength=num_classes)
  return [float(c / t) if t else None for c, t in zip(correct, total)]


def teacher_diagnostics(model, client_params, images, labels, batch_size: int, weights,
                        num_classes: int, image_size: int | None = None, rule=ensemble.MEAN,
                        members=None, mesh: Mesh | None = None) -> dict:
  """Every client and the ensemble on the test set, in one pass:
    {"clients": [row] * K, "ensemble": row}, row = {test_acc, per_class, token_entropy, token_acc}.
  The ensemble (the `members`, all clients when None) combines the client softmaxes by `rule`
  (server/ensemble.py; `mean`: sum_k w_k softmax_k), for its image prediction and its tokens.
  Runs on `mesh` (all devices by default); batch_size must be a multiple of its devices."""
  mesh = mesh or sharding.data_mesh()
  sharding.check_divisible(batch_size, "eval.batch_size")
  num_clients, n = jax.tree.leaves(client_params)[0].shape[0], len(images)
  members = np.arange(num_clients) if members is None else np.asarray(members)  # the ensemble's clients
  host_weights = np.asarray(weights, np.float32)
  client_params = sharding.replicate_anywhere(mesh, client_params)
  w, device_members = sharding.replicate(mesh, (host_weights, members.astype(np.int32)))
  teacher_batch, split = jit_teacher_batch(model, mesh, image_size, rule), NamedSharding(mesh, P("data"))
  predictions = np.zeros((num_clients + 1, n), np.int64)
  entropy_sum, hit_sum = np.zeros(num_clients + 1), np.zeros(num_clients + 1)
  for start, stop in evaluate.batches(n, batch_size):
    batch = sharding.put_global((evaluate.padded(images, start, stop, batch_size),
                                 evaluate.padded(labels, start, stop, batch_size).astype(np.int32)), split)
    probs, entropy, hits = map(sharding.to_host, teacher_batch(client_params, w, device_members, *batch))
    real = stop - start  # the zero-padded tail of the last batch is dropped here
    probs = probs[:, :real]
    predictions[:num_clients, start:stop] = probs.argmax(-1)
    predictions[num_clients, start:stop] = ensemble.combine(probs[members], rule, space="prob",
                                                            weights=host_weights).argmax(-1)
    entropy_sum += np.asarray(entropy, np.float64)[:, :real].sum(1)
    hit_sum += np.asarray(hits, np.float64)[:, :real].sum(1)
  rows = [{"test_acc": int((p == labels).sum()) / n,
           "per_class": per_class_accuracy(p, labels, num_classes),
           "token_entropy": float(e / n), "token_acc": float(h / n)}
          for p, e, h in zip(predictions, entropy_sum, hit_sum)]
  return {"clients": rows[:num_clients], "ensemble": rows[num_clients]}


def _entropy(probs):
  probs = np.asarray(probs, np.float64)
  return -np.sum(probs * np.log(np.maximum(probs, 1e-12)), -1)


def bank_targets(bank: dict, rule=ensemble.MEAN, weights=None) -> dict:
  """What a synthetic bank's stored targets teach, measured on the synthetic images themselves:
    image_acc / image_entropy: the ensemble (its teachers' softmaxes combined by `rule`, T = 1) on
      each image: share whose argmax is the label the image was inverted for, mean entropy (nats);
    token_acc_kept / token_entropy_kept: the per-token soft labels (`token_probs`) of the kept
      patches (the ones token relabel trains on the hard label): share naming the label, entropy;
    token_acc_dropped / token_entropy_dropped: the same for the dropped (background) patches,
      whose soft labels token relabel trains on (None when the bank keeps every patch);
    kept_share: mean share of kept patches.
    teacher_weights: under `agreement`, the weights measured on the bank's images, which its
      KD targets use (ensemble.bank_weights); else None.
  Near-uniform dropped-token labels (entropy near ln C) teach the background patches nothing."""
  labels, masks = np.asarray(bank["labels"]), np.asarray(bank["masks"], bool)
  bank_weights = ensemble.bank_weights(rule, weights, bank["teacher_logits"])
  if bank_weights is not None:
    weights = bank_weights
  teacher_probs = jax.nn.softmax(jnp.asarray(bank["teacher_logits"], jnp.float32), -1)
  probs = np.asarray(ensemble.combine(teacher_probs, rule, space="prob", weights=weights, axis=1))
  token_probs = np.asarray(bank["token_probs"], np.float32)
  token_entropy, token_hit = _entropy(token_probs), token_probs.argmax(-1) == labels[:, None]

  def over(selected):
    if not selected.any():
      return None, None
    return float(token_hit[selected].mean()), float(token_entropy[selected].mean())

  acc_kept, entropy_kept = over(masks)
  acc_dropped, entropy_dropped = over(~masks)
  return {"images": int(len(labels)), "image_acc": float((probs.argmax(-1) == labels).mean()),
          "image_entropy": float(_entropy(probs).mean()), "kept_share": float(masks.mean()),
          "token_acc_kept": acc_kept, "token_entropy_kept": entropy_kept,
          "token_acc_dropped": acc_dropped, "token_entropy_dropped": entropy_dropped,
          "teacher_weights": None if bank_weights is None else bank_weights.tolist()}


def summary(teachers: dict, per_class: dict, class_names) -> dict:
  """results.json's "diagnostics": the token diagnostics of every client and the ensemble, and
  the per-class accuracies of every method (`per_class`: name -> list) and every client."""
  token = lambda row, *extra: {k: row[k] for k in ("token_entropy", "token_acc") + extra}
  return {"class_names": [str(c) for c in class_names],
          "uniform_entropy": float(np.log(len(class_names))),
          "clients": [token(row, "per_class") for row in teachers["clients"]],
          "ensemble": token(teachers["ensemble"]),
          "per_class": dict(per_class)}


def per_class_table(diag: dict) -> dict:
  """{row name: per-class accuracies} of every method, then every client, for the heat map."""
  table = dict(diag["per_class"])
  for k, row in enumerate(diag["clients"]):
    table[f"client {k}"] = row["per_class"]
  return table


def save_per_class_heatmap(table: dict, class_names, path) -> None:
  """A methods x classes heat map of test accuracy (%), beside partition.png in the workdir."""
  # The object API with an Agg canvas, like partition.png: no pyplot global state.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  names = list(table)
  values = np.array([[np.nan if a is None else 100 * a for a in table[name]] for name in names], float)
  rows, num_classes = values.shape
  if len(class_names) != num_classes:
    raise ValueError(f"per_class: {len(class_names)} class names for {num_classes} columns")
  fig = Figure(figsize=(min(2.5 + 0.6 * num_classes, 40), min(1.5 + 0.35 * rows, 40)))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0, vmax=100, aspect="auto")
  fig.colorbar(image, ax=ax, label="test accuracy (%)")
  if values.size <= 2500:
    for (r, c), v in np.ndenumerate(values):
      ax.text(c, r, "-" if np.isnan(v) else f"{v:.0f}", ha="center", va="center", fontsize=7,
              color="black" if v > 60 else "white")
  ax.set_xticks(range(num_classes), [str(c) for c in class_names], rotation=45, ha="right", fontsize=8)
  ax.set_yticks(range(rows), names, fontsize=8)
  ax.set_xlabel("class")
  ax.set_title("per-class test accuracy (%)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
