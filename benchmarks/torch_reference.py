r"""PyTorch equivalents of our hot steps, for the speed comparison of benchmarks/run.py.

  python benchmarks/torch_reference.py     # smoke: torch eager vs torch.compile, Mi/4, batch 128

benchmarks/README.md compares our inversion and training steps with an equivalent PyTorch
implementation of the same model, batch and loss. This module is that implementation, written
the way a PyTorch user would write it (nn.Module, torch.optim, scaled_dot_product_attention), so
the comparison is against idiomatic PyTorch and not against a port of our XLA tricks:

  TorchViT              fedmitr_jax/models/vit.py's ViT; `load_from_flax` copies our weights in
  make_distill_step     distill.py's step: patch roll/flip, relabel loss, clip 1.0, AdamW
  make_client_step      client/training.py's step: crop/flip of uint8, CE on CLS, clip 1.0, AdamW
  make_inversion_step   inversion.py's step: 5 frozen teachers, CE + TV-l2, masked Adam on pixels
  time_fn, matmul_gflops

Layout: images are NCHW ([B, 3, H, W], PyTorch's native layout for Conv2d); ours are NHWC.
`to_nchw` converts. Every step factory takes `compile=False|True`: True wraps the loss (forward
and, through AOTAutograd, backward) and the optimiser update in `torch.compile(dynamic=False)`,
so each token count is one static compilation, as in our jitted steps.
PyTorch is a benchmark-only dependency (`pip install torch==2.13.0`); CI does not install it.

Threads: torch uses os.cpu_count() OpenMP threads. Measure on an idle machine: with other jobs
on the 2 cores, every op waits at an OpenMP barrier for a descheduled thread, and eager steps
were seen 10-16x slower at 2 threads than at torch.set_num_threads(1) (5.7 s vs 0.35 s).
"""
import math
import os
import pathlib
import sys
import time
import types

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from fedmitr_jax.models import vit as flax_vit  # noqa: E402  (SIZES: one source of truth)

# Both libraries get every core: XLA:CPU's thread pool uses them all by default.
torch.set_num_threads(os.cpu_count())

PIXEL_MIN, PIXEL_MAX = -1.0, 1.0  # fedmitr_jax.data.datasets: valid range of normalised pixels
LN_EPS = 1e-6                     # flax nn.LayerNorm's default (torch's is 1e-5)


# ---- model ------------------------------------------------------------------------------------
class Block(nn.Module):
  """Pre-LN encoder block; names mirror the Flax block so weight loading is a plain mapping."""

  def __init__(self, width, heads, mlp_dim):
    super().__init__()
    self.heads, self.head_dim = heads, width // heads
    inner = heads * self.head_dim
    self.ln1 = nn.LayerNorm(width, eps=LN_EPS)
    self.qkv = nn.Linear(width, 3 * inner)  # fused q, k, v, features ordered (3, heads, head_dim)
    self.out = nn.Linear(inner, width)
    self.ln2 = nn.LayerNorm(width, eps=LN_EPS)
    self.fc1 = nn.Linear(width, mlp_dim)
    self.fc2 = nn.Linear(mlp_dim, width)

  def forward(self, x, return_weights: bool = False):
    b, length, _ = x.shape
    qkv = self.qkv(self.ln1(x)).view(b, length, 3, self.heads, self.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, Dh]
    weights = None
    if return_weights:  # the explicit path, only where the softmax weights are wanted
      weights = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim), dim=-1)
      attn = weights @ v
    else:  # what a PyTorch user writes: the fused kernel (flash attention on CPU)
      attn = F.scaled_dot_product_attention(q, k, v)
    x = x + self.out(attn.transpose(1, 2).reshape(b, length, -1))
    x = x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))  # flax nn.gelu: tanh
    return x, weights


