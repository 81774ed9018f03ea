"""Patch-grid geometry shared by inversion (jitter) and distillation (augmentation).

Shifts are whole patches, so an augmented image is exactly a permutation of the original's
patches: the kept-token set, masks and per-token labels move with the pixels by index
arithmetic, and a frozen (dropped) patch never receives gradient through a neighbour.
"""
import jax
import jax.numpy as jnp


def roll_flip(image, shift_rows, shift_cols, flip, patch_size):
  """[H, W, C] image rolled by whole patches, then optionally flipped left-right."""
  out = jnp.roll(image, (shift_rows * patch_size, shift_cols * patch_size), axis=(0, 1))
  return jnp.where(flip, out[:, ::-1], out)


def moved_index(index, shift_rows, shift_cols, flip, grid):
  """Where patch `index` (row-major in a grid x grid image) lands after `roll_flip`."""
  row = (index // grid + shift_rows) % grid
  col = (index % grid + shift_cols) % grid
  col = jnp.where(flip, grid - 1 - col, col)
  return row * grid + col


def random_roll_flip(rng, images, keep_idx, *, patch_size, max_shift, flip=True):
  """Per-image random patch-aligned roll in [-max_shift, max_shift] patches and flip.

  Returns the augmented images and, for each kept patch of the original, its position in the
  augmented image: feed that as the model's `keep_idx` and token outputs come back in the order
  of `keep_idx`, so labels and masks of the original need no permuting.
  """
  batch, height = images.shape[0], images.shape[1]
  grid = height // patch_size
  shift_rng, flip_rng = jax.random.split(rng)
  shifts = jax.random.randint(shift_rng, (batch, 2), -max_shift, max_shift + 1)
  flips = jax.random.bernoulli(flip_rng, 0.5, (batch,)) & flip
  augmented = jax.vmap(lambda im, s, f: roll_flip(im, s[0], s[1], f, patch_size))(images, shifts, flips)
  positions = jax.vmap(lambda idx, s, f: moved_index(idx, s[0], s[1], f, grid))(keep_idx, shifts, flips)
  return augmented, positions


def patch_pixel_mask(keep_mask, image_size, patch_size):
  """[B, N] bool patch mask -> [B, H, W, 1] float pixel mask."""
  grid = image_size // patch_size
  m = keep_mask.reshape(keep_mask.shape[0], grid, 1, grid, 1)
  m = jnp.broadcast_to(m, (keep_mask.shape[0], grid, patch_size, grid, patch_size))
  return m.reshape(keep_mask.shape[0], image_size, image_size, 1).astype(jnp.float32)


def index_to_mask(keep_idx, num_patches):
  """[B, n] kept indices -> [B, N] bool mask."""
  return jnp.zeros((keep_idx.shape[0], num_patches), bool).at[
      jnp.arange(keep_idx.shape[0])[:, None], keep_idx].set(True)
