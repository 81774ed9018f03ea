"""The real entry point, end to end on the smoke config, then again to check it resumes.

`smoke_run` (conftest.py) is one run shared by the session; tests that rerun on a workdir rerun
on a copy of it.
"""
import json
import shutil

import pytest

from conftest import run_main
from fedmitr_jax import metrics

pytestmark = pytest.mark.slow  # every test here runs the entry point
ALL_METHODS = {"fedavg", "ensemble", "dense_kd", "sparse_kd", "dense_relabel", "fedmitr", "dense",
               "coboosting"}


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
  assert set(diag["banks"]) == {"dense", "sparse"}
  for kind, row in diag["banks"].items():
    assert row["images"] == results["inversion"][kind]["images"], kind
    assert 0.0 <= row["image_acc"] <= 1.0 and 0.0 <= row["token_entropy_kept"] <= diag["uniform_entropy"] + 1e-6
  assert diag["banks"]["sparse"]["kept_share"] == pytest.approx(results["inversion"]["sparse"]["mean_kept_fraction"])
  assert 0.0 <= diag["banks"]["sparse"]["token_acc_dropped"] <= 1.0
  assert "| sparse | " in (workdir / "results.md").read_text()
  assert "| teacher | token entropy" in (workdir / "results.md").read_text()
  for name in ("results.md", "partition.png", "partition.json", "synthetic_sparse.png",
               "synthetic_dense.png", "per_class.png", "config.json", "metadata.json"):
    assert (workdir / name).stat().st_size > 0, name
  metadata = json.loads((workdir / "metadata.json").read_text())
  assert metadata["packages"]["jax"] and metadata["device_count"] == 1
  for stage in ("partition", "clients", "inversion_dense", "inversion_sparse", "distill_fedmitr"):
    assert (workdir / "stages" / stage / "DONE").exists()


def test_smoke_run_leaves_metrics_of_every_stage_and_curves(smoke_run):
  workdir, first = smoke_run
  table = metrics.read_metrics(workdir / "metrics.jsonl")
  groups = metrics.stage_groups(table)
  assert set(groups) == {"clients", "inversion_dense", "inversion_sparse"} | {f"distill_{m}" for m in (
      "dense_kd", "sparse_kd", "dense_relabel", "fedmitr", "dense", "coboosting")}
  assert groups["inversion_sparse"] == ["inversion_sparse 1/2", "inversion_sparse 2/2"]
  # The rows are the progress lines: clients log every 5 of 7 steps (and the last), inversion every 4 of 8.
  assert sorted(table["clients"]) == [5, 7] and set(table["clients"][7]) == {"loss", "train_acc"}
  assert sorted(table["inversion_sparse 2/2"]) == [4, 8] and table["inversion_sparse 2/2"][8]["tokens"] == 4
  last_distill = table["distill_fedmitr"][max(table["distill_fedmitr"])]
  assert {"loss", "kd", "token", "token_fg", "token_bg"} <= set(last_distill)
  assert {"g_loss", "kd", "w_min", "w_max"} <= set(table["distill_coboosting"][1])
  printed = first.stdout.count("] step ")
  assert sum(len(steps) for steps in table.values()) == printed  # one row per progress line
  assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert not (workdir / "tensorboard").exists()  # log.tensorboard is off by default


def test_rerun_reuses_every_finished_stage(smoke_run, tmp_path):
  workdir = shutil.copytree(smoke_run[0], tmp_path / "copy")
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
  copy = shutil.copytree(workdir, tmp_path / "copy")
  for stage in ("clients", "inversion_dense", "inversion_sparse", "distill_dense_kd", "distill_sparse_kd",
                "distill_dense_relabel", "distill_fedmitr", "distill_dense", "distill_coboosting"):
    (copy / "stages" / stage / "DONE").unlink()
  shutil.rmtree(copy / "stages" / "clients" / "result")
  third = run_main(copy)
  assert third.returncode == 0, third.stderr[-3000:]
  assert "[clients] resuming at step 4" in third.stdout
  ref = json.loads((workdir / "results.json").read_text())
  new = json.loads((copy / "results.json").read_text())
  assert [c["test_acc"] for c in new["clients"]] == [c["test_acc"] for c in ref["clients"]]
  assert new["methods"]["fedavg"]["test_acc"] == ref["methods"]["fedavg"]["test_acc"]


def test_changed_config_on_same_workdir_is_refused(smoke_run, tmp_path):
  workdir = shutil.copytree(smoke_run[0], tmp_path / "copy")
  result = run_main(workdir, "--config.partition.alpha=0.3")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("error: workdir:")
  assert "partition.alpha" in result.stderr