class TorchViT(nn.Module):
  """fedmitr_jax.models.vit.ViT in PyTorch (NCHW input).

  forward(images, keep_idx=None, return_attention=False, return_tokens=True) returns
  (cls_logits [B, C], token_logits [B, n, C] or None, cls_attention [B, n] or None).
  `keep_idx` [B, n] gathers patch tokens after the position embedding (the CLS token has none);
  `return_tokens=False` skips the token head, which the inversion loss never reads (XLA drops
  that dead code from our step, so eager PyTorch should not pay for it either).
  """

  def __init__(self, num_classes, width, depth, heads, mlp_dim, patch, separate_token_head=False,
               image_size=32):
    super().__init__()
    self.patch, self.width = patch, width
    num_patches = (image_size // patch) ** 2
    self.embedding = nn.Conv2d(3, width, patch, stride=patch)
    self.pos_embedding = nn.Parameter(torch.randn(1, num_patches, width) * 0.02)
    self.cls = nn.Parameter(torch.zeros(1, 1, width))
    self.blocks = nn.ModuleList(Block(width, heads, mlp_dim) for _ in range(depth))
    self.ln_final = nn.LayerNorm(width, eps=LN_EPS)
    self.head = nn.Linear(width, num_classes)
    self.token_head = nn.Linear(width, num_classes) if separate_token_head else None

  def forward(self, images, keep_idx=None, return_attention: bool = False, return_tokens: bool = True):
    x = self.embedding(images).flatten(2).transpose(1, 2)  # [B, N, D], row-major patch order
    x = x + self.pos_embedding
    if keep_idx is not None:  # token dropping after the position embedding
      x = torch.gather(x, 1, keep_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
    weights = None
    for i, block in enumerate(self.blocks):
      x, weights = block(x, return_weights=return_attention and i == len(self.blocks) - 1)
    if not return_tokens:
      cls_logits = self.head(self.ln_final(x[:, 0]))
      token_logits = None
    else:
      x = self.ln_final(x)
      cls_logits = self.head(x[:, 0])
      token_head = self.token_head if self.token_head is not None else self.head
      token_logits = token_head(x[:, 1:])
    cls_attention = weights[:, :, 0, 1:].mean(dim=1) if return_attention else None
    return cls_logits, token_logits, cls_attention

  @torch.no_grad()
  def load_from_flax(self, params):
    """Copies our Flax parameters (nested dict of numpy or jax arrays) into this model."""
    p = lambda *path: _nested(params, path)
    _copy(self.embedding.weight, p("embedding", "kernel").transpose(3, 2, 0, 1))  # HWIO -> OIHW
    _copy(self.embedding.bias, p("embedding", "bias"))
    _copy(self.pos_embedding, p("pos_embedding"))
    _copy(self.cls, p("cls"))
    for i, block in enumerate(self.blocks):
      b = f"block{i}"
      _copy_ln(block.ln1, p(b, "ln1"))
      _copy_ln(block.ln2, p(b, "ln2"))
      kernel = p(b, "attn", "qkv", "kernel")  # [D, 3, H, Dh]
      _copy(block.qkv.weight, kernel.reshape(kernel.shape[0], -1).T)
      _copy(block.qkv.bias, p(b, "attn", "qkv", "bias").reshape(-1))
      kernel = p(b, "attn", "out", "kernel")  # [H, Dh, D]
      _copy(block.out.weight, kernel.reshape(-1, kernel.shape[-1]).T)
      _copy(block.out.bias, p(b, "attn", "out", "bias"))
      _copy_dense(block.fc1, p(b, "mlp", "fc1"))
      _copy_dense(block.fc2, p(b, "mlp", "fc2"))
    _copy_ln(self.ln_final, p("ln_final"))
    _copy_dense(self.head, p("head"))
    if self.token_head is not None:
      _copy_dense(self.token_head, p("token_head"))
    return self


def _nested(tree, path):
  """The subtree at `path`; a leaf comes back as a float32 numpy array."""
  for key in path:
    tree = tree[key]
  return tree if isinstance(tree, dict) or hasattr(tree, "keys") else np.asarray(tree, np.float32)


def _copy(dst, array):
  if tuple(dst.shape) != tuple(array.shape):
    raise ValueError(f"shape mismatch: torch {tuple(dst.shape)} vs flax {array.shape}")
  dst.copy_(torch.tensor(array))


def _copy_ln(ln, p):
  _copy(ln.weight, np.asarray(p["scale"], np.float32))
  _copy(ln.bias, np.asarray(p["bias"], np.float32))


def _copy_dense(linear, p):
  _copy(linear.weight, np.asarray(p["kernel"], np.float32).T)
  _copy(linear.bias, np.asarray(p["bias"], np.float32))


def build(variant="Mi/4", num_classes=10, *, image_size=32, separate_token_head=False, size=None):
  """TorchViT from one of our variant names, or from an explicit size (width, depth, heads, mlp)."""
  spec = flax_vit.parse_variant(variant)
  width, depth, heads, mlp = size or (spec.width, spec.depth, spec.num_heads, spec.mlp_dim)
  return TorchViT(num_classes, width, depth, heads, mlp, spec.patch_size,
                  separate_token_head=separate_token_head, image_size=image_size)


def to_nchw(images):
  """numpy/jax NHWC -> contiguous torch NCHW (float32 unless uint8)."""
  array = np.asarray(images)
  return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))


