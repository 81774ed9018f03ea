"""Stage 2: every client trains its own ViT on its own shard, and uploads it once.

A client is three pure pieces (fedjax style): `init_client_state`, `client_train_step` and the
final parameters. How clients run is a separate choice:
  * 'vmap' (fast path): all K clients in one jitted, vmapped step over parameters stacked on a
    leading client axis. Clients with fewer steps than the largest are masked (their state is left
    unchanged), and partial last batches are masked per example.
  * 'loop' (reference): the same step, jitted once, run client after client on the same batches.
Both see identical batches and random numbers, so they give the same parameters (tested).
Both keep the training images, labels and batch plan on the devices for the whole stage and hand
each step only its step number: the batch is gathered and the step's random key derived inside
the compiled step (uint8 images, replicated on every device: 150 MB for CIFAR-10 at 32 px, 7.5 GB
at 224 px).

Both use every device of every process (one SPMD program, no process repeats another's work):
  * 'vmap': the ('clients', 'data') mesh of `sharding.client_mesh`. The client axis of the states,
    plan, step totals and keys is split over 'clients' (padded to a multiple of its size with
    no-op clients, whose plans are all masked), and each client's batch over 'data'.
  * 'loop': the 1-D 'data' mesh; the current client's state is replicated, its batch split.
The states a runner returns, and those it hands to `on_step` for saving, have exactly K clients,
so a checkpoint resumes on any number of devices.
"""
import dataclasses
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedmitr_jax import sharding
from fedmitr_jax.data import augment, datasets
from fedmitr_jax.progress import Progress, log


@flax.struct.dataclass
class ClientState:
  params: any
  opt_state: any
  step: jnp.ndarray  # this client's own number of applied updates (drives its lr schedule)


def decay_mask(params):
  """Weight decay on kernels only: not on biases, LayerNorm scales or embeddings' 1-d parts."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg) -> optax.GradientTransformation:
  """Direction of the update; the learning rate is applied in the step so each client can have
  its own schedule length while all clients share one vmapped computation."""
  if cfg.optimizer == "adamw":
    core = [optax.scale_by_adam(b1=0.9, b2=0.999), optax.add_decayed_weights(cfg.weight_decay, decay_mask)]
  elif cfg.optimizer == "sgd":
    core = [optax.add_decayed_weights(cfg.weight_decay, decay_mask), optax.trace(decay=cfg.momentum)]
  else:
    raise ValueError(f"clients.optimizer: '{cfg.optimizer}' is unknown; use 'adamw' or 'sgd'")
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), *core)


def warmup_cosine_lr(base_lr, step, total_steps, warmup_fraction):
  total = jnp.maximum(total_steps, 1).astype(jnp.float32)
  warmup = jnp.maximum(jnp.round(warmup_fraction * total), 1.0)
  ramp = jnp.minimum(1.0, (step + 1.0) / warmup)
  progress = jnp.clip((step - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
  return base_lr * ramp * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))


def init_client_state(params, tx) -> ClientState:
  return ClientState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))


def token_label_loss(token_logits, labels):
  """[B] mean over patch tokens of CE(head on token i, the image label): every patch token is
  asked for evidence of the image's class, which token relabel later reads off the teachers."""
  per_token = optax.softmax_cross_entropy_with_integer_labels(
      token_logits, jnp.broadcast_to(labels[:, None], token_logits.shape[:2]))
  return per_token.mean(axis=1)


def make_client_train_step(model, tx, cfg, image_size=None):
  """Returns step(state, images_u8, labels, mask, total_steps, rng) -> (state, metrics).

  A pure function of its inputs; an all-masked batch leaves the state exactly unchanged. Images of
  another size than `image_size` (the model's input) are resized first, then cropped and flipped.
  """

  def loss_fn(params, images, labels, mask):
    logits, out = model.apply({"params": params}, images)
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if cfg.token_loss_weight:  # a Python branch: weight 0 traces exactly the plain ViT's loss
      per_example = per_example + cfg.token_loss_weight * token_label_loss(out["token_logits"], labels)
    count = jnp.maximum(mask.sum(), 1)
    loss = jnp.sum(per_example * mask) / count
    correct = jnp.sum((logits.argmax(-1) == labels) * mask)
    return loss, correct

  def step(state: ClientState, images_u8, labels, mask, total_steps, rng):
    model_input = augment.resize_to(images_u8, image_size)
    images = datasets.normalize(augment.random_crop_flip(rng, model_input, cfg.crop_padding))
    (loss, correct), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, images, labels, mask)
    direction, opt_state = tx.update(grads, state.opt_state, state.params)
    lr = warmup_cosine_lr(cfg.lr, state.step, total_steps, cfg.warmup_fraction)
    params = jax.tree.map(lambda p, d: p - lr * d, state.params, direction)
    new_state = ClientState(params=params, opt_state=opt_state, step=state.step + 1)
    active = mask.any()  # padded steps of clients that already finished change nothing
    new_state = jax.tree.map(lambda new, old: jnp.where(active, new, old), new_state, state)
    metrics = {"loss": loss * active, "correct": correct, "count": mask.sum()}
    return new_state, metrics

  return step


