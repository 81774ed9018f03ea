"""The sweep: table maths on made-up results, workdir reuse rules, and a tiny real sweep."""
import csv
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from fedmitr_jax import sweep_report, validate

REPO = pathlib.Path(__file__).resolve().parents[1]


def _results(accs, clients=(0.2, 0.4)):
  return {"methods": {m: {"test_acc": a} for m, a in accs.items()},
          "clients": [{"test_acc": c, "num_examples": 10} for c in clients]}


def test_aggregate_mean_std_and_paired_gain():
  runs = {
      (0.1, 0): _results({"fedavg": 0.10, "dense_kd": 0.20, "sparse_kd": 0.25, "fedmitr": 0.30}),
      (0.1, 1): _results({"fedavg": 0.12, "dense_kd": 0.28, "sparse_kd": 0.22, "fedmitr": 0.26}),
      (0.5, 0): _results({"fedavg": 0.30, "dense_kd": 0.40, "sparse_kd": 0.41, "fedmitr": 0.39}),
  }
  table = sweep_report.aggregate(runs, ["fedavg", "dense_kd", "sparse_kd", "fedmitr"])
  mean, std, n = table[0.1]["fedmitr"]
  assert (mean, n) == (pytest.approx(28.0), 2) and std == pytest.approx(math.sqrt(8.0))
  # Gains per seed: 30 - 25 = +5 and 26 - 28 = -2 (fedavg is not a data-free competitor).
  gain = table[0.1][sweep_report.GAIN_ROW]
  assert gain[0] == pytest.approx(1.5) and gain[1] == pytest.approx(math.sqrt(24.5)) and gain[2] == 2
  assert table[0.5][sweep_report.GAIN_ROW][:2] == (pytest.approx(-2.0), 0.0)
  assert table[0.1]["clients (mean)"][0] == pytest.approx(30.0)


def test_report_files(tmp_path):
  runs = {(a, s): _results({"fedavg": 0.1 + a, "fedmitr": 0.2 + a + s / 100}) for a in (0.1, 0.3) for s in (0, 1)}
  table = sweep_report.aggregate(runs, ["fedavg", "fedmitr"])
  sweep_report.write_markdown(table, tmp_path / "t.md", "seeds 0, 1")
  sweep_report.write_csv(table, tmp_path / "t.csv")
  sweep_report.save_plot(table, tmp_path / "t.png", "test")
  text = (tmp_path / "t.md").read_text()
  assert "| **fedmitr** | 30.50 ± 0.71 | 50.50 ± 0.71 |" in text
  rows = list(csv.DictReader(open(tmp_path / "t.csv")))
  assert {r["row"] for r in rows} == {"fedavg", "fedmitr", "clients (mean)", sweep_report.GAIN_ROW}
  assert (tmp_path / "t.png").stat().st_size > 5000


def test_diagnostics_are_averaged_over_clients_then_seeds(tmp_path):
  def run(client_accs, ensemble_acc, entropy):
    result = _results({"fedmitr": 0.3})
    result["diagnostics"] = {"clients": [{"token_acc": a, "token_entropy": entropy} for a in client_accs],
                             "ensemble": {"token_acc": ensemble_acc, "token_entropy": entropy - 0.5}}
    return result
  with_bank = run((0.2, 0.4), 0.5, 2.0)
  with_bank["diagnostics"]["banks"] = {"sparse": {"image_acc": 0.9, "token_acc_dropped": 0.6,
                                                  "token_entropy_dropped": 2.0}}
  runs = {(0.1, 0): with_bank, (0.1, 1): run((0.1, 0.1), 0.3, 1.0),  # seed 1: made before bank diagnostics
          (0.5, 0): _results({"fedmitr": 0.4})}  # an older result without diagnostics: not counted
  table = sweep_report.aggregate_diagnostics(runs)
  assert table[0.1]["clients token acc (%)"][:2] == (pytest.approx(20.0), pytest.approx(math.sqrt(200.0)))  # seeds: 30, 10
  assert table[0.1]["ensemble token acc (%)"][0] == pytest.approx(40.0)
  assert table[0.1]["ensemble token entropy (nats)"] == (pytest.approx(1.0), pytest.approx(math.sqrt(0.5)), 2)
  assert table[0.5]["clients token acc (%)"][2] == 0
  assert table[0.1]["sparse bank: dropped-token labels, acc (%)"] == (pytest.approx(60.0), 0.0, 1)
  assert table[0.1]["sparse bank: dropped-token labels, entropy (nats)"][2] == 1
  sweep_report.write_markdown(table, tmp_path / "d.md", "seeds 0, 1", what="Token evidence")
  text = (tmp_path / "d.md").read_text()
  assert "| ensemble token acc (%) | 40.00 ± 14.14 | — |" in text and "gain" not in text


