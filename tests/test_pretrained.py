"""Pretrained weights: every file format maps onto our ViT exactly, and bad files fail in one line.

Checkpoints are written here from random weights of a known model, in each format's own names
and layouts. Two checks per format: loading gives back the source weights, and our model on the
loaded weights computes what an independent numpy forward pass in the file's own layout (torch
Linear/Conv semantics for timm, separate q/k/v for vit_jax / big_vision) computes from the file.
"""
import io
import json
import os
import pathlib
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from fedmitr_jax import config_base, pipeline, validate
from fedmitr_jax.models import pretrained, vit

REPO = pathlib.Path(__file__).resolve().parents[1]
NPZ_NAMES = {  # ln1, attention, ln2, mlp module names inside one encoder block
    "vit_jax": ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"),
    "big_vision": ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"),
}
VIT_JAX_POSEMB = "Transformer/posembed_input/pos_embedding"


# ---- models and checkpoint writers ------------------------------------------------------------


def _model(variant, classes=10, image_size=32, **kwargs):
  model = vit.build_vit(variant, classes, image_size=image_size, **kwargs)
  return model, vit.init_params(model, jax.random.key(0), image_size)


def _random_weights(init, seed=0):
  """Flat '/'-keyed random weights; head and cls start at zero, which would hide a wrong mapping."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(init, sep="/")
  return {k: rng.normal(0, 0.3, v.shape).astype(np.float32) + (k.endswith("scale")) for k, v in flat.items()}


def _tree(flat):
  return traverse_util.unflatten_dict(flat, sep="/")


def _depth(flat):
  return sum(1 for k in flat if k.endswith("/ln1/scale"))


def _cls_row(flat, seed=1):
  """A CLS position row for the file, and the file's cls token so that cls + row is ours."""
  row = np.random.default_rng(seed).normal(0, 0.3, flat["cls"].shape).astype(np.float32)
  return row, flat["cls"] - row


def to_npz_names(flat, family="vit_jax", scanned=False):
  """Our weights as a vit_jax / big_vision checkpoint (vit_jax: CLS row in the posemb)."""
  ln1, attn, ln2, mlp = NPZ_NAMES[family]
  out = {"embedding/kernel": flat["embedding/kernel"], "embedding/bias": flat["embedding/bias"],
         "Transformer/encoder_norm/scale": flat["ln_final/scale"],
         "Transformer/encoder_norm/bias": flat["ln_final/bias"],
         "head/kernel": flat["head/kernel"], "head/bias": flat["head/bias"]}
  if family == "vit_jax":
    row, out["cls"] = _cls_row(flat)
    out[VIT_JAX_POSEMB] = np.concatenate([row, flat["pos_embedding"]], axis=1)
  else:
    out["cls"], out["pos_embedding"] = flat["cls"], flat["pos_embedding"]
  blocks = []
  for i in range(_depth(flat)):
    b = lambda name: flat[f"block{i}/{name}"]
    block = {f"{ln1}/scale": b("ln1/scale"), f"{ln1}/bias": b("ln1/bias"),
             f"{ln2}/scale": b("ln2/scale"), f"{ln2}/bias": b("ln2/bias"),
             f"{attn}/out/kernel": b("attn/out/kernel"), f"{attn}/out/bias": b("attn/out/bias"),
             f"{mlp}/Dense_0/kernel": b("mlp/fc1/kernel"), f"{mlp}/Dense_0/bias": b("mlp/fc1/bias"),
             f"{mlp}/Dense_1/kernel": b("mlp/fc2/kernel"), f"{mlp}/Dense_1/bias": b("mlp/fc2/bias")}
    for j, name in enumerate(("query", "key", "value")):
      block[f"{attn}/{name}/kernel"] = b("attn/qkv/kernel")[:, j]  # [D, H, Dh]
      block[f"{attn}/{name}/bias"] = b("attn/qkv/bias")[j]
    blocks.append(block)
  for key in blocks[0]:
    if scanned:  # big_vision scan layout: one stacked array per name
      out[f"Transformer/encoderblock/{key}"] = np.stack([block[key] for block in blocks])
    else:
      out.update({f"Transformer/encoderblock_{i}/{key}": block[key] for i, block in enumerate(blocks)})
  return out


