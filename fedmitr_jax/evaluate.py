"""Stage 5: test accuracy of one-shot FedAvg and the distilled students; the clients and their
ensemble are measured in one pass with their token diagnostics (diagnostics.py).

Data-parallel on the 'data' mesh (sharding.py): each test batch (eval.batch_size, a multiple of
the device count) is split over the devices and the parameters are replicated. Every process
holds the same test images, so each places its own devices' slices (sharding.put_global) and the
predictions are gathered back to every process (sharding.to_host)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedmitr_jax import sharding
from fedmitr_jax.data import augment, datasets
from fedmitr_jax.server import ensemble


def client_weights(sizes, weighting: str) -> np.ndarray:
  sizes = np.asarray(sizes, np.float64)
  if weighting == "uniform":
    return np.full(len(sizes), 1.0 / len(sizes))
  if weighting == "data_size":
    return sizes / sizes.sum()
  raise ValueError(f"eval weighting: '{weighting}' is unknown; use 'uniform' or 'data_size'")


def fedavg_params(client_params, weights, rule=ensemble.MEAN):
  """One-shot FedAvg: the (weighted) average of the client parameters; under a robust `rule`
  their coordinate-wise median / trimmed mean (Yin et al.'s robust aggregation)."""
  w = jnp.asarray(weights, jnp.float32)
  return jax.tree.map(lambda p: ensemble.combine(p, rule, space="param", weights=w), client_params)


def batches(num: int, batch_size: int):
  for start in range(0, num, batch_size):
    yield start, min(start + batch_size, num)


def padded(array, start, stop, batch_size):
  """A fixed-size batch (last one zero-padded) so every call reuses one compilation."""
  chunk = array[start:stop]
  if len(chunk) < batch_size:
    chunk = np.concatenate([chunk, np.zeros((batch_size - len(chunk),) + chunk.shape[1:], chunk.dtype)])
  return chunk


def model_input(images_u8, image_size):
  return datasets.normalize(augment.resize_to(images_u8, image_size))


@functools.lru_cache(maxsize=16)
def jit_predict(model, mesh: Mesh, token_weight: float = 0.0, image_size: int | None = None):
  """predict(params, images_u8) -> the predicted class of each image, int32 [B]; the batch split
  over 'data', the parameters replicated. Cached, so every pass with the same model and mesh
  shares one compilation."""
  def predict(params, images_u8):
    logits, out = model.apply({"params": params}, model_input(images_u8, image_size))
    if token_weight:  # LV-ViT inference: cls + w * max over tokens of the token logits
      logits = logits + token_weight * out["token_logits"].max(axis=1)
    return jnp.argmax(logits, -1)

  split = NamedSharding(mesh, P("data"))
  return jax.jit(predict, in_shardings=(NamedSharding(mesh, P()), split), out_shardings=split)


def predicted_labels(model, params, images, batch_size: int, token_weight: float = 0.0,
                     image_size: int | None = None, mesh: Mesh | None = None) -> np.ndarray:
  """The predicted class of every image, int64 [N], on `mesh` (all devices by default). image_size:
  the model's input size; images of another size are resized on the device."""
  mesh = mesh or sharding.data_mesh()
  sharding.check_divisible(batch_size, "eval.batch_size")
  predict, split = jit_predict(model, mesh, token_weight, image_size), NamedSharding(mesh, P("data"))
  params = sharding.replicate_anywhere(mesh, params)
  out = np.zeros(len(images), np.int64)
  for start, stop in batches(len(images), batch_size):
    predictions = predict(params, sharding.put_global(padded(images, start, stop, batch_size), split))
    out[start:stop] = sharding.to_host(predictions)[: stop - start]
  return out


def accuracy_of(predictions, labels) -> float:
  return int((np.asarray(predictions) == np.asarray(labels)).sum()) / len(labels)


def accuracy(model, params, images, labels, batch_size: int, token_weight: float = 0.0,
             image_size: int | None = None, mesh: Mesh | None = None) -> float:
  return accuracy_of(predicted_labels(model, params, images, batch_size, token_weight, image_size, mesh),
                     labels)


def write_results_markdown(results: dict, path) -> None:
  lines = ["| method | test acc (%) | details |", "|---|---|---|"]
  for name, entry in results["methods"].items():
    extra = ", ".join(f"{k}={_fmt(v)}" for k, v in entry.items() if k != "test_acc")
    lines.append(f"| {name} | {100 * entry['test_acc']:.2f} | {extra} |")
  lines += ["", "| client | examples | test acc (%) |", "|---|---|---|"]
  for k, client in enumerate(results["clients"]):
    lines.append(f"| {k} | {client['num_examples']} | {100 * client['test_acc']:.2f} |")
  if "diagnostics" in results:
    lines += [""] + diagnostics_markdown(results["diagnostics"])
  epath.Path(path).write_text("\n".join(lines) + "\n")


def diagnostics_markdown(diag: dict) -> list:
  """The token diagnostics table (diagnostics.py); per-class accuracies are in per_class.png."""
  lines = [f"| teacher | token entropy (nats; uniform = {diag['uniform_entropy']:.3f}) | token acc (%) |",
           "|---|---|---|"]
  rows = [(f"client {k}", row) for k, row in enumerate(diag["clients"])] + [("ensemble", diag["ensemble"])]
  for name, row in rows:
    lines.append(f"| {name} | {row['token_entropy']:.3f} | {100 * row['token_acc']:.2f} |")
  if diag.get("banks"):  # the banks' stored targets on their own images (diagnostics.bank_targets)
    cell = lambda row, kind: ("—" if row[f"token_acc_{kind}"] is None else
                              f"{100 * row[f'token_acc_{kind}']:.1f} / {row[f'token_entropy_{kind}']:.3f}")
    lines += ["", "| bank | ensemble on its images: acc (%) / entropy | kept tokens: acc (%) / entropy "
              "| dropped tokens: acc (%) / entropy |", "|---|---|---|---|"]
    for kind, row in diag["banks"].items():
      lines.append(f"| {kind} | {100 * row['image_acc']:.1f} / {row['image_entropy']:.3f} | {cell(row, 'kept')} "
                   f"| {cell(row, 'dropped')} |")
  return lines + ["", "Per-class test accuracy of every method and client: per_class.png "
                  "(numbers: results.json, diagnostics.per_class)."]


def _fmt(v):
  return f"{v:.4g}" if isinstance(v, float) else str(v)
