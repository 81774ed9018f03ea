"""launch/tpu_pod.sh and launch/gpu.sh: argument handling, and the exact commands and environment
they produce. Nothing reaches a cloud: DRY_RUN=1 prints the commands, gcloud and gsutil are stubs
that fail the test if called, and the command a TPU worker would run is executed here against stub
tools that record what they were given."""
import os
import pathlib
import re
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ("launch/tpu_pod.sh", "launch/gpu.sh", "launch/local.sh")
JAX_PIN = re.search(r"^jax==(\S+)$", (REPO / "requirements.txt").read_text(), re.M).group(1)
CONFIG = "configs/paper_cifar10.py:alpha=0.3,model=S/16"
OVERRIDES = ["--config.methods=('fedavg', \"fedmitr\")", "--config.seed=$HOME 1"]  # quotes, space, $
RECORDER = '#!/bin/bash\nprintf "%s\\0" "$@" > "$LOG/{name}.argv"\nenv > "$LOG/{name}.env"\n'


def _tool(directory: pathlib.Path, name: str, body: str) -> None:
  directory.mkdir(parents=True, exist_ok=True)
  (directory / name).write_text(body)
  (directory / name).chmod(0o755)


@pytest.fixture
def sandbox(tmp_path):
  """PATH with gcloud/gsutil stubs that record any call; LOG is where recorders write."""
  log, bin_dir = tmp_path / "log", tmp_path / "bin"
  log.mkdir()
  for name in ("gcloud", "gsutil"):
    _tool(bin_dir, name, RECORDER.format(name=name))
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "LOG": str(log),
         "DRY_RUN": "1", "DATA_DIR": str(tmp_path / "data")}
  return tmp_path, env


def launch(script, args, env, **extra):
  return subprocess.run(["bash", str(REPO / script), *args], env={**env, **extra}, cwd=REPO,
                        capture_output=True, text=True, timeout=60)


def words(line: str) -> list[str]:
  """The words bash makes of a printed command line."""
  out = subprocess.run(["bash", "-c", 'eval "w=($1)"; printf "%s\\0" "${w[@]}"', "_", line],
                       capture_output=True, text=True, check=True).stdout
  return out.split("\0")[:-1]


def recorded(log: pathlib.Path, name: str):
  argv = (log / f"{name}.argv").read_text().split("\0")[:-1]
  env = dict(line.split("=", 1) for line in (log / f"{name}.env").read_text().splitlines() if "=" in line)
  return argv, env


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
  subprocess.run(["bash", "-n", str(REPO / script)], check=True)


# ---- argument handling --------------------------------------------------------------------------
@pytest.mark.parametrize("args,extra", [
    ([], {}),
    (["configs/smoke.py"], {}),
    ([CONFIG, "/w"], {"TPU_NAME": "", "ZONE": "us-central2-b"}),
    ([CONFIG, "/w"], {"ZONE": "us-central2-b"}),
    ([CONFIG, "/w"], {"TPU_NAME": "tpu"}),
])
def test_tpu_pod_missing_args_print_usage(sandbox, args, extra):
  tmp_path, env = sandbox
  result = launch("launch/tpu_pod.sh", args, env, **extra)
  assert result.returncode != 0 and "usage:" in result.stderr and result.stdout == ""
  assert not list((tmp_path / "log").iterdir()), "nothing may be called"


def test_tpu_pod_refuses_bucket_workdir_and_create_without_type(sandbox):
  tmp_path, env = sandbox
  result = launch("launch/tpu_pod.sh", [CONFIG, "gs://bucket/run"], env, TPU_NAME="t", ZONE="z")
  assert result.returncode != 0 and "WORKDIR gs://bucket/run" in result.stderr
  result = launch("launch/tpu_pod.sh", [CONFIG, "/w"], env, TPU_NAME="t", ZONE="z", CREATE="1")
  assert result.returncode != 0 and "ACCELERATOR_TYPE" in result.stderr
  assert not list((tmp_path / "log").iterdir())


