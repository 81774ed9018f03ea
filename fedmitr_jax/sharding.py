"""Meshes over every device (all hosts), and helpers to place batches on them.

We use `jax.jit` with `NamedSharding` (JAX's recommended path; `pmap` is in maintenance mode).
The mesh axis is 'data'; parameters are replicated, batches split along their first axis.
`jax.sharding.Mesh` is built directly, with the default (auto) axis type, because
`jax.make_mesh` now defaults to explicit axes, which breaks the ViT's CLS-token concat.

Multi-process runs (`jax.distributed.initialize()`): the mesh spans devices of other processes,
and `jax.device_put` onto it refuses this process's committed arrays (it would need a cross-host
transfer, which CPU/GPU backends lack) and checks numpy input by all-gathering it from every
process. Every process holds the same host data here (the bank, the parameters), so `put_global`
hands it whole to `jax.make_array_from_process_local_data` with the global shape: each process
places the slices its own devices own, with no communication. One process keeps `device_put`.

Client training (stage 2) has a 2-D mesh of its own, `client_mesh`: clients split over 'clients',
each client's batch split over 'data'. Inversion with `inversion.parallel_batches` = G > 1 has
`group_mesh`: G bank batches over 'batches', each batch split over 'data'.
"""
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


class ShardingError(ValueError):
  pass


def data_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ("data",))


def client_mesh_shape(num_clients: int, batch_size: int, devices: int) -> tuple[int, int]:
  """(clients, data) axis sizes for K = `num_clients` clients of batch B = `batch_size` on D devices.

  The 'clients' size c is the divisor of D that makes the padded client count ceil(K / c) * c
  smallest, among those where B splits over the D / c devices of 'data' (B % (D / c) == 0); ties
  go to the larger c. Why: every device computes ceil(K / c) clients x B / (D / c) examples =
  (padded K) x B / D, so the padded count is the work per device, and the K_padded - K no-op clients
  are pure waste. Among equal work a larger c means smaller 'data' groups, so each client's gradient
  all-reduce spans fewer devices, and each device holds fewer clients' states. c = D always qualifies
  (B % 1 == 0), so there is always a shape: e.g. K=3, B=8, D=8 -> (1, 8) (no padding); K=4 -> (4, 2);
  K=3, B=2 -> (4, 2) (one no-op client); K=5, B=4 -> (2, 4)."""
  def padded(c):
    return -(-num_clients // c) * c
  fits = [c for c in range(1, devices + 1) if devices % c == 0 and batch_size % (devices // c) == 0]
  clients = min(fits, key=lambda c: (padded(c), -c))
  return clients, devices // clients


def client_mesh(num_clients: int, batch_size: int) -> Mesh:
  """The ('clients', 'data') mesh over every device with `client_mesh_shape`'s axis sizes. Devices
  are in `jax.devices()` order (grouped by process), so a 'data' group no larger than a process's
  devices stays on one host and the per-client all-reduce does not cross hosts."""
  shape = client_mesh_shape(num_clients, batch_size, jax.device_count())
  return Mesh(np.asarray(jax.devices()).reshape(shape), ("clients", "data"))


def group_mesh(groups: int) -> Mesh:
  """The ('batches', 'data') mesh over every device: `groups` independent batches side by side,
  each split over D / groups devices (devices in `jax.devices()` order, so a small 'data' group
  stays on one host). The caller checks that `groups` divides the device count."""
  devices = jax.device_count()
  return Mesh(np.asarray(jax.devices()).reshape(groups, devices // groups), ("batches", "data"))


def group_sharder(mesh: Mesh):
  """Returns x -> x placed with its leading (batch-number) axis over 'batches' and its second
  (example) axis, if any, over 'data'."""
  split, per_batch = NamedSharding(mesh, P("batches", "data")), NamedSharding(mesh, P("batches"))
  return lambda x: put_global(x, split if np.ndim(x) >= 2 else per_batch)


def check_divisible(batch: int, field: str) -> None:
  devices = jax.device_count()
  if batch % devices:
    raise ShardingError(f"{field}: {batch} is not divisible by the {devices} devices; "
                        f"set it to a multiple of {devices}")


def batch_sharder(mesh: Mesh, batch: int, field: str):
  """Returns x -> x placed with its leading (batch) axis split over 'data'."""
  check_divisible(batch, field)
  batch_sharding, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  # Scalars (an optimizer's step count) are replicated; everything else is split by example.
  return lambda x: put_global(x, batch_sharding if np.ndim(x) else replicated)


def put_global(tree, sharding: NamedSharding):
  """`tree` (the same values on every process) as global arrays with `sharding`."""
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), np.shape(x)), tree)


def replicate(mesh: Mesh, tree):
  return put_global(tree, NamedSharding(mesh, P()))


def to_host(x) -> np.ndarray:
  """The whole value of a (possibly split over several processes) array as numpy, on every
  process; gathering from the others is a collective, so every process must call it."""
  if jax.process_count() == 1 or not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def to_local(tree):
  """Global arrays replicated over every process -> this process's copy on its first device,
  for code that runs per process (evaluation on host images). One process: unchanged."""
  if jax.process_count() == 1:
    return tree
  return jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)


def replicate_anywhere(mesh: Mesh, tree):
  """`tree` replicated on `mesh`, wherever its leaves are now: numpy, one local device, or global
  arrays, replicated or split (stage outputs). Multi-process, a global array is re-laid out by a
  compiled identity, a collective: every process must call this."""
  target = NamedSharding(mesh, P())
  if jax.process_count() == 1:
    return jax.device_put(tree, target)

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x if x.sharding.is_equivalent_to(target, x.ndim) else jax.jit(_identity, out_shardings=target)(x)
    return put_global(x, target)

  return jax.tree.map(one, tree)


def _identity(x):
  return x
