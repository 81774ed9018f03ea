"""Image-classification datasets as uint8 arrays: CIFAR-10 (local copy or download), image folders, tfds.

Each split is decoded once and cached as .npy files that later runs map read-only (np.load with
mmap_mode='r'): nothing is copied into memory until a batch is read. CIFAR-10 is kept at its native
32 px whatever dataset.image_size says; the model input size is reached on the device
(augment.resize_to), so 224-px runs hold 32-px arrays (150 MB instead of 7.5 GB for the training set).
Relative paths: `dataset.tarball` from the repo root; `root`, `data_dir`, `cache_dir` from the cwd.
docs/data.md describes the lookup order, the download and the cache layout.
"""
import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
import time
import zlib

import numpy as np
from PIL import Image, ImageFile

from fedmitr_jax import config_base
from fedmitr_jax.data import download

# A truncated JPEG must raise, not load with a grey bottom half (another library may flip this).
ImageFile.LOAD_TRUNCATED_IMAGES = False

KINDS = config_base.CHOICES["dataset.kind"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # images are normalised to [-1, 1]
PIXEL_MIN, PIXEL_MAX = -1.0, 1.0              # valid range in normalised space (clip inverted pixels)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # fedmitr_jax/data/ -> repo
REPO_DATA = os.path.join(REPO_ROOT, "data")  # local copies of downloadable datasets (git-ignored)
CIFAR10_JPEG_NAME = "cifar10_jpg.tar.gz"
CIFAR10_SIZE = 32  # CIFAR kinds are cached at this native size; the model's size is reached on device
CIFAR10_SPLITS = ("train", "test")
# The official binary release: per split, records of 1 label byte + 3072 pixel bytes (R, G, B planes).
_CIFAR10_BATCHES = {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)}
_CIFAR10_META = "batches.meta.txt"
_CIFAR10_RECORD = 1 + 3 * CIFAR10_SIZE * CIFAR10_SIZE
_LAYOUT = "root/<split>/<class>/*.jpg"
_CHUNK, _PROGRESS_EVERY = 1000, 10_000  # images per decode step; a progress line every 10k images


