r"""Smoke run: a few steps of every stage on 600 CIFAR-10 images, for tests (about a minute).

  python -m fedmitr_jax.main --config configs/smoke.py --workdir /tmp/smoke

Expected: exits 0 and writes /tmp/smoke/results.json with every method of `methods`; the
accuracies are near chance (10%): this config checks the plumbing, not the method.
"""
from fedmitr_jax import config_base


def get_config(arg: str = ""):
  args = config_base.parse_arg(arg, clients=3)
  c = config_base.base_config()
  c.methods = config_base.ALL_METHODS
  c.dataset.max_train_examples = 600
  c.dataset.max_test_examples = 200
  c.partition.num_clients = args.clients
  c.partition.alpha = 0.5
  c.model.variant = "test/8"
  c.clients.epochs = 1.0
  c.clients.batch_size = 32
  c.clients.checkpoint_every_steps = 4
  c.clients.log_every_steps = 5
  c.inversion.num_batches = 2
  c.inversion.batch_size = 16
  c.inversion.iterations = 8
  c.inversion.stops = (2, 4, 6)
  c.inversion.log_every = 4
  c.distill.epochs = 2.0
  c.distill.batch_size = 16
  c.distill.checkpoint_every_steps = 2
  c.distill.log_every = 2
  c.generator_kd.g_steps = 3
  c.generator_kd.ngf = 8
  c.eval.batch_size = 128  # split over the devices: 1, 2, 4 or 8 of them divide it
  return c
