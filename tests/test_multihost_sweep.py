"""A sweep as two loopback processes, and each stage's work split over both rather than repeated.

Sweep A: `python -m fedmitr_jax.sweep` over 2 alphas x 1 seed as one process with 2 CPU devices.
Sweep B: the same sweep as 2 processes with 1 CPU device each, joined by
`jax.distributed.initialize()` (coordinator on 127.0.0.1, gloo CPU collectives), every stage of
both runs computed from scratch; then B again, which must reuse both finished runs. The stages
that run on the data mesh (inversion, distillation) split each batch over the same 2 devices in
both sweeps, and an all-reduce of two halves sums them in the same order wherever they live, so
their results are bit-identical. The stages that still run on each process's own device (client
training, the generator baselines, evaluation) compute the same thing on one CPU device in both
sweeps, so they are bit-identical too: every saved stage result and every accuracy is compared
exactly, no tolerance.
"""
import json
import os
import pathlib
import sys

import jax
import numpy as np
import pytest
from loopback import SMALL_INVERSION, load_numpy, run_one_process, run_two_processes

pytestmark = pytest.mark.slow  # two sweeps of the entry point, one of them as two joined processes
REPO = pathlib.Path(__file__).resolve().parents[1]
# One method per kind of compute: client training (fedavg, ensemble), sparse inversion and
# token-relabel distillation (fedmitr), and a generator baseline (dense; coboosting is the same
# code, generator_kd.train, and would double the test's longest stage).
METHODS = ("fedavg", "ensemble", "fedmitr", "dense")
ALPHAS, SEEDS = (0.5,), (0,)  # one run per sweep: each costs minutes as two processes
RUNS = [f"alpha{a:g}_seed{s}" for a in ALPHAS for s in SEEDS]
OVERRIDES = (f"--config.methods={METHODS!r}", *SMALL_INVERSION)
REPORT = ("sweep.md", "sweep_diagnostics.md", "sweep.csv", "sweep.json", "sweep.png")
TIMEOUT_S = 1200  # per sweep: a hung collective fails the test instead of blocking CI

# Every stage that computes (partition only shuffles indices), and evaluation, which has no stage
# folder: its facts are results.json's "evaluation".
COMPUTE_STAGES = ("clients", "inversion_sparse", "distill_fedmitr", "distill_dense")


def _command(workdir) -> list:
  return [sys.executable, "-m", "fedmitr_jax.sweep", "--config", str(REPO / "configs/smoke.py"),
          "--workdir", str(workdir), "--alphas", ",".join(f"{a:g}" for a in ALPHAS),
          "--seeds", ",".join(map(str, SEEDS)), *OVERRIDES]


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost_sweep")
  one, two = root / "one_process", root / "two_processes"
  run_one_process(_command(one), REPO, 2, TIMEOUT_S)
  procs = run_two_processes(_command(two), REPO, root / "spy", TIMEOUT_S)
  again = run_two_processes(_command(two), REPO, root / "spy_again", TIMEOUT_S)
  for pid, (code, out, err, _) in enumerate(procs + again):
    assert code == 0, f"process {pid % 2}:\n{out[-2000:]}\n{err[-3000:]}"
  return one, two, procs, again


def _results(workdir: pathlib.Path, run: str) -> dict:
  return json.loads((workdir / run / "results.json").read_text())


def test_two_processes_sweep_to_the_same_results_as_one(sweeps):
  one, two, _, _ = sweeps
  for run in RUNS:
    a, b = _results(one, run), _results(two, run)
    assert set(b["methods"]) == set(METHODS), run
    for name in METHODS:
      for key in ("test_acc", "test_acc_cls_token"):
        assert b["methods"][name].get(key) == a["methods"][name].get(key), (run, name, key)
    assert [c["test_acc"] for c in b["clients"]] == [c["test_acc"] for c in a["clients"]], run
    assert b["diagnostics"] == a["diagnostics"], run
    stages = sorted(p.name for p in (one / run / "stages").iterdir())
    assert sorted(p.name for p in (two / run / "stages").iterdir()) == stages
    for stage in stages:
      ref, got = (load_numpy(d / run / "stages" / stage / "result" / "0" / "default") for d in (one, two))
      assert jax.tree.structure(ref) == jax.tree.structure(got), (run, stage)
      for x, y in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_array_equal(x, y, err_msg=f"{run} {stage}")
  for name in ("sweep.md", "sweep.csv", "sweep.json"):
    assert (two / name).read_text() == (one / name).read_text(), name


