"""`--dry_run`: what a run will cost, from the compiler, before any of it runs.

Each stage's step is compiled on the current devices with abstract inputs (`jax.ShapeDtypeStruct`
carrying the run's shardings): client training, the inversion step dense and at every sparse
stop's token count, the distillation steps, the generator baselines' steps and the evaluation
steps. XLA's `cost_analysis()` gives the FLOPs of one step on one device (an SPMD program is
compiled per device: a step split over 8 devices does 1/8 of the work on each) and
`memory_analysis()` its buffers on one device. Printed, one JSON line per stage:

  {"stage", "devices", "tflop_per_step", "steps", "peak_gib_per_device"}

tflop_per_step is the whole step, summed over its devices; peak_gib_per_device is arguments +
outputs + temporaries - donated (aliased) buffers of one device. The last line adds them up: total
EFLOP and the hours each chip would take at the stated MFU, every stage at the speed of the
devices it runs on (a one-device stage gets one chip, however many the run has).

Nothing is read but the config (and, for a 'folder' dataset, the names of its class folders and
files, to count them); nothing is written. Step counts follow the pipeline's planning code; client
training assumes equal shards (Dirichlet shards are unequal, and the vmapped step runs until the
largest is done, so its real count is higher).
"""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fedmitr_jax import sharding, validate
from fedmitr_jax.client import training
from fedmitr_jax.data import datasets
from fedmitr_jax.models import vit
from fedmitr_jax.server import data_free, distill, generator_kd, inversion, synthetic_bank

# Peak dense bf16 TFLOP/s of one chip (vendor figures; H100/H200: SXM, without sparsity).
PEAK_BF16_TFLOPS = {"v5e": 197.0, "v6e": 918.0, "h100": 989.0, "h200": 989.0}
# (classes, train images, test images) of datasets whose size is fixed by their name.
KNOWN_SIZES = {"cifar10": (10, 50_000, 10_000), "cifar100": (100, 50_000, 10_000)}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


# ---- what the config says about the data, without loading it ----------------------------------------
def dataset_sizes(cfg) -> tuple[int, int, int]:
  """(classes, train images, test images), from the config or by counting files; no decoding."""
  if cfg.kind == "folder":
    try:
      datasets.check_dataset_config(cfg)
    except ValueError as e:
      raise validate.InputError(f"{e} (the dry run counts the class folders and images; it decodes none)") from None
    counts = []
    for split in (cfg.train_split, cfg.test_split):
      split_dir = os.path.join(cfg.root, split)
      classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
      counts.append(sum(f.lower().endswith(IMAGE_SUFFIXES)
                        for c in classes for f in os.listdir(os.path.join(split_dir, c))))
    num_classes, train, test = len(classes), *counts
  else:
    name = "cifar10" if cfg.kind == "shared_cifar10" else cfg.name
    if name not in KNOWN_SIZES:
      raise validate.InputError(f"dataset.name: the dry run knows the sizes of {sorted(KNOWN_SIZES)} only; "
                                f"'{name}' needs a real run (or a 'folder' copy it can count)")
    num_classes, train, test = KNOWN_SIZES[name]
  return (num_classes, min(train, cfg.max_train_examples or train), min(test, cfg.max_test_examples or test))


# ---- compiling a step ------------------------------------------------------------------------------
def abstract(tree, sharding_of=None):
  """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs), each with `sharding_of(x)`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      np.shape(x), x.dtype, sharding=sharding_of(x) if sharding_of else None), tree)


# The compiled code never runs, so XLA:CPU may skip LLVM's optimisations (most of its compile
# time); the FLOP count and the buffer assignment behind the memory figures come before them.
FAST_COMPILE = {"cpu": {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}}


def measure(stage: str, jitted, args, *, steps: int, devices: int, **kwargs) -> dict:
  """Compiles `jitted` for `args` and returns the stage's line."""
  options = FAST_COMPILE.get(jax.default_backend())
  compiled = jitted.lower(*args, **kwargs).compile(compiler_options=options)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = compiled.memory_analysis()
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
          - memory.alias_size_in_bytes)
  return {"stage": stage, "devices": devices, "tflop_per_step": significant(cost["flops"] * devices / 1e12),
          "steps": int(steps), "peak_gib_per_device": significant(peak / 2 ** 30)}


def significant(x: float, digits: int = 4) -> float:
  return float(f"{x:.{digits}g}")


