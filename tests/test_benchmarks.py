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
