"""The teacher ensemble over client parameters stacked on axis 0, and how client outputs combine.

Two ways to run the K teachers inside one jitted function, same maths: 'loop' unrolls the K
forward passes (faster on a 2-core CPU: benchmarks/README.md), 'vmap' maps one forward over the stacked axis
(one bigger batched matmul per layer, which may win on GPU/TPU). `teachers_mode` picks.

Every place the server combines its clients (inversion targets and loss, attention at the stops,
the bank's per-token labels, KD targets, the generator baselines, the "ensemble" evaluation, the
FedAvg parameter average) calls `combine` with the run's `Rule`:
  mean          the weighted mean (the formulas from before rules existed, kept bit for bit)
  agreement     the weighted mean, with weights scaled by each client's agreement with the others
                on the synthetic data itself: each synthetic batch during synthesis
                (`weights_on_inputs`), the whole bank for its KD targets (`bank_weights`); the
                FedAvg average and the test-set evaluation, which precede synthesis, use the
                agreement on screening's random probe images (`agreement_weights`)
  median        coordinate-wise median over clients (Yin et al., ICML 2018)
  trimmed_mean  coordinate-wise mean after dropping the floor(trim_fraction * K) largest and
                smallest values (Yin et al.)
Median and trimmed mean ignore the weights (a client dropped by screening is removed from the
stack instead); on probabilities they are renormalised over classes.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from fedmitr_jax import config_base

RULES = config_base.CHOICES["eval.ensemble_rule"]
# What the combined values are; it picks the mean's formula and whether a robust result is
# renormalised over classes (the last axis).
SPACES = ("prob", "log_prob", "logit", "score", "param")


@dataclasses.dataclass(frozen=True)
class Rule:
  """How client outputs combine (hashable, so it can be closed over by jitted functions)."""
  name: str = "mean"
  trim_fraction: float = 0.0

  def __post_init__(self):
    if self.name not in RULES:
      raise ValueError(f"eval.ensemble_rule: '{self.name}' is unknown; use one of {list(RULES)}")
    if not 0.0 <= self.trim_fraction < 0.5:
      raise ValueError(f"eval.trim_fraction: {self.trim_fraction} is outside [0, 0.5); "
                       "it is the fraction dropped from each end")

  @property
  def weighted(self) -> bool:
    """True when the combination is a weighted mean (the weights matter)."""
    return self.name in ("mean", "agreement")

  def trimmed(self, num_clients: int) -> int:
    """Clients dropped from each end by trimmed_mean."""
    return int(math.floor(self.trim_fraction * num_clients))


MEAN = Rule()


def rule_from_config(eval_cfg) -> Rule:
  return Rule(eval_cfg.ensemble_rule, float(eval_cfg.trim_fraction))


def _xp(values):
  return np if isinstance(values, np.ndarray) else jnp


def _expand(weights, ndim: int, axis: int):
  """[K] weights shaped to broadcast against values whose client axis is `axis`."""
  shape = [1] * ndim
  shape[axis] = weights.shape[0]
  return weights.reshape(shape)


def combine(values, rule: Rule = MEAN, *, space: str, weights=None, axis: int = 0):
  """Combines per-client `values` along the client `axis` by `rule`.

  space:
    'prob'      probabilities (last axis classes); mean: sum_k w_k v_k, or the plain mean when
                `weights` is None; a robust result is renormalised to sum to 1.
    'log_prob'  log-probabilities; mean: log sum_k w_k exp(v_k) (logsumexp, stable); a robust
                result is the log of the renormalised robust combination of exp(v).
    'logit'     logits; mean: tensordot(w / sum w, v) (DENSE's and Co-Boosting's ensemble).
    'score'     non-negative scores (attention); mean: sum_k w_k v_k; no renormalisation.
    'param'     one parameter leaf; mean: tensordot(w, v) (FedAvg, weights already normalised).
  numpy inputs give numpy results ('prob', 'score', 'param'), so host-side evaluation uses the
  same code. 'logit' and 'param' combine over axis 0.
  """
  if space not in SPACES:
    raise ValueError(f"space: '{space}' is unknown; use one of {list(SPACES)}")
  xp = _xp(values)
  if rule.weighted:
    if space == "log_prob":
      return jax.nn.logsumexp(values + jnp.log(_expand(weights, values.ndim, axis)), axis=axis)
    if space == "logit":
      return jnp.tensordot(weights / jnp.sum(weights), values, axes=1)
    if space == "param":
      return xp.tensordot(weights, values, axes=1)
    if weights is None:
      return xp.mean(values, axis=axis)
    return xp.sum(_expand(weights, values.ndim, axis) * values, axis=axis)
  if space == "log_prob":
    probs = combine(jnp.exp(values), rule, space="prob", axis=axis)
    return jnp.log(jnp.maximum(probs, jnp.finfo(probs.dtype).tiny))
  if rule.name == "median":
    out = xp.median(values, axis=axis)
  else:  # trimmed_mean
    num, cut = values.shape[axis], rule.trimmed(values.shape[axis])
    if 2 * cut >= num:
      raise ValueError(f"eval.trim_fraction: {rule.trim_fraction} trims all {num} clients; lower it")
    kept = xp.take(xp.sort(values, axis=axis), np.arange(cut, num - cut), axis=axis)
    out = xp.mean(kept, axis=axis)
  if space == "prob":
    out = out / xp.sum(out, axis=-1, keepdims=True)
  return out


def _agreement(probs, w, xp):
  """a_k = mean_b sum_c p_k(c | x_b) p_-k(c | x_b) for probs [K, B, C] and weights w [K] summing
  to 1: the probability that client k's prediction and the others' (sampled from their weighted
  mean, the leave-one-out ensemble) agree."""
  total = xp.tensordot(w, probs, axes=1)                                  # [B, C]
  others = (total[None] - w[:, None, None] * probs) / xp.maximum(1.0 - w, 1e-12)[:, None, None]
  return xp.mean(xp.sum(probs * others, axis=-1), axis=-1)                # [K]


def agreement_scores(probs, weights) -> np.ndarray:
  """Each client's agreement with the leave-one-out ensemble of the others on the inputs of
  probs [K, B, C] (numpy, float64), weights [K]."""
  w = np.asarray(weights, np.float64)
  return _agreement(np.asarray(probs, np.float64), w / w.sum(), np)


def agreement_weights(probs, weights) -> np.ndarray:
  """The `agreement` rule's weights: w_k a_k, renormalised (the base weights if all a_k are 0)."""
  scaled = np.asarray(weights, np.float64) * agreement_scores(probs, weights)
  if scaled.sum() <= 0:
    scaled = np.asarray(weights, np.float64)
  return scaled / scaled.sum()