@pytest.mark.parametrize("args,extra", [
    ([], {}),
    (["configs/smoke.py"], {}),
    ([CONFIG, "/w"], {"NUM_PROCESSES": "2"}),
    ([CONFIG, "/w"], {"NUM_PROCESSES": "2", "PROCESS_ID": "0"}),
])
def test_gpu_missing_args_print_usage(sandbox, args, extra):
  _, env = sandbox
  result = launch("launch/gpu.sh", args, env, **extra)
  assert result.returncode != 0 and "usage:" in result.stderr and result.stdout == ""


# ---- TPU pod -----------------------------------------------------------------------------------
def tpu_dry_run(sandbox, **extra):
  tmp_path, env = sandbox
  extra = {"TPU_NAME": "my-tpu", "ZONE": "us-central2-b", **extra}
  result = launch("launch/tpu_pod.sh", [CONFIG, "/mnt/nfs/run 1", *OVERRIDES], env, **extra)
  assert result.returncode == 0, result.stderr
  assert not list((tmp_path / "log").iterdir()), "DRY_RUN must not call gcloud or gsutil"
  return [words(line) for line in result.stdout.splitlines()]


def test_tpu_pod_dry_run_creates_copies_and_runs_on_every_worker(sandbox):
  commands = tpu_dry_run(sandbox, CREATE="1", ACCELERATOR_TYPE="v4-32")
  create, archive, scp, ssh = commands
  assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  assert create[5:] == ["my-tpu", "--zone", "us-central2-b", "--accelerator-type", "v4-32",
                        "--version", "tpu-ubuntu2204-base"]
  assert archive[:2] == ["git", "archive"] and archive[-1] == "HEAD"
  assert scp[4] == "scp" and "--worker=all" in scp and "my-tpu:fedmitr_src.tar.gz" in scp
  assert ssh[4:6] == ["ssh", "my-tpu"] and "--worker=all" in ssh
  assert ssh[ssh.index("--zone") + 1] == "us-central2-b"
  remote = ssh[ssh.index("--command") + 1]
  subprocess.run(["bash", "-n", "-c", remote], check=True)
  assert f"'jax[tpu]=={JAX_PIN}'" in remote and "export FEDMITR_DISTRIBUTED=1" in remote
  assert "gsutil" not in remote  # no DATA_BUCKET, no copy


def test_tpu_pod_clones_repo_url_instead_of_copying(sandbox):
  commands = tpu_dry_run(sandbox, REPO_URL="https://github.com/me/fedmitr_jax.git", REPO_REF="v1")
  assert len(commands) == 1  # no archive, no scp: only the ssh
  remote = commands[0][commands[0].index("--command") + 1]
  assert "git clone --depth 1 --branch v1 https://github.com/me/fedmitr_jax.git fedmitr_jax" in remote


