r"""What we tried to make the training (distillation) step faster, measured side by side.

  python benchmarks/step_variants.py [--variant Mi/4] [--rounds 2]

Prints one JSON line per variant: `{"variant", "model", "ms", "vs_current"}` (the best of `--rounds`
alternating rounds; vs_current > 1 means faster than the model as shipped), then a table.
Model variants are swapped in for the run only, by replacing names in `fedmitr_jax.models.vit`,
so every variant computes the same function (checked: same loss to 1e-4) on the same batch:

  current      the shipped ViT (fused qkv DenseGeneral, einsum attention, flax Dense/LayerNorm)
  dpa          attention by jax.nn.dot_product_attention (implementation="xla")
  head_major   q, k, v produced head-major by one einsum, no transposes around the attention dots
  colsum_2d    Dense and LayerNorm on 2-D [tokens, width] views, bias/scale gradients by a custom
               VJP with a two-level column sum (the profile's reduce-window ops)
  bf16         the shipped ViT with model.dtype='bfloat16' (not the same function: bf16 activations)

Every variant is timed in a fresh subprocess, the XLA flag variants with the shipped model and
their flag added (flags are read at backend start):
  no_tree_reduction        --xla_disable_hlo_passes=tree_reduction_rewriter
  vector_width_512         --xla_cpu_prefer_vector_width=512
  concurrency_scheduler    --xla_cpu_enable_concurrency_optimized_scheduler=true
and `one_core` runs it pinned to one CPU (taskset), which says how much of the step scales.
"""
import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import run as bench  # noqa: E402
from fedmitr_jax import config_base  # noqa: E402
from fedmitr_jax.models import vit  # noqa: E402
from fedmitr_jax.server import distill

FLAG_VARIANTS = {
    "no_tree_reduction": "--xla_disable_hlo_passes=tree_reduction_rewriter",
    "vector_width_512": "--xla_cpu_prefer_vector_width=512",
    "concurrency_scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
}


# ---- attention variants (same parameters as vit.SelfAttention) ------------------------------
class DotProductAttention(nn.Module):
  num_heads: int
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, return_weights: bool = False):
    if return_weights:  # the weights are not exposed by jax.nn.dot_product_attention
      return vit.SelfAttention(self.num_heads, self.dtype, name="fallback")(x, True)
    width = x.shape[-1]
    qkv = nn.DenseGeneral((3, self.num_heads, width // self.num_heads), dtype=self.dtype, name="qkv")(x)
    out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], implementation="xla")
    return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="out")(out), None


class HeadMajorAttention(nn.Module):
  num_heads: int
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, return_weights: bool = False):
    width = x.shape[-1]
    head_dim = width // self.num_heads
    init = nn.initializers.lecun_normal(batch_axis=())
    qkv_kernel = self.param("qkv_kernel", init, (width, 3, self.num_heads, head_dim))
    qkv_bias = self.param("qkv_bias", nn.initializers.zeros, (3, self.num_heads, head_dim))
    out_kernel = self.param("out_kernel", init, (self.num_heads, head_dim, width))
    out_bias = self.param("out_bias", nn.initializers.zeros, (width,))
    qkv = jnp.einsum("bld,dthe->tbhle", x, qkv_kernel) + qkv_bias[:, None, :, None, :]
    logits = jnp.einsum("bhqe,bhke->bhqk", qkv[0] / np.sqrt(head_dim), qkv[1])
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bhke->bhqe", weights, qkv[2])
    return jnp.einsum("bhqe,hed->bqd", out, out_kernel) + out_bias, (weights if return_weights else None)


# ---- 2-D Dense / LayerNorm with a two-level column sum for the bias and scale gradients ------
def column_sum(g):
  rows = g.shape[0]
  for chunk in (64, 32, 16):
    if rows % chunk == 0:
      return g.reshape(rows // chunk, chunk, -1).sum(1).sum(0)
  return g.sum(0)


@jax.custom_vjp
def add_bias(y, b):
  return y + b


add_bias.defvjp(lambda y, b: (y + b, None), lambda _, g: (g, column_sum(g)))


@jax.custom_vjp
def scale_shift(x, s, b):
  return x * s + b


scale_shift.defvjp(lambda x, s, b: (x * s + b, (x, s)),
                   lambda res, g: (g * res[1], column_sum(g * res[0]), column_sum(g)))


class Dense2D(nn.Module):
  features: int
  dtype: object = jnp.float32
  kernel_init: object = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    y = add_bias(x.reshape(-1, x.shape[-1]) @ kernel, bias)
    return y.reshape(*x.shape[:-1], self.features)


class LayerNorm2D(nn.Module):
  epsilon: float = 1e-6
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (width,))
    bias = self.param("bias", nn.initializers.zeros, (width,))
    x2 = x.reshape(-1, width)
    mean = x2.mean(-1, keepdims=True)
    normed = (x2 - mean) * jax.lax.rsqrt(jnp.square(x2 - mean).mean(-1, keepdims=True) + self.epsilon)
    return scale_shift(normed, scale, bias).reshape(x.shape)


