r"""Pretraining smoke run: a few steps of `python -m fedmitr_jax.pretrain` on a tiny ViT, for tests.

  python -m fedmitr_jax.pretrain --config configs/pretrain_smoke.py --workdir /tmp/pre_smoke

Expected: exits 0 in seconds and writes backbone.npz, pretrain.json and fractal_samples.png; the
losses are those of an untrained model: this config checks the plumbing.
"""
from fedmitr_jax import config_base


def get_config(arg: str = ""):
  args = config_base.parse_arg(arg, variant="test/4")
  c = config_base.pretrain_config()
  c.model.variant = args.variant
  c.fractal.num_classes = 8
  c.fractal.points_per_class = 512
  c.pretrain.steps = 6
  c.pretrain.batch_size = 8
  c.pretrain.checkpoint_every_steps = 2
  c.pretrain.log_every = 2
  c.pretrain.sample_images = 4
  return c
