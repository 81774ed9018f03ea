#!/bin/bash
# Sparse inversion at equal synthesis *time* instead of equal iterations: on one finished sweep run,
# its partition and clients are copied into a fresh workdir and the sparse bank is made FACTOR times
# larger (FACTOR x inversion.num_batches, rounded), while distill.epochs shrinks by the same ratio so
# the students take the same number of steps as in the run. FACTOR 2.5 is the measured sparse/dense
# time ratio per batch at this schedule (README "Results: the default job"). Only sparse_kd and fedmitr are trained.
#   bash benchmarks/equal_time_sparse.sh /tmp/sweeps/cifar10_cpu_full/alpha0.1_seed0 /tmp/equal_time 2.5
# Prints "<method> <CLS acc %> <CLS+token acc %> <synthesis s>" per line; compare with the run's own
# results.json (dense bank: its inversion_dense time).
set -euo pipefail
RUN=${1:?usage: equal_time_sparse.sh RUN_DIR OUT_DIR FACTOR}
OUT=${2:?usage: equal_time_sparse.sh RUN_DIR OUT_DIR FACTOR}
FACTOR=${3:?usage: equal_time_sparse.sh RUN_DIR OUT_DIR FACTOR}
PYTHON=${PYTHON:-python}
cd "$(dirname "$0")/.."
read -r ALPHA SEED BATCHES EPOCHS < <("$PYTHON" -c "import json,sys; c=json.load(open(sys.argv[1])); print(c['partition']['alpha'], c['seed'], c['inversion']['num_batches'], c['distill']['epochs'])" "$RUN/config.json")
read -r NEW_BATCHES NEW_EPOCHS < <("$PYTHON" -c "import sys; f=float(sys.argv[3]); print(round(int(sys.argv[1])*f), float(sys.argv[2])*int(sys.argv[1])/round(int(sys.argv[1])*f))" "$BATCHES" "$EPOCHS" "$FACTOR")
mkdir -p "$OUT/stages"
for stage in partition clients; do [ -d "$OUT/stages/$stage" ] || cp -r "$RUN/stages/$stage" "$OUT/stages/"; done
# No rm of OUT: rerunning the same command resumes the bank where a killed run stopped.
"$PYTHON" -m fedmitr_jax.main --config "configs/cifar10_cpu_full.py:alpha=$ALPHA" --workdir "$OUT" \
  --config.seed="$SEED" "--config.methods=('sparse_kd','fedmitr')" \
  --config.inversion.num_batches="$NEW_BATCHES" --config.distill.epochs="$NEW_EPOCHS" >> "$OUT.log" 2>&1
"$PYTHON" - "$OUT/results.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for m in ("sparse_kd", "fedmitr"):
  x = r["methods"][m]
  print(m, round(100 * x["test_acc"], 2), round(100 * x["test_acc_cls_token"], 2), round(r["inversion"]["sparse"]["seconds"]))
PY
