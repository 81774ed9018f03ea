"""Multi-host on loopback: two processes joined by `jax.distributed.initialize()` (coordinator on
127.0.0.1, gloo CPU collectives) run the distillation stages of a finished one-process run.

Run A: one process with 2 CPU devices, every stage. Run B: a copy of A without its distillation
stages and results, rerun as 2 processes with 1 CPU device each: partition, clients and synthesis
are restored from A's checkpoints by both processes, distillation runs on the same 2-device mesh
(now spanning two processes) and must give the bit-identical student. Process 1 computes half of
every gradient from the bank and initial student it restored itself, so the equality also checks
its restores. Only process 0 prints and writes logs, results and pictures; every process takes
part in the Orbax saves.
"""
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

pytestmark = pytest.mark.slow  # processes joined over loopback, each running the entry point
REPO = pathlib.Path(__file__).resolve().parents[1]
METHODS = ("fedavg", "sparse_kd", "fedmitr")
DISTILLED = ("distill_sparse_kd", "distill_fedmitr")
# A smaller inversion than the smoke config's (one stop, 4 iterations) keeps run A short; the
# bank's contents do not matter here, only that both runs distil the same one.
OVERRIDES = (f"--config.methods={METHODS!r}", "--config.inversion.iterations=4",
             "--config.inversion.stops=(2,)")
TIMEOUT_S = 240  # a hung collective fails the test instead of blocking CI

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


def _env(devices: int, **extra) -> dict:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("FEDMITR_DISTRIBUTED", "FEDMITR_NUM_PROCESSES", "FEDMITR_PROCESS_ID",
                              "JAX_COORDINATOR"))}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu", **extra)
  return env


def _command(workdir) -> list:
  return [sys.executable, "-m", "fedmitr_jax.main", "--config", str(REPO / "configs/smoke.py"),
          "--workdir", str(workdir), *OVERRIDES]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_two_processes(workdir, spy_dir: pathlib.Path):
  """Both processes at once; returns [(returncode, stdout, stderr, written paths)] by process id.
  If one fails, the other (which would wait for it in a collective) is stopped at once."""
  spy_dir.mkdir()
  (spy_dir / "sitecustomize.py").write_text(WRITE_SPY)
  pythonpath = os.pathsep.join(p for p in (str(spy_dir), os.environ.get("PYTHONPATH")) if p)
  common = dict(FEDMITR_DISTRIBUTED="1", FEDMITR_NUM_PROCESSES="2",
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", PYTHONPATH=pythonpath)
  procs = []
  for pid in (0, 1):
    with open(spy_dir / f"stdout_{pid}", "w") as out, open(spy_dir / f"stderr_{pid}", "w") as err:
      env = _env(1, FEDMITR_PROCESS_ID=str(pid), FEDMITR_TEST_WRITE_LOG=str(spy_dir / f"writes_{pid}"),
                 **common)
      procs.append(subprocess.Popen(_command(workdir), cwd=REPO, stdout=out, stderr=err, text=True, env=env))
  deadline = time.monotonic() + TIMEOUT_S
  try:
    while any(proc.poll() is None for proc in procs):
      if time.monotonic() > deadline:
        pytest.fail(f"the two-process run did not finish in {TIMEOUT_S} s (a hang in a collective?)")
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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  one, two = root / "one_process", root / "two_processes"
  first = subprocess.run(_command(one), cwd=REPO, env=_env(2), capture_output=True, text=True,
                         timeout=TIMEOUT_S)
  assert first.returncode == 0, first.stderr[-3000:]
  shutil.copytree(one, two)
  for stage in DISTILLED:
    shutil.rmtree(two / "stages" / stage)
  for name in ("results.json", "results.md"):
    (two / name).unlink()
  procs = _run_two_processes(two, root / "spy")
  for pid, (code, out, err, _) in enumerate(procs):
    assert code == 0, f"process {pid}:\n{out[-2000:]}\n{err[-3000:]}"
  return one, two, procs


def _load_numpy(path: pathlib.Path):
  """A saved stage result as numpy arrays, whatever devices it was saved from."""
  with ocp.StandardCheckpointer() as ckpt:
    tree = ckpt.metadata(path).item_metadata.tree
    return ckpt.restore(path, jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree))


def test_two_processes_distil_the_same_student_as_one(runs):
  """Same global batch, split over 2 devices both times; the gradient all-reduce sums the same
  two halves, so the students are bit-identical, not merely close."""
  one, two, _ = runs
  a, b = (json.loads((d / "results.json").read_text()) for d in (one, two))
  assert set(b["methods"]) == set(METHODS)
  for name in METHODS:
    for key in ("test_acc", "test_acc_cls_token"):
      assert b["methods"][name].get(key) == a["methods"][name].get(key), (name, key)
  assert [c["test_acc"] for c in b["clients"]] == [c["test_acc"] for c in a["clients"]]
  for stage in DISTILLED:
    ref, got = (_load_numpy(d / "stages" / stage / "result" / "0" / "default") for d in (one, two))
    assert jax.tree.structure(ref) == jax.tree.structure(got)
    for x, y in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
      np.testing.assert_array_equal(x, y, err_msg=stage)


def test_finished_stages_are_loaded_and_distillation_runs_on_both_processes(runs):
  _, two, procs = runs
  out = procs[0][1]
  assert "over 2 process(es)" in out
  for stage in ("partition", "clients", "inversion_sparse"):
    assert f"[{stage}] loaded from checkpoint" in out, stage
  assert "[clients] step" not in out and "[inversion_sparse 1/2] step" not in out
  for stage in DISTILLED:
    assert f"[{stage}] step 4/4" in out, stage
    assert (two / "stages" / stage / "DONE").exists()


def test_only_process_0_prints_and_writes_results(runs):
  one, two, procs = runs
  out_1, written_0, written_1 = procs[1][1], procs[0][3], procs[1][3]
  assert [line for line in out_1.splitlines() if line.strip() and not line.startswith("[Gloo]")] == []
  assert "[evaluate]" in procs[0][1]
  # In the workdir, process 1 writes nothing but its part of the Orbax checkpoints.
  stages = str(two / "stages")
  outside = [p for p in written_1 if p.startswith(str(two) + os.sep) and not (
      p.startswith(stages + os.sep) and ("/result/" in p or "/progress/" in p))]
  assert outside == [], outside
  # Process 0 writes each result file once; every stage's DONE and facts likewise.
  for name in ("results.json", "results.md", "synthetic_sparse.png"):
    assert written_0.count(str(two / name)) == 1, name
  for stage in DISTILLED:
    for name in ("DONE", "result.json"):
      assert written_0.count(str(two / "stages" / stage / name)) == 1, (stage, name)
  assert all(f"| {name} |" in (two / "results.md").read_text() for name in METHODS)


def test_every_process_takes_part_in_the_checkpoints(runs):
  """Orbax saves are collective: each process writes its own OCDBT part (and array metadata),
  for the rolling saves and for the result."""
  _, two, _ = runs
  for stage in DISTILLED:
    for save in ("result/0", "progress/4"):
      folder = two / "stages" / stage / save / "default"
      for pid in (0, 1):
        assert (folder / f"ocdbt.process_{pid}").is_dir(), (stage, save, pid)
        assert (folder / "array_metadatas" / f"process_{pid}").exists(), (stage, save, pid)
