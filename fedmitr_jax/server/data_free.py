"""The data-free methods (docs/method.md has the table), run side by side on the same teachers.

  method         synthesis   distillation loss
  dense_kd       dense       KL on the CLS head (beta = 0)
  sparse_kd      sparse      KL on the CLS head (beta = 0)
  dense_relabel  dense       full token-relabel loss
  fedmitr        sparse      full token-relabel loss
  dense          generator   DENSE: adversarial generator rounds interleaved with KD
  coboosting     generator   Co-Boosting: hard-sample generator, ensemble re-weighting, ODS KD
Methods that share a synthesis share its bank (built once, checkpointed as its own stage); the
generator methods synthesise inside their own stage (generator_kd.py).
"""
import jax
import jax.numpy as jnp

from fedmitr_jax import checkpoints, diagnostics, evaluate, sharding
from fedmitr_jax.models import vit
from fedmitr_jax.progress import log
from fedmitr_jax.server import distill, ensemble, generator_kd, inversion, synthetic_bank

DATA_FREE = {  # name -> (bank, uses token relabel)
    "dense_kd": ("dense", False),
    "sparse_kd": ("sparse", False),
    "dense_relabel": ("dense", True),
    "fedmitr": ("sparse", True),
}


def student_init(config, student, fedavg_params):
  if config.distill.init == "clients_fedavg":  # start from FedAvg, as DENSE does
    params = dict(fedavg_params, token_head=fedavg_params["head"])
  else:
    params = vit.init_params(student, jax.random.fold_in(jax.random.key(config.seed), 5),
                             config.dataset.image_size)
  # Fresh buffers: the distillation step donates its state, and FedAvg's are used again later.
  return jax.tree.map(jnp.copy, params)


def load_or_train(store, stage: str, init, train, max_to_keep: int = 2):
  """A student stage: loaded when finished; else `train(init, manager)` (which resumes from the
  manager's rolling saves) runs and its (params, facts) are saved as the stage's result."""
  if store.is_done(stage):
    log(f"[{stage}] loaded from checkpoint")
    return store.load_result(stage, checkpoints.abstract_like(init)), store.load_facts(stage)
  with store.progress_manager(stage, max_to_keep=max_to_keep) as manager:
    params, facts = train(init, manager)
  store.save_result(stage, params, facts)
  return params, facts


def run_data_free(config, dataset, client_params, weights, fedavg_params, store, rule=ensemble.MEAN):
  """Returns {method: {test_acc, test_acc_cls_token, seconds, ..., per_class}} for the data-free
  methods (per_class: test accuracy on each class, moved to results' diagnostics by the pipeline).
  `rule` combines the teachers everywhere (inversion, bank labels, KD targets, generators)."""
  wanted = [m for m in config.methods if m in DATA_FREE]
  image_size, num_classes = config.dataset.image_size, dataset.num_classes
  dtype = vit.compute_dtype(config.model.dtype)
  teacher = vit.build_vit(config.model.variant, num_classes, image_size=image_size, dtype=dtype)
  student = vit.build_vit(config.model.variant, num_classes, image_size=image_size,
                          separate_token_head=True, dtype=dtype)
  inverter = inversion.Inverter(teacher, config.inversion, image_size, rule)
  banks = {}
  for kind in sorted({DATA_FREE[m][0] for m in wanted}):
    banks[kind] = synthetic_bank.build_bank(
        f"inversion_{kind}", inverter, client_params, weights, num_classes=num_classes,
        seed=config.seed, sparse=kind == "sparse", store=store)
  # KD targets: the plain mean over the bank's teachers under `mean` (as before the rules existed);
  # under `agreement`, the weights measured on the bank's own images; median / trimmed mean
  # ignore weights.
  kd_weights = {kind: ensemble.bank_weights(rule, weights, bank["teacher_logits"])
                for kind, (bank, _) in banks.items()}
  results = {}
  test_images, test_labels = dataset.test_images, dataset.test_labels
  for method in [m for m in config.methods if m in generator_kd.METHODS]:
    stage = f"distill_{method}"
    params, facts = load_or_train(store, stage, student_init(config, student, fedavg_params), lambda init, m: (
        generator_kd.train(method, config, teacher, student, client_params,
                           jnp.asarray(weights, jnp.float32), init, stage=stage, manager=m, rule=rule)),
        max_to_keep=None)  # every round's save holds that round's pool rows (generator_kd.train)
    predictions = evaluate.predicted_labels(student, params, test_images, config.eval.batch_size,
                                            image_size=image_size)
    results[method] = {"test_acc": evaluate.accuracy_of(predictions, test_labels),
                       "server_seconds": facts["seconds"], "rounds": facts["rounds"],
                       "kd_steps": facts["kd_steps"],
                       "per_class": diagnostics.per_class_accuracy(predictions, test_labels, num_classes)}
  for method in wanted:
    kind, relabel = DATA_FREE[method]
    bank, bank_facts = banks[kind]
    cfg = config.distill.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.beta = config.distill.beta if relabel else 0.0
    stage = f"distill_{method}"
    params, facts = load_or_train(store, stage, student_init(config, student, fedavg_params), lambda init, m: (
        distill.train_student(student, cfg, bank, init, seed=config.seed, stage=stage, manager=m,
                              rule=rule, teacher_weights=kd_weights[kind])))
    params = sharding.to_local(params)  # replicated over every process -> this process's copy
    e = config.eval
    predictions = evaluate.predicted_labels(student, params, test_images, e.batch_size, image_size=image_size)
    acc_tok = evaluate.accuracy(student, params, test_images, test_labels, e.batch_size,
                                token_weight=config.distill.eval_token_weight, image_size=image_size)
    results[method] = {"test_acc": evaluate.accuracy_of(predictions, test_labels),
                       "test_acc_cls_token": acc_tok,
                       "inversion_seconds": bank_facts["seconds"], "distill_seconds": facts["seconds"],
                       "server_seconds": bank_facts["seconds"] + facts["seconds"],
                       "bank_images": bank_facts["images"],
                       "kept_fraction": bank_facts["mean_kept_fraction"],
                       "per_class": diagnostics.per_class_accuracy(predictions, test_labels, num_classes)}
  return results, {kind: facts for kind, (_, facts) in banks.items()}, banks

