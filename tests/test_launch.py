"""launch/tpu_pod.sh and launch/gpu.sh: argument handling, and the exact commands and environment
they produce. Nothing reaches a cloud: DRY_RUN=1 prints the commands, gcloud and gsutil are stubs
that record any call (a dry run must make none), and the command a TPU worker would run is executed
here against stub tools that record what they were given."""
import os
import pathlib
import re
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ("launch/tpu_pod.sh", "launch/gpu.sh", "launch/local.sh")
JAX_PIN = re.search(r"^jax==(\S+)$", (REPO / "requirements.txt").read_text(), re.M).group(1)
ETILS_PIN = re.search(r"^etils\[epath\]==(\S+)$", (REPO / "requirements.txt").read_text(), re.M).group(1)
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


def test_tpu_pod_refuses_relative_workdir_missing_weights_and_create_without_type(sandbox):
  tmp_path, env = sandbox
  result = launch("launch/tpu_pod.sh", [CONFIG, "runs/a"], env, TPU_NAME="t", ZONE="z")
  assert result.returncode == 2 and "error: WORKDIR runs/a: not absolute" in result.stderr
  result = launch("launch/tpu_pod.sh", [CONFIG, "/w"], env, TPU_NAME="t", ZONE="z", WEIGHTS="/no/such.npz")
  assert result.returncode == 2 and "error: WEIGHTS /no/such.npz: no such file" in result.stderr
  result = launch("launch/tpu_pod.sh", [CONFIG, "/w"], env, TPU_NAME="t", ZONE="z", CREATE="1")
  assert result.returncode != 0 and "ACCELERATOR_TYPE" in result.stderr
  assert not list((tmp_path / "log").iterdir())


def remote_command(ssh: list[str]) -> str:
  return ssh[ssh.index("--command") + 1]


def remote_line(remote: str, start: str) -> list[str]:
  """The words of the worker script's line that starts with `start`."""
  return words(next(line for line in remote.splitlines() if line.startswith(start)))


def test_tpu_pod_bucket_workdir_installs_the_gcs_extra(sandbox):
  _, env = sandbox
  result = launch("launch/tpu_pod.sh", [CONFIG, "gs://bucket/run"], env, TPU_NAME="t", ZONE="z")
  assert result.returncode == 0, result.stderr
  remote = remote_command(words(result.stdout.splitlines()[-1]))
  assert remote_line(remote, ".venv/bin/pip")[-2:] == [f"jax[tpu]=={JAX_PIN}", f"etils[epath,epath-gcs]=={ETILS_PIN}"]
  assert remote_line(remote, "exec")[-2:] == ["--workdir", "gs://bucket/run"]


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
def tpu_dry_run(sandbox, workdir="/mnt/nfs/run 1", **extra):
  tmp_path, env = sandbox
  extra = {"TPU_NAME": "my-tpu", "ZONE": "us-central2-b", **extra}
  result = launch("launch/tpu_pod.sh", [CONFIG, workdir, *OVERRIDES], env, **extra)
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
  assert remote_line(remote, ".venv/bin/pip")[-1] == f"jax[tpu]=={JAX_PIN}" and "export FEDMITR_DISTRIBUTED=1" in remote
  assert "gsutil" not in remote and "gcloud storage" not in remote  # no DATA_BUCKET, no copy


def test_tpu_pod_clones_repo_url_instead_of_copying(sandbox):
  commands = tpu_dry_run(sandbox, REPO_URL="https://github.com/me/fedmitr_jax.git", REPO_REF="v1")
  assert len(commands) == 1  # no archive, no scp: only the ssh
  remote = commands[0][commands[0].index("--command") + 1]
  assert "git clone --depth 1 --branch v1 https://github.com/me/fedmitr_jax.git fedmitr_jax" in remote


def run_worker(tmp_path, env, remote, name="worker"):
  """Runs a worker's script in <tmp>/<name> (its home folder), with python3.11 making a .venv of
  recording stubs; returns the result."""
  worker, venv_tools = tmp_path / name, tmp_path / "venv_tools"
  worker.mkdir(exist_ok=True)
  _tool(venv_tools, "python", RECORDER.format(name="python"))
  _tool(venv_tools, "pip", RECORDER.format(name="pip"))
  _tool(tmp_path / "bin", "python3.11",
        f'#!/bin/bash\n[[ $1 == -m && $2 == venv ]] && mkdir -p "$3/bin" && cp {venv_tools}/* "$3/bin/"\n')
  return subprocess.run(["bash", "-c", remote], cwd=worker, env={**env, "DRY_RUN": "", "HOME": str(worker)},
                        capture_output=True, text=True, timeout=60)


