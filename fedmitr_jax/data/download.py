"""The project's one downloader: a pinned file over HTTP(S), streamed, checksummed, renamed into place.

Nothing else in fedmitr_jax opens a network connection. A file is written to `<name>.part` next to
its destination and renamed only once its size and sha256 match the pins, so an interrupted or
corrupted download never leaves a file that looks finished.
"""
import dataclasses
import hashlib
import http.client
import os
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request


@dataclasses.dataclass(frozen=True)
class PinnedFile:
  name: str    # file name on disk
  url: str     # official address
  size: int    # bytes
  sha256: str  # hex digest


# The official binary CIFAR-10 (tensorflow_datasets pins the same size and digest).
CIFAR10_BINARY = PinnedFile(
    name="cifar-10-binary.tar.gz", url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    size=170052171, sha256="c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd")

_CHUNK = 1 << 20           # bytes read per step
_REPORT_EVERY_S = 2.0      # a progress line at most this often
_TIMEOUT_S = 30.0          # connect / read timeout; a stalled server fails instead of hanging


class DownloadError(ValueError):
  """The file could not be fetched intact; the message is one line."""


class UnreachableError(DownloadError):
  """No connection to the server at all (offline machine, wrong host, closed port)."""


def pinned(name: str) -> PinnedFile:
  """The pins of a named file, looked up when called (so tests can swap them)."""
  return {"cifar10": CIFAR10_BINARY}[name]


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(_CHUNK), b""):
      digest.update(block)
  return digest.hexdigest()


def is_intact(path: str, spec: PinnedFile) -> bool:
  """True when `path` exists with the pinned size and sha256 (size first: cheap)."""
  return os.path.isfile(path) and os.path.getsize(path) == spec.size and sha256_of(path) == spec.sha256


def fetch(spec: PinnedFile, directory: str, url: str = "", out=None) -> str:
  """Returns the path of the intact file in `directory`, downloading it from `url` (default: the
  official address) only when it is not already there. Progress lines go to `out` (default stdout)."""
  target = os.path.join(directory, spec.name)
  if is_intact(target, spec):
    return target
  url = url or spec.url
  os.makedirs(directory, exist_ok=True)
  fd, part = tempfile.mkstemp(prefix=spec.name + ".", suffix=".part", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      received, digest = _stream(url, f, spec.size, out or sys.stdout)
    if received != spec.size:
      raise DownloadError(f"download of {url} stopped at {received} of {spec.size} bytes (connection "
                          "closed early); nothing was kept, run it again")
    if digest != spec.sha256:
      raise DownloadError(f"{url} sent a file with sha256 {digest[:16]}..., not the pinned "
                          f"{spec.sha256[:16]}...; it was deleted, check the URL or fetch it again")
    os.chmod(part, 0o644)
    os.replace(part, target)
  finally:
    if os.path.exists(part):
      os.remove(part)
  return target


def _stream(url: str, f, expected: int, out) -> tuple[int, str]:
  """Copies the response body into f; returns (bytes received, sha256). Reads at most expected + 1
  bytes, so a wrong file cannot fill the disk."""
  try:
    response = urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "fedmitr_jax"}),
                                      timeout=_TIMEOUT_S)
  except urllib.error.HTTPError as e:  # reached the server, which refused: not an offline machine
    raise DownloadError(f"{url} answered HTTP {e.code} {e.reason}; check the URL") from None
  except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
    reason = getattr(e, "reason", e)
    raise UnreachableError(f"cannot reach {url} ({reason})") from None
  digest, received = hashlib.sha256(), 0
  started = last_report = time.perf_counter()
  with response:
    try:
      while received <= expected:
        block = response.read(min(_CHUNK, expected + 1 - received))
        if not block:
          break
        f.write(block)
        digest.update(block)
        received += len(block)
        now = time.perf_counter()
        if now - last_report >= _REPORT_EVERY_S:
          _report(out, received, expected, now - started)
          last_report = now
    except (OSError, http.client.HTTPException, socket.timeout) as e:  # reset, timeout mid-stream
      raise DownloadError(f"download of {url} broke off at {received} of {expected} bytes "
                          f"({type(e).__name__}: {e}); nothing was kept, run it again") from None
  _report(out, received, expected, time.perf_counter() - started)
  return received, digest.hexdigest()


def _report(out, received: int, expected: int, seconds: float) -> None:
  mb = 1e6
  print(f"download: {received / mb:.1f}/{expected / mb:.1f} MB ({received / mb / max(seconds, 1e-9):.1f} "
        "MB/s)", file=out, flush=True)
