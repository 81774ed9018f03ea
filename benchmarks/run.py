r"""Every speed figure of the project, in one run: one JSON line per figure, then a table.

  python benchmarks/run.py            # everything (~30 min on the 2-core CPU, with the default job)
  python benchmarks/run.py --quick    # a few minutes: fewer repeats, no default job
  python benchmarks/run.py --only sparse_vs_dense   # the inversion step figures alone

Figures (`{"figure": name, "value": number, "goal": number}`; ratios are measured in this run):
  sparse_vs_dense_speedup    dense / sparse inversion wall time at equal iterations, SMI's schedule
                             (goal: PyTorch's ratio measured the same way, when torch is installed)
  inversion_vs_torch_eager   PyTorch eager / ours, one 5-teacher inversion step (dense and sparse)
  train_vs_torch             PyTorch (best of eager, torch.compile) / ours, one distillation step
  train_peak_fraction        our distillation step's GFLOP/s (XLA cost analysis) / matmul peak
  teachers_vmap_vs_loop      loop / vmap time of an inversion step (> 1: vmap faster)
  clients_vmap_vs_sequential sequential / vmapped client training time (> 1: vmap faster)
  host_share_*               share of a hot loop's wall time outside compiled computation
                             (inversion, distillation, clients; benchmarks/host_overhead.py)
  default_job_seconds        the README's default job, end to end (stages in the JSON line)
  bf16_matmul_vs_torch       JAX bf16 matmul GFLOP/s / PyTorch bf16 matmul GFLOP/s
PyTorch is optional (`pip install torch==2.13.0`); without it the torch figures are skipped.
Shapes (the performance goals' shapes): fp32, batch 128, 32 px, patch 4, ViT width 128/depth 4
('Mi/4') and width 192/depth 6 ('Sm/4'), 5 teachers, 10 classes.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fedmitr_jax import config_base, entry  # noqa: E402
from fedmitr_jax.client import training
from fedmitr_jax.models import vit  # noqa: E402
from fedmitr_jax.server import distill, inversion

entry.use_cpu_flags()  # the commands' XLA:CPU flags, set before the backend starts

BATCH, IMAGE, CLASSES, TEACHERS = 128, 32, 10, 5
SMI_ITERATIONS, SMI_STOPS = 4000, (50, 100, 200, 300)
FIGURES = []


def emit(figure, value, goal=None, **extra):
  line = {"figure": figure, "value": None if value is None else round(float(value), 4), "goal": goal, **extra}
  FIGURES.append(line)
  print(json.dumps(line), flush=True)


def seconds_per_call(fn, args, repeats, warmup=2):
  """Median wall time of `fn(*args)` after `warmup` calls (compilation excluded)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def compiled_flops(jitted, *args) -> float:
  analysis = jitted.lower(*args).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis["flops"])


# ---- matmul peak ------------------------------------------------------------------------------
def jax_matmul_gflops(dtype, n=2048, repeats=10):
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
  mm = jax.jit(lambda x, y: x @ y)
  return 2 * n ** 3 / seconds_per_call(mm, (a, a), repeats) / 1e9


# ---- inversion --------------------------------------------------------------------------------
def teachers_for(variant, num=TEACHERS, dtype=jnp.float32):
  model = vit.build_vit(variant, CLASSES, image_size=IMAGE, dtype=dtype)
  params = [vit.init_params(model, jax.random.key(k), IMAGE) for k in range(num)]
  return model, jax.tree.map(lambda *xs: jnp.stack(xs), *params)


