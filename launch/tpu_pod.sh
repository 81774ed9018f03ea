#!/usr/bin/env bash
# Run one experiment on every worker of a Cloud TPU VM slice (one host or a multi-host pod slice).
#   TPU_NAME=my-tpu ZONE=us-central2-b launch/tpu_pod.sh CONFIG WORKDIR [--config.field=value ...]
# WORKDIR: gs://bucket/path (best on a pod: every worker sees it), or an absolute path that is
# one shared folder on every worker (an NFS/Filestore mount); each worker checks it can see it.
# Environment:
#   TPU_NAME, ZONE         required.
#   CREATE=1               create the slice first: ACCELERATOR_TYPE (e.g. v4-32) and RUNTIME_VERSION
#                          (default tpu-ubuntu2204-base; v5e: v2-alpha-tpuv5-lite, v6e: v2-alpha-tpuv6e).
#   REPO_URL [REPO_REF]    git clone this on the workers (a rerun fetches REPO_REF again, default the
#                          remote's HEAD); unset: copy this checkout's HEAD (git archive). Either way a
#                          rerun replaces the code on the workers (the .venv is kept).
#   REMOTE_DIR             the repo on the workers, relative to the home folder (default fedmitr_jax).
#   WEIGHTS                the pretrained weights file (local path or gs://...): copied to every worker
#                          and passed as --config.model.pretrained_path (so the config's own
#                          `pretrained=` path need not exist on the workers).
#   DATA_BUCKET            gs://... folder copied (gcloud storage rsync) to DATA_DIR (default
#                          /tmp/fedmitr_data) on every worker and passed as --config.$DATA_FIELD:
#                          dataset.root (default; kind folder) or dataset.data_dir (kind tfds);
#                          DATA_FIELD= (empty) copies only.
#   PYTHON                 Python >= 3.11 on the workers (default python3.11; apt-installed if missing).
#   DRY_RUN=1              print the commands instead of running them.
# Every worker runs the same command; FEDMITR_DISTRIBUTED=1 makes main call jax.distributed.initialize(),
# which finds the other workers through the TPU metadata.
set -euo pipefail
usage="usage: TPU_NAME=NAME ZONE=ZONE $0 CONFIG WORKDIR [--config.field=value ...]"
if (( $# < 2 )) || [[ -z ${TPU_NAME:-} || -z ${ZONE:-} ]]; then echo "$usage" >&2; exit 2; fi
config=$1 workdir=$2
shift 2
if [[ $workdir != gs://* && $workdir != /* ]]; then
  echo "error: WORKDIR $workdir: not absolute; give gs://bucket/path or an absolute path of a folder" \
       "every worker mounts (each worker would resolve a relative one in its own home folder)" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
jax_version=$(sed -n 's/^jax==//p' requirements.txt)
etils_version=$(sed -n 's/^etils\[epath\]==//p' requirements.txt)
remote_dir=${REMOTE_DIR:-fedmitr_jax}
python=${PYTHON:-python3.11}
data_dir=${DATA_DIR:-/tmp/fedmitr_data}
data_field=${DATA_FIELD-dataset.root}
tpu=(gcloud compute tpus tpu-vm)
q() { printf '%q' "$1"; }
quoted() { (( $# == 0 )) || printf ' %q' "$@"; }  # ' arg1 arg2 ...' shell-quoted; nothing for none

run() {  # runs a command, or prints it shell-quoted when DRY_RUN=1
  if [[ ${DRY_RUN:-0} == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

if [[ -n ${WEIGHTS:-} && $WEIGHTS != gs://* && ! -f $WEIGHTS ]]; then
  echo "error: WEIGHTS $WEIGHTS: no such file here; give the weights file (or a gs:// object)" >&2
  exit 2
fi

if [[ ${CREATE:-0} == 1 ]]; then
  run "${tpu[@]}" create "$TPU_NAME" --zone "$ZONE" \
      --accelerator-type "${ACCELERATOR_TYPE:?CREATE=1 needs ACCELERATOR_TYPE, e.g. v4-32}" \
      --version "${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
fi

# The code on every worker, replaced on each run (a stale copy would run old code): the clone is
# fetched again, or the copied archive unpacked into an emptied folder; the .venv is kept.
if [[ -n ${REPO_URL:-} ]]; then
  ref=${REPO_REF:-HEAD}
  get_code="if [[ -d $(q "$remote_dir")/.git ]]; then git -C $(q "$remote_dir") fetch --depth 1 $(q "$REPO_URL") $(q "$ref") && git -C $(q "$remote_dir") checkout --force --detach FETCH_HEAD; else git clone --depth 1 ${REPO_REF:+--branch $(q "$REPO_REF")} $(q "$REPO_URL") $(q "$remote_dir"); fi"
else
  [[ -z $(git status --porcelain) ]] || echo "warning: uncommitted changes are not copied (git archive HEAD)" >&2
  run git archive --format=tar.gz -o /tmp/fedmitr_src.tar.gz HEAD
  run "${tpu[@]}" scp /tmp/fedmitr_src.tar.gz "$TPU_NAME:fedmitr_src.tar.gz" --zone "$ZONE" --worker=all
  get_code="mkdir -p $(q "$remote_dir") && find $(q "$remote_dir") -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} + && tar -xzf fedmitr_src.tar.gz -C $(q "$remote_dir")"
fi

overrides=()
get_weights=true
if [[ -n ${WEIGHTS:-} ]]; then
  remote_weights="\$HOME/fedmitr_weights/$(basename "$WEIGHTS")"
  if [[ $WEIGHTS == gs://* ]]; then
    get_weights="mkdir -p \$HOME/fedmitr_weights && gcloud storage cp $(q "$WEIGHTS") \"$remote_weights\""
  else
    run "${tpu[@]}" scp "$WEIGHTS" "$TPU_NAME:fedmitr_weights.tmp" --zone "$ZONE" --worker=all
    get_weights="mkdir -p \$HOME/fedmitr_weights && mv fedmitr_weights.tmp \"$remote_weights\""
  fi
fi

get_data=true
if [[ -n ${DATA_BUCKET:-} ]]; then
  get_data="mkdir -p $(q "$data_dir") && gcloud storage rsync --recursive $(q "$DATA_BUCKET") $(q "$data_dir")"
  [[ -z $data_field ]] || overrides+=("--config.$data_field=$data_dir")
fi

# Each worker checks it sees WORKDIR's folder; a bucket path needs gcsfs (etils' epath-gcs extra).
extras=()
if [[ $workdir == gs://* ]]; then
  extras=("etils[epath,epath-gcs]==$etils_version")
  check_workdir=true
else
  check_workdir="[[ -d $(q "$workdir") || -d $(q "$(dirname "$workdir")") ]] || { echo \"error: WORKDIR $(q "$workdir"): neither it nor its parent exists on worker \$(hostname); mount the shared folder on every worker, or use gs://\" >&2; exit 2; }"
fi

remote="set -euo pipefail
$check_workdir
$get_code
$get_weights
cd $(q "$remote_dir")
command -v $python >/dev/null || { sudo apt-get update -q && sudo apt-get install -y -q $python $python-venv; }
[[ -x .venv/bin/python ]] || $python -m venv .venv
.venv/bin/pip install -q -r requirements.txt$(quoted "jax[tpu]==$jax_version" "${extras[@]}")
$get_data
export FEDMITR_DISTRIBUTED=1
exec .venv/bin/python -m fedmitr_jax.main$(quoted --config "$config" --workdir "$workdir" "${overrides[@]}")${remote_weights:+ \"--config.model.pretrained_path=$remote_weights\"}$(quoted "$@")"

run "${tpu[@]}" ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$remote"
