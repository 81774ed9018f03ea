"""Fractal images: seeded, labelled exactly per patch, and drawn from always-converging systems."""
import dataclasses

import numpy as np
import pytest

from fedmitr_jax.data import fractal

SPEC = fractal.FractalSpec(num_classes=12, image_size=32, patch_size=4, points_per_class=1024,
                           max_instances=3, seed=3)


@pytest.fixture(scope="module")
def renderer():
  return fractal.FractalRenderer(SPEC)


def test_same_seed_same_pixels_and_labels(renderer):
  again = fractal.FractalRenderer(SPEC)  # class systems rebuilt from the seed, too
  a, b = renderer.batch(5, 17, 12), again.batch(5, 17, 12)
  for key in ("images", "tokens", "labels"):
    np.testing.assert_array_equal(a[key], b[key])
  # Image i is a function of (seed, step, i) alone: a smaller batch is a prefix of a larger one.
  prefix = renderer.batch(5, 17, 5)
  np.testing.assert_array_equal(prefix["images"], a["images"][:5])
  np.testing.assert_array_equal(prefix["tokens"], a["tokens"][:5])
  assert not np.array_equal(renderer.batch(5, 18, 12)["images"], a["images"])
  assert not np.array_equal(renderer.batch(6, 17, 12)["images"], a["images"])


def test_batch_shapes_and_multi_hot_follow_tokens(renderer):
  out = renderer.batch(0, 0, 16)
  assert out["images"].shape == (16, 32, 32, 3) and out["images"].dtype == np.uint8
  assert out["tokens"].shape == (16, 64) and out["tokens"].dtype == np.int32
  assert out["labels"].shape == (16, SPEC.num_classes)
  for tokens, hot in zip(out["tokens"], out["labels"]):
    assert set(np.flatnonzero(hot)) == set(tokens[tokens < SPEC.num_classes].tolist())


def test_background_share_stays_in_the_configured_range():
  spec = dataclasses.replace(SPEC, background_share=(0.4, 0.7))
  r = fractal.FractalRenderer(spec)
  shares = np.concatenate([r.background_share(r.batch(1, s, 32)["tokens"]) for s in range(4)])
  assert shares.min() >= 0.4 and shares.max() <= 0.7
  assert shares.std() > 0.02  # a range, not one value


def _layout(classes, origins, sizes, size=32):
  slots = len(classes)
  return fractal.Layout(active=np.ones(slots, bool), classes=np.array(classes),
                        origin=np.array(origins, float), size=np.array(sizes, float),
                        flip=np.zeros((slots, 2), bool), transpose=np.zeros(slots, bool),
                        colour=np.full((slots, 3), 200.0), background=np.zeros((size, size, 3)))


def test_square_instances_label_exactly_the_patches_they_dominate():
  # Clouds that fill the unit square: instance k covers exactly its box [origin, origin + size).
  grid = (np.stack(np.meshgrid(np.arange(64), np.arange(64), indexing="ij"), -1).reshape(-1, 2) + 0.5) / 64
  clouds = np.stack([grid] * 8).astype(np.float32)
  spec = dataclasses.replace(SPEC, num_classes=8, max_instances=2, patch_threshold=0.5)
  # class 3 covers pixel rows/cols 0..15; class 6 is painted over it on rows/cols 9..23.
  out = fractal.render_layouts(clouds, [_layout([3, 6], [(0, 0), (9, 9)], [16, 15])], spec)
  tokens = out["tokens"][0].reshape(8, 8)
  expected = np.full((8, 8), 8)  # background
  expected[:4, :4] = 3
  # Patches 2..5 span pixels 8..23. Class 6 owns 3x3 of patch (2, 2)'s pixels (9 >= 8 of 16),
  # 3 of 4 rows (or columns) of the other edge patches and all of the inner ones.
  expected[2:6, 2:6] = 6
  np.testing.assert_array_equal(tokens, expected)
  assert (out["owner"][0, :9, :9] == 0).all() and (out["owner"][0, 9:24, 9:24] == 1).all()
  assert (out["owner"][0, 24:] == -1).all() and (out["owner"][0, 16:, :9] == -1).all()
  assert (out["images"][0][out["owner"][0] < 0] == 0).all()


def test_fractal_instances_labels_match_an_independent_count(renderer):
  """Real fractal clouds, random layouts: each instance is rendered alone, ownership is rebuilt in
  painting order and every patch is counted in plain Python."""
  rng = np.random.default_rng(0)
  layouts = [fractal.draw_layout(rng, SPEC) for _ in range(6)]
  out = fractal.render_layouts(renderer.clouds, layouts, SPEC)
  p, grid, need = SPEC.patch_size, 8, SPEC.patch_threshold * 16
  for b, layout in enumerate(layouts):
    owner = np.full((32, 32), -1)
    for k in range(SPEC.max_instances):
      if not layout.active[k]:
        continue
      alone = dataclasses.replace(layout, active=np.arange(SPEC.max_instances) == k)
      mask = fractal.render_layouts(renderer.clouds, [alone], SPEC)["owner"][0] == k
      owner[mask] = k  # later instances are painted over earlier ones
    np.testing.assert_array_equal(out["owner"][b], owner)
    for i in range(grid):
      for j in range(grid):
        cell = owner[i * p:(i + 1) * p, j * p:(j + 1) * p]
        counts = [(cell == k).sum() for k in range(SPEC.max_instances)]
        best = int(np.argmax(counts))
        want = layout.classes[best] if counts[best] >= need else SPEC.num_classes
        assert out["tokens"][b, i * grid + j] == want, (b, i, j, counts)
  assert (out["tokens"] < SPEC.num_classes).any() and (out["tokens"] == SPEC.num_classes).any()


def test_systems_follow_the_sigma_factor_parameterisation():
  for seed in range(20):
    rng = np.random.default_rng(seed)
    num_maps = int(rng.integers(2, 5))
    sigma = rng.uniform((5 + num_maps) / 2, (6 + num_maps) / 2)
    values = fractal.sample_singular_values(rng, num_maps, sigma)
    assert np.isclose((values[:, 0] + 2 * values[:, 1]).sum(), sigma)
    assert (values[:, 1] >= 0).all() and (values[:, 1] <= values[:, 0] + 1e-12).all()
    assert (values[:, 0] <= 1 + 1e-12).all()
    a, b, p = fractal.sample_system(np.random.default_rng(seed))
    used = p > 0
    assert 2 <= used.sum() <= 4 and np.isclose(p.sum(), 1)
    assert (np.linalg.norm(a[used], ord=2, axis=(1, 2)) <= 1 + 1e-9).all()  # no map expands
    np.testing.assert_allclose(p[used], np.maximum(abs(np.linalg.det(a[used])), 1e-6) /
                               np.maximum(abs(np.linalg.det(a[used])), 1e-6).sum())


def test_class_clouds_lie_in_the_unit_square_and_differ():
  clouds = fractal.class_point_clouds(4, 512, seed=1)
  assert clouds.shape == (4, 512, 2) and clouds.min() >= -1e-6 and clouds.max() <= 1 + 1e-6
  assert np.isfinite(clouds).all()
  assert not np.allclose(clouds[0], clouds[1])
