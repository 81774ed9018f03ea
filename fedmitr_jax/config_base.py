"""The full set of config fields, with defaults; experiment files in configs/ override them.

Every field a stage reads lives here, so `--config.x=y` on a field that does not exist fails
(the config is locked), and a new stage adds its fields here with a comment saying why.
"""
import ml_collections

# The default methods: FedAvg, the ensemble and the four synthetic-bank methods; then the paper's
# generator-based competitors (docs/method.md has the table).
CORE_METHODS = ("fedavg", "ensemble", "dense_kd", "sparse_kd", "dense_relabel", "fedmitr")
GENERATOR_METHODS = ("dense", "coboosting")
ALL_METHODS = CORE_METHODS + GENERATOR_METHODS

# Allowed values of every choice field: the one table that validation (validate.py) and the
# modules that branch on a field both read, so a new value is added in one place.
CHOICES = {
    "dataset.kind": ("cifar10", "shared_cifar10", "folder", "tfds"),
    "partition.method": ("dirichlet", "iid", "classes_per_client"),
    "model.pretrained_input_norm": ("minus_one_one", "imagenet"),
    "model.dtype": ("float32", "bfloat16"),
    "clients.mode": ("vmap", "loop"),
    "clients.optimizer": ("adamw", "sgd"),
    "inversion.teachers_mode": ("loop", "vmap"),
    "inversion.target_space": ("prob", "logit"),
    "inversion.dense_mask": ("attention", "all"),
    "inversion.bank_dtype": ("float32", "bfloat16"),
    "distill.relabel_target": ("token", "image"),
    "distill.init": ("clients_fedavg", "random"),
    "eval.ensemble_weighting": ("uniform", "data_size"),
    "eval.fedavg_weighting": ("uniform", "data_size"),
    "eval.ensemble_rule": ("mean", "median", "trimmed_mean", "agreement"),
    "attack.kind": ("random", "label_flip", "scaled", "sign_flip", "noise"),
}


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.methods = CORE_METHODS

  # ---- data -------------------------------------------------------------------------------
  c.dataset = ml_collections.ConfigDict()
  # 'cifar10' (default): the decoded cache, else a local copy (dataset.tarball, else data/ in the
  #   repo), else the official tarball downloaded once (checksummed) from download_url; docs/data.md;
  # 'shared_cifar10': only the JPEG copy at dataset.tarball, never downloaded;
  # 'folder': root/<split>/<class>/*.{jpg,png} (OfficeHome, Mini-ImageNet layout);
  # 'tfds': a named tensorflow_datasets dataset already prepared under data_dir (never downloaded).
  c.dataset.kind = "cifar10"
  c.dataset.name = "cifar10"           # tfds name (kind='tfds')
  c.dataset.data_dir = ""              # tfds data_dir (kind='tfds'); '' = tfds default
  c.dataset.root = ""                  # folder root (kind='folder')
  c.dataset.tarball = "../shared/data/cifar10_jpg.tar.gz"  # relative paths: from the repo root
  # Where kind='cifar10' downloads the official binary tarball from when no copy is found (its size
  # and sha256 are pinned in data/download.py, so a mirror must serve the same file); '' = never download.
  c.dataset.download_url = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
  c.dataset.train_split = "train"
  c.dataset.test_split = "test"
  c.dataset.image_size = 32            # the model's input size; CIFAR-10 stays 32 px in memory and is
                                       # resized on the device (bilinear) when this differs
  c.dataset.cache_dir = ""             # '' = $FEDMITR_CACHE or ~/.cache/fedmitr_jax
  c.dataset.max_train_examples = 0     # 0 = all; >0 = a class-stratified, seeded subset (smoke)
  c.dataset.max_test_examples = 0

  # ---- partition --------------------------------------------------------------------------
  c.partition = ml_collections.ConfigDict()
  c.partition.method = "dirichlet"     # 'dirichlet' | 'iid' | 'classes_per_client'
  c.partition.num_clients = 5
  c.partition.alpha = 0.1
  c.partition.classes_per_client = 2
  c.partition.min_client_examples = 10

  # ---- model ------------------------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.variant = "Mi/4"             # '<size>/<patch>': test, Mu, Mi, Ti, S, B
  c.model.pretrained_path = ""         # clients start from this file (.npz / .safetensors); '' = random
  # Input normalisation the weights file was trained with, folded into the patch embedding:
  # 'minus_one_one' (vit_jax, big_vision, timm ViT ports) | 'imagenet' (DeiT's mean/std).
  c.model.pretrained_input_norm = "minus_one_one"
  # Compute dtype of every ViT (clients, teachers, students): 'float32' | 'bfloat16'. Parameters,
  # softmax, logits and losses stay float32. bfloat16 is for TPUs/GPUs; on XLA:CPU it is slower
  # (no AMX path; benchmarks/README.md).
  c.model.dtype = "float32"

  # ---- client (local) training ------------------------------------------------------------
  c.clients = ml_collections.ConfigDict()
  c.clients.mode = "vmap"              # 'vmap': all clients in one jitted step; 'loop': one by one
  c.clients.epochs = 2.0               # epochs over each client's own shard
  c.clients.batch_size = 64
  c.clients.optimizer = "adamw"        # 'adamw' | 'sgd'
  c.clients.lr = 1e-3
  c.clients.momentum = 0.9             # sgd only
  c.clients.weight_decay = 0.05
  c.clients.warmup_fraction = 0.05
  c.clients.grad_clip = 1.0
  c.clients.crop_padding = 4           # random crop after zero padding, then horizontal flip
  # > 0 adds weight * mean over patch tokens of CE(head on token i, image label) to each client's
  # loss: per-token evidence of the image class for token relabel, which a plain ViT's patch tokens
  # (trained through CLS only) do not give. 0 = the paper's plain ViT (the loss is unchanged).
  c.clients.token_loss_weight = 0.0
  c.clients.checkpoint_every_steps = 200
  c.clients.log_every_steps = 50

  # ---- sparse model inversion (server, data-free) ---------------------------------------
  c.inversion = ml_collections.ConfigDict()
  c.inversion.num_batches = 2          # bank size = num_batches * batch_size
  c.inversion.batch_size = 64
  c.inversion.iterations = 100         # SMI: 4000 at 224 px
  c.inversion.stops = (10, 20, 30, 40)  # SMI: (50, 100, 200, 300) of 4000; ignored by dense
  c.inversion.drop_ratio = 0.3         # at each stop drop 30% of the kept patches (SMI)
  c.inversion.lr = 0.25                # Adam on pixels, betas (0.5, 0.99) (SMI / DeepInversion)
  c.inversion.beta1 = 0.5
  c.inversion.beta2 = 0.99
  c.inversion.tv_weight = 1e-4         # TV-l2 prior; ViTs have no BatchNorm, so no BN-statistics term
  c.inversion.l2_weight = 0.0
  c.inversion.jitter_patches = 1       # random roll by up to this many whole patches, each step
  c.inversion.flip = True
  c.inversion.teachers_mode = "loop"   # 'loop' (unrolled in jit; faster on CPU) | 'vmap'
  # The ensemble whose CE to the label the pixels minimise: 'prob', the mean of the client
  # softmaxes (the ensemble everywhere else); 'logit', the softmax of the mean client logits, as
  # DENSE's and Co-Boosting's generators see it (sharper when few clients know a class).
  c.inversion.target_space = "prob"
  # Dense inversion has no stops; 'attention' ranks its final images the same way to get the
  # foreground mask token relabel needs (dense_relabel), 'all' marks every patch foreground.
  c.inversion.dense_mask = "attention"
  # How the bank stores its images and soft targets (teacher logits, per-token probabilities), on
  # disk and replicated on every device while the students distil: 'float32' | 'bfloat16' (half
  # the bytes, for paper-scale banks; values rounded to 8 significant bits, and the distillation
  # step computes in float32 from them). The inversion's pixels are float32 either way; each
  # finished batch is rounded once, before it is saved.
  c.inversion.bank_dtype = "float32"
  c.inversion.log_every = 25
  # G bank batches inverted at once, side by side on a ('batches', 'data') mesh of G x D/G devices,
  # each batch split over its D/G. Why: a batch must split over the devices that run it, so with
  # G = 1 a batch_size-image batch caps inversion at batch_size devices and leaves few images per
  # device on a pod; G > 1 uses G times the devices at the same batch_size. Each batch keeps its
  # own targets and random stream, so the bank equals G = 1's up to float rounding. Must divide
  # num_batches and the device count, and batch_size must be a multiple of D/G.
  c.inversion.parallel_batches = 1

  # ---- token-relabel distillation (server) -----------------------------------------------
  c.distill = ml_collections.ConfigDict()
  c.distill.epochs = 20.0              # passes over the synthetic bank
  c.distill.batch_size = 64            # global batch, split over all devices
  c.distill.lr = 1e-3
  c.distill.weight_decay = 0.05
  c.distill.warmup_fraction = 0.05
  c.distill.grad_clip = 1.0
  c.distill.tau = 4.0                  # KD temperature on the CLS head
  c.distill.beta = 0.5                 # weight of the token term (LV-ViT's 0.5)
  c.distill.relabel_target = "token"   # background patches learn: 'token' (per-token ensemble) | 'image'
  c.distill.background_temperature = 1.0  # background targets q^(1/T), renormalised; 1 = as stored (paper)
  c.distill.zero_background = False    # False: the student sees every patch ("all patches", paper)
  c.distill.shift_patches = 1          # augmentation: roll by whole patches + flip, labels move along
  c.distill.flip = True
  c.distill.init = "clients_fedavg"    # student init: 'clients_fedavg' | 'random'
  c.distill.eval_token_weight = 0.5    # CLS+token accuracy: cls + w * max_i token_i (LV-ViT)
  c.distill.checkpoint_every_steps = 100
  c.distill.log_every = 25

  # ---- generator baselines: DENSE and Co-Boosting (generator_kd.py) ---------------------
  # Pool size and student steps follow the bank (inversion.num_batches x batch_size) and
  # distill (epochs, batch_size, optimiser), so every data-free method has the same budget.
  c.generator_kd = ml_collections.ConfigDict()
  c.generator_kd.g_steps = 30          # generator steps per round (DENSE / Co-Boosting scripts)
  c.generator_kd.lr_g = 1e-3           # Adam(0.5, 0.999) on generator parameters and z
  c.generator_kd.z_dim = 256
  c.generator_kd.ngf = 64
  c.generator_kd.g_grad_clip = 10.0    # Co-Boosting clips the generator's gradient norm at 10
  c.generator_kd.oh = 1.0              # weight of the CE-to-target term
  c.generator_kd.adv = 1.0             # weight of the adversarial (student vs ensemble) term
  c.generator_kd.crop_padding = 4      # RandomCrop(pad 4) + flip before the ensemble (both repos)
  c.generator_kd.dense_tau = 20.0      # DENSE's KD temperature
  c.generator_kd.coboost_tau = 4.0     # Co-Boosting's KD temperature
  c.generator_kd.coboost_adv_tau = 3.0  # Co-Boosting's temperature of the adversarial KL
  c.generator_kd.hard_sample_power = 1.0  # (1 - p(y|x))^hs weights the CE of hard samples
  c.generator_kd.reweight_lr = 0.01    # ensemble re-weighting: signed step mu * decay^round
  c.generator_kd.reweight_decay = 0.99
  c.generator_kd.ods_eps = 8 / 255     # on-the-fly diversification step in [-1, 1] pixel space

  # ---- evaluation -------------------------------------------------------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 512              # split over all devices: any power-of-two count up to 512 divides it
  c.eval.ensemble_weighting = "uniform"  # weights of the client softmaxes: "uniform" | "data_size"
  c.eval.fedavg_weighting = "data_size"  # FedAvg parameter average weights (McMahan et al.: data size)
  # How the server combines its clients, everywhere (server/ensemble.py): 'mean' (the weighted
  # mean) | 'median' / 'trimmed_mean' (coordinate-wise, Yin et al. 2018; also used for the FedAvg
  # parameter average and the students' FedAvg init) | 'agreement' (weights scaled by each client's
  # agreement with the others on the synthetic images; FedAvg and the test-set evaluation, which
  # come before synthesis, on screening's random probes). Robust rules guard against bad uploads.
  c.eval.ensemble_rule = "mean"
  c.eval.trim_fraction = 0.2           # trimmed_mean drops floor(0.2 K) clients from each end
  # Screening (server/screening.py) always scores the uploads and reports them in results.json;
  # True also drops the flagged ones from the server. Off by default: under Dir(0.1) an honest
  # client holding a few classes is itself an outlier, and dropping it loses those classes.
  c.eval.screen_clients = False
  c.eval.screen_z = 3.5                # robust z-score above which an upload is flagged (Iglewicz-Hoaglin)
  c.eval.screen_probe_images = 64      # random probe images for prediction agreement

  # ---- attacks on the uploads (client/attacks.py) ------------------------------------------
  # For robustness experiments: the last `num_malicious` clients' uploads are replaced after the
  # clients stage (the honest clients' stage is reused). 0 = every client honest (default).
  c.attack = ml_collections.ConfigDict()
  c.attack.num_malicious = 0
  # 'random' (a fresh random init) | 'label_flip' (trained on labels y -> (y + 1) mod C) |
  # 'scaled' (parameters x scale) | 'sign_flip' (init - (w - init)) | 'noise' (w + noise of norm
  # noise_norm)
  c.attack.kind = "scaled"
  c.attack.scale = 100.0
  c.attack.noise_norm = 10.0

  # ---- logging ----------------------------------------------------------------------------
  # Every loop's progress metrics always go to <workdir>/metrics.jsonl, drawn as curves.png at the
  # end (metrics.py). This section holds what is optional on top; it never changes a result, so
  # it may differ when a workdir is resumed (validate.MAY_CHANGE).
  c.log = ml_collections.ConfigDict()
  c.log.tensorboard = False            # also TensorBoard events in <workdir>/tensorboard (tensorboardX)
  return c


