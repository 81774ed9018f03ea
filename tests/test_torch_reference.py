"""The PyTorch reference of benchmarks/torch_reference.py computes what our JAX code computes.

Skipped without torch (a benchmark-only dependency; CI does not install it). Eager PyTorch only:
torch.compile takes minutes on this CPU, and it compiles these same functions.
"""
import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fedmitr_jax import config_base  # noqa: E402
from fedmitr_jax.models import patches
from fedmitr_jax.models import vit  # noqa: E402
from fedmitr_jax.server import distill, inversion

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "torch_reference.py"
_spec = importlib.util.spec_from_file_location("torch_reference", _PATH)
tr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tr)

IMAGE, CLASSES, BATCH = 16, 5, 4  # 'test/4': width 32, depth 2, 2 heads; 16 patches


def _models(separate_token_head=False, seed=0):
  """Our ViT with every parameter randomised (the heads start at zero) and its torch copy."""
  model, init, _ = _flax(separate_token_head)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda x: (x + 0.3 * rng.normal(size=x.shape)).astype(np.float32),
                        jax.device_get(init(jax.random.key(seed))))
  torch_model = tr.build("test/4", CLASSES, image_size=IMAGE, separate_token_head=separate_token_head)
  return model, params, torch_model.load_from_flax(params)


@functools.lru_cache(maxsize=None)
def _flax(separate_token_head):
  """(model, jitted init, jitted apply), compiled once per model for the whole file."""
  model = vit.build_vit("test/4", CLASSES, image_size=IMAGE, separate_token_head=separate_token_head)
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, IMAGE, IMAGE, 3)))["params"])
  apply = jax.jit(lambda p, x, k: model.apply({"params": p}, x, keep_idx=k, return_attention=True))
  return model, init, apply


def _images(seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (BATCH, IMAGE, IMAGE, 3)).astype(np.float32)


@pytest.mark.parametrize("separate_token_head", [False, True])
@pytest.mark.parametrize("tokens", [None, 7])
def test_forward_matches_flax(separate_token_head, tokens):
  model, params, torch_model = _models(separate_token_head)
  images = _images()
  keep_idx = None
  if tokens is not None:  # a different random subset per image, not sorted
    rng = np.random.default_rng(1)
    keep_idx = np.stack([rng.permutation(16)[:tokens] for _ in range(BATCH)]).astype(np.int32)
  logits, out = _flax(separate_token_head)[2](params, images, keep_idx)
  t_images, t_keep = tr.to_nchw(images), None if keep_idx is None else torch.from_numpy(keep_idx).long()
  with torch.no_grad():
    t_logits, t_tokens, t_attn = torch_model(t_images, t_keep, return_attention=True)
    t_cls_only = torch_model(t_images, t_keep, return_tokens=False)[0]  # SDPA in every block
  np.testing.assert_allclose(t_logits.numpy(), logits, atol=1e-4)
  np.testing.assert_allclose(t_cls_only.numpy(), logits, atol=1e-4)
  np.testing.assert_allclose(t_tokens.numpy(), out["token_logits"], atol=1e-4)
  np.testing.assert_allclose(t_attn.numpy(), out["cls_attention"], atol=1e-5)


def test_roll_flip_and_moved_index_match_patches():
  images = _images()
  shifts = np.array([[1, -1], [0, 0], [-1, 1], [1, 1]], np.int32)
  flips = np.array([True, False, False, True])
  index = np.tile(np.arange(16, dtype=np.int32), (BATCH, 1))
  ours = jax.vmap(lambda im, s, f: patches.roll_flip(im, s[0], s[1], f, 4))(images, shifts, flips)
  moved = jax.vmap(lambda i, s, f: patches.moved_index(i, s[0], s[1], f, 4))(index, shifts, flips)
  t_shifts, t_flips = torch.from_numpy(shifts).long(), torch.from_numpy(flips)
  np.testing.assert_array_equal(tr.roll_flip(tr.to_nchw(images), t_shifts, t_flips, 4).numpy(),
                                np.asarray(ours).transpose(0, 3, 1, 2))
  t_moved = tr.moved_index(torch.from_numpy(index).long(), t_shifts, t_flips, 4)
  np.testing.assert_array_equal(t_moved.numpy(), moved)


def _bank(seed=0):
  rng = np.random.default_rng(seed)
  return {"images": _images(seed), "labels": (np.arange(BATCH) % CLASSES).astype(np.int32),
          "masks": rng.random((BATCH, 16)) < 0.3,
          "teacher_logits": rng.normal(size=(BATCH, 3, CLASSES)).astype(np.float32),
          "token_probs": rng.dirichlet(np.ones(CLASSES), (BATCH, 16)).astype(np.float32)}


