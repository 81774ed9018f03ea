"""`--dry_run`: every stage compiled with abstract inputs on 8 fake CPU devices; FLOPs, steps and
memory per stage as JSON lines, nothing loaded, nothing written."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fedmitr_jax import dry_run, sharding

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARDED = ("clients", "inversion_", "distill_", "generator_kd/", "evaluate/")  # every stage, on every device


def test_flops_are_the_whole_step_however_it_is_split():
  """XLA counts an SPMD program per device; measure() multiplies back by the devices."""
  mesh = sharding.data_mesh()
  step = jax.jit(lambda x, w: jnp.tanh(x @ w).sum())
  lines = []
  for spec, devices in ((P(), 1), (P("data"), 8)):
    x = jax.ShapeDtypeStruct((1024, 512), jnp.float32, sharding=NamedSharding(mesh, spec))
    w = jax.ShapeDtypeStruct((512, 512), jnp.float32, sharding=NamedSharding(mesh, P()))
    lines.append(dry_run.measure("matmul", step, (x, w), steps=3, devices=devices))
  matmul_tflop = 2 * 1024 * 512 * 512 / 1e12
  for line in lines:
    assert line["tflop_per_step"] == pytest.approx(matmul_tflop, rel=0.01)
  # The arguments alone: x (2 MiB whole, 1/8 of it per device when split) and w (1 MiB).
  assert lines[0]["peak_gib_per_device"] * 2 ** 30 >= 3 * 2 ** 20
  assert lines[1]["peak_gib_per_device"] < lines[0]["peak_gib_per_device"]


def test_summary_projects_each_stage_at_its_own_devices():
  lines = [{"stage": "a", "devices": 8, "tflop_per_step": 8.0, "steps": 1000, "peak_gib_per_device": 1.0},
           {"stage": "b", "devices": 1, "tflop_per_step": 1.0, "steps": 1000, "peak_gib_per_device": 1.0}]
  out = dry_run.summary(lines, chip="v5e", mfu=0.5)
  assert out["total_eflop"] == pytest.approx(0.009)
  expected_s = 8000 / (8 * 197 * 0.5) + 1000 / (1 * 197 * 0.5)
  assert out["projected_hours"]["v5e"] == pytest.approx(expected_s / 3600, rel=1e-2)
  assert out["mfu"] == 0.5 and set(dry_run.summary(lines, chip=None, mfu=0.4)["projected_hours"]) == \
      {"v5e", "v6e", "h100", "h200"}


@pytest.mark.slow
def test_paper_cifar10_dry_run_on_8_devices(tmp_path):
  """configs/paper_cifar10.py with every method; a small ViT and generator (the shapes of Ti/16 at
  224 px take minutes to compile on a CPU). The data is a tfds folder with nothing prepared in it:
  any attempt to load it would fail."""
  workdir, no_data = tmp_path / "run", tmp_path / "empty_tfds"
  no_data.mkdir()
  cmd = [sys.executable, "-m", "fedmitr_jax.main", "--config", str(REPO / "configs/paper_cifar10.py"),
         "--workdir", str(workdir), "--dry_run", "--chip=v6e", "--config.model.variant=test/16",
         "--config.dataset.image_size=64", "--config.generator_kd.ngf=4",
         "--config.dataset.kind=tfds", f"--config.dataset.data_dir={no_data}"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO))  # run from an empty folder: anything written would show
  result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
  assert result.returncode == 0, result.stderr[-3000:]
  *stages, total = [json.loads(line) for line in result.stdout.splitlines()]
  by_name = {s["stage"]: s for s in stages}
  assert list(by_name) == [
      "clients", "inversion_dense", "inversion_sparse/16_tokens", "inversion_sparse/11_tokens",
      "inversion_sparse/7_tokens", "inversion_sparse/4_tokens", "inversion_sparse/2_tokens",
      "distill_kd", "distill_relabel", "generator_kd/dense/generator", "generator_kd/dense/kd",
      "generator_kd/coboosting/generator", "generator_kd/coboosting/kd", "evaluate/clients",
      "evaluate/models"]
  for s in stages:
    assert set(s) == {"stage", "devices", "tflop_per_step", "steps", "peak_gib_per_device"}
    assert s["devices"] == (8 if s["stage"].startswith(SHARDED) else 1), s
    assert s["tflop_per_step"] > 0 and s["peak_gib_per_device"] > 0, s
  # Steps from the config: 32 batches x 4000 iterations, split at the stops 50/100/200/300.
  assert by_name["inversion_dense"]["steps"] == 32 * 4000
  assert [by_name[f"inversion_sparse/{n}_tokens"]["steps"] for n in (16, 11, 7, 4, 2)] == \
      [32 * 50, 32 * 50, 32 * 100, 32 * 100, 32 * 3700]
  assert by_name["distill_relabel"]["steps"] == 2 * 200 * (32 * 128 // 256)  # dense_relabel + fedmitr
  assert by_name["clients"]["steps"] == int(np.ceil(10 * 50_000 / 5 / 64))
  # Fewer tokens, fewer FLOPs.
  flops = [by_name[f"inversion_sparse/{n}_tokens"]["tflop_per_step"] for n in (16, 11, 7, 4, 2)]
  assert flops == sorted(flops, reverse=True)
  assert total["devices"] == 8 and total["mfu"] == 0.4 and list(total["projected_hours"]) == ["v6e"]
  assert total["total_eflop"] == pytest.approx(sum(s["tflop_per_step"] * s["steps"] for s in stages) / 1e6,
                                               rel=1e-3)
  assert not workdir.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["empty_tfds"]
  assert list(no_data.iterdir()) == []


@pytest.mark.slow
def test_distillation_memory_holds_the_bank_in_its_dtype():
  """The distillation line compiles the run's bank loop: the replicated bank is in its peak, and a
  bfloat16 bank (held as its bits) takes half a float32 one's bytes, with no widened copy."""
  from fedmitr_jax import config_base
  from fedmitr_jax.server import synthetic_bank
  peaks = {}
  for dtype in ("float32", "bfloat16"):
    c = config_base.base_config()
    c.methods, c.model.variant, c.dataset.image_size = ("fedmitr",), "test/16", 64
    c.inversion.num_batches, c.inversion.batch_size, c.inversion.bank_dtype = 32, 128, dtype
    setup = dry_run.Setup(c)
    (line,) = dry_run.distill_stages(setup)
    assert line["stage"] == "distill_relabel" and line["devices"] == 8
    peaks[dtype] = line["peak_gib_per_device"] * 2 ** 30
  shapes = synthetic_bank.bank_shapes(c.inversion, 16, 10, c.partition.num_clients, 64)
  values = sum(np.prod(shape) for key, (shape, _) in shapes.items() if key in synthetic_bank.REAL_KEYS)
  assert peaks["float32"] > 4 * values  # the float32 bank's images and soft targets are in the peak
  assert peaks["float32"] - peaks["bfloat16"] == pytest.approx(2 * values, rel=0.02)  # 2 bytes a value less


