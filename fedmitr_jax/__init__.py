"""fedmitr_jax: one-shot federated learning with ViTs (FedMITR) in JAX/Flax."""
import os

# XLA:CPU: its YNNPACK dot fusions made our ViT steps slower on the CPU we measure on (dense
# inversion step 17-21% slower, width-192 training step ~10% slower, nothing faster; see
# benchmarks/README.md), so they are off unless XLA_FLAGS already says otherwise. Read when the
# backend starts, i.e. on first use of a device, which is after this import. CPU-only flag.
_NO_YNN_FUSIONS = "--xla_cpu_experimental_ynn_fusion_type="
if "xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_NO_YNN_FUSIONS}".strip()
