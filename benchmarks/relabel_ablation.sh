#!/bin/bash
# Token-relabel ablations on one finished sweep run: its partition, clients and synthetic banks are
# copied into fresh workdirs, so only the fedmitr student is distilled again (~2-4 min each on a 2-core CPU).
#   bash benchmarks/relabel_ablation.sh /tmp/sweeps/cifar10_cpu_full/alpha0.1_seed0 /tmp/ablate
#   CONFIG=configs/cifar10_cpu_pretrained.py CONFIG_ARGS=backbone=/tmp/pretrain/backbone.npz \
#     bash benchmarks/relabel_ablation.sh /tmp/sweeps/cifar10_cpu_pretrained/alpha0.1_seed0 /tmp/ablate_pt
# CONFIG must be the sweep's config and CONFIG_ARGS its args other than alpha, so the copied stages match.
# Prints "<variant> <CLS acc %> <CLS+token acc %>" per line. The run's own alpha and seed are read
# from its config.json; 'same_as_run' must reproduce the run's fedmitr figure exactly.
set -euo pipefail
RUN=${1:?usage: relabel_ablation.sh RUN_DIR OUT_DIR}
OUT=${2:?usage: relabel_ablation.sh RUN_DIR OUT_DIR}
PYTHON=${PYTHON:-python}
CONFIG=${CONFIG:-configs/cifar10_cpu_full.py}
CONFIG_ARGS=${CONFIG_ARGS:-}
cd "$(dirname "$0")/.."
read -r ALPHA SEED < <("$PYTHON" -c "import json,sys; c=json.load(open(sys.argv[1])); print(c['partition']['alpha'], c['seed'])" "$RUN/config.json")
variant() {
  local name=$1; shift
  local dir="$OUT/$name"
  rm -rf "$dir"; mkdir -p "$dir/stages"
  for stage in partition clients inversion_dense inversion_sparse; do cp -r "$RUN/stages/$stage" "$dir/stages/"; done
  "$PYTHON" -m fedmitr_jax.main --config "$CONFIG:alpha=$ALPHA${CONFIG_ARGS:+,$CONFIG_ARGS}" --workdir "$dir" \
    --config.seed="$SEED" "--config.methods=('fedmitr',)" "$@" > "$dir.log" 2>&1
  "$PYTHON" -c "import json,sys; r=json.load(open(sys.argv[1]))['methods']['fedmitr']; print(sys.argv[2], round(100*r['test_acc'],2), round(100*r['test_acc_cls_token'],2))" "$dir/results.json" "$name"
}
variant same_as_run
variant beta0 --config.distill.beta=0.0   # no token term: the CLS KD alone, on the sparse bank (= sparse_kd)
variant beta0.1 --config.distill.beta=0.1
variant beta0.25 --config.distill.beta=0.25
variant beta1.0 --config.distill.beta=1.0
variant image_target --config.distill.relabel_target=image
variant zero_background --config.distill.zero_background=True
variant bgT0.5 --config.distill.background_temperature=0.5
variant bgT0.25 --config.distill.background_temperature=0.25
variant bgT0.1 --config.distill.background_temperature=0.1
variant beta0.05 --config.distill.beta=0.05
variant beta0.1_bgT0.25 --config.distill.beta=0.1 --config.distill.background_temperature=0.25
