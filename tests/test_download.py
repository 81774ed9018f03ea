"""CIFAR-10 on a fresh machine: the checksummed download from a loopback server, local copies, the
decoded cache, the offline message, and images resized on the device. No test touches the network:
a tiny tarball in the official binary format is made here and served on 127.0.0.1."""
import hashlib
import http.server
import io
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tarfile
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fedmitr_jax import config_base, diagnostics, download as download_cli, evaluate, validate
from fedmitr_jax.client import training
from fedmitr_jax.data import augment, datasets, download
from fedmitr_jax.models import vit

REPO = pathlib.Path(__file__).resolve().parents[1]
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def make_binary_tarball(path, per_batch=3, test=4, seed=0):
  """A tarball laid out like cifar-10-binary.tar.gz: 5 train batches of `per_batch` records and a test
  batch, each record 1 label byte + 3072 bytes of R, G, B planes. Returns the HWC images and labels."""
  rng = np.random.default_rng(seed)
  written, members = {}, {}
  for split, files, n in (("train", [f"data_batch_{i}.bin" for i in range(1, 6)], per_batch),
                          ("test", ["test_batch.bin"], test)):
    chw = rng.integers(0, 256, (len(files) * n, 3, 32, 32), dtype=np.uint8)
    labels = (np.arange(len(files) * n) % len(CLASSES)).astype(np.uint8)
    records = np.concatenate([labels[:, None], chw.reshape(len(chw), -1)], axis=1)
    for i, name in enumerate(files):
      members[name] = records[i * n:(i + 1) * n].tobytes()
    written[split] = (chw.transpose(0, 2, 3, 1), labels.astype(np.int32))
  members["batches.meta.txt"] = ("\n".join(CLASSES) + "\n\n").encode()
  with tarfile.open(path, "w:gz") as tar:
    for name, blob in members.items():
      info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))
  return written


def pin(path, name="cifar-10-binary.tar.gz"):
  blob = pathlib.Path(path).read_bytes()
  return download.PinnedFile(name=name, url="http://unused.invalid/", size=len(blob),
                             sha256=hashlib.sha256(blob).hexdigest())


class LoopbackServer:
  """Serves {url path: bytes} on 127.0.0.1; truncate=True sends the full Content-Length but only
  half of the body, then closes the connection."""

  def __init__(self, files, truncate=False):
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):
        body = files.get(self.path)
        server.requests += 1
        if body is None:
          self.send_error(404)
          return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:len(body) // 2] if truncate else body)

      def log_message(self, *args):
        pass

    self.requests = 0
    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def serve():
  servers = []

  def start(files, truncate=False):
    servers.append(LoopbackServer(files, truncate))
    return servers[-1]
  yield start
  for s in servers:
    s.close()


def closed_port_url():
  with socket.socket() as s:  # a port that was just free: nothing listens there
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return f"http://127.0.0.1:{port}/cifar-10-binary.tar.gz"


@pytest.fixture
def fresh_machine(tmp_path, monkeypatch):
  """No copy anywhere: dataset.tarball missing, an empty repo data/ folder, an empty cache, no proxies."""
  for var in PROXY_VARS:
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(datasets, "REPO_DATA", str(tmp_path / "repo_data"))
  tarball = tmp_path / "served" / "cifar-10-binary.tar.gz"
  tarball.parent.mkdir()
  written = make_binary_tarball(tarball)
  monkeypatch.setattr(download, "CIFAR10_BINARY", pin(tarball))
  cfg = config_base.base_config().dataset
  cfg.tarball, cfg.cache_dir = str(tmp_path / "missing.tar.gz"), str(tmp_path / "cache")
  return cfg, tarball, written


def one_line_error(cfg):
  with pytest.raises(datasets.DataError) as e:
    datasets.load_dataset(cfg)
  message = str(e.value)
  assert "\n" not in message, message
  return message


