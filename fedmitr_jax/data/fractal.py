"""Formula-driven images with an exact per-patch annotator, for pretraining without natural images.

Classes are random iterated function systems (FractalDB, Kataoka et al., ACCV 2020). Each system
is drawn with the always-converging SVD parameterisation of Anderson & Farrell (WACV 2022): every
affine map is A = R(theta) diag(s1, s2) R(phi) D with D a random sign diagonal and 0 <= s2 <= s1 <= 1,
b uniform in [-1, 1]^2, and the "sigma factor" sum_k (s1_k + 2 s2_k) of the N maps (2..4) drawn
uniformly in [(5 + N) / 2, (6 + N) / 2], the band where attractors are neither dust nor blobs. Each
class's attractor is computed once by the chaos game (many chains iterated in parallel, map k chosen
with probability proportional to |det A_k|) and kept as a point cloud in the unit square.

An image is 1..max_instances instances of random classes, each at a random scale, position and
flip with its own colour, painted in order over a random background (a smooth colour field plus
noise). Since every pixel's owner is known, each patch's label is exact: the class of the instance
owning most of its pixels if that instance owns at least `patch_threshold` of them, else background
(index num_classes). The image's multi-hot label holds the classes that label at least one patch.

Everything is a pure function of (seed, step, index): per-image numbers come from
np.random.default_rng([seed, step, index, attempt]); the heavy work (transforming the point clouds,
rasterising, labelling) runs vectorised over the whole batch. An image whose background share
falls outside `background_share` is redrawn with the next attempt number, up to MAX_ATTEMPTS times
(a range that half the draws reach is missed by all 64 with probability 2^-64).
"""
import dataclasses
import queue
import threading

import numpy as np

MAX_MAPS = 4
CHAOS_CHAINS = 512        # parallel chaos-game chains per class
CHAOS_BURN_IN = 20        # contraction on average: 20 steps bring any start onto the attractor
MAX_ATTEMPTS = 64         # redraws of an image whose background share is out of range (then kept)


@dataclasses.dataclass(frozen=True)
class FractalSpec:
  """What the renderer needs; `from_config` reads it from a config's `fractal` section."""
  num_classes: int
  image_size: int = 32
  patch_size: int = 4
  points_per_class: int = 2048
  max_instances: int = 3
  scale: tuple = (0.35, 0.8)          # instance bounding box side, as a fraction of the image
  patch_threshold: float = 0.25       # share of a patch's pixels an instance needs to label it
  background_share: tuple = (0.2, 0.9)  # allowed share of background patches per image
  noise: float = 12.0                 # std of the background's pixel noise (0..255 scale)
  seed: int = 0                       # the class systems' seed (images have their own)

  @classmethod
  def from_config(cls, f, *, patch_size: int, seed: int):
    return cls(num_classes=f.num_classes, image_size=f.image_size, patch_size=patch_size,
               points_per_class=f.points_per_class, max_instances=f.max_instances,
               scale=tuple(f.scale), patch_threshold=f.patch_threshold,
               background_share=tuple(f.background_share), noise=f.noise, seed=seed)


# ---- class systems -----------------------------------------------------------------------------


def _rotation(angle):
  c, s = np.cos(angle), np.sin(angle)
  return np.array([[c, -s], [s, c]])


def sample_singular_values(rng, num_maps: int, sigma_factor: float) -> np.ndarray:
  """[num_maps, 2] values with 0 <= s2 <= s1 <= 1 and sum(s1 + 2 s2) == sigma_factor.

  Map by map, its share f = s1 + 2 s2 (at most 3) is drawn uniformly among the values that leave
  the remaining maps a reachable remainder; then s1 uniformly among the values keeping s2 <= s1 <= 1.
  """
  values = np.zeros((num_maps, 2))
  remaining = sigma_factor
  for k in range(num_maps):
    later = num_maps - k - 1
    share = remaining if later == 0 else rng.uniform(max(0.0, remaining - 3.0 * later), min(3.0, remaining))
    s1 = rng.uniform(max(share / 3.0, share - 2.0), min(1.0, share))
    values[k] = s1, (share - s1) / 2.0
    remaining -= share
  return values


def sample_system(rng):
  """One IFS: (A [MAX_MAPS, 2, 2], b [MAX_MAPS, 2], p [MAX_MAPS]); unused maps have p = 0."""
  num_maps = int(rng.integers(2, MAX_MAPS + 1))
  sigma = rng.uniform((5 + num_maps) / 2, (6 + num_maps) / 2)
  values = sample_singular_values(rng, num_maps, sigma)
  a, b, p = np.zeros((MAX_MAPS, 2, 2)), np.zeros((MAX_MAPS, 2)), np.zeros(MAX_MAPS)
  for k in range(num_maps):
    theta, phi = rng.uniform(0, 2 * np.pi, 2)
    signs = np.diag(rng.choice([-1.0, 1.0], 2))
    a[k] = _rotation(theta) @ np.diag(values[k]) @ _rotation(phi) @ signs
    b[k] = rng.uniform(-1, 1, 2)
    p[k] = abs(np.linalg.det(a[k]))
  p[:num_maps] = np.maximum(p[:num_maps], 1e-6)  # a rank-1 map still gets visited
  return a, b, p / p.sum()


