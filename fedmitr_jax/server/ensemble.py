"""The teacher ensemble E(x) = sum_k w_k softmax(f_k(x)) over client parameters stacked on axis 0.

Two ways to run the K teachers inside one jitted function, same maths: 'loop' unrolls the K
forward passes (faster on a 2-core CPU: benchmarks/README.md), 'vmap' maps one forward over the stacked axis
(one bigger batched matmul per layer, which may win on GPU/TPU). `teachers_mode` picks.
"""
import jax
import jax.numpy as jnp


def per_teacher(model, client_params, images, keep_idx, need_attention, mode):
  """Runs every teacher; returns (logits [K,B,C], out with leading K axis)."""
  apply = lambda p: model.apply({"params": p}, images, keep_idx=keep_idx, return_attention=need_attention)
  if mode == "vmap":
    return jax.vmap(apply)(client_params)
  if mode == "loop":
    num = jax.tree.leaves(client_params)[0].shape[0]
    results = [apply(jax.tree.map(lambda x: x[k], client_params)) for k in range(num)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *results)
  raise ValueError(f"inversion.teachers_mode: '{mode}' is unknown; use 'loop' or 'vmap'")


def ensemble_outputs(model, client_params, weights, images, *, keep_idx=None, mode="loop",
                     need_attention=False, need_tokens=False, temperature=1.0):
  """Returns a dict with
    log_probs     [B, C]     log of the weighted mean of client softmaxes (for CE to targets)
    probs         [B, C]     the ensemble's soft label at `temperature`
    cls_attention [B, n]     CLS->patch attention of the last block, mean over heads and teachers
    token_probs   [B, n, C]  mean over teachers of softmax(head(token_i) / temperature)
  """
  logits, out = per_teacher(model, client_params, images, keep_idx, need_attention, mode)
  w = weights[:, None, None]
  result = {
      # log(sum_k w_k p_k) computed stably: logsumexp over teachers of log w_k + log p_k.
      "log_probs": jax.nn.logsumexp(jax.nn.log_softmax(logits, -1) + jnp.log(w), axis=0),
      "probs": jnp.sum(w * jax.nn.softmax(logits / temperature, -1), axis=0),
  }
  if need_attention:
    result["cls_attention"] = jnp.sum(weights[:, None, None] * out["cls_attention"], axis=0)
  if need_tokens:
    token_p = jax.nn.softmax(out["token_logits"] / temperature, -1)
    result["token_probs"] = jnp.sum(weights[:, None, None, None] * token_p, axis=0)
  return result