def test_paired_differences_per_run_and_mean(tmp_path):
  runs = {
      (0.1, 0): _results({"dense_kd": 0.20, "sparse_kd": 0.25, "fedmitr": 0.22, "coboosting": 0.31}),
      (0.1, 1): _results({"dense_kd": 0.30, "sparse_kd": 0.26, "fedmitr": 0.30, "coboosting": 0.33}),
      (0.5, 0): _results({"dense_kd": 0.40, "sparse_kd": 0.40}),  # no fedmitr: left out of its rows
  }
  table = sweep_report.paired_differences(runs)
  relabel = table["token relabel on the sparse bank (fedmitr − sparse_kd)"]
  assert relabel == {(0.1, 0): pytest.approx(-3.0), (0.1, 1): pytest.approx(4.0)}
  assert table["sparse bank vs dense bank (sparse_kd − dense_kd)"][(0.5, 0)] == pytest.approx(0.0)
  assert not any("dense_relabel" in label for label in table)  # no run has it
  sweep_report.write_paired_markdown(table, tmp_path / "p.md")
  text = (tmp_path / "p.md").read_text()
  assert "| comparison | α 0.1 s0 | α 0.1 s1 | α 0.5 s0 | mean |" in text
  assert "| token relabel on the sparse bank (fedmitr − sparse_kd) | -3.00 | +4.00 | — | +0.50 |" in text


def test_read_json_inverts_write_json(tmp_path):
  runs = {(a, s): _results({"fedavg": 0.1 + a, "fedmitr": 0.2 + a + s / 100}) for a in (0.1, 0.3) for s in (0, 1)}
  table = sweep_report.aggregate(runs, ["fedavg", "fedmitr"])
  sweep_report.write_json(table, tmp_path / "sweep.json")
  back = sweep_report.read_json(tmp_path / "sweep.json")
  assert back.keys() == table.keys() and back[0.3]["fedmitr"] == pytest.approx(table[0.3]["fedmitr"])


def test_sweep_compare_table_figure_and_errors(tmp_path):
  for name, shift in (("a", 0.0), ("b", 0.05)):
    runs = {(al, s): _results({"fedavg": 0.1 + al + shift, "fedmitr": 0.2 + al + s / 100, "sparse_kd": 0.25})
            for al in (0.1, 0.5) for s in (0, 1)}
    sweep_report.write_json(sweep_report.aggregate(runs, ["fedavg", "sparse_kd", "fedmitr"]), tmp_path / f"{name}.json")
  cmd = [sys.executable, "-m", "fedmitr_jax.sweep_compare", f"--sweep=one={tmp_path / 'a.json'}",
         f"--sweep=two={tmp_path / 'b.json'}", "--rows=fedavg,fedmitr", f"--out={tmp_path / 'cmp'}"]
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  text = (tmp_path / "cmp.md").read_text()
  assert "| method | one, α = 0.1 | two, α = 0.1 | one, α = 0.5 | two, α = 0.5 |" in text
  assert "| fedavg | 20.00 ± 0.00 | 25.00 ± 0.00 | 60.00 ± 0.00 | 65.00 ± 0.00 |" in text
  # gain: fedmitr (30.0, 31.0) minus sparse_kd 25 at alpha 0.1, per seed then averaged
  assert f"| {sweep_report.GAIN_ROW} | +5.50 ± 0.71 |" in text
  assert (tmp_path / "cmp.png").stat().st_size > 10000
  bad_row = subprocess.run(cmd[:-2] + ["--rows=fedavg,dense", f"--out={tmp_path / 'x'}"], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
  assert bad_row.returncode == 2 and bad_row.stderr.strip().splitlines()[-1].startswith("error: --rows: dense")
  one = subprocess.run(cmd[:4] + cmd[5:], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert one.returncode == 2 and "two or more" in one.stderr
  assert not (tmp_path / "x.md").exists()


def test_changed_fields_ignores_methods_and_fields_new_to_the_code():
  saved = {"seed": 0, "methods": ["fedavg"], "distill": {"tau": 4.0}}
  same = {"seed": 0, "methods": ["fedavg", "dense"], "distill": {"tau": 4.0, "new_field": 1}}
  assert validate.changed_fields(saved, same) == []
  assert validate.changed_fields(saved, dict(same, distill={"tau": 1.0})) == ["distill.tau"]


@pytest.mark.slow
def test_tiny_sweep_runs_then_reuses(tmp_path):
  cmd = [sys.executable, "-m", "fedmitr_jax.sweep", "--config", str(REPO / "configs/smoke.py"),
         "--workdir", str(tmp_path), "--alphas", "0.5,1", "--seeds", "3",
         "--config.methods=('fedavg','ensemble')"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-2000:]
  table = json.loads((tmp_path / "sweep.json").read_text())
  assert set(table) == {"0.5", "1.0"} and table["0.5"]["fedavg"]["num_seeds"] == 1
  for alpha in ("0.5", "1"):
    results = json.loads((tmp_path / f"alpha{alpha}_seed3" / "results.json").read_text())
    assert results["config"]["seed"] == 3 and results["config"]["partition"]["alpha"] == float(alpha)
  assert (tmp_path / "sweep.png").exists() and "| fedavg |" in (tmp_path / "sweep.md").read_text()
  assert not (tmp_path / "sweep_paired.md").exists()  # fedavg and ensemble make no paired comparison
  second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-2000:]
  assert second.stdout.count("reused from") == 2 and "[clients]" not in second.stdout
  bad = subprocess.run(cmd[:-1] + ["--alphas", "0.5,x"], cwd=REPO, env=env, capture_output=True, text=True)
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --alphas")
