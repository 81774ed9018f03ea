#!/usr/bin/env bash
# What one accelerator host does with the paper's config, in a few minutes (one GPU or a TPU host):
#   CHIP=h200 launch/accelerator_check.sh WORKDIR [--config.field=value ...]
# 1. the dry run of CONFIG (every stage compiled on this host: FLOPs and memory per device, the
#    run's hours on CHIP) -> WORKDIR/dry_run.jsonl;
# 2. a real run of CONFIG at the reduced counts below (a few hundred steps of each stage, same
#    shapes, so the dry run's FLOPs per step hold) -> WORKDIR/run/, its output stamped per line in
#    WORKDIR/run.log;
# 3. per stage: steps/s, TFLOP/s (the dry run's tflop_per_step x steps/s) and MFU against CHIP's
#    peak bf16 TFLOP/s (benchmarks/accelerator_check.py; the rows also in WORKDIR/accelerator_check.jsonl).
# Environment: CHIP (v5e | v6e | h100 | h200; unset: no MFU column), CONFIG (default
# configs/paper_cifar10.py; config args as in configs, e.g. configs/paper_cifar10.py:model=S/16),
# PYTHON (default .venv/bin/python, as launch/gpu.sh and local.sh install it), DRY_RUN_FILE (a
# dry_run.jsonl made elsewhere, e.g. `JAX_PLATFORMS=cpu python -m fedmitr_jax.main --config CONFIG
# --workdir /tmp/x --dry_run --chip=h200 > dry.jsonl` on a CPU host, whose FLOP counts are the
# same program's: step 1 is skipped, which saves minutes of GPU compilation).
# The overrides after WORKDIR go to both commands and win over the reduced counts (a DRY_RUN_FILE
# must have been made with the same ones); the data must be where CONFIG looks
# (--config.dataset.tarball=... for a copy on this host; docs/data.md). tests/test_launch.py runs
# this with configs/smoke.py and tiny counts on a CPU.
set -euo pipefail
usage="usage: [CHIP=v5e|v6e|h100|h200] [CONFIG=configs/paper_cifar10.py] $0 WORKDIR [--config.x=y ...]"
if (( $# < 1 )); then echo "$usage" >&2; exit 2; fi
workdir=$1
shift
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
config=${CONFIG:-configs/paper_cifar10.py}
if ! command -v "$python" > /dev/null; then
  echo "error: PYTHON $python: not found; run launch/gpu.sh (or local.sh) once to create .venv," \
       "or set PYTHON" >&2
  exit 2
fi
if [[ -e $workdir/run ]]; then
  echo "error: WORKDIR $workdir already holds a run (it would resume, not run); give a new WORKDIR" >&2
  exit 2
fi
chip=()
[[ -z ${CHIP:-} ]] || chip=("--chip=$CHIP")

# A few hundred steps of each stage: clients ~3 epochs of their shards; 3 inversion batches of 400
# iterations (the stops 50/100/200/300 kept, so every token count runs; the first batch compiles,
# the others are timed); 200 distillation steps per student; 3 generator rounds.
reduced=(--config.clients.epochs=3 --config.clients.log_every_steps=50
         --config.inversion.num_batches=3 --config.inversion.iterations=400 --config.inversion.log_every=50
         --config.distill.epochs=200 --config.distill.log_every=50 --config.distill.checkpoint_every_steps=100
         --config.generator_kd.g_steps=30)

if [[ -n ${DRY_RUN_FILE:-} && ! -s $DRY_RUN_FILE ]]; then
  echo "error: DRY_RUN_FILE $DRY_RUN_FILE: not found or empty; make it with --dry_run, or unset it" >&2
  exit 2
fi

mkdir -p "$workdir"
if [[ -n ${DRY_RUN_FILE:-} ]]; then
  echo "== dry run of $config: taken from $DRY_RUN_FILE" >&2
  cp "$DRY_RUN_FILE" "$workdir/dry_run.jsonl"
else
  echo "== dry run of $config" >&2
  "$python" -m fedmitr_jax.main --config "$config" --workdir "$workdir/run" --dry_run "${chip[@]}" "$@" \
      | tee "$workdir/dry_run.jsonl"
fi
echo "== run of $config at reduced counts: $workdir/run" >&2
"$python" benchmarks/accelerator_check.py --dry_run "$workdir/dry_run.jsonl" --log "$workdir/run.log" \
    "${chip[@]}" -- "$python" -m fedmitr_jax.main --config "$config" --workdir "$workdir/run" \
    "${reduced[@]}" "$@"
