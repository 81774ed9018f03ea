"""Kill anywhere and resume with the same answer; other topologies; NaN guard; disk full.

Every run here is the real entry point in a subprocess (`python -m fedmitr_jax.main`) on the
smoke config, stopped with SIGKILL (not a clean exit) while a stage is running.
"""
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmitr_jax import checkpoints, config_base, guards
from fedmitr_jax.models import vit
from fedmitr_jax.server import distill

REPO = pathlib.Path(__file__).resolve().parents[1]
# Longer stages than the plain smoke run, so a kill lands inside them, with saves every few steps.
OVERRIDES = ("--config.methods=('fedavg','sparse_kd','fedmitr')", "--config.clients.epochs=3",
             "--config.distill.epochs=6")
TIMEOUT = 600


def command(workdir, *extra):
  # A field given in `extra` replaces its OVERRIDES entry: ml_collections appends a tuple field's
  # repeated overrides (two --config.methods would list methods twice, which validation refuses).
  given = {flag.split("=")[0] for flag in extra}
  overrides = [flag for flag in OVERRIDES if flag.split("=")[0] not in given]
  return [sys.executable, "-m", "fedmitr_jax.main", "--config", str(REPO / "configs/smoke.py"),
          "--workdir", str(workdir), *overrides, *extra]


def environment(devices=1):
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def run(workdir, devices=1, extra=(), **kwargs):
  return subprocess.run(command(workdir, *extra), cwd=REPO, env=environment(devices), capture_output=True,
                        text=True, timeout=TIMEOUT, **kwargs)