class Setup:
  """The run's models, abstract parameters and shardings, built from the config alone."""

  def __init__(self, config):
    self.config = config
    self.num_classes, self.train_size, self.test_size = dataset_sizes(config.dataset)
    self.image_size = config.dataset.image_size
    # CIFAR-10 is held at its native 32 px and resized on the device inside each step.
    self.stored_size = 32 if config.dataset.kind in ("cifar10", "shared_cifar10") else self.image_size
    self.num_clients = config.partition.num_clients
    dtype = vit.compute_dtype(config.model.dtype)
    variant = config.model.variant
    self.teacher = vit.build_vit(variant, self.num_classes, image_size=self.image_size, dtype=dtype)
    self.student = vit.build_vit(variant, self.num_classes, image_size=self.image_size,
                                 separate_token_head=True, dtype=dtype)
    self.num_patches = vit.num_patches(variant, self.image_size)
    key = jax.random.key(0)
    self.params = jax.eval_shape(lambda: vit.init_params(self.teacher, key, self.image_size))
    self.student_params = jax.eval_shape(lambda: vit.init_params(self.student, key, self.image_size))
    self.client_params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((self.num_clients,) + x.shape, x.dtype), self.params)
    self.key = jax.eval_shape(lambda: key)
    self.mesh = sharding.data_mesh()
    self.split, self.replicated = NamedSharding(self.mesh, P("data")), NamedSharding(self.mesh, P())
    self.devices = jax.device_count()

  def sharded(self, tree):
    """As the run places it: batch-first arrays split over 'data', scalars replicated."""
    return abstract(tree, lambda x: self.split if np.ndim(x) else self.replicated)

  def replicate(self, tree):
    return abstract(tree, lambda x: self.replicated)

  def array(self, shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


# ---- the stages ------------------------------------------------------------------------------------
def client_stage(s: Setup) -> list[dict]:
  """The run's own jitted planned step on the run's mesh (training.stage_mesh over every device):
  all K clients vmapped (mode 'vmap', padded as the run pads them) or one client (mode 'loop'),
  with the whole training set replicated on every device as an argument, as in the run."""
  cfg, k = s.config.clients, s.num_clients
  tx = training.make_optimizer(cfg)
  step = training.make_client_train_step(s.teacher, tx, cfg, s.image_size)
  state = jax.eval_shape(lambda p: training.init_client_state(p, tx), s.params)
  shard_steps = max(1, math.ceil(cfg.epochs * (s.train_size / k) / cfg.batch_size))
  mesh = training.stage_mesh(cfg.mode, k, cfg.batch_size)
  on = lambda spec: (lambda x: NamedSharding(mesh, spec))
  data = (abstract(s.array((s.train_size, s.stored_size, s.stored_size, 3), jnp.uint8), on(P())),
          abstract(s.array((s.train_size,), jnp.int32), on(P())))
  key_data = jax.eval_shape(jax.random.key_data, s.key)
  if cfg.mode == "vmap":
    padded = -(-k // mesh.shape["clients"]) * mesh.shape["clients"]
    stack = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct((padded,) + x.shape, x.dtype), t)
    plan = (padded, shard_steps, cfg.batch_size)
    args = (abstract(stack(state), on(P("clients"))), *data,
            abstract(s.array(plan, jnp.int32), on(P("clients", None, "data"))),
            abstract(s.array(plan, jnp.bool_), on(P("clients", None, "data"))),
            abstract(s.array((padded,), jnp.int32), on(P("clients"))),
            abstract(stack(key_data), on(P("clients"))), s.array((), jnp.int32))
    return [measure("clients", training.jit_vmapped_step(step, mesh), args, steps=shard_steps, devices=mesh.size)]
  plan = (shard_steps, cfg.batch_size)
  args = (abstract(state, on(P())), *data, abstract(s.array(plan, jnp.int32), on(P(None, "data"))),
          abstract(s.array(plan, jnp.bool_), on(P(None, "data"))), abstract(s.array((), jnp.int32), on(P())),
          abstract(key_data, on(P())), s.array((), jnp.int32))
  return [measure("clients", training.jit_looped_step(step, mesh), args, steps=shard_steps * k, devices=mesh.size)]


def inversion_stages(s: Setup) -> list[dict]:
  """The inversion step at every token count it runs with: 'inversion_dense' (all patches, every
  iteration) and 'inversion_sparse/<tokens>' (each stage between stops)."""
  cfg = s.config.inversion
  kinds = sorted({data_free.DATA_FREE[m][0] for m in s.config.methods if m in data_free.DATA_FREE})
  groups = cfg.parallel_batches  # G batches at once: one step of all G, vmapped, on G x D/G devices
  step = inversion.make_inversion_step(s.teacher, cfg, s.image_size)
  state = jax.eval_shape(lambda key: inversion.init_state(cfg, key, cfg.batch_size, s.image_size,
                                                          s.num_patches), s.key)
  if groups == 1:
    step, sharded, replicate = jax.jit(step, donate_argnums=0), s.sharded, s.replicate
  else:
    mesh = sharding.group_mesh(groups)
    on = lambda x: NamedSharding(mesh, P("batches", "data") if np.ndim(x) >= 2 else P("batches"))
    stack = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct((groups,) + x.shape, x.dtype), t)
    sharded = lambda t: abstract(stack(t), on)
    replicate = lambda t: abstract(t, lambda x: NamedSharding(mesh, P()))
    step = jax.jit(jax.vmap(step, in_axes=(0, 0, None, None, 0)), donate_argnums=0)
  labels = sharded(s.array((cfg.batch_size,), jnp.int32))
  weights = replicate(s.array((s.num_clients,), jnp.float32))
  client_params = replicate(s.client_params)
  lines, compiled = [], {}
  for kind in kinds:
    stops = inversion.active_stops(cfg, kind == "sparse")
    counts = inversion.keep_counts(s.num_patches, len(stops), cfg.drop_ratio)
    bounds = [0] + stops + [cfg.iterations]
    for tokens, start, stop in zip(counts, bounds[:-1], bounds[1:]):
      if tokens not in compiled:
        at_tokens = state.replace(keep_idx=s.array((cfg.batch_size, tokens), jnp.int32))
        args = (sharded(at_tokens), labels, client_params, weights,
                s.replicate(s.key) if groups == 1 else sharded(s.key))
        compiled[tokens] = measure("", step, args, steps=0, devices=s.devices)
      name = "inversion_dense" if kind == "dense" else f"inversion_sparse/{tokens}_tokens"
      lines.append(dict(compiled[tokens], stage=name, steps=(stop - start) * cfg.num_batches // groups))
  return lines


def distill_stages(s: Setup) -> list[dict]:
  """The data-parallel distillation loop as the run compiles it (distill.jit_bank_loop): the whole
  bank replicated on every device in `inversion.bank_dtype`, the batch gathered from it on the
  device, split over 'data'. CLS-only KD (dense_kd, sparse_kd) and token relabel (dense_relabel,
  fedmitr); steps summed over the methods that take them. XLA counts the loop's body once (its
  bounds are traced), so the FLOPs are one step's, and the memory holds the bank."""
  inv = s.config.inversion
  shapes = synthetic_bank.bank_shapes(inv, s.num_patches, s.num_classes, s.num_clients, s.image_size)
  bank = s.replicate({key: s.array(shape, distill.held_dtype(dtype))  # as train_student places it
                      for key, (shape, dtype) in shapes.items()})
  lines = []
  for name, relabel in (("distill_kd", False), ("distill_relabel", True)):
    methods = [m for m in s.config.methods if m in data_free.DATA_FREE and data_free.DATA_FREE[m][1] == relabel]
    if not methods:
      continue
    cfg = s.config.distill.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.beta = s.config.distill.beta if relabel else 0.0
    total = distill.plan_steps(inv.num_batches * inv.batch_size, cfg.batch_size, cfg.epochs)
    tx = distill.make_optimizer(cfg, total)
    state = jax.eval_shape(lambda p: distill.StudentState(params=p, opt_state=tx.init(p),
                                                          step=jnp.zeros((), jnp.int32)), s.student_params)
    longest = min(cfg.log_every, cfg.checkpoint_every_steps, total)  # train_student's chunk length
    idx = jax.ShapeDtypeStruct((longest, cfg.batch_size), jnp.int32,
                               sharding=NamedSharding(s.mesh, P(None, "data")))
    loop = distill.jit_bank_loop(distill.make_distill_step(s.student, tx, cfg), s.mesh)
    first_bad = s.replicate(s.array((), jnp.int32))
    args = (s.replicate(state), bank, idx, s.replicate(s.key), 0, longest, first_bad)
    lines.append(measure(name, loop, args, steps=total * len(methods), devices=s.devices))
  return lines


def generator_kd_stages(s: Setup) -> list[dict]:
  """DENSE / Co-Boosting, data-parallel: the generator step (its batch split over 'data') and the
  student's KD step (its images split over 'data')."""
  config, lines = s.config, []
  cfg, inv, dcfg = config.generator_kd, config.inversion, config.distill
  rounds, batch = inv.num_batches, inv.batch_size
  weights = s.replicate(s.array((s.num_clients,), jnp.float32))
  client_params, student_params = s.replicate(s.client_params), s.replicate(s.student_params)
  for method in [m for m in config.methods if m in generator_kd.METHODS]:
    total_kd = distill.plan_steps(rounds * batch, dcfg.batch_size, dcfg.epochs)
    kd_per_round = -(-total_kd // rounds)
    tx = distill.make_optimizer(dcfg, kd_per_round * rounds)
    generator = generator_kd.Generator(s.image_size, cfg.ngf)
    gen_init, gen_step = generator_kd.make_generator_step(method, cfg, generator, s.teacher, s.student,
                                                          inv.teachers_mode, batch, s.mesh)
    gen_state = jax.eval_shape(gen_init, s.key)  # carries the shardings init places it with
    args = (gen_state, s.sharded(s.array((batch,), jnp.int32)), client_params, weights, student_params,
            s.replicate(s.key))
    lines.append(measure(f"generator_kd/{method}/generator", gen_step, args, steps=rounds * cfg.g_steps,
                         devices=s.devices))
    kd_step = generator_kd.jit_sharded_kd_step(
        generator_kd.make_kd_step(method, cfg, tx, s.teacher, s.student, inv.teachers_mode), s.mesh)
    state = jax.eval_shape(lambda p: distill.StudentState(params=p, opt_state=tx.init(p),
                                                          step=jnp.zeros((), jnp.int32)), s.student_params)
    images = s.sharded(s.array((dcfg.batch_size, s.image_size, s.image_size, 3), jnp.float32))
    lines.append(measure(f"generator_kd/{method}/kd", kd_step,
                         (s.replicate(state), images, client_params, weights, s.replicate(s.key)),
                         steps=kd_per_round * rounds, devices=s.devices))
  return lines


def evaluation_stages(s: Setup) -> list[dict]:
  """Test-set passes, each batch split over 'data': every client at once (clients and their
  ensemble), then FedAvg and each student (students that learned token labels are scored twice:
  CLS, CLS+token)."""
  from fedmitr_jax import diagnostics, evaluate
  b = s.config.eval.batch_size
  images = s.sharded(s.array((b, s.stored_size, s.stored_size, 3), jnp.uint8))
  batches = math.ceil(s.test_size / b)
  methods = list(s.config.methods)
  k = s.num_clients
  teacher_batch = diagnostics.jit_teacher_batch(s.teacher, s.mesh, s.image_size)
  lines = [measure("evaluate/clients", teacher_batch,
                   (s.replicate(s.client_params), s.replicate(s.array((k,), jnp.float32)),
                    s.replicate(s.array((k,), jnp.int32)), images, s.sharded(s.array((b,), jnp.int32))),
                   steps=batches, devices=s.devices)]
  passes = (("fedavg" in methods or "ensemble" in methods)  # run_baseline_eval always scores FedAvg
            + sum(m in generator_kd.METHODS for m in methods) + 2 * sum(m in data_free.DATA_FREE for m in methods))
  if passes:
    predict = evaluate.jit_predict(s.student, s.mesh, s.config.distill.eval_token_weight, s.image_size)
    lines.append(measure("evaluate/models", predict, (s.replicate(s.student_params), images),
                         steps=batches * passes, devices=s.devices))
  return lines


STAGES = (client_stage, inversion_stages, distill_stages, generator_kd_stages, evaluation_stages)


def plan(config) -> list[dict]:
  """Every stage's line, in the order the pipeline runs them."""
  validate.check_config(config)  # the run's own checks (paths are looked at, nothing is read)
  setup = Setup(config)
  return [line for stage in STAGES for line in stage(setup)]


def summary(lines, *, chip, mfu: float) -> dict:
  """Total EFLOP and projected hours: each stage at (its devices x the chip's peak x mfu)."""
  chips = [chip] if chip else list(PEAK_BF16_TFLOPS)
  hours = {c: significant(sum(l["tflop_per_step"] * l["steps"] / (l["devices"] * PEAK_BF16_TFLOPS[c] * mfu)
                              for l in lines) / 3600, 3) for c in chips}
  return {"total_eflop": significant(sum(l["tflop_per_step"] * l["steps"] for l in lines) / 1e6),
          "mfu": mfu, "peak_bf16_tflops_per_chip": {c: PEAK_BF16_TFLOPS[c] for c in chips},
          "projected_hours": hours, "devices": jax.device_count(),
          "device_kind": jax.devices()[0].device_kind,
          "note": "hours = sum over stages of tflop_per_step x steps / (stage devices x peak x mfu)"}


def report(config, *, chip=None, mfu: float = 0.4) -> list[dict]:
  """Prints one JSON line per stage and the summary line (on process 0); returns the stage lines."""
  lines = plan(config)
  if jax.process_index() == 0:
    for line in lines + [summary(lines, chip=chip, mfu=mfu)]:
      print(json.dumps(line), flush=True)
  return lines
