"""fedmitr_jax: one-shot federated learning with ViTs (FedMITR) in JAX/Flax.

Importing the package changes nothing in the process (no environment variables, no JAX backend);
the commands set what a run needs before the first device is used (fedmitr_jax/entry.py).
"""