def test_only_process_0_prints_and_writes_the_report(sweeps):
  _, two, procs, _ = sweeps
  (_, out_0, _, written_0), (_, out_1, _, written_1) = procs
  assert "over 2 process(es)" in out_0
  assert f"[sweep] {len(RUNS)}/{len(RUNS)} runs in the table" in out_0
  assert "| **fedmitr** |" in out_0  # the table, printed at the end
  assert [line for line in out_1.splitlines() if line.strip() and not line.startswith("[Gloo]")] == []
  # The report is rewritten after each finished run, by process 0 alone.
  for name in REPORT:
    assert written_0.count(str(two / name)) == len(RUNS), name
    assert str(two / name) not in written_1, name
  # In the workdir, process 1 writes nothing but its part of the Orbax checkpoints.
  outside = [p for p in written_1 if p.startswith(str(two) + os.sep) and not (
      "/stages/" in p and ("/result/" in p or "/progress/" in p))]
  assert outside == [], outside
  for run in RUNS:
    for name in ("config.json", "results.json", "results.md", "metrics.jsonl"):
      assert str(two / run / name) in written_0, (run, name)


def _devices_reported(workdir: pathlib.Path, run: str) -> dict:
  """{stage: the "devices" its facts record (None if they record none)}, evaluation included."""
  stages = {p.name for p in (workdir / run / "stages").iterdir()} - {"partition"}
  assert stages == set(COMPUTE_STAGES), f"{run}: update COMPUTE_STAGES to the stages run: {sorted(stages)}"
  facts = {stage: json.loads((workdir / run / "stages" / stage / "result.json").read_text())
           for stage in stages}
  results = _results(workdir, run)
  # results.json repeats the clients' and the inversion's facts: both places must say the same.
  assert results["client_training"] == facts["clients"], run
  assert results["inversion"]["sparse"] == facts["inversion_sparse"], run
  facts["evaluation"] = results.get("evaluation", {})
  return {stage: f.get("devices") for stage, f in facts.items()}


def test_no_process_repeats_a_stages_compute(sweeps):
  """Every compute stage of the two-process sweep ran on the global mesh of both processes'
  devices ("devices": 2 in its facts), i.e. each process computed its half of the stage's work
  instead of all of it."""
  _, two, _, _ = sweeps
  reported = {run: _devices_reported(two, run) for run in RUNS}
  stages = (*COMPUTE_STAGES, "evaluation")
  not_split = {stage: [reported[run][stage] for run in RUNS] for stage in stages
               if any(reported[run][stage] != 2 for run in RUNS)}
  assert not not_split, f"stages whose facts do not say they ran on both processes' 2 devices: {not_split}"


def test_a_rerun_on_two_processes_reuses_every_finished_run(sweeps):
  """Both processes decide alike to reuse each run (one that ran it alone would wait for the
  other in its first collective until the timeout); only the report is written again."""
  _, two, _, again = sweeps
  (_, out_0, _, written_0), (_, out_1, _, written_1) = again
  for run in RUNS:
    assert f"reused from {two / run}" in out_0, run
  assert "[partition]" not in out_0 and "[clients]" not in out_0
  assert sorted(p for p in written_0 if p.startswith(str(two) + os.sep)) == sorted(
      str(two / name) for name in REPORT for _ in RUNS)  # after each (reused) run, as in a first sweep
  assert [p for p in written_1 if p.startswith(str(two) + os.sep)] == []
