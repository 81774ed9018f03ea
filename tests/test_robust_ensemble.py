"""The combination rules (server/ensemble.py) and upload screening (server/screening.py)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmitr_jax import evaluate
from fedmitr_jax.server import distill, ensemble, screening

MEDIAN, TRIMMED = ensemble.Rule("median"), ensemble.Rule("trimmed_mean", 0.2)


def _probs(shape, seed=0):
  return jax.nn.softmax(3.0 * jax.random.normal(jax.random.key(seed), shape), -1)


# ---- mean: the original formulas, bit for bit--------------------------------------------------
def test_mean_rule_is_bit_identical_to_the_formulas_it_replaced():
  """Each old formula and its `combine` call, both compiled as they are in the pipeline."""
  logits = 2.0 * jax.random.normal(jax.random.key(0), (5, 7, 10))
  w = jnp.asarray([0.1, 0.3, 0.2, 0.25, 0.15], jnp.float32)
  probs, tokens = jax.nn.softmax(logits, -1), _probs((5, 3, 4, 10))  # tokens [K, B, N, C]
  bank = jnp.swapaxes(logits, 0, 1)  # the bank's [B, K, C]

  def same(old, new, *args):
    np.testing.assert_array_equal(jax.jit(new)(*args), jax.jit(old)(*args))

  same(lambda l, w: jax.nn.logsumexp(jax.nn.log_softmax(l, -1) + jnp.log(w[:, None, None]), axis=0),
       lambda l, w: ensemble.combine(jax.nn.log_softmax(l, -1), space="log_prob", weights=w), logits, w)
  same(lambda p, w: jnp.sum(w[:, None, None] * p, axis=0),
       lambda p, w: ensemble.combine(p, space="prob", weights=w), probs, w)
  same(lambda p, w: jnp.sum(w[:, None, None, None] * p, axis=0),
       lambda p, w: ensemble.combine(p, space="prob", weights=w), tokens, w)
  same(lambda b: jnp.mean(jax.nn.softmax(b / 4.0, -1), axis=1),
       lambda b: ensemble.combine(jax.nn.softmax(b / 4.0, -1), space="prob", axis=1), bank)
  same(lambda l, w: jnp.tensordot(w / jnp.sum(w), l, axes=1),
       lambda l, w: ensemble.combine(l, space="logit", weights=w), logits, w)
  same(lambda l, w: jnp.tensordot(w, l, axes=1), lambda l, w: ensemble.combine(l, space="param", weights=w),
       logits, w)
  host = np.asarray(probs)  # evaluate.py's host-side ensemble: numpy in, numpy out, same formula
  np.testing.assert_array_equal(ensemble.combine(host, space="prob", weights=np.asarray(w)),
                                (host * np.asarray(w)[:, None, None]).sum(0))


# ---- the robust rules against hand computations ----------------------------------------------
def test_median_and_trimmed_mean_match_hand_computation():
  # 5 clients, 1 example, 3 classes; client 4 is an outlier that puts everything on class 2.
  p = np.array([[[0.7, 0.2, 0.1]], [[0.6, 0.3, 0.1]], [[0.5, 0.3, 0.2]], [[0.8, 0.1, 0.1]],
                [[0.0, 0.0, 1.0]]], np.float32)
  median = np.array([0.6, 0.2, 0.1]) / 0.9                 # per class: middle of 5, renormalised
  np.testing.assert_allclose(ensemble.combine(jnp.asarray(p), MEDIAN, space="prob")[0], median, rtol=1e-6)
  # trim 0.2 of 5 = 1 from each end: class 0 keeps {0.5, 0.6, 0.7}, class 1 {0.1, 0.2, 0.3}, class 2
  # {0.1, 0.1, 0.2}; means 0.6, 0.2, 0.4 / 3, renormalised.
  trimmed = np.array([0.6, 0.2, 0.4 / 3]) / (0.8 + 0.4 / 3)
  np.testing.assert_allclose(ensemble.combine(jnp.asarray(p), TRIMMED, space="prob")[0], trimmed, rtol=1e-6)
  # numpy in -> numpy out, same numbers (evaluate.py's path)
  np.testing.assert_allclose(ensemble.combine(p, MEDIAN, space="prob")[0], median, rtol=1e-6)
  # the outlier wins class 2 under the mean, not under the robust rules
  assert ensemble.combine(p, space="prob", weights=np.full(5, 0.2, np.float32))[0].argmax() == 0
  # an even K takes the mean of the two middle values; scores / logits are not renormalised
  scores = jnp.asarray([[1.0, 4.0], [2.0, 0.0], [3.0, 1.0], [10.0, 2.0]])
  np.testing.assert_allclose(ensemble.combine(scores, MEDIAN, space="score"), [2.5, 1.5])
  np.testing.assert_allclose(ensemble.combine(scores, ensemble.Rule("trimmed_mean", 0.25), space="logit"),
                             [2.5, 1.5])
  log_p = ensemble.combine(jnp.log(jnp.asarray(p)), MEDIAN, space="log_prob")
  np.testing.assert_allclose(np.exp(log_p[0]), median, rtol=1e-5)


def test_trimmed_mean_with_no_trim_is_the_mean_and_rules_are_checked():
  p = _probs((4, 3, 5))
  np.testing.assert_allclose(ensemble.combine(p, ensemble.Rule("trimmed_mean", 0.1), space="prob"),
                             jnp.mean(p, 0), rtol=1e-6)  # floor(0.1 * 4) = 0 trimmed
  with pytest.raises(ValueError, match="eval.ensemble_rule"):
    ensemble.Rule("mode")
  with pytest.raises(ValueError, match="eval.trim_fraction"):
    ensemble.Rule("trimmed_mean", 0.5)


def test_agreement_weights_match_hand_computation_and_downweight_the_odd_one():
  # 3 clients, 2 probe images, 2 classes, uniform weights.
  p = np.array([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.0, 1.0]]])
  # leave-one-out means: for client 0, mean of clients 1 and 2 = [[0.5, 0.5], [0.25, 0.75]];
  # a_0 = mean(1 * 0.5, 1 * 0.25) = 0.375. a_1 = mean(0.5, 0.5 * 0.5 + 0.5 * 0.5) = 0.5.
  # a_2 = mean(0, 0.25) = 0.125.
  a = ensemble.agreement_scores(p, np.full(3, 1 / 3))
  np.testing.assert_allclose(a, [0.375, 0.5, 0.125])
  # uniform base weights: the weights are the scores renormalised (they already sum to 1)
  np.testing.assert_allclose(ensemble.agreement_weights(p, np.full(3, 1 / 3)), [0.375, 0.5, 0.125])
  assert ensemble.Rule("agreement").weighted and not MEDIAN.weighted


def test_agreement_on_a_synthetic_batch_is_measured_on_that_batch():
  """weights_on_inputs: the agreement weights of the batch's own softmaxes; no gradient through
  the scores (only through the base weights); other rules pass the weights through."""
  logits = jnp.asarray([[[4.0, 0.0], [2.0, 0.0]], [[3.0, 0.0], [0.0, 0.0]], [[0.0, 4.0], [0.0, 3.0]]])
  base = jnp.asarray([0.5, 0.3, 0.2], jnp.float32)
  agree = ensemble.Rule("agreement")
  want = ensemble.agreement_weights(np.asarray(jax.nn.softmax(logits, -1)), np.asarray(base))
  got = ensemble.weights_on_inputs(agree, base, logits)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert got[2] < base[2] and got[0] > base[0]  # the client voting class 1 loses weight
  uniform = ensemble.agreement_weights(np.asarray(jax.nn.softmax(logits, -1)), np.full(3, 1 / 3))
  np.testing.assert_allclose(ensemble.weights_on_inputs(agree, None, logits), uniform, rtol=1e-5)
  assert ensemble.weights_on_inputs(ensemble.MEAN, base, logits) is base
  assert ensemble.weights_on_inputs(MEDIAN, None, logits) is None
  # the pixels get no gradient through the scores; the base weights still do (Co-Boosting)
  weighted_sum = lambda l: jnp.sum(ensemble.weights_on_inputs(agree, base, l) * jnp.arange(3.0))
  grad_logits = jax.grad(weighted_sum)(logits)
  np.testing.assert_array_equal(grad_logits, 0.0)
  grad_base = jax.grad(lambda w: ensemble.weights_on_inputs(agree, w, logits)[2])(base)
  assert np.all(np.isfinite(grad_base)) and np.any(grad_base != 0)
  # ensemble_outputs' combined probs use those weights (a "model" whose logits are its params)
  class Fixed:
    def apply(self, variables, images, keep_idx=None, return_attention=False):
      return variables["params"], {}
  out = ensemble.ensemble_outputs(Fixed(), logits, base, jnp.zeros((2, 1)), rule=agree)
  np.testing.assert_allclose(out["probs"], np.tensordot(want, np.asarray(jax.nn.softmax(logits, -1)), 1),
                             rtol=1e-5)
  # a bank's KD weights: agreement over all its images ([N, K, C]); None under mean
  bank_logits = jnp.swapaxes(logits, 0, 1)
  np.testing.assert_allclose(ensemble.bank_weights(agree, base, bank_logits), want, rtol=1e-5)
  assert ensemble.bank_weights(ensemble.MEAN, base, bank_logits) is None


def test_robust_rules_reach_distillation_targets_and_fedavg():
  # KD targets: the bank's [B, K, C] teacher logits, combined over axis 1.
  teacher_logits = jnp.asarray([[[4.0, 0.0], [3.0, 0.0], [0.0, 40.0]]])  # client 2 is poisoned
  batch = {"teacher_logits": teacher_logits, "labels": jnp.array([0]), "masks": jnp.ones((1, 2), bool),
           "token_probs": jnp.full((1, 2, 2), 0.5)}
  cls = jnp.zeros((1, 2))
  kd = lambda rule: distill.relabel_loss(cls, jnp.zeros((1, 2, 2)), batch, tau=1.0, beta=0.0,
                                         relabel_target="token", rule=rule)[0]
  mean_kd, med_kd = kd(ensemble.MEAN), kd(MEDIAN)
  p_med = np.median(np.asarray(jax.nn.softmax(teacher_logits[0], -1)), 0)
  p_med = p_med / p_med.sum()
  want = float(np.sum(p_med * (np.log(p_med) - np.log(0.5))))
  assert float(med_kd) == pytest.approx(want, rel=1e-5)
  assert float(mean_kd) != pytest.approx(want, rel=1e-3)
  params = {"w": jnp.asarray([[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]])}
  np.testing.assert_allclose(evaluate.fedavg_params(params, np.full(3, 1 / 3), MEDIAN)["w"], [3.0, 2.0])


def test_gradient_guard_keeps_a_zero_weight_overflowing_teacher_from_making_nan():
  # f(x) = 1e30 * x^2 has a gradient that overflows (inf) at x = 1e10; times a zero weight, inf x 0 = NaN.
  x = jnp.asarray([1e10, 1.0], jnp.float32)
  bad = lambda x: jnp.sum(0.0 * (1e30 * x * x))
  assert not np.all(np.isfinite(jax.grad(bad)(x)))
  guarded = jax.grad(lambda x: bad(ensemble.finite_input_grad(x)) + jnp.sum(x))(x)
  np.testing.assert_array_equal(guarded, [1.0, 1.0])  # the finite teacher's gradient survives
  np.testing.assert_array_equal(ensemble.finite_input_grad(x), x)


# ---- screening -----------------------------------------------------------------------------
def _clients(num=5, seed=0):
  """Stacked fake uploads: a shared init plus small per-client updates."""
  init = {"a": jax.random.normal(jax.random.key(seed), (50,)),
          "b": jax.random.normal(jax.random.key(1), (4, 6))}
  keys = jax.random.split(jax.random.key(seed + 2), num)
  return init, jax.vmap(lambda k: jax.tree.map(lambda p: p + 0.1 * jax.random.normal(k, p.shape), init))(keys)


def test_robust_z_and_median_distances():
  np.testing.assert_allclose(screening.robust_z([1.0, 1.0, 1.0, 1.0]), 0.0)
  z = screening.robust_z([1.0, 2.0, 3.0, 4.0, 100.0])  # median 3, MAD 1
  np.testing.assert_allclose(z, (np.array([1, 2, 3, 4, 100.0]) - 3) / 1.4826)
  params = {"w": jnp.asarray([[0.0], [1.0], [3.0]])}
  # distances: 0-1: 1, 0-2: 3, 1-2: 2 -> medians of each row without itself: 2, 1.5, 2.5
  np.testing.assert_allclose(screening.median_distances(params), [2.0, 1.5, 2.5])


def test_screening_flags_a_scaled_upload_and_not_honest_ones():
  _, stacked = _clients()
  probs = np.tile(np.array([0.5, 0.3, 0.2]), (5, 8, 1))
  clean = screening.screen(stacked, probs, np.full(5, 0.2), z_threshold=3.5)
  assert clean["flagged"] == []
  scaled = jax.tree.map(lambda x: x.at[3].multiply(100.0), stacked)
  facts = screening.screen(scaled, probs, np.full(5, 0.2), z_threshold=3.5)
  assert facts["flagged"] == [3]
  assert facts["param_z"][3] > 3.5 and max(np.delete(facts["param_z"], 3)) < 3.5
  json.dumps(facts)  # goes into results.json as it is


def test_screening_flags_a_disagreeing_client_and_never_a_majority():
  _, stacked = _clients()
  probs = np.tile(np.array([0.8, 0.1, 0.1]), (5, 8, 1))
  probs[1] = np.array([0.01, 0.01, 0.98])  # answers differently from everyone on every probe
  facts = screening.screen(stacked, probs, np.full(5, 0.2), z_threshold=3.5)
  assert facts["flagged"] == [1] and facts["agreement_z"][1] > 3.5
  # Everyone looks extreme relative to a tight honest pair: at most (K - 1) // 2 are flagged.
  far = {"w": jnp.asarray([[0.0], [0.001], [10.0], [200.0], [5000.0]])}
  assert len(screening.screen(far, probs, np.full(5, 0.2), z_threshold=0.5)["flagged"]) <= 2


def test_probe_images_are_seeded_and_in_range():
  a, b = screening.probe_images(0, 6, 16), screening.probe_images(0, 6, 16)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (6, 16, 16, 3) and float(a.min()) >= -1.0 and float(a.max()) <= 1.0
  assert not np.array_equal(a, screening.probe_images(1, 6, 16))


# ---- the entry point -----------------------------------------------------------------------
@pytest.mark.slow
def test_smoke_run_with_a_scaled_upload_screens_it_and_uses_the_median(tmp_path):
  import os
  import pathlib
  import subprocess
  import sys
  repo = pathlib.Path(__file__).resolve().parents[1]
  cmd = [sys.executable, "-m", "fedmitr_jax.main", "--config", str(repo / "configs/smoke.py"),
         "--workdir", str(tmp_path), "--config.attack.num_malicious=1", "--config.attack.kind=scaled",
         "--config.eval.ensemble_rule=median",
         "--config.methods=('fedavg','ensemble','fedmitr','coboosting')"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["attack"]["kind"] == "scaled" and results["attack"]["indices"] == [2]
  assert results["attack"]["scale"] == 100.0
  screen = results["screening"]
  assert screen["flagged"] == [2] and screen["param_z"][2] > screen["z_threshold"]
  assert screen["dropped"] == []  # eval.screen_clients is off by default: reported, not dropped
  assert results["ensemble_rule"]["rule"] == "median" and results["ensemble_rule"]["members"] == [0, 1, 2]
  assert set(results["methods"]) == {"fedavg", "ensemble", "fedmitr", "coboosting"}
  for entry in results["methods"].values():
    assert 0.0 <= entry["test_acc"] <= 1.0


@pytest.mark.slow
def test_smoke_run_under_agreement_weights_each_bank_on_its_own_images(tmp_path):
  from conftest import run_main
  done = run_main(tmp_path, "--config.attack.num_malicious=1", "--config.attack.kind=noise",
                  "--config.eval.ensemble_rule=agreement",
                  "--config.methods=('ensemble','sparse_kd','fedmitr','coboosting')")
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["ensemble_rule"]["rule"] == "agreement"
  probe_weights = results["ensemble_rule"]["weights"]  # measured on screening's random probes
  bank_weights = results["diagnostics"]["banks"]["sparse"]["teacher_weights"]  # on the bank
  assert len(bank_weights) == 3 and sum(bank_weights) == pytest.approx(1.0)
  assert min(bank_weights) > 0 and bank_weights != pytest.approx(probe_weights, abs=1e-6)
  for entry in results["methods"].values():
    assert 0.0 <= entry["test_acc"] <= 1.0


# ---- the experiment script's bookkeeping -------------------------------------------------------
def _bench():
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "robustness.py"
  spec = importlib.util.spec_from_file_location("robustness", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_robustness_plan_table_and_screening_scores(tmp_path):
  bench = _bench()
  assert bench.precision_recall([4], [4]) == (1.0, 1.0)
  assert bench.precision_recall([1, 4], [3, 4]) == (0.5, 0.5)
  assert bench.precision_recall([], []) == (1.0, 1.0) and bench.precision_recall([], [4]) == (0.0, 0.0)
  args = type("Args", (), dict(root=str(tmp_path), clients=[5, 10], kinds=list(bench.KINDS),
                               malicious=[0, 1, 2], rules=["mean", "median"]))
  runs = bench.plan(args)
  assert len(runs) == 2 * (2 + 5 * 2 * 2)  # per K: 2 clean runs, 5 kinds x 2 counts x 2 rules
  assert runs[0][1] == "clean_mean"  # trains the honest clients every other run of its K copies
  flags = bench.overrides(10, "scaled", 2, "mean+screen", ["ensemble"])
  assert "--config.eval.screen_clients=True" in flags and "--config.attack.num_malicious=2" in flags
  assert "--config.eval.ensemble_rule=mean" in flags
  setting = tmp_path / "clients5"
  for name, acc, flagged, indices in [("clean_mean", 0.30, [], []), ("scaled_m1_median", 0.25, [4], [4])]:
    (setting / name).mkdir(parents=True)
    (setting / name / "results.json").write_text(json.dumps({
        "methods": {"ensemble": {"test_acc": acc}}, "clients": [{}] * 5,
        "screening": {"flagged": flagged}, "attack": {"indices": indices}}))
  runs = [(setting, "clean_mean", "", 0, "mean"), (setting, "scaled_m1_median", "scaled", 1, "median")]
  text, rows = bench.table(runs, ["ensemble"])
  assert rows[1]["ensemble_drop"] == pytest.approx(5.0) and rows[1]["screen_recall"] == 1.0
  assert "| 5 | scaled | 1 | median | 25.00 (+5.00) | [4] | 1.00 | 1.00 |" in text
  stopped = {"clients": 5, "kind": "scaled", "malicious": 1, "rule": "mean", "failed": "exit 3: ..."}
  bench.save_heatmap(rows + [stopped], ["ensemble"], tmp_path / "robustness.png")
  assert (tmp_path / "robustness.png").read_bytes()[:4] == b"\x89PNG"


def test_a_screened_run_reuses_its_unscreened_twin_only_when_nothing_was_flagged(tmp_path):
  bench = _bench()
  setting = tmp_path / "clients5"
  for name, flagged in [("label_flip_m1_mean", []), ("scaled_m1_mean", [4])]:
    (setting / name).mkdir(parents=True)
    (setting / name / "results.json").write_text(json.dumps({"methods": {"ensemble": {"test_acc": 0.3}},
                                                             "screening": {"flagged": flagged}}))
  assert bench.reuse_unscreened(setting, "label_flip_m1_mean+screen", "label_flip", 1, "mean+screen")
  reused = json.loads((setting / "label_flip_m1_mean+screen" / "results.json").read_text())
  assert reused["reused_from"] == "label_flip_m1_mean" and reused["methods"]["ensemble"]["test_acc"] == 0.3
  assert not bench.reuse_unscreened(setting, "scaled_m1_mean+screen", "scaled", 1, "mean+screen")  # 4 dropped
  assert not bench.reuse_unscreened(setting, "noise_m1_mean+screen", "noise", 1, "mean+screen")  # no twin yet
  assert not (setting / "scaled_m1_mean+screen").exists()
