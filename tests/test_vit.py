import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmitr_jax.models import vit


@pytest.mark.parametrize("variant,image_size,classes,expected", [
    # Pinned. Ti/S/B equal timm's deit/vit counts minus the CLS position embedding (width),
    # which this ViT folds into the CLS token, as big_vision does.
    ("Ti/16", 224, 1000, 5_717_416 - 192),
    ("S/16", 224, 1000, 22_050_664 - 384),
    ("B/16", 224, 1000, 86_567_656 - 768),
    ("Mi/4", 32, 10, 546_058),
    ("Mu/4", 32, 10, 108_490),
    ("test/4", 32, 10, 21_130),
])
def test_parameter_counts(variant, image_size, classes, expected):
  model = vit.build_vit(variant, classes, image_size=image_size)
  shapes = jax.eval_shape(lambda: vit.init_params(model, jax.random.key(0), image_size))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == expected


def test_outputs_and_attention_shapes():
  model = vit.build_vit("test/4", 7, image_size=16)
  params = vit.init_params(model, jax.random.key(0), 16)
  logits, out = model.apply({"params": params}, jnp.ones((3, 16, 16, 3)), return_attention=True)
  assert logits.shape == (3, 7)
  assert out["token_logits"].shape == (3, 16, 7) and out["tokens"].shape == (3, 16, 32)
  # The CLS row sums to 1 over CLS + patches; the patch part alone is positive and below 1.
  patch_mass = out["cls_attention"].sum(-1)
  assert out["cls_attention"].shape == (3, 16)
  assert bool(jnp.all(out["cls_attention"] > 0)) and bool(jnp.all(patch_mass < 1.0))


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_outputs_close_to_float32():
  """model.dtype='bfloat16': same parameters, bf16 activations; logits, token logits and the
  attention scores come back float32 and agree with the float32 model to bf16 precision."""
  params = vit.init_params(vit.build_vit("test/4", 5, image_size=16), jax.random.key(3), 16)
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(4), p.shape), params)
  images = jax.random.uniform(jax.random.key(5), (4, 16, 16, 3), minval=-1, maxval=1)
  outputs = {}
  for name in ("float32", "bfloat16"):
    model = vit.build_vit("test/4", 5, image_size=16, dtype=vit.compute_dtype(name))
    outputs[name] = model.apply({"params": params}, images, return_attention=True)
  (full_logits, full), (half_logits, half) = outputs["float32"], outputs["bfloat16"]
  assert half_logits.dtype == half["token_logits"].dtype == half["cls_attention"].dtype == jnp.float32
  assert half["tokens"].dtype == jnp.bfloat16  # the activations really are bf16
  np.testing.assert_allclose(half_logits, full_logits, atol=0.05)
  np.testing.assert_allclose(half["token_logits"], full["token_logits"], atol=0.05)
  np.testing.assert_allclose(half["cls_attention"], full["cls_attention"], atol=0.01)
  assert not np.allclose(half_logits, full_logits, atol=1e-6)  # ... and not silently float32


def test_keep_idx_forwards_only_kept_tokens_at_their_positions():
  model = vit.build_vit("test/4", 5, image_size=16)
  params = vit.init_params(model, jax.random.key(1), 16)
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)
  images = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
  keep = jnp.array([[0, 3, 9], [2, 5, 15]])
  logits, out = model.apply({"params": params}, images, keep_idx=keep)
  assert out["token_logits"].shape == (2, 3, 5)
  # Same answer as the full model when every token is kept but in another order (positions kept).
  perm = jnp.array([[15 - i for i in range(16)]] * 2)
  full_logits, _ = model.apply({"params": params}, images)
  perm_logits, perm_out = model.apply({"params": params}, images, keep_idx=perm)
  np.testing.assert_allclose(full_logits, perm_logits, rtol=1e-4, atol=1e-5)
  # Changing a dropped patch's pixels changes nothing when it is not forwarded.
  changed = images.at[0, 4:8, 4:8].set(5.0)  # patch index 5 of a 4x4 grid, not kept in image 0
  logits2, _ = model.apply({"params": params}, changed, keep_idx=keep)
  np.testing.assert_allclose(logits[0], logits2[0], rtol=1e-6)


def test_bad_variant_and_image_size():
  with pytest.raises(ValueError, match="model.variant"):
    vit.parse_variant("Huge/4")
  with pytest.raises(ValueError, match="dataset.image_size"):
    vit.build_vit("test/5", 10, image_size=32)
