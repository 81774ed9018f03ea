r"""Paper scale, CIFAR-10: ImageNet-pretrained ViT-Ti/16 (or S/16) clients at 224 px, SMI's schedule.

  python -m fedmitr_jax.sweep --config configs/paper_cifar10.py:model=Ti/16,pretrained=/data/deit_tiny.safetensors \
      --workdir /mnt/nfs/paper_cifar10_ti --alphas 0.1,0.3,0.5 --seeds 0,1,2
  launch/gpu.sh configs/paper_cifar10.py:pretrained=/data/deit_tiny.safetensors /data/runs/c10_a01
  TPU_NAME=my-tpu ZONE=us-central2-b launch/tpu_pod.sh \
      configs/paper_cifar10.py:pretrained=/home/me/deit_tiny.safetensors /mnt/nfs/c10_a01

Args (`:key=value,...`): alpha (0.1 | 0.3 | 0.5), clients (5 | 10), model ('Ti/16' | 'S/16'),
pretrained (the weights file every client starts from), norm ('imagenet' for DeiT
.safetensors, 'minus_one_one' for vit_jax/big_vision .npz), data ('cifar10', the default: a local
copy or the checksummed download, docs/data.md; 'shared': only the JPEG copy at dataset.tarball;
'tfds': tfds `cifar10` prepared under data_dir), data_dir. 'cifar10' and 'shared' keep the images at
32 px in memory and upsample each batch to 224 px on the device (bilinear); 'tfds' resizes when it
decodes, so it caches and holds 7.5 GB for the training split.
Pretrained weights (the paper's clients start from ImageNet-1k weights): DeiT-Ti as timm
.safetensors, https://huggingface.co/timm/deit_tiny_patch16_224.fb_in1k/resolve/main/model.safetensors
(S/16: timm/deit_small_patch16_224.fb_in1k), or a vit_jax .npz such as gs://vit_models/augreg/
Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224.npz
(ImageNet-21k pretraining, then 1k). Download on a machine with network and pass the local path.

Compare with: FedMITR's published gain over the best baseline at Dir(0.1) on CIFAR-10 is +3.20
points (absolute accuracies are not public): check fedmitr - max(dense_kd, sparse_kd,
dense_relabel, fedavg) in sweep.md at alpha 0.1. DENSE's CNN table (5 clients, alpha
0.1/0.3/0.5): FedAvg 23.93/27.72/43.67, DENSE 50.26/59.76/62.19, ensemble 57.5/77.35/79.91;
pretrained ViTs are far stronger, so compare the ordering fedavg < data-free students < ensemble
only, not the numbers.

Cost: one Ti/16 run with 5 clients is 0.68 EFLOP by XLA's counts (the dry run), 68% of it the
dense bank (the dense baselines need it). One H200 sustained 60-80 TFLOP/s on its clients and
dense bank (Ti's narrow matmuls; docs/launching.md), so a full run takes ~3.6 h on one H200 (that
figure extrapolates measured stage rates). 10 clients double the synthesis; S/16 costs 3.5x Ti/16.
"""
from fedmitr_jax import config_base

DATA = {"cifar10": "cifar10", "shared": "shared_cifar10", "tfds": "tfds"}  # data arg -> dataset.kind


def get_config(arg: str = ""):
  args = config_base.parse_arg(arg, alpha=0.1, clients=5, model="Ti/16", pretrained="", norm="imagenet",
                               data="cifar10", data_dir="")
  if args.data not in DATA:
    raise ValueError(f"config arg 'data': '{args.data}' is not one of {tuple(DATA)}")
  c = config_base.paper_scale(args, client_epochs=10.0)
  c.dataset.kind = DATA[args.data]
  c.dataset.name = "cifar10"
  c.dataset.data_dir = args.data_dir
  return c
