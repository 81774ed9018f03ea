"""Tests for fedmitr_jax.data.datasets on tiny datasets built in tmp_path (never the real 60k CIFAR-10)."""
import os
import tarfile

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from fedmitr_jax import config_base
from fedmitr_jax.data import datasets


def _save(path, size=(20, 20), mode="RGB", color=(200, 30, 60), fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new(mode, size, color).save(path, format=fmt)


def _make_folder(root, splits=("train", "test")):
  """Two classes with mixed sizes, modes and extensions: cat = 3 images, dog = 2 per split."""
  for split in splits:
    _save(f"{root}/{split}/cat/a.jpg", (40, 30))
    _save(f"{root}/{split}/cat/b.PNG", (16, 16), "RGBA", (10, 20, 30, 128), fmt="PNG")
    _save(f"{root}/{split}/cat/c.jpeg", (16, 16), "L", 77, fmt="JPEG")
    _save(f"{root}/{split}/dog/a.JPG", (8, 12), fmt="JPEG")
    _save(f"{root}/{split}/dog/b.png", (16, 16), "P", 3, fmt="PNG")
    open(f"{root}/{split}/dog/notes.txt", "w").close()  # not an image: skipped
  os.makedirs(f"{root}/train/.hidden")                  # hidden folder: not a class


def _cfg(tmp_path, **fields):
  cfg = config_base.base_config().dataset
  cfg.kind, cfg.image_size, cfg.cache_dir = "folder", 16, str(tmp_path / "cache")
  cfg.update(fields)
  return cfg


def test_folder_shapes_labels_and_resize(tmp_path):
  _make_folder(tmp_path / "ds")
  ds = datasets.load_dataset(_cfg(tmp_path, root=str(tmp_path / "ds")))
  assert ds.class_names == ("cat", "dog") and ds.num_classes == 2 and ds.name == "ds"
  assert ds.train_images.shape == (5, 16, 16, 3) and ds.train_images.dtype == np.uint8
  assert ds.test_images.shape == (5, 16, 16, 3)
  assert ds.train_labels.dtype == np.int32 and ds.train_labels.tolist() == [0, 0, 0, 1, 1]
  # b.PNG was already 16x16: its RGB pixels pass through unresized (alpha dropped).
  assert (ds.train_images[1] == np.array([10, 20, 30], np.uint8)).all()
  assert (abs(ds.train_images[2].astype(int) - 77) <= 2).all()  # grayscale JPEG -> 3 equal channels


def test_cache_hit_skips_decoding_and_edit_invalidates(tmp_path, monkeypatch):
  _make_folder(tmp_path / "ds")
  cfg = _cfg(tmp_path, root=str(tmp_path / "ds"))
  first = datasets.load_dataset(cfg)
  assert len([f for f in os.listdir(cfg.cache_dir) if f.startswith("folder_ds_")]) == 2  # a folder per split

  def fail(*args):
    raise AssertionError("decoded although cached")
  monkeypatch.setattr(datasets, "_decode_image", fail)
  second = datasets.load_dataset(cfg)
  np.testing.assert_array_equal(first.train_images, second.train_images)
  assert second.class_names == first.class_names
  _save(str(tmp_path / "ds/train/dog/c.jpg"))  # an edited folder must be decoded again
  with pytest.raises(AssertionError, match="decoded although cached"):
    datasets.load_dataset(cfg)


@pytest.mark.parametrize("breakage, field", [
    ("missing_root", "dataset.root"),
    ("empty_class", "dataset.root"),
    ("truncated_jpeg", "dataset.root"),
    ("corrupt_png", "dataset.root"),
    ("mismatched_classes", "dataset.root"),
    ("missing_test_split", "dataset.test_split"),
])
def test_folder_errors_name_the_field(tmp_path, breakage, field):
  root = tmp_path / "ds"
  _make_folder(root)
  if breakage == "missing_root":
    root = tmp_path / "nope"
  elif breakage == "empty_class":
    os.makedirs(root / "train/bird")
    os.makedirs(root / "test/bird")
  elif breakage == "truncated_jpeg":
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(root / "x.jpg")
    blob = (root / "x.jpg").read_bytes()
    (root / "train/cat/a.jpg").write_bytes(blob[:len(blob) // 2])
  elif breakage == "corrupt_png":
    (root / "train/dog/b.png").write_bytes(b"not a png at all")
  elif breakage == "mismatched_classes":
    os.rename(root / "test/dog", root / "test/wolf")
  elif breakage == "missing_test_split":
    os.rename(root / "test", root / "val")
  with pytest.raises(datasets.DataError) as e:
    datasets.load_dataset(_cfg(tmp_path, root=str(root)))
  message = str(e.value)
  assert message.startswith(field + ":") and "\n" not in message, message
  if breakage == "truncated_jpeg":
    assert "a.jpg" in message
  if breakage == "empty_class":
    assert "bird" in message and "holds no" in message


@pytest.mark.parametrize("fields, field", [
    (dict(kind="zip"), "dataset.kind"),
    (dict(image_size=0), "dataset.image_size"),
    (dict(max_train_examples=-1), "dataset.max_train_examples"),
    (dict(kind="shared_cifar10", tarball="/no/such.tar.gz"), "dataset.tarball"),
    (dict(kind="cifar10", train_split="validation"), "dataset.train_split"),
    (dict(kind="cifar10", download_url="ftp://example.org/c.tgz"), "dataset.download_url"),
    (dict(kind="tfds", data_dir="/no/such/dir"), "dataset.data_dir"),
    (dict(kind="tfds", name=""), "dataset.name"),
])
def test_config_errors_name_the_field(tmp_path, fields, field):
  with pytest.raises(datasets.DataError, match="^" + field.replace(".", r"\.") + ":"):
    datasets.check_dataset_config(_cfg(tmp_path, **fields))


def test_default_config_finds_shared_tarball_from_repo_root():
  cfg = config_base.base_config().dataset  # tarball is relative: resolved from the repo root
  if not os.path.isfile(datasets._tarball_path(cfg)):
    pytest.skip("no ../shared/data/cifar10_jpg.tar.gz next to this checkout")
  datasets.check_dataset_config(cfg)


def _make_tarball(tmp_path, classes=("airplane", "cat")):
  src = tmp_path / "src"
  for split, n in (("train", 3), ("test", 2)):
    for c in classes:
      for i in range(n):
        _save(f"{src}/cifar10/{split}/{c}/{i:04d}.jpg", (32, 32), color=(i * 40, 0, 0))
  path = tmp_path / "tiny_cifar.tar.gz"
  with tarfile.open(path, "w:gz") as tar:
    tar.add(src / "cifar10", arcname="cifar10")
  return str(path)


def test_shared_cifar10_tiny_tarball(tmp_path):
  cfg = _cfg(tmp_path, kind="shared_cifar10", tarball=_make_tarball(tmp_path), image_size=32)
  ds = datasets.load_dataset(cfg)
  assert ds.name == "cifar10" and ds.class_names == ("airplane", "cat")
  assert ds.train_images.shape == (6, 32, 32, 3) and ds.test_images.shape == (4, 32, 32, 3)
  assert ds.train_labels.tolist() == [0, 0, 0, 1, 1, 1] and ds.test_labels.tolist() == [0, 0, 1, 1]
  # One folder per split (images.npy, labels.npy, class_names.json), no unpacked copy of the tarball.
  for split_dir in os.listdir(cfg.cache_dir):
    assert sorted(os.listdir(os.path.join(cfg.cache_dir, split_dir))) == ["class_names.json", "images.npy",
                                                                           "labels.npy"]
  assert isinstance(ds.train_images, np.memmap) and not ds.train_images.flags.writeable  # mapped, no copy


def test_shared_cifar10_corrupt_tarball(tmp_path):
  path = tmp_path / "bad.tar.gz"
  path.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
  with pytest.raises(datasets.DataError, match=r"^dataset\.tarball: cannot read"):
    datasets.load_dataset(_cfg(tmp_path, kind="shared_cifar10", tarball=str(path)))


class TinyImages(tfds.core.GeneratorBasedBuilder):
  """A tfds dataset prepared for real in array_record format (Tensor feature: writing needs no TF)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
        "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(12), "test": self._generate_examples(6)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"image": np.full((8, 8, 1), i * 10, np.uint8), "label": i % 3}


def test_tfds_prepared_array_record_without_tensorflow(tmp_path):
  TinyImages(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
  cfg = _cfg(tmp_path, kind="tfds", name="tiny_images", data_dir=str(tmp_path / "tfds"))
  ds = datasets.load_dataset(cfg)
  assert ds.class_names == ("a", "b", "c") and ds.name == "tiny_images"
  assert ds.train_images.shape == (12, 16, 16, 3) and ds.test_images.shape == (6, 16, 16, 3)
  assert sorted(np.bincount(ds.train_labels).tolist()) == [4, 4, 4]
  for image, label in zip(ds.train_images, ds.train_labels):  # gray 8x8 -> RGB 16x16, one value
    assert len(np.unique(image)) == 1 and image[0, 0, 0] % 10 == 0 and (image[0, 0, 0] // 10) % 3 == label
  cfg.test_split = "validation"
  with pytest.raises(datasets.DataError, match=r"^dataset\.test_split: 'validation' is not a split"):
    datasets.load_dataset(cfg)


def test_tfds_tfrecord_data_without_tensorflow_is_a_clear_error(tmp_path, monkeypatch):
  TinyImages(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()

  def tfrecord_only(self, split):  # what tfds raises for data prepared in tfrecord format
    raise NotImplementedError("Random access data source for file format tfrecord is not supported")
  monkeypatch.setattr(tfds.core.DatasetBuilder, "as_data_source", tfrecord_only)
  monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)  # as if TF were absent
  cfg = _cfg(tmp_path, kind="tfds", name="tiny_images", data_dir=str(tmp_path / "tfds"))
  with pytest.raises(datasets.DataError, match=r"^dataset\.data_dir: .* not in array_record format"):
    datasets.load_dataset(cfg)


def test_tfds_mock_data_reads_through_data_source(tmp_path, monkeypatch):
  # mock_data fakes the records but writes no files, so claim the dataset is prepared.
  monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
  cfg = _cfg(tmp_path, kind="tfds", name="cifar10", data_dir=str(tmp_path), image_size=32)
  with tfds.testing.mock_data(num_examples=7):
    ds = datasets.load_dataset(cfg)
  assert ds.train_images.shape == (7, 32, 32, 3) and ds.num_classes == 10
  assert ds.train_labels.min() >= 0 and ds.train_labels.max() < 10


def test_tfds_unprepared_data_dir_never_downloads(tmp_path):
  cfg = _cfg(tmp_path, kind="tfds", name="cifar10", data_dir=str(tmp_path))  # exists, but empty
  with pytest.raises(datasets.DataError, match=r"^dataset\.data_dir: tfds dataset 'cifar10' is not prepared"):
    datasets.load_dataset(cfg)
  for bad_name in ("no_such_dataset_xyz", "a:b:c/d"):
    cfg.name = bad_name
    with pytest.raises(datasets.DataError, match=r"^dataset\.name:"):
      datasets.load_dataset(cfg)


def test_stratified_subset(tmp_path):
  labels = np.repeat(np.arange(4), [100, 200, 300, 400])
  idx = datasets._stratified_subset(labels, 100, np.random.default_rng(0))
  assert len(idx) == 100 and len(set(idx)) == 100 and (np.diff(idx) > 0).all()
  assert np.bincount(labels[idx]).tolist() == [10, 20, 30, 40]
  np.testing.assert_array_equal(idx, datasets._stratified_subset(labels, 100, np.random.default_rng(0)))
  assert not np.array_equal(idx, datasets._stratified_subset(labels, 100, np.random.default_rng(1)))
  _make_folder(tmp_path / "ds")
  ds = datasets.load_dataset(_cfg(tmp_path, root=str(tmp_path / "ds"), max_train_examples=3,
                              max_test_examples=2))
  assert len(ds.train_labels) == 3 and sorted(ds.train_labels.tolist()) in ([0, 0, 1], [0, 1, 1])
  assert sorted(ds.test_labels.tolist()) == [0, 1]


def test_normalize_roundtrip_numpy_and_jax():
  x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
  y = datasets.normalize(x)
  assert y.dtype == np.float32 and y.min() == datasets.PIXEL_MIN and y.max() == datasets.PIXEL_MAX
  np.testing.assert_array_equal(datasets.denormalize(y), x)
  yj = datasets.normalize(jnp.asarray(x))
  assert isinstance(yj, jnp.ndarray) and yj.dtype == jnp.float32
  np.testing.assert_array_equal(datasets.denormalize(yj), x)
  assert datasets.denormalize(np.array([-3.0, 3.0])).tolist() == [0, 255]


def test_tfds_labels_out_of_range_are_refused(tmp_path, monkeypatch):
  """A prepared dataset whose records carry a label its ClassLabel does not have (a broken or
  hand-edited copy) stops with one line naming the split field."""
  TinyImages(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
  real = tfds.core.DatasetBuilder.as_data_source

  def with_bad_label(self, split):
    records = list(real(self, split=split))
    records[-1] = dict(records[-1], label=7)  # 3 classes: 7 is out of range
    return records
  monkeypatch.setattr(tfds.core.DatasetBuilder, "as_data_source", with_bad_label)
  cfg = _cfg(tmp_path, kind="tfds", name="tiny_images", data_dir=str(tmp_path / "tfds"))
  with pytest.raises(datasets.DataError) as e:
    datasets.load_dataset(cfg)
  message = str(e.value)
  assert message.startswith("dataset.train_split: split 'train'") and "outside [0, 3)" in message
  assert "\n" not in message
