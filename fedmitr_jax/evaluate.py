"""Stage 5: test accuracy of clients, their ensemble, one-shot FedAvg and distilled students."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from fedmitr_jax.data import datasets


def client_weights(sizes, weighting: str) -> np.ndarray:
  sizes = np.asarray(sizes, np.float64)
  if weighting == "uniform":
    return np.full(len(sizes), 1.0 / len(sizes))
  if weighting == "data_size":
    return sizes / sizes.sum()
  raise ValueError(f"eval weighting: '{weighting}' is unknown; use 'uniform' or 'data_size'")


def fedavg_params(client_params, weights):
  """One-shot FedAvg: the (weighted) average of the client parameters."""
  w = jnp.asarray(weights, jnp.float32)
  return jax.tree.map(lambda p: jnp.tensordot(w, p, axes=1), client_params)


def _batches(num: int, batch_size: int):
  for start in range(0, num, batch_size):
    yield start, min(start + batch_size, num)


def _padded(images, start, stop, batch_size):
  """A fixed-size batch (last one zero-padded) so every call reuses one compilation."""
  chunk = images[start:stop]
  if len(chunk) < batch_size:
    chunk = np.concatenate([chunk, np.zeros((batch_size - len(chunk),) + chunk.shape[1:], chunk.dtype)])
  return chunk


@functools.partial(jax.jit, static_argnames=("model", "token_weight"))
def _predict(model, params, images_u8, token_weight=0.0):
  logits, out = model.apply({"params": params}, datasets.normalize(images_u8))
  if token_weight:  # LV-ViT inference: cls + w * max over tokens of the token logits
    logits = logits + token_weight * out["token_logits"].max(axis=1)
  return logits


@functools.partial(jax.jit, static_argnames=("model",))
def _predict_stacked_probs(model, client_params, images_u8):
  """Softmax of every client, vmapped over the stacked client axis: [K, B, C]."""
  logits = jax.vmap(lambda p: model.apply({"params": p}, datasets.normalize(images_u8))[0])(client_params)
  return jax.nn.softmax(logits, axis=-1)


def accuracy(model, params, images, labels, batch_size: int, token_weight: float = 0.0) -> float:
  correct = 0
  for start, stop in _batches(len(images), batch_size):
    logits = _predict(model, params, _padded(images, start, stop, batch_size), token_weight)
    correct += int((np.asarray(logits)[: stop - start].argmax(-1) == labels[start:stop]).sum())
  return correct / len(images)


def client_and_ensemble_accuracy(model, client_params, images, labels, batch_size: int, weights):
  """Per-client accuracies and the accuracy of the ensemble (mean of the client *softmaxes*)."""
  num_clients = len(weights)
  correct = np.zeros(num_clients, np.int64)
  ensemble_correct = 0
  w = np.asarray(weights, np.float32)[:, None, None]
  for start, stop in _batches(len(images), batch_size):
    probs = np.asarray(_predict_stacked_probs(model, client_params,
                                              _padded(images, start, stop, batch_size)))[:, : stop - start]
    truth = labels[start:stop]
    correct += (probs.argmax(-1) == truth[None]).sum(axis=1)
    ensemble_correct += int(((probs * w).sum(0).argmax(-1) == truth).sum())
  return (correct / len(images)).tolist(), ensemble_correct / len(images)


def write_results_markdown(results: dict, path) -> None:
  lines = ["| method | test acc (%) | details |", "|---|---|---|"]
  for name, entry in results["methods"].items():
    extra = ", ".join(f"{k}={_fmt(v)}" for k, v in entry.items() if k != "test_acc")
    lines.append(f"| {name} | {100 * entry['test_acc']:.2f} | {extra} |")
  lines += ["", "| client | examples | test acc (%) |", "|---|---|---|"]
  for k, client in enumerate(results["clients"]):
    lines.append(f"| {k} | {client['num_examples']} | {100 * client['test_acc']:.2f} |")
  epath.Path(path).write_text("\n".join(lines) + "\n")


def _fmt(v):
  return f"{v:.4g}" if isinstance(v, float) else str(v)
