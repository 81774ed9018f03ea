"""fedmitr_jax: one-shot federated learning with ViTs by sparse model inversion and token relabel."""
