"""launch/tpu_pod.sh and launch/gpu.sh: argument handling, and the exact commands and environment
they produce. Nothing reaches a cloud: DRY_RUN=1 prints the commands, gcloud and gsutil are stubs
that record any call (a dry run must make none), and the command a TPU worker would run is executed
here against stub tools that record what they were given."""
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ("launch/tpu_pod.sh", "launch/gpu.sh", "launch/local.sh", "launch/accelerator_check.sh")
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


def _accelerator_check():
  spec = importlib.util.spec_from_file_location("accelerator_check", REPO / "benchmarks/accelerator_check.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_accelerator_table_times_each_stage_between_its_reports(tmp_path):
  """Steps between a stage's reports over the seconds between them; a stage run in parts leaves its
  first part (which compiles) out, a stage in one part its first interval (when it has others); a
  sparse interval takes its token count's FLOPs; a generator round is g_steps generator steps plus
  the round's KD steps."""
  check = _accelerator_check()
  (tmp_path / "run.log").write_text("".join(f"{t}\t{line}\n" for t, line in [
      (0.0, "devices: 1 x cpu"),
      (10.0, "[clients] step 50/200 - img/s ETA - loss=2"),
      (20.0, "[clients] step 100/200 320.0 img/s ETA 0.0 min loss=1.5"),  # left out: it compiled
      (22.0, "[clients] step 150/200 1600.0 img/s ETA 0.0 min loss=1"),
      (24.0, "[clients] step 200/200 1600.0 img/s ETA 0.0 min loss=1"),
      (20.0, "[inversion_sparse 1/2] step 50/100 - img/s ETA - loss=3 ce=2 tokens=16"),
      (90.0, "[inversion_sparse 1/2] step 100/100 8.0 img/s ETA 0.0 min loss=3 ce=2 tokens=8"),
      (91.0, "[inversion_sparse 2/2] step 50/100 9.0 img/s ETA 0.1 min loss=3 ce=2 tokens=16"),
      (92.0, "[inversion_sparse 2/2] step 100/100 400.0 img/s ETA 0.0 min loss=3 ce=2 tokens=8"),
      (93.0, "[distill_fedmitr] step 50/100 - img/s ETA - loss=1 kd=1"),
      (95.0, "[distill_fedmitr] step 100/100 200.0 img/s ETA 0.0 min loss=1 kd=1"),
      (100.0, "[distill_coboosting] step 1/3 - img synthesised/s ETA - g_loss=1 kd=1"),
      (104.0, "[distill_coboosting] step 3/3 4.0 img synthesised/s ETA 0.0 min g_loss=1 kd=1"),
      (105.0, "[distill_dense] step 1/3 - img synthesised/s ETA - g_loss=1 kd=1"),
  ]))
  line = lambda tflop, devices: {"tflop_per_step": tflop, "devices": devices}
  dry = {"clients": line(2.0, 1), "inversion_sparse/16_tokens": line(9.0, 8),
         "inversion_sparse/8_tokens": line(1.0, 8), "distill_relabel": line(3.0, 8),
         "generator_kd/coboosting/generator": line(0.5, 1), "generator_kd/coboosting/kd": line(0.25, 1),
         "generator_kd/dense/generator": line(0.5, 1), "generator_kd/dense/kd": line(0.25, 1)}
  config = {"inversion": {"num_batches": 3, "batch_size": 8}, "distill": {"batch_size": 8, "epochs": 2.0},
            "generator_kd": {"g_steps": 4}}  # KD: 2 epochs of a 24-image pool = 6 steps, 2 per round
  rows = {r["stage"]: r for r in check.table(check.read_reports(tmp_path / "run.log"), dry, config, "v5e")}
  expected = {"clients": (1, 100, 25.0, 2.0),  # steps 100..200 in 4 s "inversion_sparse": (8, 50, 50.0, 1.0),
              "distill_fedmitr": (8, 50, 25.0, 3.0), "distill_coboosting": (1, 2, 0.5, 0.5 * 4 + 0.25 * 2)}
  for stage, (devices, steps, rate, tflop) in expected.items():
    row = rows[stage]
    assert (row["devices"], row["steps"]) == (devices, steps), row
    assert row["steps_per_s"] == pytest.approx(rate) and row["tflop_per_step"] == pytest.approx(tflop), row
    assert row["tflop_per_s"] == pytest.approx(rate * tflop)
    assert row["mfu"] == pytest.approx(rate * tflop / (devices * 197.0))
  assert rows["distill_dense"]["steps"] == 0 and rows["distill_dense"]["mfu"] is None  # one report, no rate
  printed = check.format_rows(list(rows.values()))
  assert printed[0].split() == ["stage", "devices", "steps", "steps/s", "TFLOP/step", "TFLOP/s", "MFU"]
  assert printed[1].split() == ["clients", "1", "100", "25", "2", "50", "25.4%"]
  assert printed[-1].split() == ["distill_dense", "1", "0", "-", "-", "-", "-"]


@pytest.mark.slow
def test_accelerator_check_runs_a_tiny_config_on_cpu(tmp_path):
  """launch/accelerator_check.sh end to end with configs/smoke.py at tiny counts on one CPU device:
  the dry run's lines, the run, and one table row per stage with a rate, TFLOP/s and MFU."""
  overrides = ["--config.clients.epochs=1", "--config.clients.log_every_steps=2",
               "--config.inversion.iterations=8", "--config.inversion.log_every=2",
               "--config.distill.epochs=4", "--config.distill.log_every=2",
               "--config.distill.checkpoint_every_steps=2", "--config.generator_kd.g_steps=2"]
  env = dict(os.environ, CHIP="h100", CONFIG="configs/smoke.py", PYTHON=sys.executable,
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run(["bash", str(REPO / "launch/accelerator_check.sh"), str(tmp_path / "w"),
                           *overrides], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
  assert result.returncode == 0, result.stderr[-3000:]
  dry = [json.loads(line) for line in (tmp_path / "w" / "dry_run.jsonl").read_text().splitlines()]
  assert dry[0]["stage"] == "clients" and "projected_hours" in dry[-1]
  table = result.stdout[result.stdout.index("stage  "):].splitlines()
  assert table[0].split() == ["stage", "devices", "steps", "steps/s", "TFLOP/step", "TFLOP/s", "MFU"]
  stages = ["clients", "inversion_dense", "inversion_sparse", "distill_dense", "distill_coboosting",
            "distill_dense_kd", "distill_sparse_kd", "distill_dense_relabel", "distill_fedmitr"]
  assert sorted(line.split()[0] for line in table[1:]) == sorted(stages)
  rows = {r["stage"]: r for r in map(json.loads, (tmp_path / "w" / "accelerator_check.jsonl").open())}
  sparse = [line["tflop_per_step"] for line in dry if line.get("stage", "").startswith("inversion_sparse/")]
  for stage in stages:
    row = rows[stage]
    assert row["steps"] > 0 and row["steps_per_s"] > 0, row
    assert row["tflop_per_s"] == pytest.approx(row["steps_per_s"] * row["tflop_per_step"]), row
    assert row["mfu"] == pytest.approx(row["tflop_per_s"] / (row["devices"] * 989.0)), row
  assert min(sparse) <= rows["inversion_sparse"]["tflop_per_step"] <= max(sparse)
  assert rows["distill_fedmitr"]["tflop_per_step"] == next(l["tflop_per_step"] for l in dry
                                                            if l.get("stage") == "distill_relabel")


def test_accelerator_check_takes_a_dry_run_made_elsewhere(tmp_path):
  """DRY_RUN_FILE: the given dry run is copied and no dry run is compiled here (the PYTHON stub records
  every call: one, the timed run); a missing file fails with one line before anything is written."""
  dry = tmp_path / "dry.jsonl"
  dry.write_text('{"stage": "clients", "devices": 1, "tflop_per_step": 2.5, "steps": 10}\n')
  _tool(tmp_path / "bin", "python_stub", '#!/bin/bash\nprintf "%s " "$@" >> "$LOG/calls"; echo >> "$LOG/calls"\n')
  env = dict(os.environ, PYTHON=str(tmp_path / "bin" / "python_stub"), LOG=str(tmp_path), DRY_RUN_FILE=str(dry))
  result = subprocess.run(["bash", str(REPO / "launch/accelerator_check.sh"), str(tmp_path / "w")],
                          env=env, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  assert (tmp_path / "w" / "dry_run.jsonl").read_text() == dry.read_text()
  calls = (tmp_path / "calls").read_text().splitlines()
  assert len(calls) == 1 and "benchmarks/accelerator_check.py" in calls[0] and "--dry_run " in calls[0]
  missing = subprocess.run(["bash", str(REPO / "launch/accelerator_check.sh"), str(tmp_path / "w2")],
                           env={**env, "DRY_RUN_FILE": str(tmp_path / "nope.jsonl")}, capture_output=True, text=True)
  assert missing.returncode == 2 and "DRY_RUN_FILE" in missing.stderr and not (tmp_path / "w2").exists()