PAPER_MODELS = ("Ti/16", "S/16")


def paper_scale(args, *, client_epochs: float) -> ml_collections.ConfigDict:
  """What the paper-scale configs (configs/paper_*.py) share; each then sets its dataset.

  `args`: parsed config args with alpha, clients, model, pretrained, norm. ImageNet-pretrained
  ViT-Ti/16 or S/16 clients at 224 px, SMI's schedule, every method of the paper's table.
  """
  if args.model not in PAPER_MODELS:
    raise ValueError(f"config arg 'model': '{args.model}' is not one of {PAPER_MODELS}")
  c = base_config()
  c.dataset.image_size = 224
  c.partition.method = "dirichlet"
  c.partition.alpha = args.alpha
  c.partition.num_clients = args.clients
  c.model.variant = args.model
  c.model.pretrained_path = args.pretrained
  # DeiT (timm) weights expect ImageNet mean/std inputs; vit_jax / big_vision .npz: norm=minus_one_one.
  c.model.pretrained_input_norm = args.norm
  c.methods = ALL_METHODS             # the paper's table, with DENSE and Co-Boosting
  c.generator_kd.crop_padding = 28     # the baselines' RandomCrop(pad 4) at 32 px, scaled to 224
  # Accelerator numerics: bfloat16 matmuls in every ViT (parameters, softmax, logits and losses stay
  # float32) and a bfloat16 bank, half the bytes each device holds while the students distil
  # (docs/launching.md has both dtypes' figures). On a CPU, bfloat16 is slower: override both.
  c.model.dtype = "bfloat16"
  c.inversion.bank_dtype = "bfloat16"

  # Clients fine-tune the pretrained ViT as DENSE / Co-Boosting train theirs (SGD lr 0.01, momentum
  # 0.9, no weight decay) with vit_jax's fine-tuning clip (1.0) and a cosine schedule; epochs per
  # dataset (CIFAR-10: 10 epochs of a ~10k-image shard is ~1.5k steps, enough for a pretrained ViT).
  # Batch 64 per client: the vmapped step holds K x 64 images, split over every device, at ~50 MB
  # of activations per image for Ti/16, ~95 MB for S/16: 5 Ti clients take 2.5 GiB per device on 8
  # (the dry run, docs/launching.md; the one-device step took 15.0 GiB; 0.59 GiB per device on 8 with
  # --config.clients.mode=loop, one client at a time), 10 S/16 clients ~60 GB over all devices; on
  # one 16 GB chip (v5e) use loop mode.
  c.clients.optimizer = "sgd"
  c.clients.lr = 0.01
  c.clients.momentum = 0.9
  c.clients.weight_decay = 0.0
  c.clients.epochs = client_epochs
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
  # of activations, ~33 GB for 5 teachers on one device, 3.0 GiB per device on 8 (the dry run);
  # S/16 with 10 clients on one 80 GB GPU needs --config.inversion.batch_size=64.
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


