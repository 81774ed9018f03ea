"""Two processes of an entry point joined over loopback, for the multi-process tests.

`run_two_processes` starts a command as processes 0 and 1 of one `jax.distributed.initialize()`
job (coordinator on 127.0.0.1, gloo CPU collectives, 1 CPU device each) and records, with a
write spy loaded at start-up, every file each process opens for writing.
"""
import os
import pathlib
import socket
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

# Loaded by Python at start-up from PYTHONPATH: records every file the process opens for
# writing or moves into place (write_json_atomic's os.replace), one absolute path per line.
WRITE_SPY = '''
import builtins, io, os
_log, _open, _replace = os.environ["FEDMITR_TEST_WRITE_LOG"], io.open, os.replace

def _record(path):
  with _open(_log, "a") as f:
    f.write(os.path.abspath(os.fsdecode(path)) + "\\n")

def _spy_open(file, mode="r", *args, **kwargs):
  if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
    _record(file)
  return _open(file, mode, *args, **kwargs)

def _spy_replace(src, dst, *args, **kwargs):
  _record(dst)
  return _replace(src, dst, *args, **kwargs)

builtins.open = io.open = _spy_open
os.replace = _spy_replace
'''


def env(devices: int, **extra) -> dict:
  """This process's environment for a child on `devices` CPU devices, without any multi-process
  settings of its own."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("FEDMITR_DISTRIBUTED", "FEDMITR_NUM_PROCESSES", "FEDMITR_PROCESS_ID",
                              "JAX_COORDINATOR"))}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu", **extra)
  return env


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# The smoke config with a smaller inversion (one stop, 4 iterations): a multi-process test checks
# that the processes agree, not what the bank holds.
SMALL_INVERSION = ("--config.inversion.iterations=4", "--config.inversion.stops=(2,)")


def run_one_process(command, cwd, devices: int, timeout_s: float) -> None:
  """The reference run: one process with `devices` CPU devices; fails the test if it fails."""
  result = subprocess.run(command, cwd=cwd, env=env(devices), capture_output=True, text=True,
                          timeout=timeout_s)
  assert result.returncode == 0, result.stderr[-3000:]


def run_two_processes(command, cwd, spy_dir: pathlib.Path, timeout_s: float):
  """`command` as processes 0 and 1 at once; returns [(returncode, stdout, stderr, written paths)]
  by process id. If one fails, the other (which would wait for it in a collective) is stopped at
  once; if they run past `timeout_s` (a hung collective), both are stopped and the test fails."""
  spy_dir.mkdir()
  (spy_dir / "sitecustomize.py").write_text(WRITE_SPY)
  pythonpath = os.pathsep.join(p for p in (str(spy_dir), os.environ.get("PYTHONPATH")) if p)
  common = dict(FEDMITR_DISTRIBUTED="1", FEDMITR_NUM_PROCESSES="2",
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", PYTHONPATH=pythonpath)
  procs = []
  for pid in (0, 1):
    with open(spy_dir / f"stdout_{pid}", "w") as out, open(spy_dir / f"stderr_{pid}", "w") as err:
      child_env = env(1, FEDMITR_PROCESS_ID=str(pid), FEDMITR_TEST_WRITE_LOG=str(spy_dir / f"writes_{pid}"),
                      **common)
      procs.append(subprocess.Popen(command, cwd=cwd, stdout=out, stderr=err, text=True, env=child_env))
  deadline = time.monotonic() + timeout_s
  try:
    while any(proc.poll() is None for proc in procs):
      if time.monotonic() > deadline:
        pytest.fail(f"the two-process run did not finish in {timeout_s} s (a hang in a collective?)")
      if any(proc.poll() not in (None, 0) for proc in procs):
        break  # the other one would wait for it until JAX's own timeouts
      time.sleep(0.5)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
      proc.wait()
  results = []
  for pid, proc in enumerate(procs):
    log = spy_dir / f"writes_{pid}"
    written = log.read_text().splitlines() if log.exists() else []
    results.append((proc.returncode, (spy_dir / f"stdout_{pid}").read_text(),
                    (spy_dir / f"stderr_{pid}").read_text(), written))
  return results


def load_numpy(path: pathlib.Path):
  """A saved stage result as numpy arrays, whatever devices or processes it was saved from."""
  with ocp.StandardCheckpointer() as ckpt:
    tree = ckpt.metadata(path).item_metadata.tree
    return ckpt.restore(path, jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree))
