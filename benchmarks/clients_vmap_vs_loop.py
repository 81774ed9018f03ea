r"""Client training: all K clients in one vmapped step vs one client after another.

  python benchmarks/clients_vmap_vs_loop.py [--config configs/cifar10_cpu.py] [--steps 60]

Trains every client for the first `--steps` steps of its own batch plan on the real data of the
config, both ways, after a warm-up step that absorbs compilation; prints one JSON line per figure.
Real images per second count only unmasked examples, so the vmapped path pays for its padding.
"""
import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import importlib.util  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fedmitr_jax import entry  # noqa: E402
from fedmitr_jax.client import training  # noqa: E402
from fedmitr_jax.data import datasets, partition
from fedmitr_jax.models import vit  # noqa: E402

entry.use_cpu_flags()  # the commands' XLA:CPU flags, set before the backend starts


def load_config(path):
  spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/cifar10_cpu.py")
  parser.add_argument("--steps", type=int, default=60)
  args = parser.parse_args()
  config = load_config(args.config)
  dataset = datasets.load_dataset(config.dataset, seed=config.seed)
  p = config.partition
  parts = partition.partition_indices(dataset.train_labels, p.num_clients, p.method, alpha=p.alpha,
                                      classes_per_client=p.classes_per_client, seed=config.seed)
  full = training.plan_batches(parts, config.clients.batch_size, config.clients.epochs, config.seed)
  # The first `steps` steps of the real plan: the vmapped path pays for the real padding ratio.
  steps = min(args.steps, int(full.steps.max()))
  scale = steps / full.steps.max()
  plan = training.BatchPlan(index=full.index[:, :steps], mask=full.mask[:, :steps],
                           steps=np.maximum(1, np.round(full.steps * scale)).astype(int))
  plan.mask[np.arange(steps)[None, :] >= plan.steps[:, None]] = False
  model = vit.build_vit(config.model.variant, dataset.num_classes, image_size=config.dataset.image_size)
  tx = training.make_optimizer(config.clients)
  init = vit.init_params(model, jax.random.key(0), config.dataset.image_size)
  step = training.make_client_train_step(model, tx, config.clients, config.dataset.image_size)
  rngs = training.client_rngs(0, len(parts))
  timings = {}
  for mode in ("vmap", "loop"):
    warm = training.BatchPlan(index=plan.index[:, :1], mask=plan.mask[:, :1], steps=np.ones(len(parts), int))
    states = training.stack_copies(training.init_client_state(init, tx), len(parts))
    if mode == "loop":
      runner = training.train_clients_loop
    else:
      runner = training.train_clients_vmap
    jax.block_until_ready(runner(step, states, dataset.train_images, dataset.train_labels, warm, rngs,
                                 log_every=10**9))  # compile
    states = training.stack_copies(training.init_client_state(init, tx), len(parts))
    start = time.perf_counter()
    jax.block_until_ready(runner(step, states, dataset.train_images, dataset.train_labels, plan, rngs,
                                 log_every=10**9))
    timings[mode] = time.perf_counter() - start
  images = int(plan.mask.sum())
  for mode, seconds in timings.items():
    print(json.dumps({"figure": f"clients_{mode}_img_per_s", "value": round(images / seconds, 1)}))
  print(json.dumps({"figure": "clients_vmap_vs_sequential", "value": round(timings["loop"] / timings["vmap"], 3),
                    "goal": 1.0, "steps": steps, "client_steps": plan.steps.tolist(),
                    "padding_fraction": round(1 - images / plan.mask.size, 3)}))


if __name__ == "__main__":
  main()
