"""Tests run on 8 fake CPU devices so sharded code paths are exercised without accelerators.

Also shared by the whole session: one smoke run of the real entry point (`smoke_run`), and a JAX
compilation cache for the entry-point subprocesses, so a rerun, a resume or a kill test reuses the
compilations of the runs before it instead of paying for them again.
"""
import os
import pathlib
import subprocess
import sys

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402,F401  (now: JAX reads its cache settings at import, before the fixture below)
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache for the session's subprocesses (they inherit os.environ).
  JAX caches only compilations over 1 s by default; at 0 every CPU compilation is kept, and most
  of a smoke run's are shorter. JAX reads these at import, which this file did above, so only
  subprocesses use the cache (in this process JAX's in-memory cache already serves repeats);
  a cache the user set already is kept."""
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return pathlib.Path(os.environ["JAX_COMPILATION_CACHE_DIR"])


def run_main(workdir, *overrides, devices=1, config="configs/smoke.py", timeout=900):
  """`python -m fedmitr_jax.main` in a subprocess on `devices` fake CPU devices."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, "-m", "fedmitr_jax.main", "--config", str(REPO / config), "--workdir", str(workdir),
         *overrides]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, compilation_cache):
  """One uninterrupted smoke run (configs/smoke.py, one device): (workdir, CompletedProcess).
  Tests only read it; a test that reruns or edits a workdir works on a shutil.copytree copy."""
  workdir = tmp_path_factory.mktemp("smoke")
  first = run_main(workdir)
  assert first.returncode == 0, first.stderr[-3000:]
  return workdir, first
