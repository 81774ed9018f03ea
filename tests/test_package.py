"""XLA:CPU's YNNPACK dot fusions are turned off by the commands, only for runs on XLA:CPU, and
never by importing the package; the user's own XLA_FLAGS always win. pyproject.toml agrees with
the requirements.txt lock."""
import os
import subprocess
import sys

from fedmitr_jax import entry

PRINT_FLAGS = "import os; {code}; print(os.environ.get('XLA_FLAGS', '<unset>'))"


def flags_after(code: str, xla_flags=None, platforms=None) -> str:
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  if platforms is not None:
    env["JAX_PLATFORMS"] = platforms
  return subprocess.run([sys.executable, "-c", PRINT_FLAGS.format(code=code)], env=env, capture_output=True,
                        text=True, check=True, timeout=120).stdout.strip()


def test_importing_the_package_and_its_commands_leaves_xla_flags_alone():
  code = "import fedmitr_jax, fedmitr_jax.main, fedmitr_jax.pipeline"
  assert flags_after(code) == "<unset>"
  assert flags_after(code, xla_flags="--xla_force_host_platform_device_count=8") == \
      "--xla_force_host_platform_device_count=8"


def test_cpu_runs_get_the_flag_and_accelerator_runs_do_not():
  code = "from fedmitr_jax import entry; entry.use_cpu_flags()"
  assert flags_after(code, platforms="cpu") == entry.NO_YNN_FUSIONS
  assert flags_after(code, xla_flags="--xla_force_host_platform_device_count=8", platforms="cpu") == \
      f"--xla_force_host_platform_device_count=8 {entry.NO_YNN_FUSIONS}"
  for accelerator in ("tpu", "cuda", "tpu,cpu"):  # an accelerator's XLA may not know a CPU flag
    assert flags_after(code, platforms=accelerator) == "<unset>", accelerator


def test_the_users_own_setting_wins():
  mine = "--xla_cpu_experimental_ynn_fusion_type=dot"
  assert entry.with_cpu_flags(mine) == mine
  assert entry.with_cpu_flags("") == entry.NO_YNN_FUSIONS


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
  ranges = {canonicalize_name(Requirement(r).name): Requirement(r).specifier for r in project["dependencies"]}
  for extra in project["optional-dependencies"].values():
    for requirement in map(Requirement, extra):
      if not requirement.extras:  # jax[tpu] / jax[cuda12] restate jax's range for the accelerator extras
        ranges[canonicalize_name(requirement.name)] = requirement.specifier
  pins = [(Requirement(line).name, str(Requirement(line).specifier).removeprefix("=="))
          for line in (repo / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")]
  assert pins
  for name, version in pins:
    assert canonicalize_name(name) in ranges, f"{name} is locked but not declared in pyproject.toml"
    assert version in ranges[canonicalize_name(name)], (name, version, str(ranges[canonicalize_name(name)]))
  extras = project["optional-dependencies"]
  assert set(extras) == {"test", "tensorboard", "tpu", "cuda"}
  assert [Requirement(r).extras for r in extras["tpu"] + extras["cuda"]] == [{"tpu"}, {"cuda12"}]