def parse_arg(arg: str, **defaults):
  """Parses 'key=value,flag' config args (big_vision style) into a ConfigDict with defaults."""
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in parsed:
      raise ValueError(f"config arg '{key}' is unknown; known args: {sorted(parsed.keys())}")
    if not _:
      parsed[key] = True
    else:
      kind = type(parsed[key])
      try:
        parsed[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
      except ValueError:
        raise ValueError(f"config arg '{key}': '{value}' is not a {kind.__name__}") from None
  return parsed


def pretrain_config() -> ml_collections.ConfigDict:
  """Fields of `python -m fedmitr_jax.pretrain` (formula-driven pretraining, fedmitr_jax/pretrain.py).

  A config of its own, not a section of `base_config`: pretraining sees no dataset, partition or
  server stage, and the main pipeline's config stays as it was. Its output `backbone.npz` is what
  `model.pretrained_path` of the main config then loads.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0                           # model init; the fractal classes and images derive from it
  c.model = ml_collections.ConfigDict()
  c.model.variant = "Mu/4"             # the clients' variant: the backbone must have their shapes
  c.model.dtype = "float32"

  # ---- images (fedmitr_jax/data/fractal.py) ------------------------------------------------
  c.fractal = ml_collections.ConfigDict()
  c.fractal.image_size = 32            # the clients' image size
  c.fractal.num_classes = 100          # random IFS systems = classes
  c.fractal.points_per_class = 2048    # attractor points per class, drawn once (chaos game)
  c.fractal.max_instances = 3          # 1..this many instances per image
  c.fractal.scale = (0.35, 0.8)        # instance bounding-box side / image side
  c.fractal.patch_threshold = 0.25     # share of a patch's pixels an instance needs to label it
  c.fractal.background_share = (0.2, 0.9)  # allowed share of background patches (else redrawn)
  c.fractal.noise = 12.0               # background pixel noise std (0..255)

  # ---- training ------------------------------------------------------------------------------
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.steps = 1000
  c.pretrain.batch_size = 64
  c.pretrain.optimizer = "adamw"       # same optimiser code as the clients (client/training.py)
  c.pretrain.lr = 1e-3
  c.pretrain.momentum = 0.9            # sgd only
  c.pretrain.weight_decay = 0.05
  c.pretrain.warmup_fraction = 0.05
  c.pretrain.grad_clip = 1.0
  c.pretrain.image_loss_weight = 1.0   # sigmoid BCE of the CLS head against the multi-hot label
  c.pretrain.token_loss_weight = 1.0   # CE of the token head against each patch's exact label
  c.pretrain.prefetch = 4              # batches rendered ahead in a background thread (0: inline)
  c.pretrain.checkpoint_every_steps = 200
  c.pretrain.log_every = 50
  c.pretrain.sample_images = 16        # images in fractal_samples.png
  return c