def _torch_batch(bank):
  batch = {k: torch.from_numpy(np.asarray(v)) for k, v in bank.items()}
  batch["images"], batch["labels"] = tr.to_nchw(bank["images"]), batch["labels"].long()
  return batch


@pytest.mark.parametrize("relabel_target", ["token", "image"])
def test_distill_step_loss_matches_relabel_loss(relabel_target):
  model, params, torch_model = _models(separate_token_head=True)
  bank = _bank()
  logits, out = _flax(True)[2](params, bank["images"], None)
  want, _ = distill.relabel_loss(logits, out["token_logits"], bank, tau=4.0, beta=0.5,
                                 relabel_target=relabel_target)
  # No augmentation, so the student sees the bank's images in the bank's order, as ours does here.
  step = tr.make_distill_step(torch_model, relabel_target=relabel_target, max_shift=0, flip=False)
  batch = _torch_batch(bank)
  before = [p.detach().clone() for p in torch_model.parameters()]
  loss = step(batch)
  np.testing.assert_allclose(loss.item(), float(want), rtol=1e-5)
  assert all(not torch.equal(a, b) for a, b in zip(before, torch_model.parameters()))  # it trained
  assert torch.isfinite(step(batch))  # the augmented path runs too
  step = tr.make_distill_step(torch_model, relabel_target=relabel_target)
  assert torch.isfinite(step(batch))


def test_client_step_loss_matches_ce():
  model, params, torch_model = _models()
  images_u8 = np.random.default_rng(0).integers(0, 255, (BATCH, IMAGE, IMAGE, 3)).astype(np.uint8)
  labels = np.arange(BATCH) % CLASSES
  mask = np.array([True, True, True, False])
  logits, _ = _flax(False)[2](params, images_u8.astype(np.float32) / 127.5 - 1.0, None)
  log_p = jax.nn.log_softmax(logits)
  want = -np.sum(np.take_along_axis(np.asarray(log_p), labels[:, None], 1)[:, 0] * mask) / mask.sum()
  step = tr.make_client_step(torch_model, crop_padding=0, flip=False)
  loss = step(tr.to_nchw(images_u8), torch.from_numpy(labels), torch.from_numpy(mask))
  np.testing.assert_allclose(loss.item(), want, rtol=1e-5)


def test_inversion_step_matches_ours_and_freezes_dropped_patches():
  teachers = [_models(seed=s) for s in (0, 10)]
  model = teachers[0][0]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[p for _, p, _ in teachers])
  cfg = config_base.base_config().inversion
  cfg.jitter_patches, cfg.flip = 0, False  # no jitter: the random draws of the two libraries differ
  state = inversion.init_state(cfg, jax.random.key(0), BATCH, IMAGE, 16)
  keep_idx = np.stack([np.sort(np.random.default_rng(b).permutation(16)[:6]) for b in range(BATCH)])
  state = state.replace(keep_idx=jnp.asarray(keep_idx, jnp.int32))
  labels = np.arange(BATCH) % CLASSES
  weights = jnp.full((2,), 1 / 2)
  _, metrics = jax.jit(inversion.make_inversion_step(model, cfg, IMAGE))(
      state, jnp.asarray(labels), stacked, weights, jax.random.key(1))

  step, t_state = tr.make_inversion_step(
      [t for _, _, t in teachers], torch.from_numpy(labels), torch.from_numpy(keep_idx).long(),
      pixels=tr.to_nchw(state.pixels), image_size=IMAGE, max_shift=0, flip=False)
  start = t_state.pixels.detach().clone()
  np.testing.assert_allclose(step().item(), float(metrics["loss"]), rtol=1e-5)
  step, t_state = tr.make_inversion_step(
      [t for _, _, t in teachers], torch.from_numpy(labels), torch.from_numpy(keep_idx).long(),
      pixels=start, image_size=IMAGE)
  for _ in range(3):  # with jitter now: frozen patches must not move at all, kept ones must
    step()
  kept = tr.patch_pixel_mask(torch.from_numpy(keep_idx).long(), 16, IMAGE, 4).expand_as(start)
  pixels = t_state.pixels.detach()
  assert torch.equal(pixels[~kept], start[~kept])
  assert not torch.equal(pixels[kept], start[kept])
  assert torch.isfinite(t_state.best_ce).all()