def archive_on_worker(worker: pathlib.Path, files: dict) -> None:
  """What `gcloud ... scp` would have left in the worker's home: the code as a tar.gz."""
  src = worker.parent / f"src_{worker.name}"
  for name, text in files.items():
    (src / name).parent.mkdir(parents=True, exist_ok=True)
    (src / name).write_text(text)
  worker.mkdir(exist_ok=True)
  subprocess.run(["tar", "-czf", str(worker / "fedmitr_src.tar.gz"), "-C", str(src), "."], check=True)


def test_tpu_worker_command_installs_syncs_data_and_runs_main(sandbox):
  """Runs what each worker would run, with stub python/gcloud, and checks what they received."""
  tmp_path, env = sandbox
  workdir = str(tmp_path / "shared" / "run 1")
  (tmp_path / "shared").mkdir()
  remote = remote_command(tpu_dry_run(sandbox, workdir=workdir, DATA_BUCKET="gs://my-bucket/officehome/all")[-1])
  assert "gsutil" not in remote
  archive_on_worker(tmp_path / "worker", {"requirements.txt": "jax\n"})
  result = run_worker(tmp_path, env, remote)
  assert result.returncode == 0, result.stderr
  log = tmp_path / "log"
  pip_argv, _ = recorded(log, "pip")
  assert pip_argv == ["install", "-q", "-r", "requirements.txt", f"jax[tpu]=={JAX_PIN}"]
  gcloud_argv, _ = recorded(log, "gcloud")
  assert gcloud_argv == ["storage", "rsync", "--recursive", "gs://my-bucket/officehome/all", env["DATA_DIR"]]
  python_argv, python_env = recorded(log, "python")
  assert python_argv == ["-m", "fedmitr_jax.main", "--config", CONFIG, "--workdir", workdir,
                         f"--config.dataset.root={env['DATA_DIR']}", *OVERRIDES]
  assert python_env["FEDMITR_DISTRIBUTED"] == "1"
  assert (tmp_path / "worker" / "fedmitr_jax" / "requirements.txt").exists()  # the copied code was unpacked
  assert not (log / "gsutil.argv").exists()


def test_tpu_worker_refuses_a_workdir_it_cannot_see(sandbox):
  tmp_path, env = sandbox
  remote = remote_command(tpu_dry_run(sandbox, workdir="/no/such/mount/run")[-1])
  archive_on_worker(tmp_path / "worker", {"requirements.txt": "jax\n"})
  result = run_worker(tmp_path, env, remote)
  assert result.returncode == 2
  assert result.stderr.startswith("error: WORKDIR /no/such/mount/run: neither it nor its parent exists on worker")
  assert not (tmp_path / "log" / "python.argv").exists()


def test_tpu_rerun_replaces_copied_code_and_keeps_the_venv(sandbox):
  tmp_path, env = sandbox
  (tmp_path / "shared").mkdir()
  remote = remote_command(tpu_dry_run(sandbox, workdir=str(tmp_path / "shared" / "run"))[-1])
  worker = tmp_path / "worker"
  archive_on_worker(worker, {"requirements.txt": "jax\n", "fedmitr_jax/old.py": "x = 1\n"})
  assert run_worker(tmp_path, env, remote).returncode == 0
  shutil.rmtree(tmp_path / "src_worker")
  archive_on_worker(worker, {"requirements.txt": "jax\n", "fedmitr_jax/new.py": "x = 2\n"})
  assert run_worker(tmp_path, env, remote).returncode == 0
  code = worker / "fedmitr_jax"
  assert (code / "fedmitr_jax" / "new.py").exists() and not (code / "fedmitr_jax" / "old.py").exists()
  assert (code / ".venv" / "bin" / "python").exists()