class DataError(ValueError):
  """A bad dataset config or bad data on disk; the message names the config field and the fix."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  train_images: np.ndarray  # uint8 [N, H, W, 3], often a read-only memmap; H = 32 for CIFAR-10, else
                            # dataset.image_size (augment.resize_to brings it to the model's size)
  train_labels: np.ndarray  # int32 [N]
  test_images: np.ndarray
  test_labels: np.ndarray
  class_names: tuple[str, ...]
  name: str

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def normalize(images):
  """uint8 [..., 3] -> float32 in [-1, 1]; numpy in, numpy out; jax in, jax out."""
  return images.astype(np.float32) / 127.5 - 1.0


def denormalize(x) -> np.ndarray:
  """Inverse of `normalize`, rounded and clipped to uint8 (for image grids)."""
  return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _tarball_path(cfg) -> str:
  path = os.path.expanduser(cfg.tarball)
  return path if os.path.isabs(path) else os.path.normpath(os.path.join(REPO_ROOT, path))


def _class_dirs(split_dir: str, field: str) -> tuple[str, ...]:
  """Sorted class folder names of one split (hidden folders skipped)."""
  if not os.path.isdir(split_dir):
    raise DataError(f"{field}: split folder '{split_dir}' does not exist; expected {_LAYOUT}")
  names = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
  if not names:
    raise DataError(f"{field}: '{split_dir}' holds no class folders; expected {_LAYOUT}")
  return tuple(names)


def check_dataset_config(cfg) -> None:
  """Cheap checks (no decoding) that can run before a run writes anything."""
  if cfg.kind not in KINDS:
    raise DataError(f"dataset.kind: '{cfg.kind}' is unknown; use one of {', '.join(KINDS)}")
  if not isinstance(cfg.image_size, int) or cfg.image_size <= 0:
    raise DataError(f"dataset.image_size: {cfg.image_size!r} must be a positive int, e.g. 32")
  for field in ("max_train_examples", "max_test_examples"):
    if cfg[field] < 0:
      raise DataError(f"dataset.{field}: {cfg[field]} < 0; use 0 for all examples or N > 0")
  if cfg.kind == "folder":
    if not cfg.root or not os.path.isdir(cfg.root):
      raise DataError(f"dataset.root: '{cfg.root}' does not exist; point --config.dataset.root at "
                      f"a folder laid out as {_LAYOUT}")
    train = _class_dirs(os.path.join(cfg.root, cfg.train_split), "dataset.train_split")
    test = _class_dirs(os.path.join(cfg.root, cfg.test_split), "dataset.test_split")
    if train != test:
      raise DataError(f"dataset.root: class folders of '{cfg.train_split}' and '{cfg.test_split}' "
                      f"differ ({sorted(set(train) ^ set(test))[:5]}); give both the same classes")
  elif cfg.kind == "shared_cifar10" and not os.path.isfile(_tarball_path(cfg)):
    raise DataError(f"dataset.tarball: '{_tarball_path(cfg)}' does not exist; point --config.dataset."
                    "tarball at cifar10_jpg.tar.gz (relative paths: from the repo root)")
  elif cfg.kind == "cifar10":  # the data itself is found (or downloaded) by load_dataset
    for field in ("train_split", "test_split"):
      if cfg[field] not in CIFAR10_SPLITS:
        raise DataError(f"dataset.{field}: '{cfg[field]}' is not a CIFAR-10 split; use one of "
                        f"{CIFAR10_SPLITS}")
    if cfg.download_url and not cfg.download_url.startswith(("http://", "https://")):
      raise DataError(f"dataset.download_url: '{cfg.download_url}' is not an http(s) URL; give one, or '' "
                      "to never download")
  elif cfg.kind == "tfds":
    if not cfg.name:
      raise DataError("dataset.name: empty; set --config.dataset.name to a tfds name, e.g. cifar10")
    if cfg.data_dir and not os.path.isdir(os.path.expanduser(cfg.data_dir)):
      raise DataError(f"dataset.data_dir: '{cfg.data_dir}' does not exist; point --config.dataset."
                      "data_dir at the folder where the tfds dataset was prepared")


def _to_rgb(img: Image.Image, size: int) -> np.ndarray:
  img = img.convert("RGB")
  if img.size != (size, size):
    img = img.resize((size, size), Image.BILINEAR)
  return np.asarray(img, dtype=np.uint8)


def _decode_image(src, size: int, field: str, name: str) -> np.ndarray:
  """src: a path or the file's bytes; name: what an error calls it."""
  try:
    with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as img:
      img.load()  # decode now, so a truncated file raises here
      return _to_rgb(img, size)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(f"{field}: cannot read image '{name}' ({type(e).__name__}: {e}); "
                    "delete or replace the file") from None


def _decode_all(n: int, decode_range, what: str) -> np.ndarray | None:
  """Concatenates decode_range(start, stop) over chunks (None if n == 0), printing progress."""
  # A plain loop on purpose: on 32x32 JPEGs, 2 threads decoded at half the speed of one (the GIL).
  chunks, t0 = [], time.time()
  for start in range(0, n, _CHUNK):
    chunks.append(decode_range(start, min(start + _CHUNK, n)))
    done = start + len(chunks[-1])
    if done % _PROGRESS_EVERY < _CHUNK or done == n:
      rate = done / max(time.time() - t0, 1e-9)
      print(f"data: decoded {done}/{n} images of {what} ({rate:.0f} images/s)", flush=True)
  return np.concatenate(chunks) if chunks else None


def _decode_classes(files: dict, size: int, field: str, what: str):
  """files: class folder -> [(name, path or bytes)]. Returns (images, int32 labels, class names)."""
  classes = tuple(sorted(files))
  empty = [c for c in classes if not files[c]]
  if empty:
    raise DataError(f"{field}: class folder '{what}/{empty[0]}' holds no .jpg/.png images; remove it or "
                    "add images")
  items = [item for c in classes for item in sorted(files[c])]
  labels = np.asarray([i for i, c in enumerate(classes) for _ in files[c]], np.int32)
  decode = lambda a, b: np.stack([_decode_image(src, size, field, name) for name, src in items[a:b]])
  return _decode_all(len(items), decode, what), labels, classes


