"""One data-parallel mesh over every device (all hosts), and helpers to place batches on it.

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
"""
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


class ShardingError(ValueError):
  pass


def data_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ("data",))


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