def weights_on_inputs(rule: Rule, weights, logits):
  """The weights that combine the teachers' outputs on one batch, given their logits [K, B, C]
  on it. Under `agreement`, w_k a_k renormalised with a_k measured on this batch itself (a
  synthetic batch: the rule needs no real data); any other rule: `weights` unchanged (None
  stays None). The scores carry no gradient (the pixels must not learn to make clients agree);
  the base weights do, so Co-Boosting can still learn them."""
  if rule.name != "agreement":
    return weights
  num = logits.shape[0]
  base = jnp.full((num,), 1.0 / num, logits.dtype) if weights is None else weights
  base_sum = jnp.sum(base)
  scores = jax.lax.stop_gradient(
      _agreement(jax.nn.softmax(logits, -1), jax.lax.stop_gradient(base) / base_sum, jnp))
  scaled = base * scores
  return jnp.where(jnp.sum(scaled) > 0, scaled / jnp.sum(scaled), base / base_sum)


def bank_weights(rule: Rule, weights, teacher_logits):
  """A synthetic bank's teacher weights for its KD targets, from its per-teacher logits
  [N, K, C]: under `agreement`, agreement_weights measured over every image of the bank (fixed
  for all of distillation); under `mean`, None (the plain mean over the bank's teachers, as
  before the rules existed); median and trimmed mean ignore weights (None)."""
  if rule.name != "agreement":
    return None
  probs = jax.nn.softmax(jnp.swapaxes(jnp.asarray(teacher_logits, jnp.float32), 0, 1), -1)
  return agreement_weights(np.asarray(probs), weights)


@jax.custom_vjp
def finite_input_grad(images):
  """Identity whose backward pass zeroes non-finite gradient entries. Each teacher sees the
  images through it, so a poisoned teacher whose backward pass overflows (a x100 upload's
  Jacobian reaches inf; inf x 0 = NaN even where a robust rule gave it zero weight) cannot turn
  the pixels' gradient into NaN."""
  return images


def _finite_fwd(images):
  return images, None


def _finite_bwd(_, g):
  return (jnp.where(jnp.isfinite(g), g, 0.0),)


finite_input_grad.defvjp(_finite_fwd, _finite_bwd)


def per_teacher(model, client_params, images, keep_idx, need_attention, mode, guard_grads=False):
  """Runs every teacher; returns (logits [K,B,C], out with leading K axis). `guard_grads`: each
  teacher's gradient to the images is made finite on its own (finite_input_grad), as robust
  rules need; off for `mean`, whose computation stays exactly as it was."""
  feed = finite_input_grad if guard_grads else (lambda x: x)
  apply = lambda p: model.apply({"params": p}, feed(images), keep_idx=keep_idx,
                                return_attention=need_attention)
  if mode == "vmap":
    return jax.vmap(apply)(client_params)
  if mode == "loop":
    num = jax.tree.leaves(client_params)[0].shape[0]
    results = [apply(jax.tree.map(lambda x: x[k], client_params)) for k in range(num)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *results)
  raise ValueError(f"inversion.teachers_mode: '{mode}' is unknown; use 'loop' or 'vmap'")


def ensemble_outputs(model, client_params, weights, images, *, keep_idx=None, mode="loop",
                     need_attention=False, need_tokens=False, temperature=1.0, rule: Rule = MEAN,
                     target_space="prob"):
  """Returns a dict with
    log_probs     [B, C]     log of the combined client softmaxes (for CE to targets); with
                             target_space 'logit', log_softmax of the combined client logits
    probs         [B, C]     the ensemble's soft label at `temperature`
    cls_attention [B, n]     CLS->patch attention of the last block, mean over heads, combined
                             over teachers
    token_probs   [B, n, C]  softmax(head(token_i) / temperature) combined over teachers
  """
  logits, out = per_teacher(model, client_params, images, keep_idx, need_attention, mode,
                            guard_grads=rule.name != "mean")
  weights = weights_on_inputs(rule, weights, logits)
  if target_space == "logit":
    log_probs = jax.nn.log_softmax(combine(logits, rule, space="logit", weights=weights), -1)
  else:
    log_probs = combine(jax.nn.log_softmax(logits, -1), rule, space="log_prob", weights=weights)
  result = {
      "log_probs": log_probs,
      "probs": combine(jax.nn.softmax(logits / temperature, -1), rule, space="prob", weights=weights),
  }
  if need_attention:
    result["cls_attention"] = combine(out["cls_attention"], rule, space="score", weights=weights)
  if need_tokens:
    token_p = jax.nn.softmax(out["token_logits"] / temperature, -1)
    result["token_probs"] = combine(token_p, rule, space="prob", weights=weights)
  return result
