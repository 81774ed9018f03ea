"""Pretrained ViT weights from a local file, mapped onto the parameter tree of `models.vit.ViT`.

Files are read, never unpickled:
  .npz          google-research/vision_transformer ("vit_jax") and big_vision checkpoints: Flax
                names flattened with '/' (big_vision's scanned `encoderblock` layout included);
  .safetensors  timm ViT / DeiT state dicts, torch layouts; parsed here, so torch is not needed.

Each format is first converted to our names and layouts (a flat dict keyed like
'block0/attn/qkv/kernel'); one merge step then checks every shape against the model, so all
formats share the same rules:
  * the file's CLS position embedding (row 0 when it has 1 + N rows) is added to `cls`, because our
    CLS token has no position embedding (big_vision style): layer 0 sees the same input;
  * position embeddings are resized bilinearly when the file's patch grid differs from ours;
  * `head` is loaded only when its shape matches (fine-tuning on other classes keeps our zero
    init); `token_head` is never in a file and keeps its init;
  * any other difference (width, depth, heads, mlp, patch size) is a one-line `ValueError`
    naming `model.pretrained_path`, the parameter, both shapes and the fix.
"""
import json
import math
import os
import re
import zipfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fedmitr_jax.data import datasets
from fedmitr_jax.models import vit
from fedmitr_jax.progress import log

FIELD = "model.pretrained_path"
OPTIONAL = ("head", "token_head")  # kept from init when the file has none of the model's shape

# ---- reading files ----------------------------------------------------------------------------

# safetensors dtype -> little-endian numpy dtype; BF16 is read as raw 16-bit words, then widened.
_SAFETENSORS_FLOATS = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}
# Integer / bool tensors (e.g. index buffers) are never ViT weights: skipped, not an error.
_SAFETENSORS_SKIPPED = ("I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL")


def resolve_path(path: str) -> str:
  """Relative paths are taken from the repo root, like `dataset.tarball`."""
  path = os.path.expanduser(path)
  return path if os.path.isabs(path) else os.path.normpath(os.path.join(datasets.REPO_ROOT, path))


