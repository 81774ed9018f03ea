"""Importing the package turns XLA:CPU's YNNPACK dot fusions off, unless XLA_FLAGS decides."""
import os
import subprocess
import sys

CODE = "import fedmitr_jax, os; print(os.environ.get('XLA_FLAGS', ''))"


def flags_after_import(xla_flags):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  return subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True,
                        check=True, timeout=120).stdout.strip()


def test_ynn_fusions_off_by_default_and_user_flags_kept():
  assert flags_after_import(None) == "--xla_cpu_experimental_ynn_fusion_type="
  assert flags_after_import("--xla_force_host_platform_device_count=8") == \
      "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type="
  mine = "--xla_cpu_experimental_ynn_fusion_type=dot"  # the user's own choice wins
  assert flags_after_import(mine) == mine