def to_timm(flat):
  """Our weights as a timm ViT state dict (torch layouts, CLS row in pos_embed)."""
  width = flat["cls"].shape[-1]
  row, cls = _cls_row(flat)
  sd = {"patch_embed.proj.weight": flat["embedding/kernel"].transpose(3, 2, 0, 1),  # HWIO -> OIHW
        "patch_embed.proj.bias": flat["embedding/bias"], "cls_token": cls,
        "pos_embed": np.concatenate([row, flat["pos_embedding"]], axis=1),
        "norm.weight": flat["ln_final/scale"], "norm.bias": flat["ln_final/bias"],
        "head.weight": flat["head/kernel"].T, "head.bias": flat["head/bias"]}
  for i in range(_depth(flat)):
    b, t = f"block{i}/", f"blocks.{i}."
    sd.update({t + "norm1.weight": flat[b + "ln1/scale"], t + "norm1.bias": flat[b + "ln1/bias"],
               t + "norm2.weight": flat[b + "ln2/scale"], t + "norm2.bias": flat[b + "ln2/bias"],
               t + "attn.qkv.weight": flat[b + "attn/qkv/kernel"].reshape(width, 3 * width).T,
               t + "attn.qkv.bias": flat[b + "attn/qkv/bias"].reshape(-1),
               t + "attn.proj.weight": flat[b + "attn/out/kernel"].reshape(width, width).T,
               t + "attn.proj.bias": flat[b + "attn/out/bias"],
               t + "mlp.fc1.weight": flat[b + "mlp/fc1/kernel"].T, t + "mlp.fc1.bias": flat[b + "mlp/fc1/bias"],
               t + "mlp.fc2.weight": flat[b + "mlp/fc2/kernel"].T, t + "mlp.fc2.bias": flat[b + "mlp/fc2/bias"]})
  return sd


def write_safetensors(path, tensors, dtype="F32"):
  """A minimal safetensors writer: u64 LE header size, JSON header, raw little-endian data."""
  header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
  for name, value in tensors.items():
    value = np.ascontiguousarray(value, np.float32)
    if dtype == "BF16":  # keep the top 16 bits (truncation; the values are then exact in bf16)
      data = (value.view(np.uint32) >> 16).astype("<u2").tobytes()
    else:
      data = value.astype({"F32": "<f4", "F16": "<f2"}[dtype]).tobytes()
    header[name] = {"dtype": dtype, "shape": list(value.shape), "data_offsets": [offset, offset + len(data)]}
    chunks.append(data)
    offset += len(data)
  text = json.dumps(header).encode()
  text += b" " * (-len(text) % 8)
  pathlib.Path(path).write_bytes(len(text).to_bytes(8, "little") + text + b"".join(chunks))
  return path


# ---- independent numpy forward passes, each in the file's own layout -----------------------


def _ln(x, scale, bias):
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6) * scale + bias


def _gelu(x):  # tanh approximation, as flax's nn.gelu (the model's activation)
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _attention(q, k, v):  # [B, L, H, Dh]
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v)


def _patches(images, p):  # [B, gh, gw, i, j, c]: i, j are the row and column inside a patch
  b, h, w, c = images.shape
  return images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)