@pytest.mark.slow  # compiles the inversion step twice (~several s on 2 shared cores)
def test_parallel_batches_dry_run_compiles_g_batches_on_g_by_d_over_g_devices():
  """inversion.parallel_batches=2: one step of both batches, vmapped on the 2 x 4 mesh, where a
  batch of 12 (not a multiple of 8) splits over 4 devices; the steps halve and the FLOPs per step
  double, so the stage's total work is G=1's."""
  from fedmitr_jax import config_base
  lines = {}
  for groups, batch in ((1, 16), (2, 16), (2, 12)):
    c = config_base.base_config()
    c.methods, c.model.variant, c.dataset.image_size = ("sparse_kd",), "test/8", 16
    c.inversion.num_batches, c.inversion.batch_size, c.inversion.parallel_batches = 4, batch, groups
    c.inversion.iterations, c.inversion.stops = 10, (5,)
    lines[groups, batch] = {line["stage"]: line for line in dry_run.inversion_stages(dry_run.Setup(c))}
  one, two = lines[1, 16], lines[2, 16]
  assert list(one) == list(two) == ["inversion_sparse/4_tokens", "inversion_sparse/2_tokens"]
  for stage in one:
    assert two[stage]["devices"] == 8 and two[stage]["steps"] * 2 == one[stage]["steps"]
    assert two[stage]["tflop_per_step"] == pytest.approx(2 * one[stage]["tflop_per_step"], rel=0.05)
  assert lines[2, 12]["inversion_sparse/2_tokens"]["steps"] == 10
