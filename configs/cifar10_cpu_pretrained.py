r"""configs/cifar10_cpu_full.py with every client starting from a fractal-pretrained backbone.

First pretrain the backbone (no natural image is seen; writes W/backbone.npz):

  python -m fedmitr_jax.pretrain --config configs/pretrain_fractal.py --workdir W

then the sweep (5 clients, Dirichlet alpha in {0.1, 0.3, 0.5}, 2 seeds):

  python -m fedmitr_jax.sweep --config configs/cifar10_cpu_pretrained.py:backbone=W/backbone.npz \
      --workdir DIR --alphas 0.1,0.3,0.5 --seeds 0,1

Args: backbone=PATH (required; a relative path is taken from the repo root), token_loss=<float>
(clients.token_loss_weight: the per-token CE on patch tokens, 0 = plain ViT clients),
model=<size>/<patch> (the backbone's variant; Mu/4 as in cifar10_cpu_full and the
pretraining default), alpha=, clients=.
E.g. configs/cifar10_cpu_pretrained.py:backbone=W/backbone.npz,token_loss=0.5,alpha=0.3 runs
one split with the per-token loss.

Every client starts from the backbone, so FedAvg (their average), every distilled student (which
starts from FedAvg, distill.init) and DENSE / Co-Boosting (same init) do too. Everything else is
cifar10_cpu_full's budget and model (Mu/4), so a run costs what a cifar10_cpu_full run does. Each run's results.json holds the token
diagnostics of the clients and the ensemble (docs/diagnostics.md): the measure of whether the
backbone gives the teachers' patch tokens the class evidence token relabel needs.
"""
import importlib.util
import pathlib

from fedmitr_jax import config_base


def _full_config(arg: str):
  """configs/cifar10_cpu_full.py's config (configs/ is not a package: loaded by path)."""
  path = pathlib.Path(__file__).with_name("cifar10_cpu_full.py")
  spec = importlib.util.spec_from_file_location("configs_cifar10_cpu_full", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg: str = ""):
  args = config_base.parse_arg(arg, alpha=0.1, clients=5, backbone="", token_loss=0.0, model="Mu/4")
  if not args.backbone:
    raise ValueError("config arg 'backbone': not set; run the pretraining first (python -m "
                     "fedmitr_jax.pretrain --config configs/pretrain_fractal.py --workdir W) and pass "
                     "backbone=W/backbone.npz")
  c = _full_config(f"alpha={args.alpha},clients={args.clients}")
  c.model.variant = args.model
  c.model.pretrained_path = args.backbone
  c.model.pretrained_input_norm = "minus_one_one"  # pretrained on our own [-1, 1] inputs: nothing to fold
  c.clients.token_loss_weight = args.token_loss
  return c