def ref_npz(d, images, family):
  ln1, attn, ln2, mlp = NPZ_NAMES[family]
  kernel = d["embedding/kernel"]  # HWIO
  x = np.einsum("bghijc,ijcd->bghd", _patches(images, kernel.shape[0]), kernel) + d["embedding/bias"]
  x = x.reshape(len(images), -1, kernel.shape[-1])
  cls = np.broadcast_to(d["cls"], (len(images), 1, x.shape[-1]))
  if family == "vit_jax":  # the posemb is added after the CLS token joins
    x = np.concatenate([cls, x], axis=1) + d[VIT_JAX_POSEMB]
  else:
    x = np.concatenate([cls, x + d["pos_embedding"]], axis=1)
  i = 0
  while f"Transformer/encoderblock_{i}/{ln1}/scale" in d:
    g = lambda name: d[f"Transformer/encoderblock_{i}/{name}"]
    y = _ln(x, g(f"{ln1}/scale"), g(f"{ln1}/bias"))
    q, k, v = (np.einsum("bld,dhk->blhk", y, g(f"{attn}/{n}/kernel")) + g(f"{attn}/{n}/bias")
               for n in ("query", "key", "value"))
    x = x + np.einsum("blhk,hkd->bld", _attention(q, k, v), g(f"{attn}/out/kernel")) + g(f"{attn}/out/bias")
    y = _ln(x, g(f"{ln2}/scale"), g(f"{ln2}/bias"))
    y = _gelu(y @ g(f"{mlp}/Dense_0/kernel") + g(f"{mlp}/Dense_0/bias"))
    x = x + y @ g(f"{mlp}/Dense_1/kernel") + g(f"{mlp}/Dense_1/bias")
    i += 1
  x = _ln(x, d["Transformer/encoder_norm/scale"], d["Transformer/encoder_norm/bias"])
  return x[:, 0] @ d["head/kernel"] + d["head/bias"]


def ref_timm(sd, images, heads):
  weight = sd["patch_embed.proj.weight"]  # torch OIHW: out[d] = sum_cij w[d, c, i, j] x[c, i, j]
  x = np.einsum("bghijc,dcij->bghd", _patches(images, weight.shape[-1]), weight) + sd["patch_embed.proj.bias"]
  batch, width = len(images), weight.shape[0]
  x = x.reshape(batch, -1, width)
  x = np.concatenate([np.broadcast_to(sd["cls_token"], (batch, 1, width)), x], axis=1) + sd["pos_embed"]
  i = 0
  while f"blocks.{i}.norm1.weight" in sd:
    g = lambda name: sd[f"blocks.{i}.{name}"]
    y = _ln(x, g("norm1.weight"), g("norm1.bias"))
    qkv = (y @ g("attn.qkv.weight").T + g("attn.qkv.bias")).reshape(batch, -1, 3, heads, width // heads)
    out = _attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]).reshape(batch, -1, width)
    x = x + out @ g("attn.proj.weight").T + g("attn.proj.bias")
    y = _gelu(_ln(x, g("norm2.weight"), g("norm2.bias")) @ g("mlp.fc1.weight").T + g("mlp.fc1.bias"))
    x = x + y @ g("mlp.fc2.weight").T + g("mlp.fc2.bias")
    i += 1
  x = _ln(x, sd["norm.weight"], sd["norm.bias"])
  return x[:, 0] @ sd["head.weight"].T + sd["head.bias"]


def _images(n=2, size=32):
  return np.random.default_rng(5).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def _logits(model, params, images):
  return np.asarray(model.apply({"params": params}, images)[0])


def _assert_same_weights(loaded, flat, atol=1e-6, skip=()):
  loaded = traverse_util.flatten_dict(loaded, sep="/")
  assert set(loaded) == set(flat)
  for k, v in loaded.items():
    assert v.dtype == np.float32 and v.shape == flat[k].shape, k
    if k.split("/")[0] not in skip:
      np.testing.assert_allclose(np.asarray(v), flat[k], atol=atol, err_msg=k)


# ---- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("family,scanned,prefix", [
    ("vit_jax", False, ""), ("big_vision", False, ""), ("big_vision", True, "params/")])
def test_npz_round_trip_and_forward(tmp_path, family, scanned, prefix):
  model, init = _model("test/8")
  flat = _random_weights(init)
  d = to_npz_names(flat, family, scanned)
  extra = {"opt/mu/cls": np.zeros(3)} if prefix else {}  # a big_vision training checkpoint's optimizer
  np.savez(tmp_path / "w.npz", **{prefix + k: v for k, v in d.items()}, **extra)
  loaded = pretrained.load_pretrained(str(tmp_path / "w.npz"), init, variant="test/8")
  _assert_same_weights(loaded, flat)
  assert jax.tree.structure(loaded) == jax.tree.structure(init)
  images = _images()
  # The vit_jax CLS position row is folded into cls: same logits as the file's own forward pass.
  unscanned = to_npz_names(flat, family) if scanned else d
  np.testing.assert_allclose(_logits(model, loaded, images), ref_npz(unscanned, images, family),
                             atol=1e-4, rtol=1e-4)


