import jax
import jax.numpy as jnp
import numpy as np

from fedmitr_jax import config_base
from fedmitr_jax.client import training
from fedmitr_jax.models import vit


def _setup(num_clients=3, sizes=(40, 17, 25)):
  cfg = config_base.base_config().clients
  cfg.batch_size, cfg.epochs, cfg.lr = 8, 1.5, 1e-3
  model = vit.build_vit("test/8", 4, image_size=16)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (sum(sizes), 16, 16, 3), dtype=np.uint8)
  labels = rng.integers(0, 4, sum(sizes)).astype(np.int32)
  offsets = np.cumsum((0,) + sizes)
  parts = [np.arange(a, b) for a, b in zip(offsets[:-1], offsets[1:])]
  tx = training.make_optimizer(cfg)
  init = vit.init_params(model, jax.random.key(0), 16)
  states = training.stack_copies(training.init_client_state(init, tx), num_clients)
  plan = training.plan_batches(parts, cfg.batch_size, cfg.epochs, seed=0)
  step = training.make_client_train_step(model, tx, cfg)
  return step, states, images, labels, plan, training.client_rngs(0, num_clients)


def test_plan_covers_each_shard_with_masks():
  parts = [np.arange(0, 10), np.arange(10, 13)]
  plan = training.plan_batches(parts, batch_size=4, epochs=2.0, seed=1)
  assert plan.steps.tolist() == [5, 2]
  assert plan.index.shape == (2, 5, 4)
  assert plan.mask[1].sum() == 6 and not plan.mask[1, 2:].any()
  seen = plan.index[0][plan.mask[0]]
  assert sorted(seen.tolist()) == sorted(list(range(10)) * 2)  # two full epochs, own shard only
  assert set(plan.index[1][plan.mask[1]].tolist()) <= set(range(10, 13))


def test_vmapped_clients_equal_one_by_one_clients():
  step, states, images, labels, plan, rngs = _setup()
  vmapped = training.train_clients_vmap(step, states, images, labels, plan, rngs, log_every=1000)
  step, states, images, labels, plan, rngs = _setup()
  looped = training.train_clients_loop(step, states, images, labels, plan, rngs, log_every=1000)
  np.testing.assert_array_equal(np.asarray(vmapped.step), plan.steps)
  for a, b in zip(jax.tree.leaves(vmapped.params), jax.tree.leaves(looped.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)  # vmapped matmuls sum in another order
  # Clients trained on different data must have moved apart.
  first = jax.tree.leaves(vmapped.params)[0]
  assert not np.allclose(first[0], first[1])


def test_looped_clients_resume_from_a_mid_run_save_with_the_same_result():
  step, states, images, labels, plan, rngs = _setup()
  saved = {}

  def keep(g, stacked):
    saved[g] = stacked()

  full = training.train_clients_loop(step, states, images, labels, plan, rngs, log_every=1000,
                                    on_step=keep)
  offsets = np.cumsum(plan.steps)
  assert sorted(saved) == list(range(1, offsets[-1] + 1))  # steps numbered globally, 1..total
  middle = int(offsets[0]) + 2  # inside client 1: client 0 done, client 1 two steps in
  np.testing.assert_array_equal(np.asarray(saved[middle].step), [plan.steps[0], 2, 0])
  for start in (middle, int(offsets[1])):  # mid-client, and exactly at a client's end
    resumed = training.train_clients_loop(step, saved[start], images, labels, plan, rngs,
                                         log_every=1000, start_step=start)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_masked_step_leaves_state_unchanged():
  step, states, images, labels, plan, rngs = _setup()
  one = jax.tree.map(lambda x: x[0], states)
  new, _ = jax.jit(step)(one, images[:8], labels[:8], np.zeros(8, bool), jnp.int32(5), rngs[0])
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(new)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_training_reduces_loss_on_a_learnable_task():
  cfg = config_base.base_config().clients
  cfg.batch_size, cfg.lr, cfg.crop_padding = 16, 3e-3, 0
  model = vit.build_vit("test/8", 2, image_size=16)
  tx = training.make_optimizer(cfg)
  state = training.init_client_state(vit.init_params(model, jax.random.key(0), 16), tx)
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 16).astype(np.int32)
  images = np.where(labels[:, None, None, None] == 1, 220, 30).astype(np.uint8) * np.ones((16, 16, 16, 3), np.uint8)
  step = jax.jit(training.make_client_train_step(model, tx, cfg))
  mask = np.ones(16, bool)
  losses = []
  for t in range(30):
    state, m = step(state, images, labels, mask, jnp.int32(30), jax.random.key(t))
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.5 * losses[0]


def _host_fed(step, states, images, labels, plan, rngs):
  """The runners as they were: one jitted call per step on a batch gathered on the host."""
  vstep = jax.jit(jax.vmap(step))
  for t in range(plan.index.shape[1]):
    idx = plan.index[:, t]
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(rngs, t)
    states, _ = vstep(states, images[idx], labels[idx], plan.mask[:, t], jnp.asarray(plan.steps, jnp.int32), keys)
  return states


def test_device_side_batches_equal_host_gathered_batches_bit_for_bit():
  step, states, images, labels, plan, rngs = _setup()
  expected = _host_fed(step, states, images, labels, plan, rngs)
  step, states, images, labels, plan, rngs = _setup()
  vmapped = training.train_clients_vmap(step, states, images, labels, plan, rngs, log_every=1000)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(vmapped)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  step, states, images, labels, plan, rngs = _setup()
  looped = training.train_clients_loop(step, states, images, labels, plan, rngs, log_every=1000)
  jstep = jax.jit(step)
  for k in range(len(plan.steps)):  # client by client, host-gathered, unvmapped
    state = jax.tree.map(lambda x: x[k], states)
    for t in range(plan.steps[k]):
      idx = plan.index[k, t]
      state, _ = jstep(state, images[idx], labels[idx], plan.mask[k, t], jnp.int32(plan.steps[k]),
                       jax.random.fold_in(rngs[k], t))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(jax.tree.map(lambda x: x[k], looped))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
