r"""The distillation step's building blocks, XLA vs PyTorch, one op at a time (fp32, 2 threads).

  python benchmarks/ops_vs_torch.py        # PyTorch optional: pip install torch==2.13.0

Shapes are the Mi/4 step's (batch 128 x 65 tokens = 8,320 rows, width 128, 4 heads of 32, MLP
256): the forward matmul x @ W, the two backward ones (dW = x^T dy, dX = dy W^T), the batched
attention matmul q k^T, and softmax / LayerNorm / tanh-GELU over the step's tensors. One JSON line
per op: `{"op", "xla", "torch", "unit"}` (GFLOP/s for matmuls, ms otherwise), then a table.
"""
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedmitr_jax import entry  # noqa: E402

entry.use_cpu_flags()  # the commands' XLA:CPU flags, set before the backend starts
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROWS, HEADS, TOKENS, HEAD_DIM = 128 * 65, 4, 65, 32


def median_seconds(fn, repeats=20):
  for _ in range(3):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def cases(rng):
  """(name, flops or None, jax function, its arrays, torch function of torch tensors)."""
  out = []
  for k, n in ((128, 384), (128, 128), (128, 256), (256, 128)):
    x, dy, w = (rng.random(s, dtype=np.float32) for s in ((ROWS, k), (ROWS, n), (k, n)))
    flops = 2 * ROWS * k * n
    out += [(f"x@W {ROWS}x{k}x{n}", flops, lambda a, b: a @ b, (x, w), lambda a, b: a @ b),
            (f"dW=x^T dy {ROWS}x{k}x{n}", flops, lambda a, b: a.T @ b, (x, dy), lambda a, b: a.t() @ b),
            (f"dX=dy W^T {ROWS}x{k}x{n}", flops, lambda a, b: a @ b.T, (dy, w), lambda a, b: a @ b.t())]
  q = rng.random((128, HEADS, TOKENS, HEAD_DIM), dtype=np.float32)
  out.append(("attention q k^T [128,4,65,32]", 2 * q.size * TOKENS,
              lambda a, b: jnp.einsum("bhqd,bhkd->bhqk", a, b), (q, q), lambda a, b: a @ b.transpose(-1, -2)))
  scores = rng.random((128, HEADS, TOKENS, TOKENS), dtype=np.float32)
  acts = rng.random((ROWS, 256), dtype=np.float32)
  width = rng.random((ROWS, 128), dtype=np.float32)

  def layer_norm(a):
    mean = a.mean(-1, keepdims=True)
    return (a - mean) * jax.lax.rsqrt(jnp.square(a - mean).mean(-1, keepdims=True) + 1e-6)
  out += [("softmax [128,4,65,65]", None, lambda a: jax.nn.softmax(a, -1), (scores,), lambda a: a.softmax(-1)),
          ("layernorm [8320,128]", None, layer_norm, (width,),
           lambda a: __import__("torch").nn.functional.layer_norm(a, (128,), eps=1e-6)),
          ("gelu(tanh) [8320,256]", None, jax.nn.gelu, (acts,),
           lambda a: __import__("torch").nn.functional.gelu(a, approximate="tanh"))]
  return out


def main():
  try:
    import torch
    torch.set_num_threads(2)
  except ImportError:
    torch = None
    print(json.dumps({"note": "PyTorch column skipped: pip install torch==2.13.0"}))
  rows = []
  for name, flops, jax_fn, arrays, torch_fn in cases(np.random.default_rng(0)):
    jitted, device_arrays = jax.jit(jax_fn), [jnp.asarray(a) for a in arrays]
    xla = median_seconds(lambda: jitted(*device_arrays))
    torch_s = None
    if torch:
      tensors = [torch.from_numpy(a.copy()) for a in arrays]
      torch_s = median_seconds(lambda: torch_fn(*tensors))
    value = (lambda s: None if s is None else round(flops / s / 1e9, 1)) if flops else \
        (lambda s: None if s is None else round(s * 1e3, 3))
    rows.append((name, value(xla), value(torch_s), "GFLOP/s" if flops else "ms"))
    print(json.dumps({"op": name, "xla": rows[-1][1], "torch": rows[-1][2], "unit": rows[-1][3]}), flush=True)
  print("\n| op | XLA | PyTorch | unit |\n|---|---|---|---|")
  for row in rows:
    print("| " + " | ".join("" if v is None else str(v) for v in row) + " |")


if __name__ == "__main__":
  main()