def test_download_with_the_right_checksum_loads_the_records_as_written(fresh_machine, serve, capsys):
  cfg, tarball, written = fresh_machine
  server = serve({"/c10.tar.gz": tarball.read_bytes()})
  cfg.download_url = server.url + "/c10.tar.gz"
  ds = datasets.load_dataset(cfg)
  assert ds.name == "cifar10" and ds.class_names == CLASSES
  for images, labels, split in ((ds.train_images, ds.train_labels, "train"), (ds.test_images, ds.test_labels, "test")):
    np.testing.assert_array_equal(images, written[split][0])  # CHW records -> HWC arrays
    np.testing.assert_array_equal(labels, written[split][1])
    assert images.shape[1:] == (32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int32
  # A pixel read by hand from the raw record: record 4 of the train set, green plane, row 5, column 7.
  raw = tarfile.open(tarball).extractfile("cifar-10-batches-bin/data_batch_2.bin").read()
  record = np.frombuffer(raw, np.uint8)[1 * 3073:2 * 3073]  # batch 2 holds train records 3..5
  assert ds.train_images[4, 5, 7, 1] == record[1 + 1024 + 5 * 32 + 7]
  assert isinstance(ds.train_images, np.memmap) and not ds.train_images.flags.writeable
  assert "MB/s" in capsys.readouterr().out
  cache = sorted(os.listdir(cfg.cache_dir))
  assert "cifar-10-binary.tar.gz" in cache and not [f for f in cache if f.endswith(".part")]
  assert len([f for f in cache if f.startswith("cifar10-binary_")]) == 2

  # (a) the decoded cache comes first: no copy and no server needed any more.
  os.remove(os.path.join(cfg.cache_dir, "cifar-10-binary.tar.gz"))
  cfg.download_url = closed_port_url()
  again = datasets.load_dataset(cfg)
  np.testing.assert_array_equal(again.test_images, written["test"][0])
  assert server.requests == 1


def test_wrong_checksum_is_one_line_and_leaves_no_file(fresh_machine, serve, monkeypatch):
  cfg, tarball, _ = fresh_machine
  good = download.CIFAR10_BINARY
  monkeypatch.setattr(download, "CIFAR10_BINARY", download.PinnedFile(good.name, good.url, good.size, "0" * 64))
  cfg.download_url = serve({"/c.tgz": tarball.read_bytes()}).url + "/c.tgz"
  message = one_line_error(cfg)
  assert message.startswith("dataset.download_url: ") and "sha256" in message and "deleted" in message
  assert os.listdir(cfg.cache_dir) == []


@pytest.mark.parametrize("how", ["short_body", "longer_pin"])
def test_truncated_download_is_one_line_and_leaves_no_file(fresh_machine, serve, monkeypatch, how):
  cfg, tarball, _ = fresh_machine
  blob = tarball.read_bytes()
  if how == "short_body":  # the server promises len(blob) bytes and closes after half of them
    server = serve({"/c.tgz": blob}, truncate=True)
  else:  # the server closes cleanly, but before the pinned size is reached
    server = serve({"/c.tgz": blob[:-100]})
  cfg.download_url = server.url + "/c.tgz"
  message = one_line_error(cfg)
  assert message.startswith("dataset.download_url: download of ") and f"of {len(blob)} bytes" in message
  assert os.listdir(cfg.cache_dir) == []


def test_http_error_is_not_mistaken_for_offline(fresh_machine, serve):
  cfg, _, _ = fresh_machine
  cfg.download_url = serve({}).url + "/nothing-here.tar.gz"
  message = one_line_error(cfg)
  assert message.startswith("dataset.download_url: ") and "HTTP 404" in message


@pytest.mark.parametrize("url", ["closed_port", ""])
def test_offline_without_a_copy_names_both_ways_to_get_the_data(fresh_machine, url):
  cfg, _, _ = fresh_machine
  cfg.download_url = closed_port_url() if url == "closed_port" else ""
  message = one_line_error(cfg)
  assert message.startswith("dataset: no CIFAR-10 copy here")
  assert f"dataset.tarball ('{cfg.tarball}')" in message and datasets.REPO_DATA in message
  assert "python -m fedmitr_jax.download cifar10 --dir D" in message
  assert os.listdir(cfg.cache_dir) == []


def test_offline_stops_in_validation_before_the_workdir_is_written(fresh_machine, tmp_path):
  cfg, _, _ = fresh_machine
  config = config_base.base_config()
  config.dataset = cfg
  config.dataset.download_url = closed_port_url()
  with pytest.raises(validate.InputError, match=r"^dataset: no CIFAR-10 copy here"):
    validate.prepare(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_local_copies_are_found_in_order_without_network(fresh_machine, tmp_path):
  cfg, tarball, written = fresh_machine
  cfg.download_url = closed_port_url()
  os.makedirs(datasets.REPO_DATA)
  os.rename(tarball, os.path.join(datasets.REPO_DATA, "cifar-10-binary.tar.gz"))  # data/<binary>
  ds = datasets.load_dataset(cfg)
  np.testing.assert_array_equal(ds.train_labels, written["train"][1])
  assert "cifar-10-binary.tar.gz" not in os.listdir(cfg.cache_dir)  # read in place, not copied

  # dataset.tarball pointing at a JPEG copy comes before data/ (and its own cache is keyed by it).
  jpeg = tmp_path / "jpg" / "cifar10_jpg.tar.gz"
  src = tmp_path / "jpg_src"
  for split in ("train", "test"):
    for c in CLASSES[:2]:
      os.makedirs(src / "cifar10" / split / c)
      Image.new("RGB", (32, 32), (9, 9, 9)).save(src / "cifar10" / split / c / "0.jpg")
  jpeg.parent.mkdir()
  with tarfile.open(jpeg, "w:gz") as tar:
    tar.add(src / "cifar10", arcname="cifar10")
  cfg.tarball, cfg.cache_dir = str(jpeg), str(tmp_path / "cache2")
  ds = datasets.load_dataset(cfg)
  assert ds.class_names == CLASSES[:2] and ds.train_images.shape == (2, 32, 32, 3)


def test_an_earlier_download_is_used_offline_and_a_corrupt_one_fetched_again(fresh_machine, serve):
  cfg, tarball, written = fresh_machine
  earlier = os.path.join(cfg.cache_dir, "cifar-10-binary.tar.gz")
  os.makedirs(cfg.cache_dir)
  shutil.copy(tarball, earlier)
  cfg.download_url = ""  # never download: the intact file in the cache is enough
  np.testing.assert_array_equal(datasets.load_dataset(cfg).train_labels, written["train"][1])
  for folder in os.listdir(cfg.cache_dir):  # drop the decoded cache, then damage the download
    if folder.startswith("cifar10-binary_"):
      shutil.rmtree(os.path.join(cfg.cache_dir, folder))
  with open(earlier, "r+b") as f:
    f.write(b"\0" * 64)
  server = serve({"/c.tgz": tarball.read_bytes()})
  cfg.download_url = server.url + "/c.tgz"
  np.testing.assert_array_equal(datasets.load_dataset(cfg).test_images, written["test"][0])
  assert server.requests == 1 and pathlib.Path(earlier).read_bytes() == tarball.read_bytes()


def test_a_local_binary_copy_that_is_not_the_official_file_is_refused(fresh_machine, monkeypatch):
  cfg, tarball, _ = fresh_machine
  cfg.tarball, cfg.download_url = str(tarball), ""
  good = download.CIFAR10_BINARY
  monkeypatch.setattr(download, "CIFAR10_BINARY", download.PinnedFile(good.name, good.url, good.size, "1" * 64))
  message = one_line_error(cfg)
  assert message.startswith("dataset.tarball: ") and "differs from the official" in message


def test_download_cli_writes_the_verified_file_and_reports_progress(fresh_machine, serve, tmp_path, capsys):
  _, tarball, _ = fresh_machine
  server = serve({"/c.tgz": tarball.read_bytes()})
  target = tmp_path / "out"
  assert download_cli.main(["cifar10", "--dir", str(target), "--url", server.url + "/c.tgz"]) == 0
  assert (target / "cifar-10-binary.tar.gz").read_bytes() == tarball.read_bytes()
  out = capsys.readouterr().out
  assert "MB/s" in out and "(verified)" in out
  assert download_cli.main(["cifar10", "--dir", str(target), "--url", server.url + "/c.tgz"]) == 0
  assert server.requests == 1  # already there and intact: not fetched again
  assert download_cli.main(["cifar10", "--dir", str(tmp_path / "x"), "--url", closed_port_url()]) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: cannot reach") and "\n" not in err


def test_resize_to_is_identity_at_the_model_size_and_bilinear_otherwise():
  x = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  assert augment.resize_to(x, 8) is x and augment.resize_to(x, None) is x  # 32-px runs: untouched
  y = augment.resize_to(jnp.asarray(x), 16)
  assert y.shape == (2, 16, 16, 3) and y.dtype == jnp.float32
  flat = np.full((1, 4, 4, 3), 77, np.uint8)  # a flat image stays flat, in the 0-255 range
  np.testing.assert_allclose(augment.resize_to(flat, 12), 77.0, rtol=1e-6)


def _small_and_resized_images_and_model():
  rng = np.random.default_rng(1)
  small = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
  big = np.asarray(jax.image.resize(small.astype(np.float32), (6, 16, 16, 3), "bilinear"))
  model = vit.build_vit("test/8", 4, image_size=16)
  params = jax.jit(lambda key: vit.init_params(model, key, 16))(jax.random.key(0))  # one compile, not eager
  params = jax.tree.map(lambda p: np.asarray(p) + 0.05 * rng.standard_normal(p.shape, np.float32), params)
  return small, big, np.arange(6, dtype=np.int32) % 4, model, params


@pytest.mark.slow
def test_evaluation_resizes_small_images_on_device():
  """8-px images for a 16-px model score as the same images resized beforehand: the resize is inside."""
  small, big, labels, model, params = _small_and_resized_images_and_model()
  assert evaluate.accuracy(model, params, small, labels, 8, image_size=16) == \
      evaluate.accuracy(model, params, big, labels, 8)
  stacked = jax.tree.map(lambda p: np.stack([p, -p]), params)
  inside = diagnostics.teacher_diagnostics(model, stacked, small, labels, 8, [0.5, 0.5], 4, image_size=16)
  before = diagnostics.teacher_diagnostics(model, stacked, big, labels, 8, [0.5, 0.5], 4)
  for a, b in zip(inside["clients"] + [inside["ensemble"]], before["clients"] + [before["ensemble"]]):
    assert a["test_acc"] == b["test_acc"] and a["per_class"] == b["per_class"]
    np.testing.assert_allclose([a["token_entropy"], a["token_acc"]], [b["token_entropy"], b["token_acc"]],
                               rtol=1e-5)


@pytest.mark.slow
def test_client_step_resizes_small_images_before_crop_and_flip():
  small, big, labels, model, params = _small_and_resized_images_and_model()
  cfg = config_base.base_config().clients
  cfg.crop_padding = 2
  tx = training.make_optimizer(cfg)
  state = training.init_client_state(params, tx)
  step = jax.jit(training.make_client_train_step(model, tx, cfg, image_size=16))
  args = (labels, np.ones(6, bool), jnp.int32(10), jax.random.key(3))
  on_device, _ = step(state, small, *args)
  beforehand, _ = step(state, big, *args)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), on_device.params,
               beforehand.params)
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), on_device.params, params)
  assert max(jax.tree.leaves(moved)) > 0  # the step did train


