"""The data-free server: the ensemble, synthesis, the synthetic bank, distillation, baselines."""
