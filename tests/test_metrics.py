"""metrics.jsonl, TensorBoard events and curves.png; progress reports reaching them; rates after compile."""
import json
import struct
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fedmitr_jax import config_base, metrics, progress, validate


def rows(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_writer_appends_rows_and_a_resumed_stage_appends(tmp_path):
  writer = metrics.MetricsWriter(tmp_path)
  writer.write("distill_fedmitr", 2, {"loss": np.float32(2.5), "kd": jnp.asarray(1.25)})
  writer.write("distill_fedmitr", 4, {"loss": 2.0, "kd": 1.0})
  writer.close()
  with (tmp_path / metrics.METRICS_FILE).open("a") as f:
    f.write('{"stage": "distill_fedmitr", "step": 6, "lo')  # killed in the middle of a row
  resumed = metrics.MetricsWriter(tmp_path)  # the rerun resumes from the save at step 2
  resumed.write("distill_fedmitr", 4, {"loss": 1.5, "kd": 0.75})
  resumed.write("distill_fedmitr", 6, {"loss": 1.0, "kd": 0.5})
  lines = (tmp_path / metrics.METRICS_FILE).read_text().splitlines()
  assert len(lines) == 5 and json.loads(lines[0]) == {"stage": "distill_fedmitr", "step": 2, "loss": 2.5,
                                                      "kd": 1.25}
  assert json.loads(lines[3])["step"] == 4  # the fragment kept its own line; the rerun's rows follow
  table = metrics.read_metrics(tmp_path / metrics.METRICS_FILE)
  assert table == {"distill_fedmitr": {2: {"loss": 2.5, "kd": 1.25}, 4: {"loss": 1.5, "kd": 0.75},
                                       6: {"loss": 1.0, "kd": 0.5}}}


def test_only_process_0_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  writer = metrics.MetricsWriter(tmp_path / "w", tensorboard=True)
  writer.write("clients", 5, {"loss": 1.0})
  writer.close()
  assert not (tmp_path / "w").exists()


def _events(directory):
  """Scalars (tag, step, value) of every TensorBoard event file under `directory`, read with
  tensorboardX's own protobuf (TFRecord framing: length, crc, payload, crc)."""
  from tensorboardX.proto import event_pb2
  found = []
  for path in sorted(directory.glob("events.out.tfevents.*")):
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      found += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
  return found


def test_tensorboard_events_hold_the_same_scalars(tmp_path):
  pytest.importorskip("tensorboardX")
  writer = metrics.MetricsWriter(tmp_path, tensorboard=True)
  writer.write("inversion_sparse 1/2", 4, {"loss": 3.0, "tokens": 11})
  writer.write("clients", 5, {"loss": 0.5})
  writer.close()
  assert sorted(_events(tmp_path / metrics.TENSORBOARD_DIR)) == [
      ("clients/loss", 5, 0.5), ("inversion_sparse/loss/1_of_2", 4, 3.0),
      ("inversion_sparse/tokens/1_of_2", 4, 11.0)]
  assert len(rows(tmp_path / metrics.METRICS_FILE)) == 2  # the JSON lines are written as well


def test_tensorboard_off_writes_no_events_and_missing_package_is_one_line(tmp_path, monkeypatch):
  """Off: no event files. On without tensorboardX: the writer and, before any stage, validation
  stop with one line naming the field."""
  writer = metrics.MetricsWriter(tmp_path / "off")
  writer.write("clients", 1, {"loss": 1.0})
  assert not (tmp_path / "off" / metrics.TENSORBOARD_DIR).exists()
  config = config_base.base_config()
  config.log.tensorboard = True
  config.dataset.tarball = str(tmp_path / "cifar10_jpg.tar.gz")  # check_config only needs it to exist
  (tmp_path / "cifar10_jpg.tar.gz").write_bytes(b"")
  validate.check_config(config)  # tensorboardX is installed: accepted
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if it were not installed
  with pytest.raises(ValueError, match="^log.tensorboard: tensorboardX is not installed"):
    metrics.MetricsWriter(tmp_path / "on", tensorboard=True)
  with pytest.raises(validate.InputError, match="^log.tensorboard: .*pip install tensorboardX"):
    validate.check_config(config)


def test_log_section_may_change_on_a_resumed_workdir():
  saved = json.loads(json.dumps(config_base.base_config().to_dict()))
  current = config_base.base_config()
  current.log.tensorboard = True
  assert validate.changed_fields(saved, json.loads(json.dumps(current.to_dict()))) == []


def test_progress_reports_reach_the_file_only_while_recording(tmp_path, capsys):
  progress.Progress("distill_x", 10, 8).report(2, loss=1.0)  # no run recording: printed only
  with metrics.recording(tmp_path, curves=False):
    p = progress.Progress("distill_x", 10, 8, start_step=4)  # a resumed stage
    p.report(6, loss=jnp.float32(0.75), kd=np.float64(0.5))
  assert rows(tmp_path / metrics.METRICS_FILE) == [{"stage": "distill_x", "step": 6, "loss": 0.75, "kd": 0.5}]
  assert "[distill_x] step 6/10" in capsys.readouterr().out
  assert not (tmp_path / metrics.CURVES_FILE).exists()
  assert metrics._active is None


def test_recording_draws_curves_at_a_clean_end_only(tmp_path):
  with pytest.raises(RuntimeError):
    with metrics.recording(tmp_path / "failed"):
      progress.Progress("clients", 4, 8).report(2, loss=1.0)
      raise RuntimeError("stage failed")
  assert (tmp_path / "failed" / metrics.METRICS_FILE).exists()
  assert not (tmp_path / "failed" / metrics.CURVES_FILE).exists()
  with metrics.recording(tmp_path / "ok"):
    progress.Progress("clients", 4, 8).report(2, loss=1.0)
  assert (tmp_path / "ok" / metrics.CURVES_FILE).exists()


def test_rate_and_eta_count_from_the_end_of_the_first_step(monkeypatch, capsys):
  """Step 1 takes 10 s (compiling), steps 2-5 take 1 s each: 8 images a step is 8 img/s, and the
  5 steps left take 5 s; counting from the start would say 2.9 img/s and 10 s left."""
  clock = iter([0.0, 10.0, 14.0])
  monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
  p = progress.Progress("clients", 10, 8)
  p.step_done()  # t = 10: the first step, with its compilation, is over
  for _ in range(3):
    p.step_done()  # later calls do not move the origin (and read no clock)
  p.report(5, loss=1.0)  # t = 14
  assert "[clients] step 5/10 8.0 img/s ETA 0.1 min loss=1" in capsys.readouterr().out


def test_report_right_after_the_first_step_has_no_rate_yet(capsys):
  p = progress.Progress("distill_x", 3, 8, start_step=2)
  p.step_done()
  p.report(3, loss=2.0)
  assert "[distill_x] step 3/3 - img/s ETA - loss=2" in capsys.readouterr().out


def test_curves_from_a_handmade_file(tmp_path):
  lines = [
      {"stage": "clients", "step": 5, "loss": 2.2, "train_acc": 0.1},
      {"stage": "clients", "step": 10, "loss": 2.0, "train_acc": 0.2},
      {"stage": "inversion_sparse 1/2", "step": 4, "loss": 5.0, "ce": 2.0, "tokens": 11},
      {"stage": "inversion_sparse 1/2", "step": 8, "loss": 4.0, "ce": 1.5, "tokens": 4},
      {"stage": "inversion_sparse 2/2", "step": 4, "loss": 5.5, "ce": 2.1, "tokens": 11},
      {"stage": "clients", "step": 10, "loss": 1.9, "train_acc": 0.25},  # resumed: replaces step 10
  ]
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in lines) + "not json\n")
  table = metrics.read_metrics(path)
  assert table["clients"][10] == {"loss": 1.9, "train_acc": 0.25}
  assert metrics.stage_groups(table) == {"clients": ["clients"],
                                         "inversion_sparse": ["inversion_sparse 1/2", "inversion_sparse 2/2"]}
  assert metrics.save_curves(path, tmp_path / "curves.png")
  with Image.open(tmp_path / "curves.png") as image:
    assert image.size == (840, 300)  # two panels side by side (4.2 x 3.0 in each, 100 dpi)
    pixels = np.asarray(image.convert("RGB")).astype(int)
  # Each panel holds drawn lines: coloured pixels (axes, text and grid are grey) in both halves.
  saturated = (pixels.max(-1) - pixels.min(-1)) > 60
  assert saturated[:, :420].sum() > 200 and saturated[:, 420:].sum() > 200


def test_curves_need_a_loss(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text(json.dumps({"stage": "clients", "step": 5, "train_acc": 0.5}) + "\n")
  assert not metrics.save_curves(path, tmp_path / "curves.png")
  assert not (tmp_path / "curves.png").exists()
  assert not metrics.save_curves(tmp_path / "missing.jsonl", tmp_path / "curves.png")