def _list_folder(split_dir: str) -> dict:
  """class -> [(path, path)] of split_dir/<class>/*.{jpg,jpeg,png}."""
  files = {}
  for c in _class_dirs(split_dir, "dataset.root"):
    paths = [os.path.join(split_dir, c, f) for f in os.listdir(os.path.join(split_dir, c))
             if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    files[c] = [(p, p) for p in paths]
  return files


def _read_tarball(tarball: str, split: str, size: int):
  """Decodes [<top>/]<split>/<class>/*.jpg straight from the tarball, in memory."""
  # Not unpacked first: on a 2-core CPU, writing 60,000 small files took 5-25 s, reading the stream 1.6 s.
  files = {}
  try:
    with tarfile.open(tarball) as tar:
      for m in tar:
        parts = posixpath.normpath(m.name).split("/")
        if m.isdir() and len(parts) >= 2 and parts[-2] == split and not parts[-1].startswith("."):
          files.setdefault(parts[-1], [])
        elif (m.isfile() and len(parts) >= 3 and parts[-3] == split and not parts[-1].startswith(".")
              and parts[-1].lower().endswith(IMAGE_EXTENSIONS)):
          files.setdefault(parts[-2], []).append((f"{tarball}:{m.name}", tar.extractfile(m).read()))
  except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
    raise DataError(f"dataset.tarball: cannot read '{tarball}' ({e}); replace the file") from None
  if not files:
    raise DataError(f"dataset.tarball: '{tarball}' holds no [<top>/]{split}/<class>/*.jpg; point "
                    "--config.dataset.tarball at a tarball laid out like cifar10_jpg.tar.gz")
  return _decode_classes(files, size, "dataset.tarball", f"{tarball}:{split}")


def _tfds_builder(cfg):
  import tensorflow_datasets as tfds  # lazy: only kind='tfds' pays for the import
  try:
    builder = tfds.builder(cfg.name, data_dir=os.path.expanduser(cfg.data_dir) or None)
  except (tfds.core.registered.DatasetNotFoundError, ValueError):  # ValueError: a malformed name
    raise DataError(f"dataset.name: '{cfg.name}' is neither a tfds dataset nor prepared in "
                    f"dataset.data_dir '{cfg.data_dir}'; fix the name or the data_dir") from None
  # Offline, a download would retry for minutes before failing: never let tfds start one.
  if not builder.is_prepared():
    raise DataError(f"dataset.data_dir: tfds dataset '{cfg.name}' is not prepared in "
                    f"'{builder.data_dir}'; prepare it on a machine with network (tfds build "
                    "--file_format=array_record) or point --config.dataset.data_dir at a copy")
  features = builder.info.features
  if "image" not in features or "label" not in features or not hasattr(features["label"], "names"):
    raise DataError(f"dataset.name: tfds dataset '{cfg.name}' needs an 'image' and a ClassLabel "
                    f"'label' feature (has {list(features.keys())}); use another dataset")
  return builder


def _read_tfds(builder, cfg, split: str, field: str, size: int):
  """Reads a split without TensorFlow (array_record data source); TF only for tfrecord data."""
  try:
    source = builder.as_data_source(split=split)
    get_range = lambda a, b: [source[i] for i in range(a, b)]  # (mock_data breaks __getitems__)
  except NotImplementedError:  # tfrecord data: only readable through TensorFlow
    if importlib.util.find_spec("tensorflow") is None:
      raise DataError(f"dataset.data_dir: '{builder.data_dir}' is not in array_record format; prepare "
                      "it again with --file_format=array_record or install tensorflow") from None
    import tensorflow_datasets as tfds
    source = list(tfds.as_numpy(builder.as_dataset(split=split)))
    get_range = lambda a, b: source[a:b]
  except ValueError as e:  # unknown split, bad slice
    raise DataError(f"dataset.{field}: '{split}' is not a split of tfds '{cfg.name}' ({e}); "
                    f"use one of {list(builder.info.splits)}") from None
  labels = np.zeros(len(source), np.int64)

  def decode(a, b):
    examples = get_range(a, b)
    labels[a:b] = [int(ex["label"]) for ex in examples]
    arrays = [np.asarray(ex["image"]) for ex in examples]  # [H, W, 1|3|4]; sizes may vary
    return np.stack([_to_rgb(Image.fromarray(x.squeeze(-1) if x.shape[-1] == 1 else x), size)
                     for x in arrays])

  images = _decode_all(len(source), decode, f"{cfg.name}/{split}")
  label_feature = builder.info.features["label"]
  if images is None or labels.min() < 0 or labels.max() >= label_feature.num_classes:
    raise DataError(f"dataset.{field}: split '{split}' of tfds '{cfg.name}' is empty or has labels "
                    f"outside [0, {label_feature.num_classes}); pick another split or prepare it again")
  return images, labels.astype(np.int32), tuple(label_feature.names)


def _cache_dir(cfg) -> str:
  path = os.path.expanduser(cfg.cache_dir or os.environ.get("FEDMITR_CACHE") or "~/.cache/fedmitr_jax")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise DataError(f"dataset.cache_dir: cannot create '{path}' ({e}); point --config.dataset."
                    "cache_dir (or $FEDMITR_CACHE) at a writable folder") from None
  return path


def _digest(*parts) -> str:
  return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


def _read_split_dir(path: str):
  """(images memory-mapped read-only, labels, class names) of one cached split folder."""
  images = np.load(os.path.join(path, "images.npy"), mmap_mode="r", allow_pickle=False)
  labels = np.load(os.path.join(path, "labels.npy"), allow_pickle=False)
  with open(os.path.join(path, "class_names.json")) as f:
    class_names = tuple(str(c) for c in json.load(f))
  if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] != 3 or len(images) != len(labels):
    raise ValueError(f"images {images.dtype}{images.shape} / labels {labels.shape} do not match")
  return images, labels, class_names