@pytest.mark.slow
def test_fresh_machine_smoke_run_downloads_and_trains_clients(tmp_path):
  """The real entry point on a machine with no copy: it downloads from the loopback server, decodes,
  trains the clients and evaluates. The pins are swapped in the child before main runs."""
  tarball = tmp_path / "served.tar.gz"
  make_binary_tarball(tarball, per_batch=130, test=210)  # smoke.py takes 600 / 200 examples
  spec = pin(tarball)
  server = LoopbackServer({"/cifar-10-binary.tar.gz": tarball.read_bytes()})
  workdir, cache = tmp_path / "run", tmp_path / "cache"
  child = ("import runpy, sys; from fedmitr_jax.data import datasets, download; "
           f"download.CIFAR10_BINARY = download.PinnedFile(*{(spec.name, spec.url, spec.size, spec.sha256)!r}); "
           f"datasets.REPO_DATA = {str(tmp_path / 'repo_data')!r}; "
           "runpy.run_module('fedmitr_jax.main', run_name='__main__', alter_sys=True)")
  env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  try:
    run = subprocess.run(
        [sys.executable, "-c", child, "--config", str(REPO / "configs/smoke.py"), "--workdir", str(workdir),
         f"--config.dataset.tarball={tmp_path / 'missing.tar.gz'}", f"--config.dataset.cache_dir={cache}",
         f"--config.dataset.download_url={server.url}/cifar-10-binary.tar.gz",
         "--config.methods=('fedavg', 'ensemble')"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  finally:
    server.close()
  assert run.returncode == 0, run.stderr[-3000:]
  assert "MB/s" in run.stdout and "[clients] done" in run.stdout, run.stdout[-3000:]
  assert "dataset cifar10: 600 train, 200 test, 10 classes" in run.stdout
  results = json.loads((workdir / "results.json").read_text())
  assert set(results["methods"]) == {"fedavg", "ensemble"} and len(results["clients"]) == 3
  assert server.requests == 1 and (cache / "cifar-10-binary.tar.gz").stat().st_size == spec.size
