#!/usr/bin/env bash
# Run one experiment on this machine (CPU or a single GPU): installs into .venv on first use.
#   launch/local.sh configs/cifar10_cpu.py /tmp/fedmitr_cpu [--config.field=value ...]
# WORKDIR may be gs://bucket/path (then: .venv/bin/pip install 'etils[epath,epath-gcs]', see
# requirements.txt). Add --dry_run to print each stage's FLOPs and memory without running it.
# Set FAKE_DEVICES=8 to split data-parallel stages over 8 fake CPU devices (testing sharding).
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
shift 2
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv && .venv/bin/pip install --quiet -r requirements.txt
fi
if [[ -n "${FAKE_DEVICES:-}" ]]; then
  export XLA_FLAGS="--xla_force_host_platform_device_count=${FAKE_DEVICES}"
fi
exec .venv/bin/python -m fedmitr_jax.main --config "$config" --workdir "$workdir" "$@"