def test_timm_safetensors_round_trip_and_forward(tmp_path, capsys):
  model, init = _model("Mu/4")
  flat = _random_weights(init)
  sd = to_timm(flat)
  path = write_safetensors(tmp_path / "deit.safetensors", sd)
  loaded = pretrained.load_pretrained(str(path), init, variant="Mu/4")
  _assert_same_weights(loaded, flat)
  images = _images()
  heads = vit.parse_variant("Mu/4").num_heads
  np.testing.assert_allclose(_logits(model, loaded, images), ref_timm(sd, images, heads),
                             atol=1e-4, rtol=1e-4)
  assert "[pretrained] timm weights from" in capsys.readouterr().out


def test_timm_bf16_file_loads_within_bf16_rounding(tmp_path):
  _, init = _model("test/8")
  flat = _random_weights(init)
  path = write_safetensors(tmp_path / "w.safetensors", to_timm(flat), dtype="BF16")
  loaded = traverse_util.flatten_dict(pretrained.load_pretrained(str(path), init, variant="test/8"), sep="/")
  for k, v in loaded.items():  # truncation to 8 mantissa bits: relative error below 2**-7
    np.testing.assert_allclose(np.asarray(v), flat[k], rtol=2 ** -7 * 2.5, atol=1e-2, err_msg=k)


def test_safetensors_dtypes_decode_exactly(tmp_path):
  values = np.array([[1.0, -2.5, 0.15625], [3.0e38, -1.0e-30, 0.0]], np.float32)
  for dtype in ("BF16", "F16"):
    exact = values if dtype == "BF16" else np.array([[1.0, -2.5, 0.15625], [0.5, -0.25, 0.0]], np.float32)
    path = write_safetensors(tmp_path / f"{dtype}.safetensors", {"x": exact, "y": exact[0]}, dtype=dtype)
    arrays = pretrained.read_safetensors(str(path))
    if dtype == "BF16":  # the writer truncated to bf16 (1e-30, 3e38 are not bf16 values)
      exact = (exact.view(np.uint32) & 0xFFFF0000).view(np.float32)
    assert arrays["x"].dtype == np.float32 and arrays["x"].shape == (2, 3)
    np.testing.assert_array_equal(arrays["x"], exact)
    np.testing.assert_array_equal(arrays["y"], exact[0])
  words = np.array([0x3F80, 0xC020, 0x7F80], np.uint16)  # 1.0, -2.5, +inf
  np.testing.assert_array_equal(pretrained.bf16_to_float32(words), [1.0, -2.5, np.inf])


# ---- position embeddings, head ----------------------------------------------------------------


def _vit_jax_file(tmp_path, flat, name="w.npz"):
  np.savez(tmp_path / name, **to_npz_names(flat, "vit_jax"))
  return str(tmp_path / name)


def test_posemb_grid_is_resized_and_cls_row_folded(tmp_path, capsys):
  _, small = _model("test/8", image_size=32)  # 4x4 grid
  flat = _random_weights(small)
  width = flat["cls"].shape[-1]
  ramp = np.broadcast_to(np.arange(4, dtype=np.float32)[None, :, None], (4, 4, width))  # value = column
  flat["pos_embedding"] = (ramp + np.arange(width, dtype=np.float32)).reshape(1, 16, width)
  _, big = _model("test/8", image_size=64)  # 8x8 grid
  loaded = pretrained.load_pretrained(_vit_jax_file(tmp_path, flat), big, variant="test/8")
  pos = np.asarray(loaded["pos_embedding"])
  assert pos.shape == (1, 64, width)
  grid = pos.reshape(8, 8, width) - np.arange(width)
  # Bilinear with half-pixel centres: output column j samples input column j/2 - 1/4 (clamped).
  expected = np.array([0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3])
  np.testing.assert_allclose(grid, np.broadcast_to(expected[None, :, None], grid.shape), atol=1e-5)
  np.testing.assert_allclose(np.asarray(loaded["cls"]), flat["cls"], atol=1e-6)  # the row is folded
  np.testing.assert_allclose(np.asarray(loaded["embedding"]["kernel"]), flat["embedding/kernel"])
  assert "resized from a 4x4 to a 8x8 grid" in capsys.readouterr().out


