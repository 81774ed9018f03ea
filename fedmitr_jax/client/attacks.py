"""Poisoned uploads: what a malicious client can send instead of its honest model.

Applied to the stacked client parameters after the clients stage, so the honest clients are
trained (or loaded) once and reused by every attack. `apply_attack` is a pure function of
(client_params, init params, attack config, seed); the malicious clients are the last
`num_malicious` (a fixed, recorded choice, so runs with 1 and 2 attackers share the first).

  random     a fresh random initialisation of the same architecture (a client that never trained)
  label_flip the client trained honestly on its own shard, but on labels y -> (y + 1) mod C
             (a derangement: no class keeps its label); trained by the pipeline's
             `clients_label_flip` stage and passed in as `flipped_params`
  scaled     w * scale (a boosted / model-replacement upload, Bagdasaryan et al. 2020)
  sign_flip  init - (w - init): the client's update from the shared init, negated
  noise      w + noise_norm * g / ||g||, g ~ N(0, I) over all parameters (Gaussian, norm noise_norm)
"""
import jax
import jax.numpy as jnp
import numpy as np

from fedmitr_jax import config_base

KINDS = config_base.CHOICES["attack.kind"]


def malicious_indices(num_clients: int, num_malicious: int) -> list[int]:
  """The attacked clients: the last `num_malicious`."""
  return list(range(num_clients - num_malicious, num_clients))


def check_attack_config(cfg, num_clients: int) -> None:
  """One-line ValueError for a bad `attack` section (before any stage runs)."""
  if cfg.kind not in KINDS:
    raise ValueError(f"attack.kind: '{cfg.kind}' is unknown; use one of {list(KINDS)}")
  if not 0 <= cfg.num_malicious < num_clients:
    raise ValueError(f"attack.num_malicious: {cfg.num_malicious} is outside [0, {num_clients - 1}]; "
                     "at least one client must stay honest (partition.num_clients sets K)")
  if cfg.kind == "scaled" and not np.isfinite(cfg.scale):
    raise ValueError(f"attack.scale: {cfg.scale} is not finite; use a finite factor such as 100")
  if cfg.kind == "noise" and not (np.isfinite(cfg.noise_norm) and cfg.noise_norm > 0):
    raise ValueError(f"attack.noise_norm: {cfg.noise_norm} must be a positive finite number")


def flipped_labels(labels, num_classes: int):
  """The label_flip attacker's labels: y -> (y + 1) mod C."""
  return (np.asarray(labels) + 1) % num_classes


def _global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def attacked_upload(kind, params, init_params, cfg, rng, fresh_init):
  """One malicious client's upload from its honest parameters `params` (not for label_flip)."""
  if kind == "random":
    return fresh_init(rng)
  if kind == "scaled":
    return jax.tree.map(lambda w: w * cfg.scale, params)
  if kind == "sign_flip":
    return jax.tree.map(lambda w, w0: w0 - (w - w0), params, init_params)
  if kind == "noise":
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(rng, len(leaves))
    noise = [jax.random.normal(k, w.shape, jnp.float32) for k, w in zip(keys, leaves)]
    scale = cfg.noise_norm / _global_norm(noise)
    return jax.tree.unflatten(treedef, [(w + scale * n).astype(w.dtype) for w, n in zip(leaves, noise)])
  raise ValueError(f"attack.kind: '{kind}' is not a parameter attack")


def apply_attack(client_params, init_params, cfg, seed: int, *, fresh_init=None, flipped_params=None):
  """Returns (client_params with the malicious uploads in place, facts for results.json).

  client_params: stacked on axis 0; init_params: the shared initialisation (unstacked);
  cfg: the `attack` config section; fresh_init(rng) -> params: a random init ('random');
  flipped_params: the label_flip clients' parameters stacked in the order of `indices`.
  Honest clients' entries are left bit-identical."""
  num_clients = jax.tree.leaves(client_params)[0].shape[0]
  indices = malicious_indices(num_clients, cfg.num_malicious)
  facts = {"kind": cfg.kind, "num_malicious": cfg.num_malicious, "indices": indices,
           "which": "the last num_malicious clients"}
  if cfg.kind == "scaled":
    facts["scale"] = cfg.scale
  if cfg.kind == "noise":
    facts["noise_norm"] = cfg.noise_norm
  if cfg.kind == "label_flip":
    facts["label_map"] = "y -> (y + 1) mod num_classes"
  if not indices:
    return client_params, facts
  base = jax.random.fold_in(jax.random.key(seed), 8)  # stream 8: attacks
  for position, k in enumerate(indices):
    if cfg.kind == "label_flip":
      upload = jax.tree.map(lambda x: x[position], flipped_params)
    else:
      honest = jax.tree.map(lambda x: x[k], client_params)
      upload = attacked_upload(cfg.kind, honest, init_params, cfg, jax.random.fold_in(base, k), fresh_init)
    client_params = jax.tree.map(lambda stacked, x: stacked.at[k].set(x), client_params, upload)
  return client_params, facts
