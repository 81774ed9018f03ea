"""The whole run, stage by stage: partition -> clients -> (inversion -> distillation) -> evaluate.

Each stage saves its result through `StageStore`; a rerun on the same workdir loads finished
stages instead of redoing them and resumes an unfinished one from its last save.
"""
import time

import jax
import numpy as np
from etils import epath

from fedmitr_jax import checkpoints, evaluate, guards, plots
from fedmitr_jax.checkpoints import StageStore, write_json_atomic
from fedmitr_jax.client import training
from fedmitr_jax.data import partition as partition_lib
from fedmitr_jax.models import pretrained, vit
from fedmitr_jax.progress import log
from fedmitr_jax.server import data_free


def run_partition(config, dataset, store: StageStore, workdir: epath.Path):
  if store.is_done("partition"):
    saved = store.load_result("partition", None)
    indices, offsets = np.asarray(saved["indices"]), np.asarray(saved["offsets"])
    log("[partition] loaded from checkpoint")
    return [indices[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
  p = config.partition
  parts = partition_lib.partition_indices(
      dataset.train_labels, p.num_clients, p.method, alpha=p.alpha,
      classes_per_client=p.classes_per_client, seed=config.seed,
      min_client_examples=p.min_client_examples)
  counts = partition_lib.class_counts(dataset.train_labels, parts, dataset.num_classes)
  if jax.process_index() == 0:
    partition_lib.save_partition_report(counts, dataset.class_names, workdir)
  offsets = np.cumsum([0] + [len(x) for x in parts])
  store.save_result("partition", {"indices": np.concatenate(parts), "offsets": offsets},
                    {"client_sizes": [len(x) for x in parts]})
  log(f"[partition] {p.method} over {p.num_clients} clients, sizes {[len(x) for x in parts]}")
  return parts


def client_model(config, dataset):
  return vit.build_vit(config.model.variant, dataset.num_classes, image_size=config.dataset.image_size,
                       dtype=vit.compute_dtype(config.model.dtype))


def run_clients(config, dataset, parts, store: StageStore):
  """Trains (or loads) the K client models; returns their parameters stacked on axis 0."""
  model = client_model(config, dataset)
  cfg = config.clients
  init = vit.init_params(model, jax.random.fold_in(jax.random.key(config.seed), 1), config.dataset.image_size)
  if config.model.pretrained_path:  # every client starts from the same pretrained weights
    init = pretrained.load_pretrained(config.model.pretrained_path, init, variant=config.model.variant,
                                      input_norm=config.model.pretrained_input_norm)
  tx = training.make_optimizer(cfg)
  states = training.stack_copies(training.init_client_state(init, tx), len(parts))
  if store.is_done("clients"):
    log("[clients] loaded from checkpoint")
    return store.load_result("clients", checkpoints.abstract_like(states.params))

  plan = training.plan_batches(parts, cfg.batch_size, cfg.epochs, config.seed)
  step_fn = training.make_client_train_step(model, tx, cfg)
  rngs = training.client_rngs(config.seed, len(parts))
  log(f"[clients] {len(parts)} clients, {cfg.mode} mode, steps per client {plan.steps.tolist()}")
  started = time.perf_counter()
  guard = guards.FiniteGuard("clients", "clients.lr")
  if cfg.mode not in ("vmap", "loop"):
    raise ValueError(f"clients.mode: '{cfg.mode}' is unknown; use 'vmap' or 'loop'")
  with store.progress_manager("clients") as manager:
    start, saved = checkpoints.restore_latest(manager, checkpoints.abstract_like(states))
    if saved is not None:
      states = saved
      log(f"[clients] resuming at step {start}")

    # Loop mode also saves when each client finishes, so a finished client is never retrained.
    client_ends = set(np.cumsum(plan.steps).tolist()) if cfg.mode == "loop" else set()

    def save_every(t, states_fn):
      if t % cfg.checkpoint_every_steps == 0 or t in client_ends:
        guard.check(manager.latest_step())  # never save a state that came from a NaN
        manager.save(t, args=checkpoints.standard_save(states_fn()))

    train = training.train_clients_vmap if cfg.mode == "vmap" else training.train_clients_loop
    states = train(step_fn, states, dataset.train_images, dataset.train_labels, plan, rngs,
                   start_step=start, on_step=save_every, log_every=cfg.log_every_steps, guard=guard)
    guard.check(manager.latest_step())
    manager.wait_until_finished()
  seconds = time.perf_counter() - started
  store.save_result("clients", states.params, {"seconds": seconds, "mode": cfg.mode,
                                               "steps": plan.steps.tolist()})
  log(f"[clients] done in {seconds / 60:.1f} min")
  return states.params


def run_baseline_eval(config, dataset, sizes, client_params, ensemble_weights, fedavg):
  """fedavg, ensemble and every client on the test set."""
  model = client_model(config, dataset)
  e = config.eval
  started = time.perf_counter()
  client_acc, ensemble_acc = evaluate.client_and_ensemble_accuracy(
      model, client_params, dataset.test_images, dataset.test_labels, e.batch_size, ensemble_weights)
  ensemble_seconds = time.perf_counter() - started
  started = time.perf_counter()
  fedavg_acc = evaluate.accuracy(model, fedavg, dataset.test_images, dataset.test_labels, e.batch_size)
  # Server-side wall time of each method (client training is shared by all and reported apart).
  methods = {"fedavg": {"test_acc": fedavg_acc, "server_seconds": time.perf_counter() - started},
             "ensemble": {"test_acc": ensemble_acc, "server_seconds": ensemble_seconds}}
  client_rows = [{"test_acc": a, "num_examples": n} for a, n in zip(client_acc, sizes)]
  return methods, client_rows


def run(config, dataset, workdir) -> dict:
  workdir = epath.Path(workdir)  # a local folder or a bucket path (gs://...)
  store = StageStore(workdir)
  parts = run_partition(config, dataset, store, workdir)
  client_params = run_clients(config, dataset, parts, store)
  sizes = [len(p) for p in parts]
  weights = evaluate.client_weights(sizes, config.eval.ensemble_weighting)
  fedavg = evaluate.fedavg_params(client_params, evaluate.client_weights(sizes, config.eval.fedavg_weighting))
  methods, client_rows = run_baseline_eval(config, dataset, sizes, client_params, weights, fedavg)
  student_results, bank_facts, banks = data_free.run_data_free(config, dataset, client_params, weights,
                                                           fedavg, store)
  methods.update(student_results)
  methods = {name: methods[name] for name in config.methods if name in methods}
  results = {"methods": methods, "clients": client_rows, "inversion": bank_facts,
             "client_training": store.load_facts("clients"),
             "config": config.to_dict()}
  if jax.process_index() == 0:  # one writer on multi-host runs
    for kind, (bank, _) in banks.items():
      plots.save_bank_grid(bank, dataset.class_names, config.model.variant, workdir / f"synthetic_{kind}.png")
    write_json_atomic(workdir / "results.json", results)
    evaluate.write_results_markdown(results, workdir / "results.md")
  for name, entry in methods.items():
    log(f"[evaluate] {name:>14s}: {100 * entry['test_acc']:.2f}%")
  log("[evaluate] clients: " + " ".join(f"{100 * c['test_acc']:.1f}%" for c in client_rows))
  return results
