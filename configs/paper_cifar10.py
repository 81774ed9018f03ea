r"""Paper scale, CIFAR-10: ImageNet-pretrained ViT-Ti/16 (or S/16) clients at 224 px, SMI's schedule.

  python -m fedmitr_jax.sweep --config configs/paper_cifar10.py:model=Ti/16,pretrained=/data/deit_tiny.safetensors \
      --workdir /mnt/nfs/paper_cifar10_ti --alphas 0.1,0.3,0.5 --seeds 0,1,2
  launch/gpu.sh configs/paper_cifar10.py:pretrained=/data/deit_tiny.safetensors /data/runs/c10_a01
  TPU_NAME=my-tpu ZONE=us-central2-b launch/tpu_pod.sh \
      configs/paper_cifar10.py:pretrained=/home/me/deit_tiny.safetensors /mnt/nfs/c10_a01

Args (`:key=value,...`): alpha (0.1 | 0.3 | 0.5), clients (5 | 10), model ('Ti/16' | 'S/16'),
pretrained (the weights file every client starts from), norm ('imagenet' for DeiT
.safetensors, 'minus_one_one' for vit_jax/big_vision .npz), data ('shared': the JPEG copy in
../shared/data, upsampled from 32 to 224 px; 'tfds': tfds `cifar10` prepared under data_dir, also
upsampled), data_dir. Every kind of dataset is resized to 224 px by data.py when it is decoded
(bilinear; decoded once, then cached as a 7.5 GB .npz for the training split).
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

Cost (estimated from XLA's FLOP counts, not measured): one Ti/16 run with 5 clients is about
0.58 EFLOP, 77% of it the dense bank (the dense baselines need it): ~1.6 h at a sustained
100 TFLOP/s (one H100 might sustain less on Ti's narrow matmuls). 10 clients double the
synthesis; S/16 costs 3.5x Ti/16.
"""
from fedmitr_jax import config_base

MODELS = ("Ti/16", "S/16")
DATA = ("shared", "tfds")


def get_config(arg: str = ""):
  args = config_base.parse_arg(arg, alpha=0.1, clients=5, model="Ti/16", pretrained="", norm="imagenet", data="shared",
                               data_dir="")
  if args.model not in MODELS:
    raise ValueError(f"config arg 'model': '{args.model}' is not one of {MODELS}")
  if args.data not in DATA:
    raise ValueError(f"config arg 'data': '{args.data}' is not one of {DATA}")
  c = config_base.base_config()
  c.dataset.kind = "shared_cifar10" if args.data == "shared" else "tfds"
  c.dataset.name = "cifar10"
  c.dataset.data_dir = args.data_dir
  c.dataset.image_size = 224
  c.partition.method = "dirichlet"
  c.partition.alpha = args.alpha
  c.partition.num_clients = args.clients
  c.model.variant = args.model
  c.model.pretrained_path = args.pretrained
  # DeiT (timm) weights expect ImageNet mean/std inputs; vit_jax / big_vision .npz: norm=minus_one_one.
  c.model.pretrained_input_norm = args.norm
  c.methods = config_base.ALL_METHODS  # the paper's table, with DENSE and Co-Boosting
  c.generator_kd.crop_padding = 28     # the baselines' RandomCrop(pad 4) at 32 px, scaled to 224

  # Clients fine-tune the pretrained ViT as DENSE / Co-Boosting train theirs (SGD lr 0.01, momentum
  # 0.9, no weight decay) with vit_jax's fine-tuning clip (1.0) and a cosine schedule. 10 epochs of
  # a ~10k-image shard is ~1.5k steps, enough to fit a pretrained ViT; more only adds client drift.
  # Batch 64 per client: the vmapped step holds K x 64 images on one device, at ~50 MB of
  # activations per image for Ti/16, ~95 MB for S/16 (XLA's memory analysis): 5 Ti clients ~17 GB,
  # 10 S/16 clients ~60 GB; on 16-32 GB chips use --config.clients.mode=loop (one at a time).
  c.clients.optimizer = "sgd"
  c.clients.lr = 0.01
  c.clients.momentum = 0.9
  c.clients.weight_decay = 0.0
  c.clients.epochs = 10.0
  c.clients.batch_size = 64
  c.clients.crop_padding = 28  # 1/8 of the image, as pad 4 at 32 px

  # SMI's schedule at 224 px: 4000 iterations, stops 50/100/200/300 dropping 30% each (196 patches
  # -> 137 -> 95 -> 66 -> 46 kept), Adam lr 0.25, jitter +-28 px (~2 whole patches) + flip.
  # Bank: 32 x 128 = 4,096 images per bank (DENSE's pool reaches 51k generator samples, but 4000
  # pixel iterations per image cost ~1000x a generator sample; 4k is the affordable "thousands").
  c.inversion.iterations = 4000
  c.inversion.stops = (50, 100, 200, 300)
  c.inversion.drop_ratio = 0.3
  c.inversion.lr = 0.25
  c.inversion.jitter_patches = 2
  # Batch 128 (global, split over the devices): a dense step holds up to 128 x K x 50 MB (Ti/16)
  # of activations, ~33 GB for 5 teachers on one device; S/16 with 10 clients on one 80 GB GPU
  # needs --config.inversion.batch_size=64.
  c.inversion.batch_size = 128
  c.inversion.num_batches = 32
  c.inversion.log_every = 500

  # DENSE and Co-Boosting distil for 200 epochs over their pool; at 4,096 images that is 3,200
  # steps of 256 per student, ~4% of the run's FLOPs, so we keep it. AdamW at DeiT's lr rule
  # (5e-4 * batch / 512).
  c.distill.epochs = 200.0
  c.distill.batch_size = 256
  c.distill.lr = 2.5e-4
  c.distill.checkpoint_every_steps = 500
  c.distill.log_every = 100
  c.eval.batch_size = 256
  return c
