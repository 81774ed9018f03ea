"""The real entry point, end to end on the smoke config, then again to check it resumes."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
ALL_METHODS = {"fedavg", "ensemble", "dense_kd", "sparse_kd", "dense_relabel", "fedmitr", "dense",
               "coboosting"}


def run_main(workdir, *overrides, devices=1):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, "-m", "fedmitr_jax.main", "--config", str(REPO / "configs/smoke.py"),
         "--workdir", str(workdir), *overrides]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("smoke")
  first = run_main(workdir)
  assert first.returncode == 0, first.stderr[-3000:]
  return workdir, first


def test_smoke_run_writes_all_results_and_pictures(smoke_run):
  workdir, first = smoke_run
  results = json.loads((workdir / "results.json").read_text())
  assert set(results["methods"]) == ALL_METHODS
  for name, entry in results["methods"].items():
    assert 0.0 <= entry["test_acc"] <= 1.0, name
  assert len(results["clients"]) == 3
  assert sum(c["num_examples"] for c in results["clients"]) == 600
  assert results["config"]["model"]["variant"] == "test/8"
  assert results["inversion"]["sparse"]["tokens_per_stage"] == [16, 11, 7, 4]
  diag = results["diagnostics"]  # docs/diagnostics.md
  assert set(diag["per_class"]) == ALL_METHODS and len(diag["clients"]) == 3
  for row in diag["clients"] + [diag["ensemble"]]:
    assert 0.0 <= row["token_entropy"] <= diag["uniform_entropy"] + 1e-6 and 0.0 <= row["token_acc"] <= 1.0
  for per_class in list(diag["per_class"].values()) + [c["per_class"] for c in diag["clients"]]:
    assert len(per_class) == 10 and all(0.0 <= a <= 1.0 for a in per_class)
  assert "| teacher | token entropy" in (workdir / "results.md").read_text()
  for name in ("results.md", "partition.png", "partition.json", "synthetic_sparse.png",
               "synthetic_dense.png", "per_class.png", "config.json", "metadata.json"):
    assert (workdir / name).stat().st_size > 0, name
  metadata = json.loads((workdir / "metadata.json").read_text())
  assert metadata["packages"]["jax"] and metadata["device_count"] == 1
  for stage in ("partition", "clients", "inversion_dense", "inversion_sparse", "distill_fedmitr"):
    assert (workdir / "stages" / stage / "DONE").exists()


def test_rerun_reuses_every_finished_stage(smoke_run):
  workdir, first = smoke_run
  before = json.loads((workdir / "results.json").read_text())
  second = run_main(workdir)
  assert second.returncode == 0, second.stderr[-3000:]
  for stage in ("partition", "clients", "inversion_dense", "inversion_sparse", "distill_fedmitr",
                "distill_dense", "distill_coboosting"):
    assert f"[{stage}] loaded from checkpoint" in second.stdout
  assert "[clients] step" not in second.stdout and "[inversion_sparse 1/2] step" not in second.stdout
  after = json.loads((workdir / "results.json").read_text())
  assert {k: v["test_acc"] for k, v in after["methods"].items()} == \
         {k: v["test_acc"] for k, v in before["methods"].items()}


def test_unfinished_client_stage_resumes_from_its_last_save(smoke_run, tmp_path):
  """Remove the clients' DONE and result: the rerun restores the last progress save (step 4 of
  7) instead of starting over, and ends with the same client accuracies."""
  workdir, _ = smoke_run
  copy = tmp_path / "copy"
  subprocess.run(["cp", "-r", str(workdir), str(copy)], check=True)
  for stage in ("clients", "inversion_dense", "inversion_sparse", "distill_dense_kd", "distill_sparse_kd",
                "distill_dense_relabel", "distill_fedmitr", "distill_dense", "distill_coboosting"):
    (copy / "stages" / stage / "DONE").unlink()
  subprocess.run(["rm", "-rf", str(copy / "stages" / "clients" / "result")], check=True)
  third = run_main(copy)
  assert third.returncode == 0, third.stderr[-3000:]
  assert "[clients] resuming at step 4" in third.stdout
  ref = json.loads((workdir / "results.json").read_text())
  new = json.loads((copy / "results.json").read_text())
  assert [c["test_acc"] for c in new["clients"]] == [c["test_acc"] for c in ref["clients"]]
  assert new["methods"]["fedavg"]["test_acc"] == ref["methods"]["fedavg"]["test_acc"]


def test_changed_config_on_same_workdir_is_refused(smoke_run):
  workdir, _ = smoke_run
  result = run_main(workdir, "--config.partition.alpha=0.3")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("error: workdir:")
  assert "partition.alpha" in result.stderr