def test_tpu_rerun_fetches_the_repo_again(sandbox):
  """REPO_URL: the first run clones, a rerun after a new commit runs the new commit (a local git
  repository stands in for the remote)."""
  tmp_path, env = sandbox
  origin = tmp_path / "origin"
  git = lambda *args: subprocess.run(["git", "-C", str(origin), *args], check=True, capture_output=True,
                                     env={**env, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                                          "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})
  origin.mkdir()
  git("init", "-q")
  (origin / "requirements.txt").write_text("jax\n")
  (origin / "version.txt").write_text("1\n")
  git("add", "-A")
  git("commit", "-qm", "one")
  (tmp_path / "shared").mkdir()
  remote = remote_command(tpu_dry_run(sandbox, workdir=str(tmp_path / "shared" / "run"),
                                      REPO_URL=f"file://{origin}")[-1])
  assert run_worker(tmp_path, env, remote).returncode == 0
  code = tmp_path / "worker" / "fedmitr_jax"
  assert (code / "version.txt").read_text() == "1\n"
  (origin / "version.txt").write_text("2\n")
  git("commit", "-qam", "two")
  result = run_worker(tmp_path, env, remote)
  assert result.returncode == 0, result.stderr
  assert (code / "version.txt").read_text() == "2\n"


def test_tpu_weights_file_is_copied_to_every_worker_and_used(sandbox):
  tmp_path, env = sandbox
  weights = tmp_path / "deit tiny.safetensors"
  weights.write_bytes(b"weights")
  (tmp_path / "shared").mkdir()
  bucket = tpu_dry_run(sandbox, WEIGHTS="gs://b/deit.safetensors")[-1]
  assert ('gcloud storage cp gs://b/deit.safetensors "$HOME/fedmitr_weights/deit.safetensors"'
          in remote_command(bucket))
  commands = tpu_dry_run(sandbox, workdir=str(tmp_path / "shared" / "run"), WEIGHTS=str(weights))
  scp = [c for c in commands if c[4] == "scp" and str(weights) in c]
  assert len(scp) == 1 and "--worker=all" in scp[0] and "my-tpu:fedmitr_weights.tmp" in scp[0]
  worker = tmp_path / "worker"
  archive_on_worker(worker, {"requirements.txt": "jax\n"})
  shutil.copy(weights, worker / "fedmitr_weights.tmp")  # what the scp above leaves on each worker
  result = run_worker(tmp_path, env, remote_command(commands[-1]))
  assert result.returncode == 0, result.stderr
  copied = worker / "fedmitr_weights" / weights.name
  assert copied.read_bytes() == b"weights"
  python_argv, _ = recorded(tmp_path / "log", "python")
  assert f"--config.model.pretrained_path={copied}" in python_argv
  assert python_argv[-len(OVERRIDES):] == OVERRIDES  # the user's overrides come last and win


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
  (tmp_path / "nfs").mkdir()
  workdir = str(tmp_path / "nfs" / "run")
  result = subprocess.run(["bash", str(repo / "launch" / "gpu.sh"), CONFIG, workdir, *OVERRIDES],
                          env={**env, "DRY_RUN": "", "NUM_PROCESSES": "2", "PROCESS_ID": "1",
                               "COORDINATOR": "10.0.0.1:1234"},
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  pip_argv, _ = recorded(tmp_path / "log", "pip")
  assert pip_argv[-1] == f"jax[cuda12]=={JAX_PIN}"
  argv, child_env = recorded(tmp_path / "log", "python")
  assert argv == ["-m", "fedmitr_jax.main", "--config", CONFIG, "--workdir", workdir, *OVERRIDES]
  assert child_env["FEDMITR_DISTRIBUTED"] == "1"
  assert child_env["JAX_COORDINATOR_ADDRESS"] == "10.0.0.1:1234"
  assert (child_env["FEDMITR_NUM_PROCESSES"], child_env["FEDMITR_PROCESS_ID"]) == ("2", "1")


def test_gpu_several_hosts_need_a_shared_absolute_workdir(sandbox):
  _, env = sandbox
  hosts = {"NUM_PROCESSES": "2", "PROCESS_ID": "0", "COORDINATOR": "10.0.0.1:1234"}
  result = launch("launch/gpu.sh", [CONFIG, "runs/a"], env, **hosts)
  assert result.returncode == 2 and result.stderr.startswith("error: WORKDIR runs/a: not absolute")
  result = launch("launch/gpu.sh", [CONFIG, "/no/such/mount/run"], env, **hosts)
  assert result.returncode == 2 and "neither it nor its parent exists" in result.stderr
  result = launch("launch/gpu.sh", [CONFIG, "gs://bucket/run"], env, **hosts)
  assert result.returncode == 0, result.stderr
  pip = words(result.stdout.splitlines()[-2])
  assert pip[-2:] == [f"jax[cuda12]=={JAX_PIN}", f"etils[epath,epath-gcs]=={ETILS_PIN}"]


def test_jax_reads_the_coordinator_address_but_not_the_process_count():
  """What gpu.sh relies on: initialize() reads JAX_COORDINATOR_ADDRESS, not the process count/id."""
  from jax._src import distributed
  source = pathlib.Path(distributed.__file__).read_text()
  assert "os.environ.get('JAX_COORDINATOR_ADDRESS')" in source
  assert "JAX_NUM_PROCESSES" not in source and "JAX_PROCESS_ID" not in source
