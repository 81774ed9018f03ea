"""The benchmark's model variants compute the function they are compared against (no timing here)."""
import importlib.util
import pathlib
import sys

import pytest

pytestmark = pytest.mark.slow  # each variant compiles full training steps (~20-40 CPU-s)
_BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def step_variants():
  sys.path.insert(0, str(_BENCH))
  try:
    spec = importlib.util.spec_from_file_location("step_variants", _BENCH / "step_variants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
  finally:
    sys.path.remove(str(_BENCH))


@pytest.fixture(scope="module")
def shipped_loss(step_variants):
  return step_variants.first_loss("test/4")


@pytest.mark.parametrize("name", ["dpa", "colsum_2d"])
def test_variant_computes_the_shipped_loss(step_variants, shipped_loss, name):
  from fedmitr_jax.models import vit
  try:
    step_variants.use_model_variant(name)
    assert vit.SelfAttention is not step_variants.ORIGINAL_ATTENTION or vit.nn is not step_variants.nn
    variant = step_variants.first_loss("test/4")
  finally:
    step_variants.use_model_variant("current")
  assert variant == pytest.approx(shipped_loss, rel=1e-4)
  assert vit.SelfAttention is step_variants.ORIGINAL_ATTENTION and vit.nn is step_variants.nn


@pytest.mark.slow  # 15 compilations (2 rules and the control x 5 token counts)
def test_ensemble_rules_reports_each_rule_and_screening():
  """benchmarks/ensemble_rules.py at tiny shapes: the mean, a robust rule and the control (the mean
  compiled again) at every token count, their ratios to the mean and the screening time."""
  import json
  import subprocess
  out = subprocess.run([sys.executable, str(_BENCH / "ensemble_rules.py"), "--clients", "3", "--repeats", "1",
                        "--variant", "test/4", "--batch", "4", "--rules", "median"], capture_output=True, text=True,
                       check=True).stdout
  lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  steps = {line["rule"]: line["step_ms"] for line in lines if "rule" in line}
  assert sorted(steps) == ["mean", "mean_again", "median"]
  assert all(len(ms) == 5 and min(ms.values()) > 0 for ms in steps.values())  # 64 tokens, 4 stops
  figures = {line["figure"]: line for line in lines if "figure" in line}
  assert "median_over_mean_inversion_K3" in figures and figures["median_over_mean_inversion_K3"]["value"] > 0
  assert figures["mean_again_over_mean_inversion_K3"]["value"] > 0
  assert figures["screening_seconds_K3"]["value"] > 0 and figures["screening_seconds_K3"]["share_of_sparse_bank"] > 0


def test_inversion_step_paper_reports_every_token_count():
  """benchmarks/inversion_step_paper.py at tiny shapes: one time per count of SMI's schedule, and the ratio."""
  import json
  import subprocess
  from fedmitr_jax.server import inversion
  out = subprocess.run([sys.executable, str(_BENCH / "inversion_step_paper.py"), "--variant", "test/4", "--image",
                        "16", "--batch", "4", "--teachers", "2", "--dtype", "float32", "--repeats", "1",
                        "--matmul", "64"], capture_output=True, text=True, check=True).stdout
  lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  counts = inversion.keep_counts(16, 4, 0.3)
  timed = {line["tokens"]: line["step_s"] for line in lines if "tokens" in line}
  assert sorted(timed) == sorted(counts) and all(s > 0 for s in timed.values())
  assert lines[-1]["counts"] == counts and lines[-1]["smi_weighted_dense_over_sparse"] > 0
  assert any("matmul_bf16_n" in line for line in lines)
