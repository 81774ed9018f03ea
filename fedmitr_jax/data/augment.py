"""Image augmentation as pure, jittable functions of (rng, images)."""
import jax
import jax.numpy as jnp


def random_crop_flip(rng, images, padding: int):
  """Random crop after `padding` pixels of zero padding, then a random horizontal flip.

  images: [B, H, W, C] (any dtype). Zero padding on the uint8 image is black, as torchvision's
  RandomCrop(padding) does before normalisation.
  """
  batch, height, width, _ = images.shape
  crop_rng, flip_rng = jax.random.split(rng)
  offsets = jax.random.randint(crop_rng, (batch, 2), 0, 2 * padding + 1)
  flips = jax.random.bernoulli(flip_rng, 0.5, (batch,))
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

  def one(image, offset, flip):
    crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, image.shape[-1]))
    return jnp.where(flip, crop[:, ::-1], crop)

  return jax.vmap(one)(padded, offsets, flips)
