r"""The gate before the federated sweep: does a backbone give a ViT's patch tokens class evidence?

One Mi/4 client trained centrally on 10,000 CIFAR-10 training images (a class-stratified, seeded
subset), evaluated on the full test set: its test accuracy and token diagnostics (token entropy,
token accuracy, per-class accuracy; docs/diagnostics.md). Run from scratch and from the backbone
with the same steps, and each with and without the per-token loss:

  python -m fedmitr_jax.main --config configs/central_gate.py:epochs=30 --workdir G/scratch
  python -m fedmitr_jax.main --config configs/central_gate.py:backbone=W/backbone.npz,epochs=30 \
      --workdir G/backbone

(add token_loss=0.5 for the per-token CE, with a workdir of its own). Each results.md holds the
accuracy and the diagnostics table; the comparison table goes in docs/results.md. W/backbone.npz
comes from `python -m fedmitr_jax.pretrain --config configs/pretrain_fractal.py --workdir W`.

Args: backbone=PATH ('' = from scratch), token_loss=<float> (clients.token_loss_weight),
model=<size>/<patch> (Mi/4 by default; the backbone's variant when one is given),
epochs=<float> (passes over the 10,000 images, 157 steps of 64 each). The run is partition (iid,
one client holding every image) -> clients -> evaluation; FedAvg and the ensemble of one client are
that client, so `methods` lists them only to report its accuracy and diagnostics.

Time: `central_gate.py:epochs=1` (157 steps, from scratch) trained in 254 s, compilation included,
and evaluated in 88 s (the diagnostics pass and FedAvg, 10,000 test images each) on the 2-core CPU
of the README while other jobs shared it (load average ~18). At benchmarks/README.md's uncontended
Mi/4 client step rate (395 img/s) an epoch is ~25 s, so epochs=30 is ~13 min of training per run.
That run's test accuracy was 30.1%, token entropy 1.912 nats, token accuracy 26.4%.
"""
from fedmitr_jax import config_base


def get_config(arg: str = ""):
  args = config_base.parse_arg(arg, backbone="", token_loss=0.0, epochs=30.0, model="Mi/4")
  c = config_base.base_config()
  c.methods = ("fedavg", "ensemble")  # no server stage: the gate is about the client alone
  c.dataset.max_train_examples = 10_000
  c.partition.method = "iid"
  c.partition.num_clients = 1
  c.model.variant = args.model
  c.model.pretrained_path = args.backbone
  c.model.pretrained_input_norm = "minus_one_one"  # pretrained on our own [-1, 1] inputs
  c.clients.mode = "loop"  # one client: the same steps either way, loop is the faster mode on CPU
  c.clients.epochs = args.epochs
  c.clients.batch_size = 64
  c.clients.lr = 1e-3
  c.clients.token_loss_weight = args.token_loss
  return c
