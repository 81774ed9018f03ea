r"""Fractal pretraining of the 32-px client ViTs: the real run, sized for a 2-core CPU.

  python -m fedmitr_jax.pretrain --config configs/pretrain_fractal.py --workdir W
  python -m fedmitr_jax.pretrain --config configs/pretrain_fractal.py:variant=Mi/4 --workdir W

then point the main pipeline at W/backbone.npz (--config.model.pretrained_path=W/backbone.npz,
same model.variant). No natural image is used: the images are rendered IFS fractals with exact
per-patch labels (fedmitr_jax/data/fractal.py).

Budget (measured on a 2-core CPU shared with other jobs, load average ~15-20; W/pretrain.json
records each run's own rates):
  Mu/4, batch 64: train step 92 ms of CPU (238 ms wall under that load), rendering 64 images 30 ms
  of CPU on the prefetch thread (~2,100 images per CPU-second). 15,000 steps ~= 122 ms x 15,000
  = 31 min when the CPU is ours (CPU time summed over both cores, so an upper bound there).
  This config's first 500 steps, shared CPU at load average 9-18: 256-301 img/s after compiling,
  0.21-0.25 s per step, rendering 355-475 img/s on its thread: 15,000 steps in 53-60 min.
  Mi/4, batch 64: train step 271 ms of CPU (1.0 s wall under load): 6,000 steps ~= 30 min.

Classes: 100, not FractalDB's 1,000. A width-64, 3-block ViT sees ~1M images in this budget
(~2 instances each: ~19k instances per class at 100 classes). Data would suffice for 1,000, but a
1,000-way task would stay at chance for most of this short run, and what the clients need is the
encoder's patch features, which the per-token task trains at any class count. Short runs (800 steps of batch 64, Mu/4, lr to 0 by
step 800): at 10 classes the foreground-token accuracy reaches 14% (chance 10%); at 100 classes it
is still 0.6% (chance 1%, rising from 0.01%) while background/foreground is already learnt, so
more classes than 100 would leave the class task at chance for most of this budget.
"""
from fedmitr_jax import config_base

STEPS = {"Mu/4": 15000, "Mi/4": 6000}


def get_config(arg: str = ""):
  args = config_base.parse_arg(arg, variant="Mu/4")
  if args.variant not in STEPS:
    raise ValueError(f"config arg 'variant': '{args.variant}' is not one of {sorted(STEPS)}")
  c = config_base.pretrain_config()
  c.model.variant = args.variant
  c.fractal.num_classes = 100
  c.pretrain.steps = STEPS[args.variant]
  c.pretrain.batch_size = 64
  c.pretrain.lr = 1e-3
  c.pretrain.warmup_fraction = 0.02
  c.pretrain.checkpoint_every_steps = 500
  c.pretrain.log_every = 100
  return c
