r"""Device bytes per synthetic-bank image, for each inversion.bank_dtype (the figures in docs/data.md).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python benchmarks/bank_memory.py [--image_size 224 --patch 16 --classes 100 --teachers 5]

Two measurements per dtype, one JSON line each:
- "placed": a bank of --images images put on the devices as distillation puts it (synthetic_bank's
  arrays, distill.as_bits, sharding.replicate), then the bytes of the shards one device holds
  (and, on an accelerator, the change in its allocator's bytes_in_use), per image;
- "compiled": the distillation loop (dry_run.distill_stages, the run's own jit_bank_loop) compiled
  for a bank of B and of 2B images (B = --batch images, one inversion batch); the difference of
  XLA's peak bytes per device, divided by B: what one more image costs a device in the compiled
  stage, copies included. The student is the tiny 'test' ViT with the run's patch size: the bank's
  share does not depend on the student, and it compiles in seconds.
"""
import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fedmitr_jax import config_base, dry_run, sharding  # noqa: E402
from fedmitr_jax.server import distill, synthetic_bank  # noqa: E402


def inversion_cfg(dtype: str, images: int):
  cfg = config_base.base_config().inversion
  cfg.num_batches, cfg.batch_size, cfg.bank_dtype = 1, images, dtype
  return cfg


def placed(dtype: str, args) -> dict:
  """Bytes one device holds per image of a bank placed as train_student places it."""
  shapes = synthetic_bank.bank_shapes(inversion_cfg(dtype, args.images), (args.image_size // args.patch) ** 2,
                                      args.classes, args.teachers, args.image_size)
  device = jax.devices()[0]
  before = (device.memory_stats() or {}).get("bytes_in_use")
  bank = sharding.replicate(sharding.data_mesh(), {key: distill.as_bits(np.zeros(shape, dt))
                                                  for key, (shape, dt) in shapes.items()})
  jax.block_until_ready(bank)
  after = (device.memory_stats() or {}).get("bytes_in_use")
  per_key = {key: sum(s.data.nbytes for s in array.addressable_shards if s.device == device) / args.images
             for key, array in bank.items()}
  return {"measure": "placed", "bank_dtype": dtype, "bytes_per_image_per_device": sum(per_key.values()),
          "per_key": per_key,
          "allocator_bytes_per_image": None if before is None else (after - before) / args.images,
          "devices": jax.device_count(), "device_kind": device.device_kind}


def compiled(dtype: str, args) -> dict:
  """XLA's peak bytes per device of the distillation loop: per image, from two bank sizes."""
  peaks = []
  for num_batches in (1, 2):
    c = config_base.base_config()
    c.dataset.name, c.dataset.image_size = "cifar100", args.image_size  # C = 100 (the dry run knows it)
    c.model.variant = f"test/{args.patch}"
    c.partition.num_clients = args.teachers
    c.methods = ("fedmitr",)
    c.inversion.batch_size, c.inversion.num_batches, c.inversion.bank_dtype = args.batch, num_batches, dtype
    # One step per compiled chunk at both sizes: only the bank differs between the two programs.
    c.distill.batch_size, c.distill.epochs, c.distill.log_every = args.batch, 1.0, 1
    setup = dry_run.Setup(c)
    assert setup.num_classes == args.classes, "--classes: the compiled measure uses CIFAR-100's 100 classes"
    (line,) = dry_run.distill_stages(setup)
    peaks.append(line["peak_gib_per_device"] * 2 ** 30)
  return {"measure": "compiled", "bank_dtype": dtype,
          "bytes_per_image_per_device": (peaks[1] - peaks[0]) / args.batch,
          "bank_images": (args.batch, 2 * args.batch), "devices": jax.device_count(),
          "device_kind": jax.devices()[0].device_kind}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--patch", type=int, default=16)
  parser.add_argument("--classes", type=int, default=100)
  parser.add_argument("--teachers", type=int, default=5)
  parser.add_argument("--images", type=int, default=64, help="bank size of the 'placed' measure")
  parser.add_argument("--batch", type=int, default=128, help="inversion batch of the 'compiled' measure")
  args = parser.parse_args()
  for dtype in config_base.CHOICES["inversion.bank_dtype"]:
    print(json.dumps(placed(dtype, args)), flush=True)
  if args.classes == 100:
    for dtype in config_base.CHOICES["inversion.bank_dtype"]:
      print(json.dumps(compiled(dtype, args)), flush=True)


if __name__ == "__main__":
  main()
