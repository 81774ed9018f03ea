"""Screening of the uploads before the server uses them: which client models look poisoned?

The server has no data, so it looks at two things it does have:
  (a) parameter space: s_k = log median_j ||w_k - w_j||, the typical distance of client k to the
      others (a scaled, random or noised upload sits far from every honest one);
  (b) predictions: a_k, client k's agreement with the leave-one-out ensemble of the others on
      random probe images (ensemble.agreement_scores; an upload that answers differently from
      everyone else scores low).
Each score becomes a robust z-score, (x - median) / (1.4826 MAD), in log space (so it is relative)
with the MAD floored at 0.1 (a 10% spread): with K = 5 four near-equal honest scores would
otherwise make any small difference look extreme. A client is flagged when its larger z (far in
parameters, or low in agreement) exceeds `eval.screen_z`; at most floor((K - 1) / 2) are flagged,
the most extreme first, so the honest majority is never voted out.
"""
import jax
import jax.numpy as jnp
import numpy as np

from fedmitr_jax.data import datasets
from fedmitr_jax.server import ensemble

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation
MIN_SPREAD = 0.1       # floor of the robust scale, in log units


def probe_images(seed: int, num: int, image_size: int) -> jnp.ndarray:
  """Seeded random inputs in the models' normalised space: half white noise (the inversion's
  starting point), half smooth colour blobs (4x4 noise upsampled), which draw more varied
  predictions from a classifier than white noise alone."""
  rng = jax.random.fold_in(jax.random.key(seed), 9)  # stream 9: screening probes
  white_rng, smooth_rng = jax.random.split(rng)
  half = num // 2
  white = jax.random.normal(white_rng, (half, image_size, image_size, 3))
  coarse = jax.random.normal(smooth_rng, (num - half, 4, 4, 3))
  smooth = jax.image.resize(coarse, (num - half, image_size, image_size, 3), "bilinear")
  return jnp.clip(jnp.concatenate([white, smooth]), datasets.PIXEL_MIN, datasets.PIXEL_MAX)


def client_probs(model, client_params, images, mode: str = "loop") -> np.ndarray:
  """Softmax of every client on `images`: [K, B, C]."""
  run = jax.jit(lambda p, x: ensemble.per_teacher(model, p, x, None, False, mode))
  logits, _ = run(client_params, images)
  return np.asarray(jax.nn.softmax(logits, -1), np.float64)


def median_distances(client_params) -> np.ndarray:
  """median_j != k ||w_k - w_j|| for every client k (float64 on the host, one leaf at a time, so a
  large model never needs all K flattened copies in memory at once)."""
  leaves = jax.tree.leaves(client_params)
  num = leaves[0].shape[0]
  squared = np.zeros((num, num))
  for leaf in leaves:
    x = np.asarray(leaf, np.float64).reshape(num, -1)
    for i in range(num):
      squared[i] += np.sum((x - x[i]) ** 2, axis=1)
  dist = np.sqrt(squared)
  if num == 1:
    return np.zeros(1)
  return np.array([np.median(np.delete(dist[k], k)) for k in range(num)])


def robust_z(values) -> np.ndarray:
  """(x - median) / max(1.4826 MAD, MIN_SPREAD): how many robust deviations above typical."""
  values = np.asarray(values, np.float64)
  centre = np.median(values)
  spread = max(MAD_TO_SIGMA * np.median(np.abs(values - centre)), MIN_SPREAD)
  return (values - centre) / spread


def _log(x):
  return np.log(np.maximum(np.asarray(x, np.float64), 1e-30))


def screen(client_params, probe_probs, weights, *, z_threshold: float) -> dict:
  """Scores every upload; returns the facts for results.json, with `flagged` (client indices)."""
  num = len(weights)
  distance = median_distances(client_params)
  agreement = ensemble.agreement_scores(probe_probs, weights)
  param_z = robust_z(_log(distance))
  agreement_z = -robust_z(_log(agreement))  # low agreement = positive z
  score = np.maximum(param_z, agreement_z)
  over = [k for k in np.argsort(-score, kind="stable") if score[k] > z_threshold]
  flagged = sorted(int(k) for k in over[:(num - 1) // 2])
  return {"param_median_distance": distance.tolist(), "param_z": param_z.tolist(),
          "agreement": agreement.tolist(), "agreement_z": agreement_z.tolist(),
          "z_threshold": z_threshold, "flagged": flagged}
