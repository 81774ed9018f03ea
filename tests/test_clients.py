import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from fedmitr_jax import config_base, sharding
from fedmitr_jax.client import training
from fedmitr_jax.models import vit


def _setup(num_clients=3, sizes=(40, 17, 25), batch_size=8, epochs=1.5):
  cfg = config_base.base_config().clients
  cfg.batch_size, cfg.epochs, cfg.lr = batch_size, epochs, 1e-3
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


def _one_device(*axes):
  """A mesh with `axes` on the first device only: the unsharded reference."""
  return Mesh(np.asarray(jax.devices()[:1]).reshape((1,) * len(axes)), axes)


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


@pytest.mark.slow  # ~11 s: the fast tier keeps the vmap == loop and resume checks of the same runner
def test_device_side_batches_equal_host_gathered_batches_bit_for_bit():
  step, states, images, labels, plan, rngs = _setup()
  expected = _host_fed(step, states, images, labels, plan, rngs)
  step, states, images, labels, plan, rngs = _setup()
  vmapped = training.train_clients_vmap(step, states, images, labels, plan, rngs, log_every=1000,
                                        mesh=_one_device("clients", "data"))
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(vmapped)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  step, states, images, labels, plan, rngs = _setup()
  looped = training.train_clients_loop(step, states, images, labels, plan, rngs, log_every=1000,
                                       mesh=_one_device("data"))
  jstep = jax.jit(step)
  for k in range(len(plan.steps)):  # client by client, host-gathered, unvmapped
    state = jax.tree.map(lambda x: x[k], states)
    for t in range(plan.steps[k]):
      idx = plan.index[k, t]
      state, _ = jstep(state, images[idx], labels[idx], plan.mask[k, t], jnp.int32(plan.steps[k]),
                       jax.random.fold_in(rngs[k], t))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(jax.tree.map(lambda x: x[k], looped))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_client_mesh_shape_pads_least_then_prefers_more_client_groups():
  shape = sharding.client_mesh_shape
  assert shape(3, 8, 8) == (1, 8)  # c=1 pads nothing; c=2 and c=4 would pad to 4
  assert shape(4, 8, 8) == (4, 2)  # c=1, 2, 4 all pad nothing: the largest wins
  assert shape(8, 8, 8) == (8, 1) and shape(16, 8, 8) == (8, 1)
  assert shape(3, 2, 8) == (4, 2)  # B=2 splits over at most 2 devices: c >= 4, 4 pads to 4
  assert shape(5, 4, 8) == (2, 4)  # B=4: c >= 2; c=2 pads to 6, c=4 and 8 to 8
  assert shape(5, 3, 8) == (8, 1)  # an odd batch does not split: a whole batch per device, one client each
  assert shape(6, 12, 4) == (2, 2) and shape(7, 12, 1) == (1, 1)
  for k in range(1, 20):  # never more padding than the best divisor allows, and the batch always splits
    for b in (1, 2, 4, 6, 8, 16):
      c, d = shape(k, b, 8)
      assert c * d == 8 and b % d == 0
      assert -(-k // c) * c == min(-(-k // x) * x for x in (1, 2, 4, 8) if b % (8 // x) == 0)


# Sharded vs one device: the same batches and keys, but each client's gradient is summed in
# per-device partial sums then all-reduced over 'data', a different order of float additions, so
# the parameters agree to float tolerance, not bit for bit. The absolute part (1% of the lr, 1e-3)
# is for the attention's key bias: softmax ignores it, so its gradient is rounding noise (~1e-9),
# which Adam scales up towards lr-sized steps; those entries differ by up to ~7e-6 here.
@pytest.mark.slow
@pytest.mark.parametrize("sizes, batch_size, mesh_shape", [
    ((6, 3, 4), 2, {"clients": 4, "data": 2}),  # 3 clients + 1 no-op
    ((8, 4, 6, 5, 9), 4, {"clients": 2, "data": 4}),  # 5 clients + 1 no-op
])
def test_sharded_vmapped_clients_equal_one_device_clients(sizes, batch_size, mesh_shape):
  k = len(sizes)
  mesh = sharding.client_mesh(k, batch_size)
  assert dict(mesh.shape) == mesh_shape and mesh.size == jax.device_count() == 8
  step, states, images, labels, plan, rngs = _setup(k, sizes, batch_size, epochs=1.0)
  assert len(set(plan.steps.tolist())) > 1  # unequal clients: some are masked while others train
  sharded = training.train_clients_vmap(step, states, images, labels, plan, rngs, log_every=1, mesh=mesh)
  step, states, images, labels, plan, rngs = _setup(k, sizes, batch_size, epochs=1.0)
  one = training.train_clients_vmap(step, states, images, labels, plan, rngs, log_every=1000,
                                    mesh=_one_device("clients", "data"))
  np.testing.assert_array_equal(np.asarray(sharded.step), plan.steps)  # K clients back, no padding
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(one)):
    assert a.shape == b.shape and a.shape[0] == k
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_sharded_looped_clients_equal_one_device_clients():
  step, states, images, labels, plan, rngs = _setup(2, (12, 7), 8, epochs=1.0)
  sharded = training.train_clients_loop(step, states, images, labels, plan, rngs, log_every=1000)
  step, states, images, labels, plan, rngs = _setup(2, (12, 7), 8, epochs=1.0)
  one = training.train_clients_loop(step, states, images, labels, plan, rngs, log_every=1000,
                                    mesh=_one_device("data"))
  np.testing.assert_array_equal(np.asarray(sharded.step), plan.steps)
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(one)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_loop_mode_refuses_a_batch_that_does_not_split_over_the_devices():
  with pytest.raises(sharding.ShardingError, match=r"^clients.batch_size: 12 is not divisible by the 8 devices"):
    training.loop_mesh(12)


@pytest.mark.slow
def test_client_stage_records_its_devices_and_saves_k_clients(tmp_path):
  """pipeline.run_clients on the 8-device (4 x 2) mesh: 3 clients + 1 no-op, batch 2. The facts
  name the devices; the result and the rolling saves hold the 3 clients only, and the stage loads
  its result on a rerun."""
  import types
  from fedmitr_jax import checkpoints, pipeline
  config = config_base.base_config()
  config.model.variant, config.dataset.image_size = "test/8", 16
  cfg = config.clients
  cfg.batch_size, cfg.epochs, cfg.checkpoint_every_steps, cfg.log_every_steps = 2, 1.0, 2, 100
  rng = np.random.default_rng(0)
  dataset = types.SimpleNamespace(num_classes=4, train_images=rng.integers(0, 256, (13, 16, 16, 3), dtype=np.uint8),
                                  train_labels=rng.integers(0, 4, 13).astype(np.int32))
  parts = [np.arange(0, 6), np.arange(6, 9), np.arange(9, 13)]
  store = checkpoints.StageStore(tmp_path)
  params = pipeline.run_clients(config, dataset, parts, store)
  facts = store.load_facts("clients")
  assert facts["devices"] == jax.device_count() == 8 and facts["steps"] == [3, 2, 2]
  with store.progress_manager("clients") as manager:
    assert manager.latest_step() == 2  # saves every 2 steps: the last one at step 2 of 3
    saved = checkpoints.restore(manager, 2, None)
  assert {np.shape(x)[0] for x in jax.tree.leaves(saved)} == {3}
  assert np.asarray(saved["step"]).tolist() == [2, 2, 2]
  loaded = pipeline.run_clients(config, dataset, parts, store)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    assert a.shape[0] == 3
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
