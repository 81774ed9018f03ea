"""The package: importing it turns XLA:CPU's YNNPACK dot fusions off unless XLA_FLAGS decides; its
pyproject.toml agrees with the requirements.txt lock."""
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


def test_pyproject_ranges_admit_every_locked_version():
  """requirements.txt is the exact lock, pyproject.toml the ranges `pip install -e .` resolves:
  every pinned package is declared there (as a dependency or in an extra) and its pin is allowed."""
  import pathlib
  import tomllib

  from packaging.requirements import Requirement
  from packaging.utils import canonicalize_name

  repo = pathlib.Path(__file__).resolve().parents[1]
  project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
  assert project["name"] == "fedmitr_jax" and project["requires-python"] == ">=3.11"
  declared = [Requirement(r) for r in project["dependencies"]]
  declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
  ranges = {}
  for requirement in declared:
    if not requirement.extras:  # jax[tpu] / jax[cuda12] restate jax's range for the accelerator extras
      ranges[canonicalize_name(requirement.name)] = requirement.specifier
  pins = [line.split("==") for line in (repo / "requirements.txt").read_text().splitlines()
          if line and not line.startswith("#")]
  assert pins
  for name, version in pins:
    assert canonicalize_name(name) in ranges, f"{name} is locked but not declared in pyproject.toml"
    assert version in ranges[canonicalize_name(name)], (name, version, str(ranges[canonicalize_name(name)]))
  extras = project["optional-dependencies"]
  assert set(extras) == {"test", "tensorboard", "tpu", "cuda"}
  assert [Requirement(r).extras for r in extras["tpu"] + extras["cuda"]] == [{"tpu"}, {"cuda12"}]