def bf16_to_float32(words: np.ndarray) -> np.ndarray:
  """bfloat16 is the top half of a float32: shift the 16-bit word up and reinterpret."""
  return (words.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path: str) -> dict:
  """name -> float32 array. Format: u64 LE header size, JSON header, raw little-endian data."""
  with open(path, "rb") as f:
    raw = f.read()
  if len(raw) < 8:
    raise ValueError("shorter than the 8-byte header size")
  size = int.from_bytes(raw[:8], "little")
  if size > len(raw) - 8:
    raise ValueError(f"header size {size} runs past the end of the file (truncated?)")
  header = json.loads(raw[8:8 + size])
  if not isinstance(header, dict):
    raise ValueError("header is not a JSON object")
  base, arrays = 8 + size, {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise ValueError(f"header entry '{name}' lacks dtype/shape/data_offsets") from None
    if dtype in _SAFETENSORS_SKIPPED:
      continue
    if dtype not in _SAFETENSORS_FLOATS:
      raise ValueError(f"tensor '{name}' has dtype {dtype}; only F32, F16, BF16 and F64 are read")
    np_dtype = np.dtype(_SAFETENSORS_FLOATS[dtype])
    count = math.prod(shape)
    if end - begin != count * np_dtype.itemsize or not 0 <= begin <= end <= len(raw) - base:
      raise ValueError(f"tensor '{name}' data [{begin}, {end}) does not fit shape {shape} "
                       "or the file (truncated?)")
    array = np.frombuffer(raw, np_dtype, count, base + begin).reshape(shape)
    arrays[name] = bf16_to_float32(array) if dtype == "BF16" else array.astype(np.float32)
  return arrays


def read_npz(path: str) -> dict:
  """name -> array of an .npz archive; object (pickled) entries are refused by numpy."""
  archive = np.load(path, allow_pickle=False)
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise ValueError("holds a single .npy array, not an .npz archive of named arrays")
  with archive:
    return {name: archive[name] for name in archive.files}


def read_arrays(path: str) -> dict:
  """Reads a checkpoint file by extension; every failure is a one-line ValueError."""
  readers = {".npz": read_npz, ".safetensors": read_safetensors}
  extension = os.path.splitext(path)[1].lower()
  if extension not in readers:
    raise ValueError(f"{FIELD}: '{path}' has an unknown extension; use a .npz (vit_jax / big_vision) "
                     "or .safetensors (timm) file (torch .pt/.pth pickles are not read)")
  if not os.path.isfile(path):
    raise ValueError(f"{FIELD}: '{path}' does not exist; point --config.{FIELD} at a weights file "
                     "(relative paths: from the repo root)")
  try:
    return readers[extension](path)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    reason = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the library said
    raise ValueError(f"{FIELD}: '{path}' is not a readable {extension} file ({reason}); "
                     "replace the file") from None


# ---- converting each format to our names and layouts ------------------------------------------


class _Source:
  """The file's arrays, recording which were used so leftovers can be reported."""

  def __init__(self, arrays: dict, path: str, family: str):
    self.arrays, self.path, self.family, self.used = arrays, path, family, set()

  def has(self, key: str) -> bool:
    return key in self.arrays

  def get(self, key: str) -> np.ndarray:
    if key not in self.arrays:
      raise ValueError(f"{FIELD}: '{self.path}' ({self.family}) lacks '{key}'; the file is "
                       "incomplete or not a plain ViT; pick another file")
    value = self.arrays[key]
    if value.dtype.kind != "f":
      raise ValueError(f"{FIELD}: '{self.path}' entry '{key}' has dtype {value.dtype}, not a float; "
                       "pick another file")
    self.used.add(key)
    return np.asarray(value, np.float32)

  def unused(self) -> list:
    return sorted(set(self.arrays) - self.used)


# Flax family names inside one encoder block: vit_jax numbers every submodule of the block in
# call order; big_vision numbers per module type.
_NPZ_FAMILIES = {
    "vit_jax": {"ln1": "LayerNorm_0", "attn": "MultiHeadDotProductAttention_1",
                "ln2": "LayerNorm_2", "mlp": "MlpBlock_3",
                "posemb": "Transformer/posembed_input/pos_embedding"},
    "big_vision": {"ln1": "LayerNorm_0", "attn": "MultiHeadDotProductAttention_0",
                   "ln2": "LayerNorm_1", "mlp": "MlpBlock_0", "posemb": "pos_embedding"},
}
# ours (inside block{i}) -> the file's (inside encoderblock_{i}); qkv is assembled apart.
_NPZ_BLOCK = {
    "ln1/scale": "{ln1}/scale", "ln1/bias": "{ln1}/bias",
    "ln2/scale": "{ln2}/scale", "ln2/bias": "{ln2}/bias",
    "attn/out/kernel": "{attn}/out/kernel", "attn/out/bias": "{attn}/out/bias",
    "mlp/fc1/kernel": "{mlp}/Dense_0/kernel", "mlp/fc1/bias": "{mlp}/Dense_0/bias",
    "mlp/fc2/kernel": "{mlp}/Dense_1/kernel", "mlp/fc2/bias": "{mlp}/Dense_1/bias",
}
_NPZ_TOP = {
    "embedding/kernel": "embedding/kernel", "embedding/bias": "embedding/bias",
    "pos_embedding": "{posemb}", "ln_final/scale": "Transformer/encoder_norm/scale",
    "ln_final/bias": "Transformer/encoder_norm/bias",
}
_NPZ_HEAD = {"head/kernel": "head/kernel", "head/bias": "head/bias"}

# timm: ours (inside block{i}) -> (name inside blocks.{i}., transpose torch's [out, in] Linear).
_TIMM_BLOCK = {
    "ln1/scale": ("norm1.weight", False), "ln1/bias": ("norm1.bias", False),
    "ln2/scale": ("norm2.weight", False), "ln2/bias": ("norm2.bias", False),
    "mlp/fc1/kernel": ("mlp.fc1.weight", True), "mlp/fc1/bias": ("mlp.fc1.bias", False),
    "mlp/fc2/kernel": ("mlp.fc2.weight", True), "mlp/fc2/bias": ("mlp.fc2.bias", False),
    "attn/out/bias": ("attn.proj.bias", False),
}
_TIMM_TOP = {"embedding/bias": "patch_embed.proj.bias", "pos_embedding": "pos_embed",
             "ln_final/scale": "norm.weight", "ln_final/bias": "norm.bias"}


def _detect(arrays: dict, path: str):
  """Returns (family, arrays with any big_vision 'params/...' style prefix removed)."""
  if "patch_embed.proj.weight" in arrays:
    return "timm", arrays
  matches = (re.match(r"(.*?)Transformer/encoderblock(_0)?/", k) for k in arrays)
  match = next((m for m in matches if m), None)
  if match:
    prefix = match.group(1)
    inner = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    for family, names in _NPZ_FAMILIES.items():
      if any(k.startswith(f"Transformer/encoderblock{s}/{names['mlp']}/") for k in inner
             for s in ("_0", "")):
        return family, inner
  shown = sorted(arrays)[:4]
  raise ValueError(f"{FIELD}: '{path}' is not a ViT checkpoint this loader knows (vit_jax, big_vision "
                   f"or timm ViT/DeiT names expected; its first keys are {shown}); pick such a file")


def _require_cls(source: _Source, key: str) -> np.ndarray:
  if not source.has(key):
    raise ValueError(f"{FIELD}: '{source.path}' ({source.family}) has no class token '{key}' "
                     "(a 'gap'/'map' pooled model); this ViT pools the CLS token, pick a checkpoint "
                     "trained with one")
  return source.get(key)


def _from_npz(source: _Source) -> dict:
  names = _NPZ_FAMILIES[source.family]
  scanned = not source.has(f"Transformer/encoderblock_0/{names['ln1']}/scale")

  def block(i, suffix):  # big_vision's scanned layout stacks all blocks on axis 0
    if scanned:
      return source.get(f"Transformer/encoderblock/{suffix}")[i]
    return source.get(f"Transformer/encoderblock_{i}/{suffix}")

  if scanned:
    depth = source.get(f"Transformer/encoderblock/{names['ln1']}/scale").shape[0]
  else:
    depth = 0
    while source.has(f"Transformer/encoderblock_{depth}/{names['ln1']}/scale"):
      depth += 1
  ours = {k: source.get(v.format(**names)) for k, v in _NPZ_TOP.items()}
  ours["cls"] = _require_cls(source, "cls")
  for i in range(depth):
    for k, v in _NPZ_BLOCK.items():
      ours[f"block{i}/{k}"] = block(i, v.format(**names))
    attn = names["attn"]  # separate q, k, v [D, H, Dh] -> our fused [D, 3, H, Dh]
    ours[f"block{i}/attn/qkv/kernel"] = np.stack(
        [block(i, f"{attn}/{p}/kernel") for p in ("query", "key", "value")], axis=1)
    ours[f"block{i}/attn/qkv/bias"] = np.stack(
        [block(i, f"{attn}/{p}/bias") for p in ("query", "key", "value")], axis=0)
  # A vit_jax 'pre_logits' layer sits between the encoder and the head; without it the head is
  # meaningless, so it is not loaded (and the layer itself has no place in our model).
  pre_logits = [k for k in source.arrays if k.startswith("pre_logits/")]
  if pre_logits:
    source.used.update(pre_logits + [v for v in _NPZ_HEAD.values() if source.has(v)])
    log("[pretrained] the file's head follows a pre_logits layer this ViT lacks: head not loaded")
  else:
    ours.update({k: source.get(v) for k, v in _NPZ_HEAD.items() if source.has(v)})
  return ours


def _from_timm(source: _Source, num_heads: int) -> dict:
  kernel = source.get("patch_embed.proj.weight")  # torch OIHW [D, 3, p, p] -> Flax HWIO
  ours = {"embedding/kernel": kernel.transpose(2, 3, 1, 0),
          "cls": _require_cls(source, "cls_token")}
  ours.update({k: source.get(v) for k, v in _TIMM_TOP.items()})
  depth = 0
  while source.has(f"blocks.{depth}.norm1.weight"):
    depth += 1
  for i in range(depth):
    t, b = f"blocks.{i}.", f"block{i}/"
    for k, (name, transpose) in _TIMM_BLOCK.items():
      value = source.get(t + name)
      ours[b + k] = value.T if transpose else value
    qkv = source.get(t + "attn.qkv.weight")  # [3D, D]: rows q|k|v, then head, then head dim
    width = qkv.shape[1]
    # timm files do not record the head count: the model's is used. If the widths differ the
    # shape check reports the width, so any split that reshapes cleanly will do here.
    heads = num_heads if width % num_heads == 0 else 1
    ours[b + "attn/qkv/kernel"] = qkv.T.reshape(width, 3, heads, width // heads)
    # qkv_bias=False models have no bias: zeros are the same function.
    bias = source.get(t + "attn.qkv.bias") if source.has(t + "attn.qkv.bias") else np.zeros(3 * width)
    ours[b + "attn/qkv/bias"] = bias.reshape(3, heads, width // heads)
    proj = source.get(t + "attn.proj.weight")  # [D_out, D_in], D_in ordered head, head dim
    ours[b + "attn/out/kernel"] = proj.T.reshape(heads, width // heads, proj.shape[0])
  if source.has("head.weight"):
    ours["head/kernel"] = source.get("head.weight").T
    ours["head/bias"] = source.get("head.bias")
  return ours


# ---- fitting to our model -------------------------------------------------------------------


def _isqrt_exact(n: int):
  root = math.isqrt(n)
  return root if root * root == n else None


def _fold_cls_and_resize(ours: dict, num_patches: int, path: str) -> None:
  """Moves a CLS position row into `cls` and resizes the patch grid to ours, in place."""
  pos = ours["pos_embedding"]
  pos = pos[None] if pos.ndim == 2 else pos
  rows = pos.shape[1]
  if _isqrt_exact(rows) is None:
    if _isqrt_exact(rows - 1) is None:
      raise ValueError(f"{FIELD}: '{path}' has a position embedding of {rows} rows, neither a square "
                       "patch grid nor 1 + one; pick another file")
    # Our CLS token has no position embedding: adding the file's CLS row to the token itself
    # gives the first block the very same input.
    ours["cls"] = ours["cls"] + pos[:, :1]
    pos = pos[:, 1:]
  grid, target = _isqrt_exact(pos.shape[1]), _isqrt_exact(num_patches)
  width = pos.shape[-1]
  if grid != target:
    resized = jax.image.resize(pos.reshape(grid, grid, width), (target, target, width), "bilinear")
    pos = np.asarray(resized, np.float32).reshape(1, target * target, width)
    log(f"[pretrained] position embeddings resized from a {grid}x{grid} to a {target}x{target} grid")
  ours["pos_embedding"] = pos


def _file_model(ours: dict):
  """(width, depth, heads or None, mlp_dim, patch) of the file, for the fix in error messages."""
  patch, width = ours["embedding/kernel"].shape[0], ours["embedding/kernel"].shape[-1]
  depth = _depth(ours)
  qkv, fc1 = ours.get("block0/attn/qkv/kernel"), ours.get("block0/mlp/fc1/kernel")
  heads = qkv.shape[2] if qkv is not None else None
  return width, depth, heads, (fc1.shape[1] if fc1 is not None else None), patch


def _fix(ours: dict, family: str) -> str:
  width, depth, heads, mlp_dim, patch = _file_model(ours)
  known_heads = family != "timm"  # timm files do not record it
  about = f"width {width}, depth {depth}, mlp {mlp_dim}, patch {patch}"
  about += f", heads {heads}" if known_heads else ""
  for name, (w, d, h, m) in vit.SIZES.items():
    if (w, d, m) == (width, depth, mlp_dim) and (h == heads or not known_heads):
      return f"pick model.variant {name}/{patch} ({about}) or another file"
  return f"no model.variant size has the file's {about}: add one to vit.SIZES or pick another file"


def _depth(flat: dict) -> int:
  return sum(1 for k in flat if re.fullmatch(r"block\d+/ln1/scale", k))


def _optional(top: str, init_flat: dict, ours: dict):
  """Values of an OPTIONAL module: the file's when every shape matches, else None."""
  names = [k for k in init_flat if k.split("/")[0] == top]
  if all(k in ours and ours[k].shape == tuple(init_flat[k].shape) for k in names):
    return {k: ours[k] for k in names}
  found = ours[f"{top}/kernel"].shape if f"{top}/kernel" in ours else "none"
  log(f"[pretrained] {top} kept from init (file's kernel: {found}, "
      f"model's: {tuple(init_flat[f'{top}/kernel'].shape)})")
  return None


def _merge(init_flat: dict, ours: dict, *, path: str, family: str, variant: str):
  """Our tree with the file's values, after checking every shape against the model."""
  # Shapes first, so a width or patch size mismatch is not reported as a depth difference; the
  # patch embedding first, as its shape shows both (eval_shape trees come back key-sorted).
  for name in sorted(init_flat, key=lambda k: k != "embedding/kernel"):
    value, leaf = ours.get(name), init_flat[name]
    if value is not None and name.split("/")[0] not in OPTIONAL and value.shape != tuple(leaf.shape):
      raise ValueError(f"{FIELD}: '{path}' has {name} of shape {value.shape} but model.variant "
                       f"'{variant}' needs {tuple(leaf.shape)}; {_fix(ours, family)}")
  if _depth(ours) != _depth(init_flat):
    raise ValueError(f"{FIELD}: '{path}' has {_depth(ours)} encoder blocks but model.variant "
                     f"'{variant}' has {_depth(init_flat)}; {_fix(ours, family)}")
  merged = {}
  for top in OPTIONAL:
    if f"{top}/kernel" in init_flat:
      merged.update(_optional(top, init_flat, ours) or {})
  for name, leaf in init_flat.items():
    if name in merged:
      merged[name] = jnp.asarray(merged[name], leaf.dtype)
    elif name.split("/")[0] in OPTIONAL:
      merged[name] = leaf
    elif name in ours:
      merged[name] = jnp.asarray(ours[name], leaf.dtype)
    else:  # the converters fill whole blocks, so only a model with unknown parts gets here
      raise ValueError(f"{FIELD}: '{path}' ({family}) has nothing for '{name}' of model.variant "
                       f"'{variant}'; pick another file")
  return merged


# Per-channel input normalisation the file's model was trained with. Ours feeds [-1, 1]
# (mean = std = 0.5), as vit_jax, big_vision and timm's ViT ports do; DeiT used ImageNet's.
INPUT_NORMS = {"minus_one_one": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
               "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def fold_input_norm(ours: dict, norm: str) -> None:
  """Makes the patch embedding take our [-1, 1] pixels when the file expects (u - mean) / std.

  With u = (x + 1) / 2: (u - m) / s = x / (2 s) + (0.5 - m) / s, so the kernel is scaled per input
  channel and the constant goes into the bias; exact, since the patch conv has no padding.
  """
  mean, std = (np.asarray(v, np.float64) for v in INPUT_NORMS[norm])
  if np.array_equal(mean, [0.5] * 3) and np.array_equal(std, [0.5] * 3):
    return
  kernel = np.asarray(ours["embedding/kernel"], np.float64)  # [p, p, 3, D]
  ours["embedding/bias"] = np.asarray(ours["embedding/bias"], np.float64) + np.einsum(
      "hwcd,c->d", kernel, (0.5 - mean) / std)
  ours["embedding/kernel"] = kernel / (2 * std)[None, None, :, None]


def load_pretrained(path: str, init_params, *, variant: str, input_norm: str = "minus_one_one"):
  """Returns `init_params` with every parameter the file holds, in the same structure and dtypes.

  `init_params` supplies shapes, dtypes and the values kept when the file has none (`head` of
  another class count, `token_head`); its leaves may be `jax.ShapeDtypeStruct`s (from
  `jax.eval_shape`) to validate a file cheaply. `variant` only names the model in messages.
  `input_norm` names the normalisation the file's model expects (`INPUT_NORMS`; DeiT: 'imagenet').
  Raises a one-line ValueError naming `model.pretrained_path` for any file that does not fit.
  """
  path = resolve_path(path)
  family, arrays = _detect(read_arrays(path), path)
  source = _Source(arrays, path, family)
  init_flat = traverse_util.flatten_dict(init_params, sep="/")
  if family == "timm":
    qkv = init_flat.get("block0/attn/qkv/kernel")
    ours = _from_timm(source, qkv.shape[2] if qkv is not None else 1)
  else:
    ours = _from_npz(source)
  leftover = source.unused()
  if leftover:  # LayerScale, distillation / register tokens, norm_pre...: our ViT has no place
    raise ValueError(f"{FIELD}: '{path}' ({family}) holds {len(leftover)} entries this ViT has no "
                     f"place for, e.g. {leftover[:3]}; pick a plain CLS-token ViT/DeiT checkpoint")
  if input_norm not in INPUT_NORMS:
    raise ValueError(f"model.pretrained_input_norm: '{input_norm}' is unknown; use one of {list(INPUT_NORMS)}")
  if "embedding/kernel" in ours and "embedding/bias" in ours:
    fold_input_norm(ours, input_norm)
  _fold_cls_and_resize(ours, init_flat["pos_embedding"].shape[1], path)
  merged = _merge(init_flat, ours, path=path, family=family, variant=variant)
  log(f"[pretrained] {family} weights from {path}")
  return traverse_util.unflatten_dict(merged, sep="/")


# ---- writing a backbone ------------------------------------------------------------------------


def backbone_arrays(params) -> dict:
  """Our ViT parameters in big_vision's .npz names and layouts (the inverse of `_from_npz`),
  without `head` and `token_head`: a backbone for clients of any class count."""
  flat = {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  names = _NPZ_FAMILIES["big_vision"]
  out = {"cls": flat["cls"], "pos_embedding": flat["pos_embedding"]}
  out.update({file_name: flat[ours] for ours, file_name in _NPZ_TOP.items() if ours != "pos_embedding"})
  for i in range(_depth(flat)):
    prefix = f"Transformer/encoderblock_{i}/"
    out.update({prefix + v.format(**names): flat[f"block{i}/{k}"] for k, v in _NPZ_BLOCK.items()})
    for j, part in enumerate(("query", "key", "value")):  # our fused [D, 3, H, Dh] -> q, k, v
      out[f"{prefix}{names['attn']}/{part}/kernel"] = flat[f"block{i}/attn/qkv/kernel"][:, j]
      out[f"{prefix}{names['attn']}/{part}/bias"] = flat[f"block{i}/attn/qkv/bias"][j]
  return out


def save_backbone(params, path) -> None:
  """Writes `backbone_arrays(params)` as an .npz that `load_pretrained` reads (big_vision family)."""
  tmp = f"{path}.tmp.npz"
  np.savez(tmp, **backbone_arrays(params))
  os.replace(tmp, path)