# ---- patch geometry (fedmitr_jax/models/patches.py) ----------------------------------------------------
def _gather_hw(images, rows, cols):
  """out[b, c, h, w] = images[b, c, rows[b, h], cols[b, w]]: per-image shifts and flips as one
  gather (torch has no per-sample roll; a Python loop over the batch would be far slower)."""
  b, c, _, width = images.shape
  idx = (rows[:, :, None] * width + cols[:, None, :]).view(b, 1, -1).expand(b, c, -1)
  return images.flatten(2).gather(2, idx).view(b, c, rows.shape[1], cols.shape[1])


def roll_flip(images, shifts, flips, patch):
  """patches.roll_flip for a batch: roll by shifts[b] = (rows, cols) whole patches, then flip
  left-right where flips[b]. images [B, C, H, W]."""
  _, _, height, width = images.shape
  h = torch.arange(height, device=images.device)
  w = torch.arange(width, device=images.device)
  rows = (h[None] - shifts[:, :1] * patch) % height
  pre_flip = torch.where(flips[:, None], width - 1 - w[None], w[None])
  cols = (pre_flip - shifts[:, 1:] * patch) % width
  return _gather_hw(images, rows, cols)


def moved_index(index, shifts, flips, grid):
  """patches.moved_index: where each patch of `index` [B, n] lands after `roll_flip`."""
  row = (index // grid + shifts[:, :1]) % grid
  col = (index % grid + shifts[:, 1:]) % grid
  col = torch.where(flips[:, None], grid - 1 - col, col)
  return row * grid + col


def random_shifts_flips(batch, max_shift, flip, generator):
  """The random part of patches.random_roll_flip, drawn outside the (compiled) loss."""
  shifts = torch.randint(-max_shift, max_shift + 1, (batch, 2), generator=generator)
  flips = (torch.rand(batch, generator=generator) < 0.5) & flip
  return shifts, flips


def patch_pixel_mask(keep_idx, num_patches, image_size, patch):
  """[B, n] kept indices -> [B, 1, H, W] bool pixel mask (patches.index_to_mask + patch_pixel_mask)."""
  grid = image_size // patch
  mask = torch.zeros(keep_idx.shape[0], num_patches, dtype=torch.bool, device=keep_idx.device)
  mask.scatter_(1, keep_idx, True)
  mask = mask.view(-1, 1, grid, 1, grid, 1).expand(-1, 1, grid, patch, grid, patch)
  return mask.reshape(-1, 1, image_size, image_size)


# ---- losses -----------------------------------------------------------------------------------
def relabel_loss(cls_logits, token_logits, batch, *, tau=4.0, beta=0.5, relabel_target="token"):
  """fedmitr_jax.server.distill.relabel_loss (the loss only; ours also returns its terms as metrics)."""
  teacher_soft = torch.softmax(batch["teacher_logits"] / tau, -1).mean(1)
  student_log = torch.log_softmax(cls_logits / tau, -1)
  loss = tau ** 2 * (teacher_soft * (torch.log(teacher_soft + 1e-12) - student_log)).sum(-1).mean()
  if beta:
    token_log = torch.log_softmax(token_logits, -1)  # [B, N, C]
    labels = batch["labels"][:, None, None].expand(-1, token_log.shape[1], 1)
    hard = -token_log.gather(-1, labels)[..., 0]
    if relabel_target == "token":
      q = batch["token_probs"]
    else:
      q = torch.softmax(batch["teacher_logits"], -1).mean(1)[:, None, :]
    soft = -(q * token_log).sum(-1)
    m = batch["masks"].float()
    loss = loss + beta * (m * hard + (1 - m) * soft).mean()
  return loss


def tv_l2(x):
  """fedmitr_jax.server.inversion.tv_l2 for NCHW: L2 norms of neighbour differences, 4 directions."""
  d1 = x[:, :, :, :-1] - x[:, :, :, 1:]
  d2 = x[:, :, :-1, :] - x[:, :, 1:, :]
  d3 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
  d4 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
  return sum(torch.sqrt((d * d).sum()) for d in (d1, d2, d3, d4))


def ensemble_log_probs(teachers, images, keep_idx, log_weights):
  """ensemble.ensemble_outputs' log_probs: log sum_k w_k softmax(f_k(x)), teachers in a loop."""
  logits = torch.stack([t(images, keep_idx, return_tokens=False)[0] for t in teachers])
  return torch.logsumexp(torch.log_softmax(logits, -1) + log_weights[:, None, None], dim=0)


# ---- optimiser plumbing -----------------------------------------------------------------------
def _adamw(model, lr, weight_decay, compile):
  """AdamW with decay on tensors of ndim > 1 only (clients.decay_mask). Eager uses the fused CPU
  kernel (the fastest eager AdamW); compiled uses foreach, which inductor turns into its own kernel."""
  decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
  other = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
  groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
  return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, **_impl(compile))


