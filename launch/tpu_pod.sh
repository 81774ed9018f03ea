#!/usr/bin/env bash
# Run one experiment on every worker of a Cloud TPU VM slice (one host or a multi-host pod slice).
#   TPU_NAME=my-tpu ZONE=us-central2-b launch/tpu_pod.sh CONFIG WORKDIR [--config.field=value ...]
# Environment:
#   TPU_NAME, ZONE         required.
#   CREATE=1               create the slice first: ACCELERATOR_TYPE (e.g. v4-32) and RUNTIME_VERSION
#                          (default tpu-ubuntu2204-base; v5e: v2-alpha-tpuv5-lite, v6e: v2-alpha-tpuv6e).
#   REPO_URL [REPO_REF]    git clone this on the workers; unset: copy this checkout's HEAD (git archive).
#   REMOTE_DIR             the repo on the workers, relative to the home folder (default fedmitr_jax).
#   DATA_BUCKET            gs://... folder copied (gsutil rsync) to DATA_DIR (default /tmp/fedmitr_data) on
#                          every worker and passed as --config.$DATA_FIELD: dataset.root (default; kind
#                          folder) or dataset.data_dir (kind tfds); DATA_FIELD= (empty) copies only.
#   PYTHON                 Python >= 3.11 on the workers (default python3.11; apt-installed if missing).
#   DRY_RUN=1              print the commands instead of running them.
# Every worker runs the same command; FEDMITR_DISTRIBUTED=1 makes main call jax.distributed.initialize(),
# which finds the other workers through the TPU metadata. On a multi-host slice WORKDIR must be one
# folder shared by all workers (an NFS/Filestore mount): the code writes it with local file APIs.
set -euo pipefail
usage="usage: TPU_NAME=NAME ZONE=ZONE $0 CONFIG WORKDIR [--config.field=value ...]"
if (( $# < 2 )) || [[ -z ${TPU_NAME:-} || -z ${ZONE:-} ]]; then echo "$usage" >&2; exit 2; fi
config=$1 workdir=$2
shift 2
if [[ $workdir == gs://* ]]; then
  echo "error: WORKDIR $workdir: gs:// is not supported yet (the workdir is written with local file" \
       "APIs); use a folder every worker mounts (NFS/Filestore)" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
jax_version=$(sed -n 's/^jax==//p' requirements.txt)
remote_dir=${REMOTE_DIR:-fedmitr_jax}
python=${PYTHON:-python3.11}
data_dir=${DATA_DIR:-/tmp/fedmitr_data}
data_field=${DATA_FIELD-dataset.root}
tpu=(gcloud compute tpus tpu-vm)

run() {  # runs a command, or prints it shell-quoted when DRY_RUN=1
  if [[ ${DRY_RUN:-0} == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

if [[ ${CREATE:-0} == 1 ]]; then
  run "${tpu[@]}" create "$TPU_NAME" --zone "$ZONE" \
      --accelerator-type "${ACCELERATOR_TYPE:?CREATE=1 needs ACCELERATOR_TYPE, e.g. v4-32}" \
      --version "${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
fi

# The code on every worker: a fresh clone, or this checkout's HEAD copied over.
if [[ -n ${REPO_URL:-} ]]; then
  get_code="[[ -d $(printf %q "$remote_dir") ]] || git clone --depth 1 ${REPO_REF:+--branch $(printf %q "$REPO_REF")} $(printf '%q %q' "$REPO_URL" "$remote_dir")"
else
  [[ -z $(git status --porcelain) ]] || echo "warning: uncommitted changes are not copied (git archive HEAD)" >&2
  run git archive --format=tar.gz -o /tmp/fedmitr_src.tar.gz HEAD
  run "${tpu[@]}" scp /tmp/fedmitr_src.tar.gz "$TPU_NAME:fedmitr_src.tar.gz" --zone "$ZONE" --worker=all
  get_code="mkdir -p $(printf %q "$remote_dir") && tar -xzf fedmitr_src.tar.gz -C $(printf %q "$remote_dir")"
fi

data_override=()
get_data=true
if [[ -n ${DATA_BUCKET:-} ]]; then
  get_data="mkdir -p $(printf %q "$data_dir") && gsutil -m rsync -r $(printf '%q %q' "$DATA_BUCKET" "$data_dir")"
  [[ -z $data_field ]] || data_override=("--config.$data_field=$data_dir")
fi

remote="set -euo pipefail
$get_code
cd $(printf %q "$remote_dir")
command -v $python >/dev/null || { sudo apt-get update -q && sudo apt-get install -y -q $python $python-venv; }
[[ -x .venv/bin/python ]] || $python -m venv .venv
.venv/bin/pip install -q -r requirements.txt 'jax[tpu]==$jax_version'
$get_data
export FEDMITR_DISTRIBUTED=1
exec .venv/bin/python -m fedmitr_jax.main$(printf ' %q' --config "$config" --workdir "$workdir" "${data_override[@]}" "$@")"

run "${tpu[@]}" ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$remote"