class _NnWith2D:
  """`flax.linen` as vit.py sees it, with Dense and LayerNorm replaced (benchmark only)."""
  def __getattr__(self, name):
    return {"Dense": Dense2D, "LayerNorm": LayerNorm2D}.get(name) or getattr(nn, name)


def use_model_variant(name):
  vit.SelfAttention = {"dpa": DotProductAttention, "head_major": HeadMajorAttention}.get(name, ORIGINAL_ATTENTION)
  vit.nn = _NnWith2D() if name == "colsum_2d" else nn
  jax.clear_caches()


ORIGINAL_ATTENTION = vit.SelfAttention
MODEL_VARIANTS = ("current", "dpa", "head_major", "colsum_2d", "bf16")


def first_loss(variant):
  """The loss of one step from a fixed init: the variants must compute the same function."""
  model = vit.build_vit(variant, bench.CLASSES, image_size=bench.IMAGE, separate_token_head=True)
  params = vit.init_params(model, jax.random.key(0), bench.IMAGE)
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(1), p.shape), params)
  cfg = config_base.base_config().distill
  tx = distill.make_optimizer(cfg, 1000)
  state = distill.StudentState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))
  _, metrics = jax.jit(distill.make_distill_step(model, tx, cfg))(
      state, bench.distill_batch(vit.num_patches(variant, bench.IMAGE)), jax.random.key(0))
  return float(metrics["loss"])


def measure_in_subprocess(name, args):
  """One variant's step time in a fresh process: in one long process the variants' timings
  drifted (the shipped model measured 35% slower after the others had run), so none share one."""
  flags = FLAG_VARIANTS.get(name, "")
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
  command = [sys.executable, __file__, "--variant", args.variant, "--repeats", str(args.repeats),
             "--single", name]
  if name == "one_core":
    command = [shutil.which("taskset"), "-c", "0", *command]
  out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])["ms"]


def single(name, args):
  """The subprocess side: time one variant (flag variants and one_core run the shipped model)."""
  if name == "inversion":
    result = {}
    for dtype_name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
      model, teachers = bench.teachers_for(args.variant, dtype=dtype)
      result[dtype_name] = 1e3 * bench.inversion_step_seconds(model, teachers, 64, max(2, args.repeats // 2), flops=False)[0]
    print(json.dumps(result))
    return
  use_model_variant(name if name in MODEL_VARIANTS else "current")
  dtype = jnp.bfloat16 if name == "bf16" else jnp.float32
  print(json.dumps({"ms": 1e3 * bench.distill_step_seconds(args.variant, args.repeats, dtype=dtype)[0]}))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="Mi/4", help="model size/patch, as model.variant")
  parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best is kept")
  parser.add_argument("--repeats", type=int, default=8)
  parser.add_argument("--single", help=argparse.SUPPRESS)  # subprocess mode: one variant
  args = parser.parse_args()
  if args.single:
    single(args.single, args)
    return

  reference_loss = first_loss(args.variant)
  for name in MODEL_VARIANTS[1:]:
    if name in ("head_major", "bf16"):
      continue  # other parameter layout / other precision: a fixed init is not the same function
    use_model_variant(name)
    loss = first_loss(args.variant)
    if abs(loss - reference_loss) > 1e-4 * max(1.0, abs(reference_loss)):
      sys.exit(f"variant {name} computes a different loss ({loss} vs {reference_loss}); not comparable")
  use_model_variant("current")

  names = [*MODEL_VARIANTS, *FLAG_VARIANTS] + (["one_core"] if shutil.which("taskset") else [])
  best = {}
  for _ in range(args.rounds):
    for name in names:
      best[name] = min(best.get(name, float("inf")), measure_in_subprocess(name, args))
  for name, ms in best.items():
    print(json.dumps({"variant": name, "model": args.variant, "ms": round(ms, 1),
                      "vs_current": round(best["current"] / ms, 3)}), flush=True)
  # The 5-teacher inversion step at 64 tokens, float32 vs bfloat16 compute (the images stay float32).
  env = dict(os.environ)
  out = subprocess.run([sys.executable, __file__, "--variant", args.variant, "--repeats", str(args.repeats),
                        "--single", "inversion"], env=env, check=True, capture_output=True, text=True).stdout
  inversion_ms = json.loads(out.strip().splitlines()[-1])
  print(json.dumps({"variant": "inversion_bf16", "model": args.variant, "ms": round(inversion_ms["bfloat16"], 1),
                    "float32_ms": round(inversion_ms["float32"], 1),
                    "vs_float32": round(inversion_ms["float32"] / inversion_ms["bfloat16"], 3)}), flush=True)
  print(f"\n| variant ({args.variant} distillation step, batch {bench.BATCH}) | ms | vs current |\n|---|---|---|")
  for name, ms in best.items():
    print(f"| {name} | {ms:.1f} | {best['current'] / ms:.2f}x |")
  print(f"| inversion step, bf16 vs float32 (64 tokens) | {inversion_ms['bfloat16']:.1f} vs "
        f"{inversion_ms['float32']:.1f} | {inversion_ms['float32'] / inversion_ms['bfloat16']:.2f}x |")


if __name__ == "__main__":
  main()
