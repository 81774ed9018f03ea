#!/usr/bin/env bash
# Run one experiment on the GPUs of this host; installs jax[cuda12] into .venv.
#   launch/gpu.sh CONFIG WORKDIR [--config.field=value ...]
# One host: one process drives every local GPU (data-parallel stages split over all of them), no
# distributed setup. Several hosts: run it on each host with the same COORDINATOR (host:port of
# process 0, reachable from all) and NUM_PROCESSES, and PROCESS_ID = 0 .. NUM_PROCESSES-1; WORKDIR
# must then be gs://bucket/path or an absolute path of one folder every host mounts (NFS); each
# host checks it sees the folder (or its parent). The code and the weights file are each host's own
# (same commit, same path: the config's `pretrained=` is read on every host).
#   NUM_PROCESSES=2 PROCESS_ID=0 COORDINATOR=10.0.0.1:1234 launch/gpu.sh CONFIG WORKDIR   # host 0
#   NUM_PROCESSES=2 PROCESS_ID=1 COORDINATOR=10.0.0.1:1234 launch/gpu.sh CONFIG WORKDIR   # host 1
# DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
usage="usage: [NUM_PROCESSES=N PROCESS_ID=I COORDINATOR=HOST:PORT] $0 CONFIG WORKDIR [--config.field=value ...]"
if (( $# < 2 )); then echo "$usage" >&2; exit 2; fi
config=$1 workdir=$2
shift 2
cd "$(dirname "$0")/.."
jax_version=$(sed -n 's/^jax==//p' requirements.txt)
etils_version=$(sed -n 's/^etils\[epath\]==//p' requirements.txt)

run() {  # runs a command, or prints it shell-quoted when DRY_RUN=1
  if [[ ${DRY_RUN:-0} == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

envs=()
if [[ -n ${NUM_PROCESSES:-} ]]; then
  if [[ -z ${PROCESS_ID:-} || -z ${COORDINATOR:-} ]]; then
    echo "error: NUM_PROCESSES needs PROCESS_ID and COORDINATOR=host:port too" >&2; echo "$usage" >&2; exit 2
  fi
  # jax.distributed.initialize() reads JAX_COORDINATOR_ADDRESS itself; the process count and id it
  # detects only in clusters it knows (TPU, SLURM, Open MPI, k8s), so main.py passes FEDMITR_NUM_PROCESSES
  # and FEDMITR_PROCESS_ID.
  envs=(FEDMITR_DISTRIBUTED=1 "JAX_COORDINATOR_ADDRESS=$COORDINATOR"
        "FEDMITR_NUM_PROCESSES=$NUM_PROCESSES" "FEDMITR_PROCESS_ID=$PROCESS_ID")
  if [[ $workdir != gs://* ]]; then
    if [[ $workdir != /* ]]; then
      echo "error: WORKDIR $workdir: not absolute; several hosts need gs://bucket/path or an absolute" \
           "path of a folder every host mounts" >&2; exit 2
    fi
    if [[ ! -d $workdir && ! -d $(dirname "$workdir") ]]; then
      echo "error: WORKDIR $workdir: neither it nor its parent exists on $(hostname); mount the shared" \
           "folder on every host, or use gs://" >&2; exit 2
    fi
  fi
fi
extras=()  # a bucket workdir needs gcsfs (etils' epath-gcs extra)
[[ $workdir != gs://* ]] || extras=("etils[epath,epath-gcs]==$etils_version")

[[ -x .venv/bin/python ]] || run "${PYTHON:-python3}" -m venv .venv  # PYTHON: a Python >= 3.11
run .venv/bin/pip install -q -r requirements.txt "jax[cuda12]==$jax_version" "${extras[@]}"
run env "${envs[@]}" .venv/bin/python -m fedmitr_jax.main --config "$config" --workdir "$workdir" "$@"
