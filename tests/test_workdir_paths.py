"""Workdirs go through etils.epath, so a bucket path (gs://...) works where pathlib would make a
local folder named 'gs:'. No network: epath's own test helper (`epath.testing.mock_epath`) routes
every gs:// file operation into a local folder that stands in for the bucket."""
import json
import os

import numpy as np
import pytest
from etils import epath
from PIL import Image

from fedmitr_jax import checkpoints, config_base, evaluate, plots, sweep_report, validate
from fedmitr_jax.data import partition

BUCKET_OPS_ONE_PATH = ("exists", "glob", "isdir", "listdir", "makedirs", "mkdir", "open", "remove", "rmtree",
                       "stat", "walk")
BUCKET_OPS_TWO_PATHS = ("copy", "rename", "replace")


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """gs://bucket/... lands in <tmp>/bucket/...; the current folder is watched for a stray 'gs:'."""
  root = tmp_path / "fake_gcs"
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  seen = []

  def local(path):
    path = os.fspath(path)
    if path.startswith("gs://"):
      seen.append(path)
      return str(root / path[len("gs://"):])
    return path

  def open_object(original, path, mode):  # a bucket has no folders: writing an object needs none
    if any(c in mode for c in "wax") and os.fspath(path).startswith("gs://"):
      os.makedirs(os.path.dirname(local(path)), exist_ok=True)
    return original(local(path), mode)

  one = lambda original, path, *args, **kwargs: original(local(path), *args, **kwargs)
  two = lambda original, path, dst, *args, **kwargs: original(local(path), local(dst), *args, **kwargs)
  fakes = {**{n: one for n in BUCKET_OPS_ONE_PATH}, **{n: two for n in BUCKET_OPS_TWO_PATHS}, "open": open_object}
  with epath.testing.mock_epath(**fakes):
    yield root, seen
  assert list(cwd.iterdir()) == [], "a gs:// path was written as a local folder"


def _folder_dataset(root):
  for split in ("train", "test"):
    for c in ("a", "b"):
      (root / split / c).mkdir(parents=True)
      for i in range(6):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / split / c / f"{i}.png")
  return root


def test_bucket_paths_keep_their_scheme():
  """Why epath: pathlib collapses 'gs://b/run' to 'gs:/b/run' (a local folder); epath keeps it,
  and our absolute() keeps it too where epath's own would prefix the current folder."""
  assert str(epath.Path("gs://b/run") / "stages") == "gs://b/run/stages"
  assert str(checkpoints.absolute("gs://b/run")) == "gs://b/run"
  assert checkpoints.absolute("rel").is_absolute()


def test_run_records_and_stage_files_on_a_bucket(bucket, tmp_path):
  root, seen = bucket
  config = config_base.base_config()
  config.dataset.kind, config.dataset.image_size = "folder", 8
  config.dataset.root, config.dataset.cache_dir = str(_folder_dataset(tmp_path / "data")), str(tmp_path / "cache")
  config.model.variant = "test/4"
  config.partition.num_clients, config.partition.min_client_examples = 2, 1
  validate.prepare(config, "gs://bucket/run")
  saved = json.loads((root / "bucket/run/config.json").read_text())
  assert saved["model"]["variant"] == "test/4" and (root / "bucket/run/metadata.json").exists()
  config.seed = 7  # the bucket's saved config is read back and compared
  with pytest.raises(validate.InputError, match="holds a run with a different config"):
    validate.prepare(config, "gs://bucket/run")

  store = checkpoints.StageStore("gs://bucket/run")
  assert not store.is_done("partition")
  checkpoints.write_json_atomic(store.root / "partition" / "result.json", {"client_sizes": [3, 9]})
  checkpoints.write_json_atomic(store.root / "partition" / "DONE", {"stage": "partition"})
  assert store.is_done("partition") and store.load_facts("partition") == {"client_sizes": [3, 9]}
  assert not (root / "bucket/run/stages/partition/result.json.tmp").exists()
  assert "gs://bucket/run/stages/partition/DONE" in seen


def test_results_pictures_and_sweep_tables_on_a_bucket(bucket):
  root, _ = bucket
  results = {"methods": {"fedavg": {"test_acc": 0.5}, "fedmitr": {"test_acc": 0.625}},
             "clients": [{"test_acc": 0.4, "num_examples": 10}]}
  evaluate.write_results_markdown(results, epath.Path("gs://bucket/run") / "results.md")
  assert "| fedmitr | 62.50 |" in (root / "bucket/run/results.md").read_text()
  partition.save_partition_report(np.array([[3, 0], [1, 4]]), ["a", "b"], "gs://bucket/run")
  assert json.loads((root / "bucket/run/partition.json").read_text())["client_sizes"] == [3, 5]
  bank = {"labels": np.array([0, 1]), "images": np.zeros((2, 8, 8, 3), np.float32),
          "masks": np.ones((2, 4), bool)}
  plots.save_bank_grid(bank, ["a", "b"], "test/4", epath.Path("gs://bucket/run/synthetic_sparse.png"))
  runs = {(0.1, 0): {"methods": results["methods"], "clients": results["clients"]}}
  table = sweep_report.aggregate(runs, ["fedavg", "fedmitr"])
  sweep = epath.Path("gs://bucket/sweep")
  sweep_report.write_markdown(table, sweep / "sweep.md", "seeds 0; 1 runs")
  sweep_report.write_csv(table, sweep / "sweep.csv")
  sweep_report.write_json(table, sweep / "sweep.json")
  sweep_report.save_plot(table, sweep / "sweep.png", "title")
  assert json.loads((root / "bucket/sweep/sweep.json").read_text())["0.1"]["fedmitr"]["mean"] == 62.5
  assert (root / "bucket/sweep/sweep.csv").read_text().startswith("row,alpha,mean,std,num_seeds")
  for png in ("bucket/run/partition.png", "bucket/run/synthetic_sparse.png", "bucket/sweep/sweep.png"):
    assert (root / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