def chaos_game(rng, a, b, p, num_points: int) -> np.ndarray:
  """[num_points, 2] attractor points of the IFS, from CHAOS_CHAINS chains run side by side."""
  steps = -(-num_points // CHAOS_CHAINS)
  x = rng.uniform(-1, 1, (CHAOS_CHAINS, 2))
  cumulative = np.cumsum(p)
  points = []
  for t in range(CHAOS_BURN_IN + steps):
    k = np.minimum(np.searchsorted(cumulative, rng.random(CHAOS_CHAINS)), MAX_MAPS - 1)
    x = np.einsum("nij,nj->ni", a[k], x) + b[k]
    if t >= CHAOS_BURN_IN:
      points.append(x)
  return np.concatenate(points)[:num_points]


def to_unit_square(points: np.ndarray) -> np.ndarray:
  """Scales and centres the cloud into [0, 1]^2 keeping its aspect ratio."""
  low, high = points.min(0), points.max(0)
  side = max(float((high - low).max()), 1e-9)
  return (points - (low + high) / 2) / side + 0.5


def class_point_clouds(num_classes: int, num_points: int, seed: int, min_fill: float = 0.08):
  """[C, num_points, 2] float32 clouds in the unit square, one per class.

  A system whose attractor covers under `min_fill` of a 32x32 thumbnail of its bounding box (a
  line or a few dots: nothing to segment) is replaced by the class's next draw, as FractalDB
  filters classes by filling rate.
  """
  clouds = np.zeros((num_classes, num_points, 2), np.float32)
  for c in range(num_classes):
    rng = np.random.default_rng([seed, c])
    for _ in range(100):
      cloud = to_unit_square(chaos_game(rng, *sample_system(rng), num_points))
      cells = np.minimum((cloud * 32).astype(int), 31)
      if len(np.unique(cells[:, 0] * 32 + cells[:, 1])) >= min_fill * 32 * 32 or _ == 99:
        break
    clouds[c] = cloud
  return clouds


# ---- images --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Layout:
  """Per-image drawing parameters; arrays over instance slots I = max_instances (unused: active 0)."""
  active: np.ndarray      # [I] bool
  classes: np.ndarray     # [I] int
  origin: np.ndarray      # [I, 2] top-left (row, col) of the bounding box, in pixels
  size: np.ndarray        # [I] side of the bounding box, in pixels
  flip: np.ndarray        # [I, 2] bool: mirror rows / columns
  transpose: np.ndarray   # [I] bool: swap axes (with flips: all 8 square symmetries)
  colour: np.ndarray      # [I, 3] in [0, 255]
  background: np.ndarray  # [H, W, 3] float


def _smooth_field(rng, size: int, noise: float) -> np.ndarray:
  """A random colour field: a 2x2..4x4 colour grid upsampled bilinearly, plus pixel noise."""
  cells = int(rng.integers(2, 5))
  grid = rng.uniform(0, 255, (cells, cells, 3))
  coords = np.linspace(0, cells - 1, size)
  low = np.minimum(coords.astype(int), cells - 2)
  frac = (coords - low)[:, None]
  rows = grid[low] * (1 - frac[..., None]) + grid[low + 1] * frac[..., None]  # [size, cells, 3]
  field = rows[:, low] * (1 - frac[None, :, :]) + rows[:, low + 1] * frac[None, :, :]
  return field + rng.normal(0, noise, (size, size, 3))


def draw_layout(rng, spec: FractalSpec) -> Layout:
  slots, size = spec.max_instances, spec.image_size
  count = int(rng.integers(1, slots + 1))
  sides = rng.uniform(*spec.scale, slots) * size
  return Layout(
      active=np.arange(slots) < count,
      classes=rng.integers(0, spec.num_classes, slots),
      origin=rng.uniform(0, 1, (slots, 2)) * (size - sides)[:, None],
      size=sides,
      flip=rng.random((slots, 2)) < 0.5,
      transpose=rng.random(slots) < 0.5,
      colour=rng.uniform(0, 255, (slots, 3)),
      background=_smooth_field(rng, size, spec.noise))


def instance_masks(clouds, layouts, spec: FractalSpec):
  """(masks [B, I, H, W] bool, density [B, I, H, W] float) of every instance drawn alone."""
  size = spec.image_size
  stack = lambda name: np.stack([getattr(lay, name) for lay in layouts])
  classes, flip, transpose = stack("classes"), stack("flip"), stack("transpose")
  points = clouds[classes]                                                # [B, I, P, 2]
  points = np.where(transpose[..., None, None], points[..., ::-1], points)
  points = np.where(flip[:, :, None, :], 1.0 - points, points)
  pixels = points * stack("size")[..., None, None] + stack("origin")[:, :, None, :]
  cells = np.clip(pixels.astype(np.int64), 0, size - 1)
  batch, slots = classes.shape
  instance = np.arange(batch * slots).reshape(batch, slots, 1)
  flat = (instance * size + cells[..., 0]) * size + cells[..., 1]
  density = np.bincount(flat.ravel(), minlength=batch * slots * size * size)
  density = density.reshape(batch, slots, size, size).astype(np.float32)
  masks = (density > 0) & stack("active")[..., None, None]
  return masks, density


def owners(masks) -> np.ndarray:
  """[B, H, W] index of the instance painted last over each pixel (later ones cover earlier), -1 none."""
  slots = masks.shape[1]
  return np.where(masks, np.arange(slots)[None, :, None, None], -1).max(axis=1)


def patch_labels(owner, classes, spec: FractalSpec) -> np.ndarray:
  """[B, n] label of every patch (row-major, as the ViT's tokens): the class of the instance that
  owns most of its pixels when it owns at least patch_threshold of them, else num_classes."""
  batch, size, _ = owner.shape
  p, slots = spec.patch_size, classes.shape[1]
  grid = size // p
  onehot = owner[..., None] == np.arange(slots)                          # [B, H, W, I]
  counts = onehot.reshape(batch, grid, p, grid, p, slots).sum(axis=(2, 4)).reshape(batch, grid * grid, slots)
  best = counts.argmax(-1)
  enough = counts.max(-1) >= spec.patch_threshold * p * p
  return np.where(enough, np.take_along_axis(classes, best, axis=1), spec.num_classes)


def multi_hot(tokens, num_classes: int) -> np.ndarray:
  """[B, C] float32: 1 for every class that labels at least one patch."""
  hot = np.zeros((tokens.shape[0], num_classes + 1), np.float32)
  np.put_along_axis(hot, tokens, 1.0, axis=1)
  return hot[:, :num_classes]


def paint(layouts, masks, density, owner) -> np.ndarray:
  """uint8 [B, H, W, 3]: background, then each instance's colour shaded by its point density."""
  image = np.stack([lay.background for lay in layouts])
  colours = np.stack([lay.colour for lay in layouts])                    # [B, I, 3]
  shade = 0.6 + 0.4 * density / np.maximum(density.max(axis=(2, 3), keepdims=True), 1.0)
  slot = np.maximum(owner, 0)[:, None]                                   # [B, 1, H, W]
  own_shade = np.take_along_axis(shade, slot, axis=1)[:, 0]
  own_colour = np.take_along_axis(colours[:, :, None, None, :], slot[..., None], axis=1)[:, 0]
  image = np.where((owner >= 0)[..., None], own_colour * own_shade[..., None], image)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def render_layouts(clouds, layouts, spec: FractalSpec) -> dict:
  """images uint8 [B, H, W, 3], tokens int32 [B, n], labels float32 [B, C], owner [B, H, W]."""
  masks, density = instance_masks(clouds, layouts, spec)
  owner = owners(masks)
  classes = np.stack([lay.classes for lay in layouts])
  tokens = patch_labels(owner, classes, spec).astype(np.int32)
  return {"images": paint(layouts, masks, density, owner), "tokens": tokens,
          "labels": multi_hot(tokens, spec.num_classes), "owner": owner}


class FractalRenderer:
  """Batches of fractal images; `batch(seed, step, size)` is a pure function of its arguments."""

  def __init__(self, spec: FractalSpec):
    self.spec = spec
    self.clouds = class_point_clouds(spec.num_classes, spec.points_per_class, spec.seed)

  def background_share(self, tokens) -> np.ndarray:
    return (tokens == self.spec.num_classes).mean(axis=1)

  def batch(self, seed: int, step: int, size: int) -> dict:
    low, high = self.spec.background_share
    attempt = np.zeros(size, int)
    layouts = [draw_layout(np.random.default_rng([seed, step, i, 0]), self.spec) for i in range(size)]
    out = render_layouts(self.clouds, layouts, self.spec)
    for _ in range(MAX_ATTEMPTS):  # redraw only the images out of range, all of them at once
      share = self.background_share(out["tokens"])
      redo = np.flatnonzero((share < low) | (share > high))
      if not len(redo):
        break
      attempt[redo] += 1
      layouts = [draw_layout(np.random.default_rng([seed, step, i, attempt[i]]), self.spec) for i in redo]
      again = render_layouts(self.clouds, layouts, self.spec)
      for key in out:
        out[key][redo] = again[key]
    return {k: v for k, v in out.items() if k != "owner"}


class Prefetcher:
  """Renders the batches of steps start, start+1, ... in a background thread, `depth` ahead."""

  def __init__(self, render_step, start: int, stop: int, depth: int = 4):
    self._queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(render_step, start, stop), daemon=True)
    self._thread.start()

  def _run(self, render_step, start, stop):
    for step in range(start, stop):
      try:
        item = (step, render_step(step), None)
      except Exception as e:  # noqa: BLE001 (handed to the consumer, raised there)
        item = (step, None, e)
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if self._stop.is_set() or item[2] is not None:
        return

  def get(self, step: int):
    got, batch, error = self._queue.get()
    if error is not None:
      raise error
    assert got == step, (got, step)
    return batch

  def close(self):
    self._stop.set()
    self._thread.join(timeout=5)