def _impl(compile):
  return {"foreach": True} if compile else {"fused": True}


def _maybe_compile(fn, compile, mode=None):
  return torch.compile(fn, dynamic=False, mode=mode) if compile else fn


def _train_update(params, opt, grad_clip, compile, mode):
  """Clip by global norm, then step. One function so torch.compile sees it whole."""

  def update():
    torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    opt.step()

  return _maybe_compile(update, compile, mode)


# ---- training steps ---------------------------------------------------------------------------
def make_distill_step(model, *, lr=1e-3, weight_decay=0.05, grad_clip=1.0, tau=4.0, beta=0.5,
                      relabel_target="token", max_shift=1, flip=True, compile=False, mode=None, seed=0):
  """distill.make_distill_step in PyTorch. Returns step(batch) -> loss (detached, before the
  update). batch: dict of tensors like our bank's, images NCHW. Constant lr (our step evaluates
  its warmup-cosine schedule inside the jitted step: a few scalar ops)."""
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = _adamw(model, lr, weight_decay, compile)
  update = _train_update(params, opt, grad_clip, compile, mode)
  generator = torch.Generator().manual_seed(seed)

  def loss_fn(batch, shifts, flips):
    images = batch["images"]
    all_idx = torch.arange(batch["masks"].shape[1]).expand(images.shape[0], -1)
    augmented = roll_flip(images, shifts, flips, model.patch)
    positions = moved_index(all_idx, shifts, flips, images.shape[-1] // model.patch)
    cls_logits, token_logits, _ = model(augmented, positions)
    return relabel_loss(cls_logits, token_logits, batch, tau=tau, beta=beta, relabel_target=relabel_target)

  loss_fn = _maybe_compile(loss_fn, compile, mode)

  def step(batch):
    shifts, flips = random_shifts_flips(batch["images"].shape[0], max_shift, flip, generator)
    loss = loss_fn(batch, shifts, flips)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    update()
    return loss.detach()

  return step


def random_crop_flip(images_u8, padding, flip, generator):
  """augment.random_crop_flip for NCHW uint8: zero-pad, crop at a random offset, random flip."""
  b, _, height, width = images_u8.shape
  padded = F.pad(images_u8, (padding, padding, padding, padding))
  offsets = torch.randint(0, 2 * padding + 1, (b, 2), generator=generator)
  flips = (torch.rand(b, generator=generator) < 0.5) & flip
  w = torch.arange(width)
  rows = offsets[:, :1] + torch.arange(height)[None]
  cols = offsets[:, 1:] + torch.where(flips[:, None], width - 1 - w[None], w[None])
  return _gather_hw(padded, rows, cols)


def make_client_step(model, *, lr=1e-3, weight_decay=0.05, grad_clip=1.0, crop_padding=4, flip=True,
                     compile=False, mode=None, seed=0):
  """clients.make_client_train_step in PyTorch: step(images_u8 NCHW, labels, mask) -> loss.
  Augments uint8 images (crop + flip), normalises to [-1, 1], masked CE on the CLS head,
  clip, AdamW. Constant lr (ours: warmup-cosine inside the step)."""
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = _adamw(model, lr, weight_decay, compile)
  update = _train_update(params, opt, grad_clip, compile, mode)
  generator = torch.Generator().manual_seed(seed)

  def loss_fn(crops_u8, labels, mask):
    images = crops_u8.float() / 127.5 - 1.0
    logits = model(images, return_tokens=False)[0]
    per_example = F.cross_entropy(logits, labels.long(), reduction="none")
    return (per_example * mask).sum() / mask.sum().clamp(min=1)

  loss_fn = _maybe_compile(loss_fn, compile, mode)

  def step(images_u8, labels, mask):
    crops = random_crop_flip(images_u8, crop_padding, flip, generator)
    loss = loss_fn(crops, labels, mask.float())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    update()
    return loss.detach()

  return step


# ---- inversion step ---------------------------------------------------------------------------
def freeze(teacher):
  """Teachers are fixed: eval mode and no parameter gradients (only the pixels get one)."""
  teacher.eval()
  for p in teacher.parameters():
    p.requires_grad_(False)
  return teacher


def make_inversion_step(teachers, labels, keep_idx, *, pixels=None, image_size=32, lr=0.25,
                        betas=(0.5, 0.99), tv_weight=1e-4, max_shift=1, flip=True, weights=None,
                        compile=False, mode=None, seed=0):
  """inversion.make_inversion_step in PyTorch, for one stage (fixed keep_idx [B, n]).

  Returns (step, state): step() -> loss runs one iteration; state.pixels [B, 3, H, W] (NCHW) is
  the optimised leaf (Adam), state.best_pixels / state.best_ce track each image's best iterate.
  Pixels start at N(0, 1) clipped to [-1, 1] unless `pixels` is given. Patches outside keep_idx
  stay exactly frozen: Adam's in-place update is undone there (its momentum would move them).
  """
  teachers = [freeze(t) for t in teachers]
  patch = teachers[0].patch
  generator = torch.Generator().manual_seed(seed)
  batch, num_patches = keep_idx.shape[0], (image_size // patch) ** 2
  if pixels is None:
    pixels = torch.randn(batch, 3, image_size, image_size, generator=generator)
  pixels = pixels.clone().clamp_(PIXEL_MIN, PIXEL_MAX).requires_grad_(True)
  weights = torch.full((len(teachers),), 1.0 / len(teachers)) if weights is None else weights
  log_weights = torch.log(weights)
  state = types.SimpleNamespace(  # what our InversionState carries, mutable
      pixels=pixels, best_pixels=pixels.detach().clone(), best_ce=torch.full((batch,), math.inf),
      opt=torch.optim.Adam([pixels], lr=lr, betas=betas, **_impl(compile)))
  kept = patch_pixel_mask(keep_idx, num_patches, image_size, patch)  # fixed for the stage

  def loss_fn(pixels, shifts, flips):
    augmented = roll_flip(pixels, shifts, flips, patch)
    positions = moved_index(keep_idx, shifts, flips, image_size // patch)
    log_probs = ensemble_log_probs(teachers, augmented, positions, log_weights)
    ce = -log_probs.gather(1, labels[:, None].long())[:, 0]
    return ce.mean() + tv_weight * tv_l2(pixels), ce

  def update(ce):
    # The loss was measured on the current pixels: keep them if they are this image's best.
    better = ce < state.best_ce
    state.best_pixels.copy_(torch.where(better[:, None, None, None], pixels, state.best_pixels))
    state.best_ce.copy_(torch.where(better, ce, state.best_ce))
    before = pixels.detach().clone()
    state.opt.step()
    pixels.copy_(torch.where(kept, pixels, before).clamp_(PIXEL_MIN, PIXEL_MAX))

  loss_fn = _maybe_compile(loss_fn, compile, mode)
  update = torch.no_grad()(_maybe_compile(update, compile, mode))

  def step():
    shifts, flips = random_shifts_flips(batch, max_shift, flip, generator)
    loss, ce = loss_fn(pixels, shifts, flips)
    pixels.grad = None
    loss.backward()
    update(ce.detach())
    return loss.detach()

  return step, state


# ---- timing -----------------------------------------------------------------------------------
def time_fn(fn, warmup=2, iters=10):
  """Median seconds per call of fn() after `warmup` calls (compilation, allocator warm-up; the
  median because the CPU may be shared). PyTorch on CPU runs synchronously, so perf_counter around
  the call is the whole step."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def matmul_gflops(dtype="float32", n=2048, iters=10):
  """PyTorch's n x n matmul throughput in GFLOP/s (bf16 goes through oneDNN, AMX where present)."""
  dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
  g = torch.Generator().manual_seed(0)
  a = torch.randn(n, n, generator=g).to(dtype)
  b = torch.randn(n, n, generator=g).to(dtype)
  out = torch.empty(n, n, dtype=dtype)
  seconds = time_fn(lambda: torch.mm(a, b, out=out), warmup=2, iters=iters)
  return 2 * n ** 3 / seconds / 1e9


# ---- the benchmark's shapes -------------------------------------------------------------------
BATCH, IMAGE, CLASSES, TEACHERS = 128, 32, 10, 5


def synthetic_batch(num_patches, batch=BATCH, seed=0):
  """A distillation batch of bank-shaped random tensors (images NCHW)."""
  r = np.random.default_rng(seed)
  return {"images": torch.from_numpy(r.normal(size=(batch, 3, IMAGE, IMAGE)).astype(np.float32)),
          "labels": torch.from_numpy(r.integers(0, CLASSES, batch)),
          "masks": torch.from_numpy(r.random((batch, num_patches)) < 0.25),
          "teacher_logits": torch.from_numpy(r.normal(size=(batch, TEACHERS, CLASSES)).astype(np.float32)),
          "token_probs": torch.from_numpy(r.dirichlet(np.ones(CLASSES), (batch, num_patches)).astype(np.float32))}


def _warmup(mode, warmup):
  """Compiled steps compile on call 1 and were seen running slow for a call or two after it
  (lazily created optimiser state, inductor caches), so they get two extra warm-up calls."""
  return warmup + 2 if mode == "compile" else warmup


def inversion_step_timings(variant, tokens, repeats=10, modes=("eager",), warmup=2):
  """{mode: seconds} of one 5-teacher inversion step forwarding `tokens` patch tokens."""
  torch.manual_seed(0)
  teachers = [build(variant, CLASSES, image_size=IMAGE) for _ in range(TEACHERS)]
  num_patches = (IMAGE // teachers[0].patch) ** 2
  keep_idx = torch.arange(num_patches)[:tokens].expand(BATCH, -1).contiguous()
  labels = torch.arange(BATCH) % CLASSES
  out = {}
  for mode in modes:
    step, _ = make_inversion_step(teachers, labels, keep_idx, image_size=IMAGE, compile=mode == "compile")
    out[mode] = time_fn(step, warmup=_warmup(mode, warmup), iters=repeats)
  return out


def distill_step_timings(variant, repeats=10, modes=("eager", "compile"), warmup=2):
  """{mode: seconds} of one distillation (token relabel) step on a student with a token head."""
  out = {}
  for mode in modes:
    torch.manual_seed(0)
    model = build(variant, CLASSES, image_size=IMAGE, separate_token_head=True)
    batch = synthetic_batch((IMAGE // model.patch) ** 2)
    step = make_distill_step(model, compile=mode == "compile")
    out[mode] = time_fn(lambda: step(batch), warmup=_warmup(mode, warmup), iters=repeats)
  return out


def client_step_timings(variant, repeats=10, modes=("eager", "compile"), warmup=2):
  """{mode: seconds} of one client step (uint8 crop/flip, CE on CLS, AdamW)."""
  r = np.random.default_rng(0)
  images = torch.from_numpy(r.integers(0, 255, (BATCH, 3, IMAGE, IMAGE)).astype(np.uint8))
  labels, mask = torch.from_numpy(r.integers(0, CLASSES, BATCH)), torch.ones(BATCH, dtype=torch.bool)
  out = {}
  for mode in modes:
    torch.manual_seed(0)
    step = make_client_step(build(variant, CLASSES, image_size=IMAGE), compile=mode == "compile")
    out[mode] = time_fn(lambda: step(images, labels, mask), warmup=_warmup(mode, warmup), iters=repeats)
  return out


def inversion_step_seconds(variant, tokens, repeats=10):
  """PyTorch eager seconds per inversion step (the issue's inversion goal is against eager)."""
  return inversion_step_timings(variant, tokens, repeats)["eager"]


def distill_step_seconds(variant, repeats=10):
  """The faster of eager and torch.compile, seconds per distillation step."""
  return min(distill_step_timings(variant, repeats).values())


def client_step_seconds(variant, repeats=10):
  """The faster of eager and torch.compile, seconds per client step."""
  return min(client_step_timings(variant, repeats).values())


def _smoke():
  """Mi/4, batch 128: torch eager vs torch.compile, a few repeats each; one JSON line per figure."""
  import json
  print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
  print(json.dumps({"matmul_fp32_gflops": round(matmul_gflops("float32", iters=3), 1),
                    "matmul_bf16_gflops": round(matmul_gflops("bfloat16", iters=3), 1)}), flush=True)
  for tokens in (64, 14):
    t = inversion_step_timings("Mi/4", tokens, repeats=3, modes=("eager", "compile"))
    print(json.dumps({"inversion_seconds": {k: round(v, 4) for k, v in t.items()}, "tokens": tokens}), flush=True)
  for name, fn in (("distill", distill_step_timings), ("client", client_step_timings)):
    t = fn("Mi/4", repeats=3)
    print(json.dumps({f"{name}_seconds": {k: round(v, 4) for k, v in t.items()}}), flush=True)


if __name__ == "__main__":
  _smoke()