def _write_split_dir(path: str, images, labels, class_names) -> None:
  """Writes a split folder atomically: a finished folder or none (an interrupted write is a .tmp)."""
  tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path))
  try:
    np.save(os.path.join(tmp, "images.npy"), np.ascontiguousarray(images, np.uint8))
    np.save(os.path.join(tmp, "labels.npy"), np.asarray(labels, np.int32))
    with open(os.path.join(tmp, "class_names.json"), "w") as f:
      json.dump(list(class_names), f)
    os.chmod(tmp, 0o755)
    try:
      os.replace(tmp, path)
    except OSError:  # another process (multi-host on a shared disk) finished the same folder first
      if not os.path.isdir(path):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _cached(path: str, build):
  """(images, labels, class_names) of the split folder at path, built and written first if missing.

  The images come back memory-mapped from the written file, so the decoded copy is freed."""
  if os.path.isdir(path):
    try:
      return _read_split_dir(path)
    except (OSError, ValueError) as e:
      print(f"data: cache folder '{path}' is unreadable ({e}); rebuilding it", flush=True)
      shutil.rmtree(path, ignore_errors=True)
  _write_split_dir(path, *build())
  return _read_split_dir(path)


def _jpeg_tarball_split(tarball: str, split: str, cache_dir: str):
  """One split of a CIFAR-10 JPEG tarball, decoded at the native 32 px."""
  stat = os.stat(tarball)
  key = _digest(tarball, stat.st_size, stat.st_mtime_ns, split, CIFAR10_SIZE)
  slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"cifar10-jpeg_{os.path.basename(tarball).split('.')[0]}_{split}")
  return _cached(os.path.join(cache_dir, f"{slug}_{CIFAR10_SIZE}px_{key}"),
                 lambda: _read_tarball(tarball, split, CIFAR10_SIZE))