@pytest.mark.parametrize("source_size,target_size", [(32, 64), (64, 32)])
def test_constant_posemb_stays_constant(tmp_path, source_size, target_size):
  _, source = _model("test/8", image_size=source_size)
  flat = _random_weights(source)
  column = np.random.default_rng(3).normal(size=flat["cls"].shape[-1]).astype(np.float32)
  flat["pos_embedding"] = np.broadcast_to(column, flat["pos_embedding"].shape).copy()
  _, target = _model("test/8", image_size=target_size)
  loaded = pretrained.load_pretrained(_vit_jax_file(tmp_path, flat), target, variant="test/8")
  pos = np.asarray(loaded["pos_embedding"])
  assert pos.shape == (1, (target_size // 8) ** 2, column.size)
  np.testing.assert_allclose(pos, np.broadcast_to(column, pos.shape), atol=1e-5)


def test_head_of_another_class_count_keeps_init(tmp_path, capsys):
  _, init10 = _model("test/8", classes=10)
  flat = _random_weights(init10)
  path = _vit_jax_file(tmp_path, flat)
  _, init7 = _model("test/8", classes=7)
  loaded = pretrained.load_pretrained(path, init7, variant="test/8")
  _assert_same_weights(loaded, {**flat, "head/kernel": np.zeros((32, 7)), "head/bias": np.zeros(7)})
  assert "head kept from init (file's kernel: (32, 10), model's: (32, 7))" in capsys.readouterr().out


def test_student_token_head_keeps_init_and_head_loads(tmp_path):
  _, student = _model("test/8", separate_token_head=True)
  flat = _random_weights(_model("test/8")[1])
  loaded = pretrained.load_pretrained(_vit_jax_file(tmp_path, flat), student, variant="test/8")
  np.testing.assert_allclose(np.asarray(loaded["head"]["kernel"]), flat["head/kernel"])
  assert not np.asarray(loaded["token_head"]["kernel"]).any()


def test_abstract_init_validates_without_values(tmp_path):
  model, init = _model("test/8")
  shapes = jax.eval_shape(lambda: vit.init_params(model, jax.random.key(0), 32))
  loaded = pretrained.load_pretrained(_vit_jax_file(tmp_path, _random_weights(init)), shapes, variant="test/8")
  assert loaded["block0"]["ln1"]["scale"].shape == (32,)


# ---- errors ---------------------------------------------------------------------------------


def _one_line_error(path, init, variant):
  with pytest.raises(ValueError) as err:
    pretrained.load_pretrained(str(path), init, variant=variant)
  message = str(err.value)
  assert message.startswith("model.pretrained_path: ") and "\n" not in message, message
  return message


def test_wrong_width_names_the_parameter_shapes_and_variant(tmp_path):
  path = _vit_jax_file(tmp_path, _random_weights(_model("Mu/8")[1]))
  message = _one_line_error(path, _model("test/8")[1], "test/8")
  assert "embedding/kernel of shape (8, 8, 3, 64)" in message and "needs (8, 8, 3, 32)" in message
  assert "pick model.variant Mu/8" in message


def test_wrong_patch_size_and_wrong_depth(tmp_path):
  path = _vit_jax_file(tmp_path, _random_weights(_model("test/4")[1]))
  message = _one_line_error(path, _model("test/8")[1], "test/8")
  assert "embedding/kernel" in message and "model.variant test/4" in message
  flat = _random_weights(_model("test/8")[1])
  shallow = {k: v for k, v in to_npz_names(flat).items() if "encoderblock_1/" not in k}
  np.savez(tmp_path / "shallow.npz", **shallow)
  message = _one_line_error(tmp_path / "shallow.npz", _model("test/8")[1], "test/8")
  assert "has 1 encoder blocks but model.variant 'test/8' has 2" in message


def test_timm_wrong_width(tmp_path):
  path = write_safetensors(tmp_path / "w.safetensors", to_timm(_random_weights(_model("Mu/8")[1])))
  message = _one_line_error(path, _model("test/8")[1], "test/8")
  assert "embedding/kernel of shape (8, 8, 3, 64)" in message and "Mu/8" in message


def _valid_safetensors(tmp_path):
  return write_safetensors(tmp_path / "ok.safetensors", to_timm(_random_weights(_model("test/8")[1])))


@pytest.mark.parametrize("name,make,expected", [
    ("missing.npz", None, "does not exist"),
    ("weights.pth", lambda p: p.write_bytes(b"\x80\x04junk"), "unknown extension"),
    ("garbage.npz", lambda p: p.write_bytes(os.urandom(300)), "not a readable .npz"),
    ("garbage.safetensors", lambda p: p.write_bytes(b"\xff" * 300), "runs past the end"),
    ("empty.safetensors", lambda p: p.write_bytes(b""), "not a readable .safetensors"),
    ("badjson.safetensors", lambda p: p.write_bytes((8).to_bytes(8, "little") + b"{not js}"),
     "not a readable .safetensors"),
    ("pickled.npz", lambda p: np.savez(p, a=np.array([{}], dtype=object)), "not a readable .npz"),
    ("array.npz", lambda p: p.write_bytes(_npy_bytes()), "not an .npz archive"),
    ("other.npz", lambda p: np.savez(p, weights=np.zeros(3)), "not a ViT checkpoint"),
])
def test_bad_files_are_one_line_errors(tmp_path, name, make, expected):
  path = tmp_path / name
  if make:
    make(path)
  assert expected in _one_line_error(path, _model("test/8")[1], "test/8")


def _npy_bytes():
  buffer = io.BytesIO()
  np.save(buffer, np.zeros(3))
  return buffer.getvalue()


@pytest.mark.parametrize("fraction", [0.3, 0.9])
def test_truncated_files(tmp_path, fraction):
  good = _valid_safetensors(tmp_path)
  raw = good.read_bytes()
  (tmp_path / "cut.safetensors").write_bytes(raw[:int(len(raw) * fraction)])
  assert "truncated" in _one_line_error(tmp_path / "cut.safetensors", _model("test/8")[1], "test/8")
  np.savez(tmp_path / "ok.npz", **to_npz_names(_random_weights(_model("test/8")[1])))
  raw = (tmp_path / "ok.npz").read_bytes()
  (tmp_path / "cut.npz").write_bytes(raw[:int(len(raw) * fraction)])
  assert "not a readable .npz" in _one_line_error(tmp_path / "cut.npz", _model("test/8")[1], "test/8")


@pytest.mark.parametrize("change,expected", [
    (lambda sd: sd.update({"blocks.0.ls1.gamma": np.ones(32)}), "no place for"),  # DeiT-III LayerScale
    (lambda sd: sd.update({"dist_token": np.zeros((1, 1, 32))}), "no place for"),  # distilled DeiT
    (lambda sd: sd.pop("cls_token"), "no class token"),
    (lambda sd: sd.pop("blocks.1.mlp.fc2.bias"), "lacks 'blocks.1.mlp.fc2.bias'"),
])
def test_timm_models_this_vit_cannot_represent(tmp_path, change, expected):
  sd = to_timm(_random_weights(_model("test/8")[1]))
  change(sd)
  path = write_safetensors(tmp_path / "w.safetensors", sd)
  assert expected in _one_line_error(path, _model("test/8")[1], "test/8")


def test_pre_logits_file_loads_body_but_not_head(tmp_path):
  _, init = _model("test/8")
  flat = _random_weights(init)
  np.savez(tmp_path / "w.npz", **to_npz_names(flat), **{"pre_logits/kernel": np.ones((32, 32)),
                                                        "pre_logits/bias": np.zeros(32)})
  loaded = pretrained.load_pretrained(str(tmp_path / "w.npz"), init, variant="test/8")
  _assert_same_weights(loaded, flat, skip=("head",))
  assert not np.asarray(loaded["head"]["kernel"]).any()


def test_relative_paths_are_from_the_repo_root():
  assert pretrained.resolve_path("weights/x.npz") == str(REPO / "weights" / "x.npz")
  assert pretrained.resolve_path("/abs/x.npz") == "/abs/x.npz"


# ---- hooks: validate.prepare, pipeline.run_clients, the command line -----------------------


def _folder_config(tmp_path, pretrained_path):
  for split in ("train", "test"):
    for c in ("a", "b"):
      (tmp_path / "data" / split / c).mkdir(parents=True)
      for i in range(6):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "data" / split / c / f"{i}.png")
  c = config_base.base_config()
  c.dataset.kind, c.dataset.root, c.dataset.image_size = "folder", str(tmp_path / "data"), 8
  c.dataset.cache_dir = str(tmp_path / "cache")
  c.model.variant, c.model.pretrained_path = "test/4", str(pretrained_path)
  c.partition.num_clients, c.partition.min_client_examples = 2, 1
  return c


def test_prepare_checks_the_file_before_writing(tmp_path):
  good = _vit_jax_file(tmp_path, _random_weights(_model("test/4", image_size=32)[1]))  # 8x8 -> 2x2, 10 -> 2 classes
  validate.prepare(_folder_config(tmp_path / "good", good), tmp_path / "work")
  assert (tmp_path / "work" / "config.json").exists()
  bad = _vit_jax_file(tmp_path, _random_weights(_model("Mu/4", image_size=8)[1]), "bad.npz")
  with pytest.raises(validate.InputError, match="^model.pretrained_path: .*embedding/kernel"):
    validate.prepare(_folder_config(tmp_path / "bad", bad), tmp_path / "work_bad")
  assert not (tmp_path / "work_bad").exists()


def test_run_clients_starts_from_the_file(tmp_path, monkeypatch):
  model, init = _model("test/8")
  flat = _random_weights(init)
  config = config_base.base_config()
  config.model.variant, config.model.pretrained_path = "test/8", _vit_jax_file(tmp_path, flat)
  seen = {}

  class Stop(Exception):
    pass

  def capture(params, tx):  # the client state is built from `init`: stop there and look at it
    seen["init"] = params
    raise Stop

  monkeypatch.setattr(pipeline.training, "init_client_state", capture)
  with pytest.raises(Stop):
    pipeline.run_clients(config, types.SimpleNamespace(num_classes=10), [np.arange(4)], store=None)
  _assert_same_weights(seen["init"], flat)


@pytest.mark.slow
def test_cli_wrong_shape_file_exits_2_and_writes_nothing(tmp_path):
  path = _vit_jax_file(tmp_path, _random_weights(_model("Mu/8")[1]))  # smoke is test/8: width 32
  env = dict(os.environ, XLA_FLAGS="")
  result = subprocess.run(
      [sys.executable, "-m", "fedmitr_jax.main", "--config", str(REPO / "configs/smoke.py"),
       "--workdir", str(tmp_path / "w"), f"--config.model.pretrained_path={path}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 2, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: model.pretrained_path") and "embedding/kernel" in last, last
  assert not (tmp_path / "w").exists()



def test_imagenet_input_norm_is_folded_into_the_patch_embedding():
  """A file trained on (u - mean) / std inputs gives the same patch embeddings on our [-1, 1]
  pixels once folded: conv_file((u - m) / s) == conv_folded(2u - 1)."""
  rng = np.random.default_rng(0)
  kernel, bias = rng.normal(size=(4, 4, 3, 8)), rng.normal(size=(8,))
  ours = {"embedding/kernel": kernel.copy(), "embedding/bias": bias.copy()}
  pretrained.fold_input_norm(ours, "imagenet")
  u = rng.uniform(size=(4, 4, 3))
  mean, std = (np.asarray(v) for v in pretrained.INPUT_NORMS["imagenet"])
  expected = np.einsum("hwc,hwcd->d", (u - mean) / std, kernel) + bias
  got = np.einsum("hwc,hwcd->d", 2 * u - 1, ours["embedding/kernel"]) + ours["embedding/bias"]
  np.testing.assert_allclose(got, expected, rtol=1e-10)
  same = {"embedding/kernel": kernel.copy(), "embedding/bias": bias.copy()}
  pretrained.fold_input_norm(same, "minus_one_one")  # the file already expects [-1, 1]
  np.testing.assert_array_equal(same["embedding/kernel"], kernel)
