"""One data-parallel mesh over every device (all hosts), and helpers to place batches on it.

We use `jax.jit` with `NamedSharding` (JAX's recommended path; `pmap` is in maintenance mode).
The mesh axis is 'data'; parameters are replicated, batches split along their first axis.
`jax.sharding.Mesh` is built directly, with the default (auto) axis type, because
`jax.make_mesh` now defaults to explicit axes, which broke the ViT's CLS concat (SPEC.md).
"""
import jax
import numpy as np
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
  return lambda x: jax.device_put(x, batch_sharding if np.ndim(x) else replicated)


def replicate(mesh: Mesh, tree):
  return jax.device_put(tree, NamedSharding(mesh, P()))
