"""Image resizing and augmentation as pure, jittable functions of (rng, images)."""
import jax
import jax.numpy as jnp


def resize_to(images, image_size):
  """[B, h, w, C] -> [B, image_size, image_size, C], bilinear, float32 in the input's 0-255 range.

  Where images enter a model, inside its jitted step: datasets keep CIFAR-10 at 32 px in host memory
  and only each batch is upsampled (224 px: 7.5 GB of training set would be 150 MB). Images already
  at image_size (or image_size None) pass through unchanged, so 32-px runs see the same numbers.
  """
  if image_size is None or images.shape[1:3] == (image_size, image_size):
    return images
  shape = (images.shape[0], image_size, image_size, images.shape[-1])
  return jax.image.resize(images.astype(jnp.float32), shape, method="bilinear")


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