def inversion_step_call(model, teachers, tokens, mode="loop", rule=None):
  """(jitted step, its arguments): one inversion step forwarding `tokens` patch tokens, at the
  module's IMAGE / BATCH / TEACHERS; `rule` (an ensemble.Rule) combines the teachers, the mean by
  default."""
  cfg = config_base.base_config().inversion
  cfg.teachers_mode = mode
  step = jax.jit(inversion.make_inversion_step(model, cfg, IMAGE, **({"rule": rule} if rule else {})))
  num_patches = (IMAGE // model.patch_size) ** 2
  state = inversion.init_state(cfg, jax.random.key(0), BATCH, IMAGE, num_patches)
  state = state.replace(keep_idx=state.keep_idx[:, :tokens])
  labels = jnp.asarray(inversion.balanced_labels(0, BATCH, CLASSES))
  weights = jnp.full((TEACHERS,), 1.0 / TEACHERS)
  return step, (state, labels, teachers, weights, jax.random.key(1))


def inversion_step_seconds(model, teachers, tokens, repeats, mode="loop", flops=True):
  """(seconds, flops) of one inversion step (`inversion_step_call`); flops=False skips the second
  compilation that counts them (None)."""
  step, args = inversion_step_call(model, teachers, tokens, mode)
  return seconds_per_call(step, args, repeats), compiled_flops(step, *args) if flops else None


def sparse_vs_dense(variant, repeats, torch_ref):
  """Our inversion step's seconds at every token count of SMI's schedule and the dense / sparse
  ratio they give; with PyTorch, its eager step's seconds at the same counts and its ratio, the
  goal ours is held to (both measured here, in this run). Returns (ours, PyTorch's) seconds."""
  model, teachers = teachers_for(variant)
  counts = inversion.keep_counts(vit.num_patches(variant, IMAGE), len(SMI_STOPS), 0.3)
  ours, theirs = {}, {}
  for n in counts:
    ours[n], flops = inversion_step_seconds(model, teachers, n, repeats)
    emit(f"inversion_step_seconds_{variant}_{n}tokens", ours[n], gflops_per_s=round(flops / ours[n] / 1e9, 1))
  goal = 3.0
  if torch_ref:
    theirs = {n: torch_ref.inversion_step_seconds(variant, n, repeats) for n in counts}
    goal = smi_weighted_speedup(theirs, counts)
    emit(f"sparse_vs_dense_speedup_torch_{variant}", goal,
         step_seconds={n: round(t, 4) for n, t in theirs.items()})
  emit(f"sparse_vs_dense_speedup_{variant}", smi_weighted_speedup(ours, counts), goal=round(goal, 3),
       how="per-step times at each token count, weighted by SMI's 4000-iteration schedule; goal: "
           + ("PyTorch eager's ratio, measured the same way in this run" if torch_ref else "3.0"))
  return ours, theirs


def inversion_figures(variant, repeats, torch_ref):
  step_seconds, torch_seconds = sparse_vs_dense(variant, repeats, torch_ref)
  if torch_ref:
    for n in (max(step_seconds), min(step_seconds)):
      emit(f"inversion_vs_torch_eager_{variant}_{n}tokens", torch_seconds[n] / step_seconds[n], goal=1.3)


def smi_weighted_speedup(step_seconds: dict, counts) -> float:
  """Dense / sparse time of SMI's 4000-iteration schedule from per-step times per token count."""
  bounds = [0, *SMI_STOPS, SMI_ITERATIONS]
  sparse = sum((b - a) * step_seconds[n] for a, b, n in zip(bounds[:-1], bounds[1:], counts))
  return SMI_ITERATIONS * step_seconds[counts[0]] / sparse


def measured_synthesis_speedup(model, teachers, iterations):
  """A real dense and a real sparse batch (synthesize_batch, prunes included) at SMI's schedule
  scaled to `iterations`; compilation is excluded by running each once before timing."""
  cfg = config_base.base_config().inversion
  cfg.iterations, cfg.log_every = iterations, 10 ** 9
  cfg.stops = tuple(max(1, s * iterations // SMI_ITERATIONS) for s in SMI_STOPS)
  inverter = inversion.Inverter(model, cfg, IMAGE)
  weights = jnp.full((TEACHERS,), 1.0 / TEACHERS)
  labels = inversion.balanced_labels(0, BATCH, CLASSES)
  seconds = {}
  for sparse in (False, True):
    # Warm-up on a short schedule with a stop per stage: compiles every token count's step and
    # prune (compilations depend on shapes only), then the timed run at the real schedule.
    timed = (cfg.iterations, cfg.stops)
    cfg.iterations, cfg.stops = len(SMI_STOPS) + 2, tuple(range(1, len(SMI_STOPS) + 1))
    inversion.synthesize_batch(inverter, teachers, weights, labels, jax.random.key(0), sparse=sparse,
                               stage_name="bench warm-up")
    cfg.iterations, cfg.stops = timed
    start = time.perf_counter()
    inversion.synthesize_batch(inverter, teachers, weights, labels, jax.random.key(1), sparse=sparse,
                               stage_name="bench")
    seconds[sparse] = time.perf_counter() - start
  return seconds[False] / seconds[True], cfg.stops


# ---- training (distillation) step -------------------------------------------------------------
def distill_batch(num_patches, rng=0):
  r = np.random.default_rng(rng)
  return {"images": jnp.asarray(r.normal(size=(BATCH, IMAGE, IMAGE, 3)), jnp.float32),
          "labels": jnp.asarray(r.integers(0, CLASSES, BATCH), jnp.int32),
          "masks": jnp.asarray(r.random((BATCH, num_patches)) < 0.25),
          "teacher_logits": jnp.asarray(r.normal(size=(BATCH, TEACHERS, CLASSES)), jnp.float32),
          "token_probs": jnp.asarray(r.dirichlet(np.ones(CLASSES), (BATCH, num_patches)), jnp.float32)}


def distill_step_seconds(variant, repeats, dtype=jnp.float32):
  model = vit.build_vit(variant, CLASSES, image_size=IMAGE, separate_token_head=True, dtype=dtype)
  params = vit.init_params(model, jax.random.key(0), IMAGE)
  cfg = config_base.base_config().distill
  tx = distill.make_optimizer(cfg, 1000)
  state = distill.StudentState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))
  step = jax.jit(distill.make_distill_step(model, tx, cfg))  # no donation: the state is reused
  args = (state, distill_batch(vit.num_patches(variant, IMAGE)), jax.random.key(0))
  return seconds_per_call(step, args, repeats), compiled_flops(step, *args)


def client_step_seconds(variant, repeats):
  model = vit.build_vit(variant, CLASSES, image_size=IMAGE)
  params = vit.init_params(model, jax.random.key(0), IMAGE)
  cfg = config_base.base_config().clients
  tx = training.make_optimizer(cfg)
  step = jax.jit(training.make_client_train_step(model, tx, cfg))
  r = np.random.default_rng(0)
  args = (training.init_client_state(params, tx), jnp.asarray(r.integers(0, 255, (BATCH, IMAGE, IMAGE, 3)), jnp.uint8),
          jnp.asarray(r.integers(0, CLASSES, BATCH), jnp.int32), jnp.ones(BATCH, bool), jnp.int32(1000),
          jax.random.key(0))
  return seconds_per_call(step, args, repeats), compiled_flops(step, *args)


# ---- the default job --------------------------------------------------------------------------
def default_job():
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedmitr_jax.main", "--config", "configs/cifar10_cpu.py",
                    "--workdir", workdir], cwd=REPO, check=True, capture_output=True, text=True)
    total = time.perf_counter() - start
    results = json.loads(pathlib.Path(workdir, "results.json").read_text())
  stages = {"clients": results["client_training"]["seconds"]}
  stages.update({f"inversion_{k}": v["seconds"] for k, v in results["inversion"].items()})
  stages.update({name: m.get("distill_seconds", m.get("server_seconds")) for name, m in results["methods"].items()})
  accuracy = {name: round(100 * m["test_acc"], 2) for name, m in results["methods"].items()}
  return total, {k: round(v, 1) for k, v in stages.items()}, accuracy


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="fewer repeats, no default job")
  parser.add_argument("--only", choices=("sparse_vs_dense",),
                      help="only the inversion step figures: sparse vs dense, ours and PyTorch's")
  args = parser.parse_args()
  repeats = 3 if args.quick else 10
  try:
    import torch_reference as torch_ref  # noqa: E402  (benchmarks/, needs torch)
  except ImportError as e:
    torch_ref = None
    print(json.dumps({"note": f"PyTorch figures skipped ({e}); pip install torch==2.13.0"}), flush=True)
  print(json.dumps({"note": "machine", "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
                    "cpus": os.cpu_count(), "jax": jax.__version__}), flush=True)

  if args.only == "sparse_vs_dense":
    for variant in ("Mi/4", "Sm/4"):
      inversion_figures(variant, repeats, torch_ref)
    print_table()
    return

  # Peak: the best fp32 matmul of the machine it runs on, by XLA or by PyTorch.
  jax_fp32 = jax_matmul_gflops(jnp.float32)
  emit("matmul_fp32_gflops_jax", jax_fp32)
  peak = jax_fp32
  if torch_ref:
    torch_fp32 = torch_ref.matmul_gflops("float32")
    emit("matmul_fp32_gflops_torch", torch_fp32)
    peak = max(peak, torch_fp32)
  jax_bf16 = jax_matmul_gflops(jnp.bfloat16)
  emit("matmul_bf16_gflops_jax", jax_bf16)
  if torch_ref:
    torch_bf16 = torch_ref.matmul_gflops("bfloat16")
    emit("matmul_bf16_gflops_torch", torch_bf16)
    emit("bf16_matmul_vs_torch", jax_bf16 / torch_bf16, goal=1.0)

  for variant in ("Mi/4", "Sm/4"):
    inversion_figures(variant, repeats, torch_ref)
    seconds, flops = distill_step_seconds(variant, repeats)
    emit(f"distill_step_img_per_s_{variant}", BATCH / seconds)
    emit(f"train_peak_fraction_{variant}", flops / seconds / 1e9 / peak, goal=0.55,
         gflops_per_s=round(flops / seconds / 1e9, 1), peak_gflops_per_s=round(peak, 1))
    client_seconds, client_flops = client_step_seconds(variant, repeats)
    emit(f"client_step_img_per_s_{variant}", BATCH / client_seconds,
         peak_fraction=round(client_flops / client_seconds / 1e9 / peak, 3))
    if torch_ref:
      torch_seconds = torch_ref.distill_step_seconds(variant, repeats)
      emit(f"train_vs_torch_{variant}", torch_seconds / seconds, goal=1.2)
      torch_client = torch_ref.client_step_seconds(variant, repeats)
      emit(f"client_train_vs_torch_{variant}", torch_client / client_seconds, goal=1.2)

  for variant in ("Mi/4", "Sm/4"):
    model, teachers = teachers_for(variant)
    ratio, stops = measured_synthesis_speedup(model, teachers, 100 if args.quick else 200)
    emit(f"sparse_vs_dense_speedup_measured_{variant}", ratio, goal=3.0, stops=list(stops),
         how="one real dense and one real sparse batch (prunes included), SMI's stops scaled")
  model, teachers = teachers_for("Mi/4")
  for n in (64, 14):
    loop, _ = inversion_step_seconds(model, teachers, n, repeats, mode="loop", flops=False)
    vmapped, _ = inversion_step_seconds(model, teachers, n, repeats, mode="vmap", flops=False)
    emit(f"teachers_vmap_vs_loop_{n}tokens", loop / vmapped, goal=1.0)
  clients_line = subprocess.run(
      [sys.executable, str(REPO / "benchmarks/clients_vmap_vs_loop.py"), "--steps", "20" if args.quick else "60"],
      cwd=REPO, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
  clients_result = json.loads(clients_line)
  emit("clients_vmap_vs_sequential", clients_result["value"], goal=1.0,
       padding_fraction=clients_result["padding_fraction"])
  for line in subprocess.run([sys.executable, str(REPO / "benchmarks/host_overhead.py"), "--repeats",
                              "1" if args.quick else "3"], cwd=REPO, check=True, capture_output=True,
                             text=True).stdout.splitlines():
    if not line.startswith('{"figure"'):
      continue  # the runners' own progress lines
    result = json.loads(line)
    emit(result.pop("figure"), result.pop("value"), **result)
  if not args.quick:
    total, stages, accuracy = default_job()
    emit("default_job_seconds", total, stages=stages, test_accuracy_percent=accuracy)

  print_table()


def print_table():
  print("\n| figure | value | goal | met |\n|---|---|---|---|")
  for line in FIGURES:
    goal, value = line["goal"], line["value"]
    met = "" if goal is None or value is None else ("yes" if value >= goal else "NO")
    print(f"| {line['figure']} | {value} | {'' if goal is None else goal} | {met} |")


if __name__ == "__main__":
  main()