def make_planned_step(step_fn, batch_sharding=None):
  """planned(state, images, labels, index, mask, total_steps, rng, t) -> step_fn on step t's batch:
  images[index[t]] with mask[t], and fold_in(rng, t), computed on the device. `images`/`labels`:
  the whole training set; `index`/`mask`: one client's plan [T, B]. `batch_sharding` (over 'data'):
  the gathered batch is split over it, each device gathering and training on its own examples."""

  def planned(state, images, labels, index, mask, total_steps, rng, t):
    rows = jax.lax.dynamic_index_in_dim(index, t, keepdims=False)
    batch = (jnp.take(images, rows, axis=0), jnp.take(labels, rows, axis=0),
             jax.lax.dynamic_index_in_dim(mask, t, keepdims=False))
    if batch_sharding is not None:
      batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    return step_fn(state, *batch, total_steps, jax.random.fold_in(rng, t))

  return planned


def _with_key_data(planned):
  """`planned` taking its key as raw uint32 key data: typed key arrays cannot be handed to
  `jax.make_array_from_process_local_data` (numpy has no key dtype), raw data can."""

  def planned_raw(state, images, labels, index, mask, total_steps, key_data, t):
    return planned(state, images, labels, index, mask, total_steps, jax.random.wrap_key_data(key_data), t)

  return planned_raw


def jit_vmapped_step(step_fn, mesh: Mesh):
  """All clients' planned step, vmapped and jitted on the ('clients', 'data') mesh:
  vstep(states, images, labels, index, mask, totals, key_data, t) -> (states, metrics).
  Client-axis arguments (states, totals, key_data, metrics) split over 'clients'; the plan
  [K, T, B] over ('clients', -, 'data'); the training set and t replicated. `spmd_axis_name` makes
  the batch constraint inside the vmap P('clients', 'data'), so no device gathers another's rows."""
  clients, replicated = NamedSharding(mesh, P("clients")), NamedSharding(mesh, P())
  plan = NamedSharding(mesh, P("clients", None, "data"))
  planned = _with_key_data(make_planned_step(step_fn, NamedSharding(mesh, P("data"))))
  vmapped = jax.vmap(planned, in_axes=(0, None, None, 0, 0, 0, 0, None), spmd_axis_name="clients")
  return jax.jit(vmapped, in_shardings=(clients, replicated, replicated, plan, plan, clients, clients, replicated),
                 out_shardings=(clients, clients), donate_argnums=0)


def jit_looped_step(step_fn, mesh: Mesh):
  """One client's planned step, jitted on the 1-D 'data' mesh:
  jstep(state, images, labels, index, mask, total, key_data, t) -> (state, metrics), the plan
  [T, B] split over 'data' by example, everything else replicated."""
  replicated, plan = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "data"))
  planned = _with_key_data(make_planned_step(step_fn, NamedSharding(mesh, P("data"))))
  return jax.jit(planned, in_shardings=(replicated,) * 3 + (plan, plan) + (replicated,) * 3,
                 out_shardings=(replicated, replicated))


def loop_mesh(batch_size: int) -> Mesh:
  """The 1-D 'data' mesh of 'loop' mode; each client's batch is split over every device."""
  sharding.check_divisible(batch_size, "clients.batch_size")
  return sharding.data_mesh()


def stage_mesh(mode: str, num_clients: int, batch_size: int) -> Mesh:
  """The mesh mode `mode` trains on: 'vmap' the 2-D client mesh, 'loop' the 1-D 'data' mesh."""
  return sharding.client_mesh(num_clients, batch_size) if mode == "vmap" else loop_mesh(batch_size)