def run_and_kill(workdir, marker: str, devices=1, extra=()) -> str:
  """Starts a run, SIGKILLs it as soon as a stdout line starts with `marker`; returns stdout."""
  proc = subprocess.Popen(command(workdir, *extra), cwd=REPO, env=environment(devices), stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  lines = []
  try:
    for line in proc.stdout:
      lines.append(line)
      if line.startswith(marker):
        proc.send_signal(signal.SIGKILL)
        break
  finally:
    proc.kill()
    proc.wait(timeout=60)
  out = "".join(lines)
  assert line.startswith(marker), f"the run never printed {marker!r}:\n{out[-2000:]}"
  assert proc.returncode == -signal.SIGKILL
  return out


def finished_saves(workdir, stage):
  """Step numbers of the complete rolling saves of a stage (Orbax renames a save into place
  when it is complete; an interrupted one keeps its '.orbax-checkpoint-tmp' name)."""
  progress = pathlib.Path(workdir) / "stages" / stage / "progress"
  return sorted(int(p.name) for p in progress.glob("*") if p.name.isdigit()) if progress.exists() else []


def accuracies(workdir):
  results = json.loads((pathlib.Path(workdir) / "results.json").read_text())
  return ({k: v["test_acc"] for k, v in results["methods"].items()},
          [c["test_acc"] for c in results["clients"]])


def expect_resumed(out, stage, saves, unit="step"):
  """The rerun resumed from the newest complete save, or started over when there was none."""
  if not saves:
    assert f"[{stage}] resuming" not in out
  elif unit == "batch":
    assert f"[{stage}] resuming after {saves[-1]}/" in out, out[-3000:]
  else:
    assert f"[{stage}] resuming at step {saves[-1]}" in out, out[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One uninterrupted run: the answer every interrupted run must reproduce."""
  workdir = tmp_path_factory.mktemp("reference")
  result = run(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.mark.slow
def test_sigkill_in_every_stage_then_resume_gives_the_same_results(reference, tmp_path):
  workdir = tmp_path / "killed"
  # 1. Killed during client training.
  run_and_kill(workdir, "[clients] step 10/")
  assert not (workdir / "stages/clients/DONE").exists()
  client_saves = finished_saves(workdir, "clients")
  assert client_saves, "killed before the first clients save: nothing to resume from"
  # A save interrupted by a kill leaves an unfinished folder; make one on purpose (garbage in a
  # step above every real save): it must be ignored, not restored.
  junk = workdir / "stages/clients/progress/9999.orbax-checkpoint-tmp"
  junk.mkdir(parents=True)
  (junk / "_CHECKPOINT_METADATA").write_text("{truncated")
  # 2. Rerun, killed during synthesis.
  out = run_and_kill(workdir, "[inversion_sparse 2/2] step 4/")
  expect_resumed(out, "clients", client_saves)
  assert "[partition] loaded from checkpoint" in out
  bank_saves = finished_saves(workdir, "inversion_sparse")
  assert bank_saves == [1], bank_saves  # batch 1 of 2 was saved before batch 2 started
  # 3. Rerun, killed during distillation.
  out = run_and_kill(workdir, "[distill_fedmitr] step 6/")
  assert "[clients] loaded from checkpoint" in out and "[clients] step" not in out
  expect_resumed(out, "inversion_sparse", bank_saves, unit="batch")
  assert "[inversion_sparse 1/2]" not in out  # the saved batch is not redone
  distill_saves = finished_saves(workdir, "distill_fedmitr")
  assert distill_saves, "killed before the first distillation save"
  # 4. Rerun to the end: nothing finished is redone, and the answer is the uninterrupted one.
  final = run(workdir)
  assert final.returncode == 0, final.stderr[-3000:]
  for stage in ("partition", "clients", "inversion_sparse", "distill_sparse_kd"):
    assert f"[{stage}] loaded from checkpoint" in final.stdout
  expect_resumed(final.stdout, "distill_fedmitr", distill_saves)
  assert accuracies(workdir) == accuracies(reference)


@pytest.mark.slow
def test_sigkill_in_looped_clients_resumes_inside_the_client(tmp_path):
  """clients.mode=loop (one client after another) saves every checkpoint_every_steps global steps
  and at the end of each client, so a kill costs only the steps since the last save."""
  loop = ("--config.clients.mode=loop", "--config.clients.epochs=1", "--config.methods=('fedavg',)")
  workdir = tmp_path / "killed"
  out = run_and_kill(workdir, "[clients 1] step 5/", extra=loop)
  steps = json.loads(re.search(r"steps per client (\[[\d, ]+\])", out).group(1))
  saves = finished_saves(workdir, "clients")
  # Client 0's end was saved: saves at every 4th global step and at each client's end were issued
  # up to the killed step (client 0's end and at least one more), and each save first waits for
  # the one before it to complete.
  assert saves and saves[-1] >= steps[0], (saves, steps)
  final = run(workdir, extra=loop)
  assert final.returncode == 0, final.stderr[-3000:]
  expect_resumed(final.stdout, "clients", saves)
  assert "[clients 0] step" not in final.stdout  # the finished client is not trained again
  done_in_client_1 = saves[-1] - steps[0]
  reported = [int(n) for n in re.findall(r"\[clients 1\] step (\d+)/", final.stdout)]
  assert reported and done_in_client_1 < reported[0] <= done_in_client_1 + 5, reported  # goes on, not from 0
  # That the resumed clients equal uninterrupted ones is tested in process
  # (test_clients.test_looped_clients_resume_from_a_mid_run_save_with_the_same_result).


@pytest.mark.parametrize("first, second", [(8, 1), (1, 8)])
@pytest.mark.slow
def test_distillation_saved_on_one_topology_resumes_on_another(reference, tmp_path, first, second):
  """Rolling saves made with `first` devices restore with `second` devices. The data-parallel
  sum runs in another order on another device count, so the result is checked for closeness."""
  workdir = tmp_path / "topology"
  shutil.copytree(reference, workdir)
  shutil.rmtree(workdir / "stages/distill_fedmitr")
  (workdir / "results.json").unlink()
  run_and_kill(workdir, "[distill_fedmitr] step 6/", devices=first)
  saves = finished_saves(workdir, "distill_fedmitr")
  assert saves, "no rolling save before the kill"
  final = run(workdir, devices=second)
  assert final.returncode == 0, final.stderr[-3000:]
  expect_resumed(final.stdout, "distill_fedmitr", saves)
  assert json.loads((workdir / "metadata.json").read_text())["device_count"] == second
  got, ref = accuracies(workdir)[0]["fedmitr"], accuracies(reference)[0]["fedmitr"]
  assert abs(got - ref) <= 0.02, (got, ref)  # 200 test images: at most 4 flipped predictions


@pytest.mark.slow
def test_disk_full_while_saving_is_one_line_and_a_rerun_finishes(reference, tmp_path):
  """A file-size limit makes every large write fail as a full disk would (EFBIG instead of
  ENOSPC): the run stops with one line, and the same command finishes once space is back.
  The run restarts from the reference's finished banks, so the failing saves are distillation's."""
  workdir = tmp_path / "full"
  shutil.copytree(reference, workdir)
  for stage in ("distill_sparse_kd", "distill_fedmitr"):
    shutil.rmtree(workdir / "stages" / stage)
  (workdir / "results.json").unlink()

  # The limit is set inside the child before main runs (not with preexec_fn, which is unsafe
  # after fork in a process that already runs JAX threads). SIGXFSZ is ignored so a too-large
  # write fails with EFBIG instead of killing the process.
  small_disk = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                "resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY)); "
                "sys.argv = ['main'] + sys.argv[1:]; runpy.run_module('fedmitr_jax.main', run_name='__main__')")
  cmd = [sys.executable, "-c", small_disk] + command(workdir)[3:]
  # Without the session's compilation cache: the limit would cut its larger entries short.
  no_cache = dict(environment(), JAX_ENABLE_COMPILATION_CACHE="false")
  full = subprocess.run(cmd, cwd=REPO, env=no_cache, capture_output=True, text=True, timeout=TIMEOUT)
  assert full.returncode == 4, full.stderr[-3000:]
  last = full.stderr.strip().splitlines()[-1]
  assert last.startswith("error: workdir: disk full while saving under") and "rerun" in last
  assert not (workdir / "results.json").exists()
  assert not (workdir / "stages/distill_sparse_kd/DONE").exists()
  again = run(workdir)
  assert again.returncode == 0, again.stderr[-3000:]
  assert accuracies(workdir) == accuracies(reference)


@pytest.mark.slow
def test_cli_nonfinite_loss_stops_with_the_stage_and_step(tmp_path):
  result = subprocess.run(command(tmp_path / "nan", "--config.clients.lr=1e30"), cwd=REPO,
                          env=environment(), capture_output=True, text=True, timeout=TIMEOUT)
  assert result.returncode == 3, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert re.match(r"error: \[clients\] the loss became non-finite at step \d+; .*clients\.lr", last), last
  assert not (tmp_path / "nan/stages/clients/DONE").exists()


@pytest.mark.slow
def test_nonfinite_distillation_keeps_the_last_good_save(tmp_path):
  """A poisoned example (NaN soft label) stops distillation at the first step that sees it; the
  newest save is from before that step and holds finite parameters."""
  model = vit.build_vit("test/8", 4, image_size=16, separate_token_head=True)
  params = vit.init_params(model, jax.random.key(0), 16)
  n, patches = 32, 4
  rng = np.random.default_rng(0)
  bank = {"images": rng.normal(size=(n, 16, 16, 3)).astype(np.float32),
          "labels": (np.arange(n) % 4).astype(np.int32), "masks": np.ones((n, patches), bool),
          "teacher_logits": rng.normal(size=(n, 2, 4)).astype(np.float32),
          "token_probs": np.full((n, patches, 4), 0.25, np.float32)}
  cfg = config_base.base_config().distill
  cfg.batch_size, cfg.epochs, cfg.checkpoint_every_steps = 8, 3.0, 2
  poisoned = int(distill.batch_indices(n, 8, 3, seed=0)[0])  # last batch of epoch 0: step 4
  first_seen = next(t for t in range(12) if poisoned in distill.batch_indices(n, 8, t, seed=0)) + 1
  assert first_seen == 4
  bank["teacher_logits"][poisoned] = np.nan
  store = checkpoints.StageStore(tmp_path)
  with store.progress_manager("distill_x") as manager:
    with pytest.raises(guards.NonFiniteError) as err:
      distill.train_student(model, cfg, bank, params, seed=0, stage="distill_x", manager=manager)
    newest = manager.latest_step()
  assert f"[distill_x] the loss became non-finite at step {first_seen};" in str(err.value)
  assert newest is not None and newest < first_seen
  assert f"last good save (step {newest}) is kept" in str(err.value)
  tx = distill.make_optimizer(cfg, 12)
  template = distill.StudentState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))
  with store.progress_manager("distill_x") as manager:
    _, saved = checkpoints.restore_latest(manager, checkpoints.abstract_like(template))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(saved.params))