def _load_split(cfg, field: str, cache_dir: str):
  """One split of kind folder, shared_cifar10 or tfds, through the cache; field: '{train,test}_split'."""
  split, size, kind = cfg[field], cfg.image_size, cfg.kind
  if kind == "shared_cifar10":
    return _jpeg_tarball_split(_tarball_path(cfg), split, cache_dir)
  if kind == "folder":  # any image sizes: resized to the model's size while decoding
    split_dir = os.path.abspath(os.path.join(cfg.root, split))
    files = _list_folder(split_dir)
    # Key on names, sizes and mtimes: an edited folder must not be served stale from the cache.
    stats = sorted((p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for c in files for p, _ in files[c])
    key, source = _digest(split_dir, size, stats), os.path.basename(os.path.normpath(cfg.root))
    build = lambda: _decode_classes(files, size, "dataset.root", split_dir)
  else:
    builder = _tfds_builder(cfg)
    key, source = _digest(os.path.abspath(builder.data_dir), split, size), cfg.name
    build = lambda: _read_tfds(builder, cfg, split, field, size)
  slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{kind}_{source}_{split}_{size}px")
  return _cached(os.path.join(cache_dir, f"{slug}_{key}"), build)


# ---- CIFAR-10: decoded cache -> local copy -> download ------------------------------------------
def _cifar10_copies(cfg) -> tuple[str, ...]:
  """Where a local copy may be, in lookup order (an earlier download in the cache comes after these)."""
  name = download.pinned("cifar10").name
  return (_tarball_path(cfg), os.path.join(REPO_DATA, CIFAR10_JPEG_NAME), os.path.join(REPO_DATA, name))


def _is_binary_copy(path: str) -> bool:
  """True for the official binary tarball (cifar-10-batches-bin/...), False for a JPEG tree."""
  try:
    with tarfile.open(path) as tar:
      first = tar.next()
  except (tarfile.TarError, OSError, EOFError, zlib.error):
    return False  # unreadable: the JPEG reader names the file in its error
  return first is not None and posixpath.normpath(first.name).split("/")[0] == "cifar-10-batches-bin"


def read_cifar10_binary(path: str, field: str = "dataset.tarball"):
  """({'train': (images, labels), 'test': ...}, class_names) from the official binary tarball.

  Plain numpy on the raw records (no pickle, no TensorFlow): label byte, then the 32x32 R, G and B
  planes (CHW), transposed to HWC uint8."""
  blobs = {}
  try:
    with tarfile.open(path) as tar:
      for m in tar:
        name = posixpath.basename(m.name)
        if m.isfile() and (name.endswith(".bin") or name == _CIFAR10_META):
          blobs[name] = tar.extractfile(m).read()
  except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
    raise DataError(f"{field}: cannot read '{path}' ({e}); delete it and fetch it again") from None
  needed = (*_CIFAR10_BATCHES["train"], *_CIFAR10_BATCHES["test"], _CIFAR10_META)
  missing = [n for n in needed if n not in blobs]
  if missing:
    raise DataError(f"{field}: '{path}' has no {missing[0]}; it is not cifar-10-binary.tar.gz, replace it")
  class_names = tuple(line.strip() for line in blobs[_CIFAR10_META].decode().splitlines() if line.strip())
  splits = {}
  for split, files in _CIFAR10_BATCHES.items():
    raw = b"".join(blobs[f] for f in files)
    if not raw or len(raw) % _CIFAR10_RECORD:
      raise DataError(f"{field}: the {split} batches of '{path}' are {len(raw)} bytes, not a multiple of "
                      f"{_CIFAR10_RECORD}-byte records; replace the file")
    records = np.frombuffer(raw, np.uint8).reshape(-1, _CIFAR10_RECORD)
    labels = records[:, 0].astype(np.int32)
    if labels.max() >= len(class_names):
      raise DataError(f"{field}: '{path}' has label {labels.max()} but {len(class_names)} class names in "
                      f"{_CIFAR10_META}; replace the file")
    images = records[:, 1:].reshape(-1, 3, CIFAR10_SIZE, CIFAR10_SIZE).transpose(0, 2, 3, 1)
    splits[split] = (np.ascontiguousarray(images), labels)
  return splits, class_names


def _how_to_get_cifar10(cfg) -> str:
  name = download.pinned("cifar10").name
  return (f"either put a copy at dataset.tarball ('{_tarball_path(cfg)}') or in {REPO_DATA}/ "
          f"({CIFAR10_JPEG_NAME} or {name}), or run `python -m fedmitr_jax.download cifar10 --dir D` "
          f"on a machine with network and copy D/{name} into {REPO_DATA}/")


def _download_cifar10(cfg, cache_dir: str) -> str:
  """The checksummed official tarball in cache_dir (an intact earlier download is used as it is, also
  offline); every failure is one line."""
  spec = download.pinned("cifar10")
  earlier = os.path.join(cache_dir, spec.name)
  if download.is_intact(earlier, spec):
    return earlier
  if not cfg.download_url:
    raise DataError(f"dataset: no CIFAR-10 copy here and dataset.download_url is ''; "
                    f"{_how_to_get_cifar10(cfg)}")
  print(f"data: no local CIFAR-10 copy; downloading {cfg.download_url} ({spec.size / 1e6:.1f} MB, "
        f"sha256-checked) into {cache_dir}", flush=True)
  try:
    return download.fetch(spec, cache_dir, cfg.download_url)
  except download.UnreachableError as e:
    raise DataError(f"dataset: no CIFAR-10 copy here and {e}; {_how_to_get_cifar10(cfg)}") from None
  except download.DownloadError as e:
    raise DataError(f"dataset.download_url: {e}") from None
  except OSError as e:  # the cache folder is full or read-only
    raise DataError(f"dataset.cache_dir: cannot write the download into '{cache_dir}' ({e}); free space "
                    "or point --config.dataset.cache_dir elsewhere") from None


def _load_cifar10(cfg, cache_dir: str):
  """Both splits of kind 'cifar10': the decoded cache, else a local copy, else the download."""
  spec = download.pinned("cifar10")
  # The official data is checksummed, so its decoded cache is keyed by the digest, not by a path.
  folders = {s: os.path.join(cache_dir, f"cifar10-binary_{s}_{CIFAR10_SIZE}px_{spec.sha256[:12]}")
             for s in CIFAR10_SPLITS}
  wanted = (cfg.train_split, cfg.test_split)
  if all(os.path.isdir(folders[s]) for s in wanted):
    try:
      return tuple(_read_split_dir(folders[s]) for s in wanted)
    except (OSError, ValueError) as e:
      print(f"data: cached CIFAR-10 is unreadable ({e}); decoding it again", flush=True)
  path = next((p for p in _cifar10_copies(cfg) if os.path.isfile(p)), None)
  if path is not None and not _is_binary_copy(path):
    return tuple(_jpeg_tarball_split(path, s, cache_dir) for s in wanted)
  field = "dataset.tarball" if path == _tarball_path(cfg) else "dataset"
  if path is None:
    path = _download_cifar10(cfg, cache_dir)
  elif not download.is_intact(path, spec):
    raise DataError(f"{field}: '{path}' differs from the official {spec.name} (size or sha256); delete it, "
                    "or fetch it again with `python -m fedmitr_jax.download cifar10`")
  print(f"data: reading CIFAR-10 from {path}", flush=True)
  splits, class_names = read_cifar10_binary(path, field)
  for split, (images, labels) in splits.items():
    shutil.rmtree(folders[split], ignore_errors=True)  # an unreadable old folder
    _write_split_dir(folders[split], images, labels, class_names)
  del splits
  return tuple(_read_split_dir(folders[s]) for s in wanted)


def _stratified_subset(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
  """n sorted indices with the class mix of the full split (each class within 1 of n * share)."""
  if n <= 0 or n >= len(labels):
    return np.arange(len(labels))
  perm = rng.permutation(len(labels))
  shuffled, rank = labels[perm], np.empty(len(labels))
  for c in np.unique(shuffled):
    where = np.flatnonzero(shuffled == c)
    rank[where] = (np.arange(len(where)) + 0.5) / len(where)  # place within its class, in (0, 1)
  return np.sort(perm[np.argsort(rank, kind="stable")[:n]])


def _subset(images, labels, n: int, rng: np.random.Generator):
  """The seeded max_*_examples subset; the whole split as it is (a memmap stays one) when n is 0."""
  if n <= 0 or n >= len(labels):
    return images, labels.astype(np.int32)
  idx = _stratified_subset(labels, n, rng)
  return images[idx], labels[idx].astype(np.int32)


def load_dataset(cfg, seed: int = 0) -> Dataset:
  """Both splits (decoded once, then from the cache), cut to the seeded max_*_examples subsets."""
  check_dataset_config(cfg)
  cache_dir = _cache_dir(cfg)
  if cfg.kind == "cifar10":
    (train_x, train_y, classes), (test_x, test_y, test_classes) = _load_cifar10(cfg, cache_dir)
  else:
    train_x, train_y, classes = _load_split(cfg, "train_split", cache_dir)
    test_x, test_y, test_classes = _load_split(cfg, "test_split", cache_dir)
  if classes != test_classes:
    field = {"folder": "dataset.root", "tfds": "dataset.name"}.get(cfg.kind, "dataset.tarball")
    raise DataError(f"{field}: train classes {classes[:4]}... differ from test classes "
                    f"{test_classes[:4]}...; both splits need the same classes")
  train_x, train_y = _subset(train_x, train_y, cfg.max_train_examples, np.random.default_rng((seed, 0)))
  test_x, test_y = _subset(test_x, test_y, cfg.max_test_examples, np.random.default_rng((seed, 1)))
  name = {"folder": os.path.basename(os.path.normpath(cfg.root)), "shared_cifar10": "cifar10",
          "cifar10": "cifar10"}
  return Dataset(train_x, train_y, test_x, test_y, classes, name.get(cfg.kind, cfg.name))
