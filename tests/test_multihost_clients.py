"""Client training over two processes on loopback (2 CPU devices each, one 4-device mesh, gloo
collectives): every process places only its own devices' shards, no process repeats another's
work, and the K clients that come back (and those handed to `on_step` for saving) equal the same
clients trained on one device, on both processes alike.

Cases: 'vmap' with the batch split over all 4 devices (mesh 1 x 4, 'data' across the processes),
'vmap' with the clients split across the processes (batch 2: mesh 4 x 1, one no-op client), and
'loop' (the batch split over all 4 devices).
"""
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from fedmitr_jax import sharding
from fedmitr_jax.client import training
from test_clients import _one_device, _setup

pytestmark = pytest.mark.slow  # two processes joined over loopback
REPO = pathlib.Path(__file__).resolve().parents[1]
CASES = (("vmap", (6, 3, 4), 4, {"clients": 1, "data": 4}), ("vmap", (6, 3, 4), 2, {"clients": 4, "data": 1}),
         ("loop", (8, 5), 4, {"data": 4}))
TIMEOUT_S = 400  # a hung collective fails the test instead of blocking CI

# One process of the pair: argv = process id, coordinator port, output .npz.
WORKER = '''
import sys
import jax
jax.distributed.initialize(f"127.0.0.1:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[1]))
import numpy as np
from fedmitr_jax import sharding
from fedmitr_jax.client import training
from test_clients import _setup
from test_multihost_clients import CASES, train_case

out = {}
for i, (mode, sizes, batch, _) in enumerate(CASES):
  mesh = training.stage_mesh(mode, len(sizes), batch)
  assert jax.device_count() == mesh.size == 4 and jax.local_device_count() == 2
  out[f"shape_{i}"] = np.asarray(list(mesh.shape.values()))
  for name, leaves in train_case(mode, sizes, batch, mesh).items():
    for j, leaf in enumerate(leaves):
      out[f"{i}_{name}_{j}"] = leaf
np.savez(sys.argv[3], **out)
'''


def train_case(mode, sizes, batch, mesh) -> dict:
  """{'final': leaves of the returned clients, 'saved': leaves of the last `on_step` states}."""
  step, states, images, labels, plan, rngs = _setup(len(sizes), sizes, batch, epochs=1.0)
  saved = {}
  keep = lambda t, states_fn: saved.__setitem__(t, jax.tree.map(sharding.to_host, states_fn()))
  train = training.train_clients_vmap if mode == "vmap" else training.train_clients_loop
  final = train(step, states, images, labels, plan, rngs, log_every=1000, mesh=mesh, on_step=keep)
  return {"final": [np.asarray(x) for x in jax.tree.leaves(final)],
          "saved": [np.asarray(x) for x in jax.tree.leaves(saved[max(saved)])]}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_the_same_clients_as_one_device(tmp_path):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
  procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(pid), str(port), str(tmp_path / f"p{pid}.npz")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for pid in (0, 1)]
  try:
    logs = [proc.communicate(timeout=TIMEOUT_S)[0] for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for pid, (proc, log) in enumerate(zip(procs, logs)):
    assert proc.returncode == 0, f"process {pid}:\n{log[-3000:]}"
  got = [np.load(tmp_path / f"p{pid}.npz") for pid in (0, 1)]
  for i, (mode, sizes, batch, shape) in enumerate(CASES):
    assert got[0][f"shape_{i}"].tolist() == list(shape.values())
    mesh = _one_device("clients", "data") if mode == "vmap" else _one_device("data")
    for name, leaves in train_case(mode, sizes, batch, mesh).items():
      for j, expected in enumerate(leaves):
        a, b = got[0][f"{i}_{name}_{j}"], got[1][f"{i}_{name}_{j}"]
        np.testing.assert_array_equal(a, b)  # both processes hold the same whole result
        assert a.shape == expected.shape and a.shape[0] == len(sizes)  # K clients, no padding
        # Gradients summed per device, then all-reduced: tolerance as in test_clients.
        np.testing.assert_allclose(a, expected, rtol=1e-5, atol=1e-5)
