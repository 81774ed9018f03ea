"""The commands' shared entry (fedmitr_jax/entry.py): command-line mistakes as a user types them
are one line on stderr, exit code 2 and nothing written; the exit-code mapping of errors."""
import os
import pathlib
import subprocess
import sys

import pytest

from fedmitr_jax import config_base, entry

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs/smoke.py")


def command(module, *args, cwd):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("module", ["fedmitr_jax.main", "fedmitr_jax.sweep"])
@pytest.mark.parametrize("args,line", [
    (["--config", SMOKE, "--workdir", "{w}", "--config.inversion.stepz=3"],
     "error: --config.inversion.stepz: no such field; nearest: inversion.stops, inversion.flip, inversion.lr"),
    (["--config", SMOKE, "--workdir", "{w}", "--config.partition.alpah=0.3"],
     "error: --config.partition.alpah: no such field; nearest: partition.alpha, partition.method, "
     "partition.num_clients"),
    (["--config", "configs/no_such.py", "--workdir", "{w}"],
     "error: --config: no such file: configs/no_such.py; give a config file such as configs/smoke.py "
     "(a relative path is read from the current folder)"),
    (["--config", SMOKE + ":clientz=3", "--workdir", "{w}"],
     "error: --config: config arg 'clientz' is unknown; known args: ['clients']"),
    (["--config", SMOKE, "--workdir", "{f}"],
     "error: --workdir: {f} is a file, not a folder; give a folder path (it is created if missing)"),
    (["--config", SMOKE, "--workdir", "{w}", "--config.partition.alpha=abc"],
     "error: flag --config.partition.alpha=abc: could not convert string to float: 'abc'"),
])
def test_command_line_mistakes_are_one_line_exit_2_and_write_nothing(tmp_path, module, args, line):
  run_dir, a_file = tmp_path / "run", tmp_path / "notes.txt"
  a_file.write_text("mine\n")
  fill = lambda s: s.format(w=run_dir, f=a_file)
  result = command(module, *map(fill, args), cwd=REPO)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.splitlines() == [fill(line)]
  assert result.stdout == ""
  assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"] and a_file.read_text() == "mine\n"


def test_command_line_error_reads_only(tmp_path):
  """The check itself (no subprocess): a good command line has no error and creates nothing."""
  assert entry.command_line_error(["--config", SMOKE, "--workdir", str(tmp_path / "w"),
                                   "--config.inversion.stops=(1,)", "--config.inversion=dict()"]) is None
  assert entry.command_line_error(["--config=" + SMOKE, "--config.clients.nope=1"]).startswith(
      "error: --config.clients.nope: no such field; nearest: clients.")
  assert entry.command_line_error(["--workdir", "gs://bucket/run"]) is None  # not checked locally
  assert not (tmp_path / "w").exists()


def test_field_paths_cover_every_leaf():
  paths = entry.field_paths(config_base.base_config())
  assert "inversion.stops" in paths and "seed" in paths and "inversion" not in paths
  assert len(paths) == len(set(paths))


def test_distributed_args():
  assert entry.distributed_args({}) == {}
  assert entry.distributed_args({"FEDMITR_NUM_PROCESSES": "4", "FEDMITR_PROCESS_ID": "3"}) == \
      {"num_processes": 4, "process_id": 3}
