"""Attacks on the uploads (client/attacks.py): each changes exactly the chosen clients."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fedmitr_jax import config_base
from fedmitr_jax.client import attacks

K = 4


def _setup():
  init = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (6, 3)), "bias": jnp.zeros((3,))},
          "scale": jnp.ones((3,))}
  keys = jax.random.split(jax.random.key(1), K)
  perturb = lambda k: jax.tree.map(lambda p: p + 0.1 * jax.random.normal(k, p.shape), init)
  stacked = jax.vmap(perturb)(keys)
  return init, stacked


def _cfg(kind, num_malicious=2, **fields):
  cfg = config_base.base_config().attack
  cfg.kind, cfg.num_malicious = kind, num_malicious
  for k, v in fields.items():
    cfg[k] = v
  return cfg


def _client(tree, k):
  return jax.tree.map(lambda x: np.asarray(x[k]), tree)


def _fresh_init(rng):
  return {"dense": {"kernel": jax.random.normal(rng, (6, 3)), "bias": jnp.zeros((3,))},
          "scale": jnp.ones((3,))}


@pytest.mark.parametrize("kind", attacks.KINDS)
def test_each_attack_changes_exactly_the_last_clients(kind):
  init, stacked = _setup()
  flipped = jax.tree.map(lambda x: x[:2] + 5.0, stacked)  # stands in for the retrained clients
  out, facts = attacks.apply_attack(stacked, init, _cfg(kind), seed=0, fresh_init=_fresh_init,
                                    flipped_params=flipped)
  assert facts["indices"] == [2, 3] and facts["kind"] == kind
  for k in range(K):
    same = jax.tree.map(np.array_equal, _client(out, k), _client(stacked, k))
    if k < 2:  # honest: bit-identical
      assert all(jax.tree.leaves(same)), (kind, k)
    else:
      assert not all(jax.tree.leaves(same)), (kind, k)


def test_attacks_do_what_they_say():
  init, stacked = _setup()
  honest = _client(stacked, 3)
  scaled, _ = attacks.apply_attack(stacked, init, _cfg("scaled", 1, scale=100.0), seed=0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, 100.0 * b, rtol=1e-6), _client(scaled, 3), honest)
  flipped, _ = attacks.apply_attack(stacked, init, _cfg("sign_flip", 1), seed=0)
  # its update from the shared init is negated: (w' - init) = -(w - init)
  jax.tree.map(lambda a, b, w0: np.testing.assert_allclose(a - w0, -(b - w0), atol=1e-6),
               _client(flipped, 3), honest, jax.tree.map(np.asarray, init))
  noisy, facts = attacks.apply_attack(stacked, init, _cfg("noise", 1, noise_norm=3.0), seed=0)
  diff = jax.tree.leaves(jax.tree.map(lambda a, b: a - b, _client(noisy, 3), honest))
  assert np.sqrt(sum(np.sum(d.astype(np.float64) ** 2) for d in diff)) == pytest.approx(3.0, rel=1e-4)
  assert facts["noise_norm"] == 3.0
  again, _ = attacks.apply_attack(stacked, init, _cfg("noise", 1, noise_norm=3.0), seed=0)
  other, _ = attacks.apply_attack(stacked, init, _cfg("noise", 1, noise_norm=3.0), seed=1)
  assert np.array_equal(again["scale"], noisy["scale"]) and not np.array_equal(other["scale"], noisy["scale"])
  fresh, _ = attacks.apply_attack(stacked, init, _cfg("random", 1), seed=0, fresh_init=_fresh_init)
  np.testing.assert_array_equal(fresh["dense"]["kernel"][3],
                                _fresh_init(jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 8), 3))
                                ["dense"]["kernel"])


def test_no_attack_returns_the_uploads_untouched():
  init, stacked = _setup()
  out, facts = attacks.apply_attack(stacked, init, _cfg("scaled", 0), seed=0)
  assert out is stacked and facts["indices"] == []


def test_label_flip_is_a_derangement_and_bad_configs_fail():
  labels = np.arange(10)
  flipped = attacks.flipped_labels(labels, 10)
  assert sorted(flipped) == list(range(10)) and not np.any(flipped == labels)
  with pytest.raises(ValueError, match="attack.num_malicious"):
    attacks.check_attack_config(_cfg("scaled", 5), num_clients=5)
  with pytest.raises(ValueError, match="attack.noise_norm"):
    attacks.check_attack_config(_cfg("noise", 1, noise_norm=-1.0), num_clients=5)
  with pytest.raises(ValueError, match="attack.kind"):
    attacks.check_attack_config(ml_collections.ConfigDict({"kind": "x", "num_malicious": 1}), num_clients=5)
