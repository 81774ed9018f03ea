"""A Flax (Linen) Vision Transformer that can drop tokens and return what FedMITR needs.

Compared with a plain ViT it (1) accepts `keep_idx`, the indices of the patch tokens to forward,
gathered *after* the position embedding is added so kept tokens keep their positions (SMI);
(2) returns per-token logits, the classifier head applied to every patch token (token relabel);
(3) returns the last block's CLS-to-patch attention, averaged over heads, on request (the score
sparse inversion ranks patches by). Shapes are static for a given number of kept tokens.
"""
import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# size name -> (width, depth, heads, mlp_dim). Ti/S/B follow ViT/DeiT; the rest are for 32-px CPU
# work ('Mi' and 'Sm' are the width-128/depth-4 and width-192/depth-6 models of the
# performance benchmarks, benchmarks/README.md) and tests.
SIZES = {
    "test": (32, 2, 2, 64),
    "Mu": (64, 3, 2, 128),
    "Mi": (128, 4, 4, 256),
    "Sm": (192, 6, 3, 768),
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
}


@dataclasses.dataclass(frozen=True)
class ViTSpec:
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int


def parse_variant(variant: str) -> ViTSpec:
  match = re.fullmatch(r"(\w+)/(\d+)", variant)
  if not match or match.group(1) not in SIZES:
    raise ValueError(f"model.variant: '{variant}' is not '<size>/<patch>' with size in "
                     f"{sorted(SIZES)}; use e.g. --config.model.variant=Mi/4")
  return ViTSpec(*SIZES[match.group(1)], patch_size=int(match.group(2)))


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x)
    x = nn.gelu(x)
    return nn.Dense(width, dtype=self.dtype, name="fc2")(x)


class SelfAttention(nn.Module):
  """Multi-head self-attention that can hand back its softmax weights."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, return_weights: bool = False):
    batch, length, width = x.shape
    head_dim = width // self.num_heads
    # One fused projection for q, k and v: one matmul instead of three.
    qkv = nn.DenseGeneral((3, self.num_heads, head_dim), dtype=self.dtype, name="qkv")(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, L, H, Dh]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(self.dtype)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    out = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="out")(out)
    return out, (weights if return_weights else None)


class EncoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, return_weights: bool = False):
    y, weights = SelfAttention(self.num_heads, self.dtype, name="attn")(
        nn.LayerNorm(dtype=self.dtype, name="ln1")(x), return_weights)
    x = x + y
    x = x + MlpBlock(self.mlp_dim, self.dtype, name="mlp")(nn.LayerNorm(dtype=self.dtype, name="ln2")(x))
    return x, weights


class ViT(nn.Module):
  """Pre-LN ViT with a CLS token and learned position embeddings.

  __call__ returns `(cls_logits, out)`; `out` names intermediates:
    token_logits  [B, n, C]  head applied to each kept patch token (`token_head` if separate)
    tokens        [B, n, D]  final-LayerNorm patch tokens
    cls_attention [B, n]     last block CLS->patch attention, mean over heads (only when asked)
  """
  num_classes: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  separate_token_head: bool = False  # LV-ViT-style auxiliary head for the student
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, keep_idx=None, return_attention: bool = False):
    x = nn.Conv(self.width, (self.patch_size, self.patch_size), strides=self.patch_size,
                padding="VALID", dtype=self.dtype, name="embedding")(images)
    batch, gh, gw, width = x.shape
    x = x.reshape(batch, gh * gw, width)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, gh * gw, width))
    x = x + pos.astype(self.dtype)
    if keep_idx is not None:  # drop tokens after the position embedding: kept ones keep their place
      x = jnp.take_along_axis(x, keep_idx[..., None].astype(jnp.int32), axis=1)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, width)).astype(self.dtype), x], axis=1)

    weights = None
    for i in range(self.depth):
      last = i == self.depth - 1
      x, weights = EncoderBlock(self.num_heads, self.mlp_dim, self.dtype, name=f"block{i}")(
          x, return_weights=return_attention and last)
    x = nn.LayerNorm(dtype=self.dtype, name="ln_final")(x)

    head = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="head")
    cls_logits = head(x[:, 0])
    token_head = head
    if self.separate_token_head:
      token_head = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                            name="token_head")
    out = {"tokens": x[:, 1:], "token_logits": token_head(x[:, 1:]).astype(jnp.float32)}
    if return_attention:
      out["cls_attention"] = weights[:, :, 0, 1:].astype(jnp.float32).mean(axis=1)
    return cls_logits.astype(jnp.float32), out


# model.dtype -> the compute dtype. Parameters, softmax and logits stay float32 either way (the
# big_vision recipe for bf16 on TPUs/GPUs); only matmul and conv inputs and activations change.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"model.dtype: '{name}' is unknown; use one of {sorted(COMPUTE_DTYPES)}")
  return COMPUTE_DTYPES[name]


def build_vit(variant: str, num_classes: int, *, image_size: int, separate_token_head=False,
              dtype=jnp.float32) -> ViT:
  spec = parse_variant(variant)
  if image_size % spec.patch_size:
    raise ValueError(f"dataset.image_size: {image_size} is not divisible by the patch size "
                     f"{spec.patch_size} of model.variant '{variant}'; change one of them")
  return ViT(num_classes=num_classes, width=spec.width, depth=spec.depth, num_heads=spec.num_heads,
             mlp_dim=spec.mlp_dim, patch_size=spec.patch_size,
             separate_token_head=separate_token_head, dtype=dtype)


def num_patches(variant: str, image_size: int) -> int:
  return (image_size // parse_variant(variant).patch_size) ** 2


def init_params(model: ViT, rng, image_size: int):
  return model.init(rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32))["params"]
