r"""The default job: CIFAR-10 (offline JPEG copy), 5 clients, Dir(0.1), a small 32-px ViT.

  python -m fedmitr_jax.main --config configs/cifar10_cpu.py --workdir /tmp/fedmitr_cpu

Budgeted to finish in under 8 minutes on a 2-core CPU with the six default methods (5.2 min
measured; hardware table in docs/results.md). Expected (seed 0, docs/results.md "The default job"):
clients 13-25%, ensemble 27.8%, fedavg 15.3%, dense_kd 13.8%, sparse_kd 18.1%, dense_relabel 14.2%,
fedmitr 16.9% (19.6% with the token head).
Args: 'alpha=0.3,clients=10' change the split.
"""
from fedmitr_jax import config_base


def get_config(arg: str = ""):
  args = config_base.parse_arg(arg, alpha=0.1, clients=5)
  c = config_base.base_config()
  c.partition.method = "dirichlet"
  c.partition.alpha = args.alpha
  c.partition.num_clients = args.clients
  c.model.variant = "Mu/4"
  # One client after another: 1.7x the images/s of the vmapped step on a 2-core CPU, where K
  # clients in one step add padding (Dir(0.1) shards are unequal) and gain no parallelism
  # (benchmarks/README.md, clients_vmap_vs_sequential). Same batches and random numbers as vmap.
  c.clients.mode = "loop"
  c.clients.epochs = 3.0
  c.clients.batch_size = 64
  c.clients.lr = 1e-3
  # 4 x 64 synthetic images per bank at 100 iterations; stops at 10/20/30/40 (config_base).
  c.inversion.num_batches = 4
  c.inversion.batch_size = 64
  return c
