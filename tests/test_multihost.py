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
import sys

import jax
import numpy as np
import pytest
from loopback import SMALL_INVERSION, load_numpy, run_one_process, run_two_processes

pytestmark = pytest.mark.slow  # processes joined over loopback, each running the entry point
REPO = pathlib.Path(__file__).resolve().parents[1]
METHODS = ("fedavg", "sparse_kd", "fedmitr")
DISTILLED = ("distill_sparse_kd", "distill_fedmitr")
OVERRIDES = (f"--config.methods={METHODS!r}", *SMALL_INVERSION)
TIMEOUT_S = 240  # a hung collective fails the test instead of blocking CI


def _command(workdir) -> list:
  return [sys.executable, "-m", "fedmitr_jax.main", "--config", str(REPO / "configs/smoke.py"),
          "--workdir", str(workdir), *OVERRIDES]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  one, two = root / "one_process", root / "two_processes"
  run_one_process(_command(one), REPO, 2, TIMEOUT_S)
  shutil.copytree(one, two)
  for stage in DISTILLED:
    shutil.rmtree(two / "stages" / stage)
  for name in ("results.json", "results.md"):
    (two / name).unlink()
  procs = run_two_processes(_command(two), REPO, root / "spy", TIMEOUT_S)
  for pid, (code, out, err, _) in enumerate(procs):
    assert code == 0, f"process {pid}:\n{out[-2000:]}\n{err[-3000:]}"
  return one, two, procs


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
    ref, got = (load_numpy(d / "stages" / stage / "result" / "0" / "default") for d in (one, two))
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