def test_tpu_worker_command_installs_syncs_data_and_runs_main(sandbox):
  """Runs what each worker would run, with stub python/gsutil, and checks what they received."""
  tmp_path, env = sandbox
  ssh = tpu_dry_run(sandbox, DATA_BUCKET="gs://my-bucket/officehome/all")[-1]
  remote = ssh[ssh.index("--command") + 1]
  worker, log = tmp_path / "worker", tmp_path / "log"
  venv_tools = tmp_path / "venv_tools"
  _tool(venv_tools, "python", RECORDER.format(name="python"))
  _tool(venv_tools, "pip", RECORDER.format(name="pip"))
  _tool(tmp_path / "bin", "python3.11",
        f'#!/bin/bash\n[[ $1 == -m && $2 == venv ]] && mkdir -p "$3/bin" && cp {venv_tools}/* "$3/bin/"\n')
  (worker / "src").mkdir(parents=True)
  (worker / "src" / "requirements.txt").write_text("jax\n")
  subprocess.run(["tar", "-czf", str(worker / "fedmitr_src.tar.gz"), "-C", str(worker / "src"), "."], check=True)
  result = subprocess.run(["bash", "-c", remote], cwd=worker, env={**env, "DRY_RUN": ""},
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  pip_argv, _ = recorded(log, "pip")
  assert pip_argv == ["install", "-q", "-r", "requirements.txt", f"jax[tpu]=={JAX_PIN}"]
  gsutil_argv, _ = recorded(log, "gsutil")
  assert gsutil_argv == ["-m", "rsync", "-r", "gs://my-bucket/officehome/all", env["DATA_DIR"]]
  python_argv, python_env = recorded(log, "python")
  assert python_argv == ["-m", "fedmitr_jax.main", "--config", CONFIG, "--workdir", "/mnt/nfs/run 1",
                         f"--config.dataset.root={env['DATA_DIR']}", *OVERRIDES]
  assert python_env["FEDMITR_DISTRIBUTED"] == "1"
  assert (worker / "fedmitr_jax" / "requirements.txt").exists()  # the copied code was unpacked


def test_tpu_pod_data_field_for_tfds(sandbox):
  _, env = sandbox
  ssh = tpu_dry_run(sandbox, DATA_BUCKET="gs://b/tfds", DATA_FIELD="dataset.data_dir")[-1]
  assert f"--config.dataset.data_dir={env['DATA_DIR']}" in ssh[ssh.index("--command") + 1]


def test_tpu_pin_matches_requirements():
  """The TPU and GPU extras are installed at requirements.txt's jax version (read, not copied)."""
  for script in ("launch/tpu_pod.sh", "launch/gpu.sh"):
    assert "jax==" not in (REPO / script).read_text().replace("s/^jax==//p", "")


# ---- GPU ---------------------------------------------------------------------------------------
def test_gpu_dry_run_single_host(sandbox):
  _, env = sandbox
  result = launch("launch/gpu.sh", [CONFIG, "/runs/a 1", *OVERRIDES], env)
  assert result.returncode == 0, result.stderr
  commands = [words(line) for line in result.stdout.splitlines()]
  assert commands[-2] == [".venv/bin/pip", "install", "-q", "-r", "requirements.txt", f"jax[cuda12]=={JAX_PIN}"]
  assert commands[-1] == ["env", ".venv/bin/python", "-m", "fedmitr_jax.main", "--config", CONFIG,
                          "--workdir", "/runs/a 1", *OVERRIDES]


def test_gpu_multi_node_passes_the_distributed_environment(sandbox):
  """Runs gpu.sh for real in a copy of the repo whose .venv holds recording stubs."""
  tmp_path, env = sandbox
  repo = tmp_path / "repo"
  (repo / "launch").mkdir(parents=True)
  shutil.copy(REPO / "launch" / "gpu.sh", repo / "launch" / "gpu.sh")
  shutil.copy(REPO / "requirements.txt", repo / "requirements.txt")
  for name in ("python", "pip"):
    _tool(repo / ".venv" / "bin", name, RECORDER.format(name=name))
  result = subprocess.run(["bash", str(repo / "launch" / "gpu.sh"), CONFIG, "/nfs/run", *OVERRIDES],
                          env={**env, "DRY_RUN": "", "NUM_PROCESSES": "2", "PROCESS_ID": "1",
                               "COORDINATOR": "10.0.0.1:1234"},
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  pip_argv, _ = recorded(tmp_path / "log", "pip")
  assert pip_argv[-1] == f"jax[cuda12]=={JAX_PIN}"
  argv, child_env = recorded(tmp_path / "log", "python")
  assert argv == ["-m", "fedmitr_jax.main", "--config", CONFIG, "--workdir", "/nfs/run", *OVERRIDES]
  assert child_env["FEDMITR_DISTRIBUTED"] == "1"
  assert child_env["JAX_COORDINATOR_ADDRESS"] == "10.0.0.1:1234"
  assert (child_env["FEDMITR_NUM_PROCESSES"], child_env["FEDMITR_PROCESS_ID"]) == ("2", "1")


def test_jax_reads_the_coordinator_address_but_not_the_process_count():
  """What gpu.sh relies on: initialize() reads JAX_COORDINATOR_ADDRESS, not the process count/id."""
  from jax._src import distributed
  source = pathlib.Path(distributed.__file__).read_text()
  assert "os.environ.get('JAX_COORDINATOR_ADDRESS')" in source
  assert "JAX_NUM_PROCESSES" not in source and "JAX_PROCESS_ID" not in source