def pad_clients(x, padded: int) -> np.ndarray:
  """`x` [K, ...] on the host, grown to [padded, ...] with copies of its last client. A copy is a
  valid state (or step total, or key) for a no-op client, whose plan is all masked: the step
  leaves its state exactly unchanged, and it is dropped before anything is returned or saved."""
  x = np.asarray(x)
  return np.concatenate([x, np.repeat(x[-1:], padded - len(x), axis=0)])


def _host_tree(tree):
  return jax.tree.map(sharding.to_host, tree)


# ---- batches ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """Which examples each client sees at each step. index: [K, T, B] global indices; mask: same
  shape, False for padding; steps: [K] real step count of each client (T = max steps)."""
  index: np.ndarray
  mask: np.ndarray
  steps: np.ndarray


def plan_batches(parts, batch_size: int, epochs: float, seed: int) -> BatchPlan:
  steps = np.array([max(1, math.ceil(epochs * len(p) / batch_size)) for p in parts])
  total = int(steps.max())
  index = np.zeros((len(parts), total, batch_size), np.int64)
  mask = np.zeros((len(parts), total, batch_size), bool)
  for k, part in enumerate(parts):
    rng = np.random.default_rng([seed, k])
    wanted = max(1, math.ceil(epochs * len(part)))
    order = np.concatenate([rng.permutation(len(part)) for _ in range(math.ceil(wanted / len(part)))])
    chosen = np.asarray(part)[order[:wanted]]
    flat_index = np.zeros(steps[k] * batch_size, np.int64)
    flat_index[:wanted] = chosen
    index[k, :steps[k]] = flat_index.reshape(steps[k], batch_size)
    mask[k, :steps[k]] = (np.arange(steps[k] * batch_size) < wanted).reshape(steps[k], batch_size)
  return BatchPlan(index=index, mask=mask, steps=steps)


def client_rngs(seed: int, num_clients: int):
  base = jax.random.fold_in(jax.random.key(seed), 2)  # stream 2: client training
  return jnp.stack([jax.random.fold_in(base, k) for k in range(num_clients)])


# ---- runners ---------------------------------------------------------------------------------
def train_clients_vmap(step_fn, states, images, labels, plan: BatchPlan, rngs, *, start_step=0,
                       on_step=None, log_every=50, stage="clients", guard=None, mesh=None):
  """All clients at once, on `mesh` (default: `sharding.client_mesh` over every device).
  `on_step(t, states_fn)` is called after each step (checkpoints; `states_fn()` gives the K
  clients' states, replicated, as in `train_clients_loop`); `guard` (a guards.FiniteGuard) sees
  every step's losses, so `on_step` can check it before saving."""
  num_clients, total, batch = plan.index.shape
  mesh = mesh or sharding.client_mesh(num_clients, batch)
  padded = -(-num_clients // mesh.shape["clients"]) * mesh.shape["clients"]
  log(f"[{stage}] mesh clients={mesh.shape['clients']} x data={mesh.shape['data']} ({mesh.size} devices), "
      f"{num_clients} clients" + (f" + {padded - num_clients} no-op" if padded > num_clients else ""))
  clients, replicated = NamedSharding(mesh, P("clients")), NamedSharding(mesh, P())
  plan_sharding = NamedSharding(mesh, P("clients", None, "data"))
  vstep = jit_vmapped_step(step_fn, mesh)
  images, labels = sharding.replicate(mesh, (np.asarray(images), np.asarray(labels, np.int32)))
  no_op = np.zeros((padded - num_clients,) + plan.mask.shape[1:], bool)
  index = sharding.put_global(pad_clients(plan.index.astype(np.int32), padded), plan_sharding)
  mask = sharding.put_global(np.concatenate([plan.mask, no_op]), plan_sharding)
  totals = sharding.put_global(pad_clients(plan.steps.astype(np.int32), padded), clients)
  key_data = sharding.put_global(pad_clients(jax.random.key_data(rngs), padded), clients)
  states = sharding.put_global(jax.tree.map(lambda x: pad_clients(x, padded), _host_tree(states)), clients)
  # The padding is dropped before anything leaves the stage: saves and the result hold K clients.
  unpad = jax.jit(lambda tree: jax.tree.map(lambda x: x[:num_clients], tree), out_shardings=replicated)
  if guard is not None:  # it folds in losses that live on the mesh; so must its own number
    guard.first_bad = sharding.replicate(mesh, guard.first_bad)
  progress = Progress(stage, total, int(plan.mask.sum() / total), start_step=start_step)
  for t in range(start_step, total):
    states, metrics = vstep(states, images, labels, index, mask, totals, key_data, t)
    progress.step_done()
    if guard is not None:
      guard.update(t + 1, metrics["loss"])  # a no-op client's loss is 0: finite
    if on_step is not None:
      on_step(t + 1, lambda: unpad(states))
    if (t + 1) % log_every == 0 or t + 1 == total:
      m = {k: v[:num_clients] for k, v in _host_tree(metrics).items()}
      progress.report(t + 1, loss=m["loss"].sum() / max((m["count"] > 0).sum(), 1),
                      train_acc=m["correct"].sum() / max(m["count"].sum(), 1))
  return jax.tree.map(jnp.asarray, _host_tree(unpad(states)))


def train_clients_loop(step_fn, states, images, labels, plan: BatchPlan, rngs, *, start_step=0,
                       on_step=None, log_every=50, stage="clients", guard=None, mesh=None):
  """Reference: one client after another, each only for its own steps, on `mesh` (default:
  `loop_mesh`: every device, each client's batch split over them).

  Steps are numbered globally (client 0's steps, then client 1's, ...), so one counter names a
  resume point. `on_step(g, stacked_states_fn)` is called after global step g; calling
  `stacked_states_fn()` gives every client's state stacked (host arrays), the current one at its
  step g, so a caller that saves only every N steps pays for the stacking only then. Resuming from
  a state saved at `start_step` gives the uninterrupted result: batches and random numbers depend
  only on (client, step)."""
  mesh = mesh or loop_mesh(plan.index.shape[-1])
  log(f"[{stage}] mesh data={mesh.size} ({mesh.size} devices), one client at a time")
  replicated, plan_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "data"))
  jstep = jit_looped_step(step_fn, mesh)
  images, labels = sharding.replicate(mesh, (np.asarray(images), np.asarray(labels, np.int32)))
  key_data = np.asarray(jax.random.key_data(rngs))
  states = _host_tree(states)  # the stack stays on the host; only the current client is on the devices
  if guard is not None:
    guard.first_bad = sharding.replicate(mesh, guard.first_bad)
  offsets = np.concatenate([[0], np.cumsum(plan.steps)])
  for k in range(len(plan.steps)):
    if start_step >= offsets[k + 1]:
      continue  # finished before the save we resumed from; its state is in `states`
    first = start_step - offsets[k] if start_step > offsets[k] else 0
    state = sharding.put_global(jax.tree.map(lambda x: x[k], states), replicated)
    client = (sharding.put_global(plan.index[k].astype(np.int32), plan_sharding),
              sharding.put_global(plan.mask[k], plan_sharding),
              sharding.put_global(np.int32(plan.steps[k]), replicated),
              sharding.put_global(key_data[k], replicated))  # placed once per client, not per step
    progress = Progress(f"{stage} {k}", int(plan.steps[k]), plan.index.shape[-1], start_step=int(first))
    for t in range(int(first), int(plan.steps[k])):
      state, metrics = jstep(state, images, labels, *client, t)
      progress.step_done()
      g = int(offsets[k]) + t + 1
      if guard is not None:
        guard.update(g, metrics["loss"])
      if on_step is not None:
        on_step(g, lambda: _with_client(states, k, _host_tree(state)))
      if (t + 1) % log_every == 0 or t + 1 == plan.steps[k]:
        progress.report(t + 1, loss=metrics["loss"])
    if guard is not None:
      guard.check()
    states = _with_client(states, k, _host_tree(state))
  return jax.tree.map(jnp.asarray, states)


def _with_client(states, k: int, state):
  """`states` (host arrays stacked on axis 0) with client k's entry replaced by `state`: a copy."""

  def replaced(stacked, x):
    stacked = stacked.copy()
    stacked[k] = x
    return stacked

  return jax.tree.map(replaced, states, state)


def stack_copies(tree, num: int):
  """The same initial parameters for every client (one shared init, as in one-shot FL)."""
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (num,) + x.shape).copy(), tree)
