"""The whole run, stage by stage: partition -> clients -> (inversion -> distillation) -> evaluate.

Between the clients and the server: the configured attack replaces the malicious uploads
(client/attacks.py), and screening scores every upload (server/screening.py), dropping the flagged
ones when `eval.screen_clients`. Everything the server does then combines its clients by
`eval.ensemble_rule` (server/ensemble.py).

Each stage saves its result through `StageStore`; a rerun on the same workdir loads finished
stages instead of redoing them and resumes an unfinished one from its last save.
"""
import time

import jax
import numpy as np
from etils import epath

from fedmitr_jax import checkpoints, diagnostics, evaluate, guards, metrics, plots
from fedmitr_jax.checkpoints import StageStore, write_json_atomic
from fedmitr_jax.client import attacks, training
from fedmitr_jax.data import partition as partition_lib
from fedmitr_jax.models import pretrained, vit
from fedmitr_jax.progress import log
from fedmitr_jax.server import data_free, ensemble, screening


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


def shared_init(config, model):
  """The initial parameters every client starts from (seeded random, or the pretrained file)."""
  init = vit.init_params(model, jax.random.fold_in(jax.random.key(config.seed), 1), config.dataset.image_size)
  if config.model.pretrained_path:  # every client starts from the same pretrained weights
    init = pretrained.load_pretrained(config.model.pretrained_path, init, variant=config.model.variant,
                                      input_norm=config.model.pretrained_input_norm)
  return init


def run_clients(config, dataset, parts, store: StageStore, *, stage: str = "clients", train_labels=None):
  """Trains (or loads) the K client models; returns their parameters stacked on axis 0.
  `stage` / `train_labels` (default: the dataset's) let the label_flip attack train its clients
  the same way on flipped labels, as a stage of its own."""
  model = client_model(config, dataset)
  cfg = config.clients
  init = shared_init(config, model)
  tx = training.make_optimizer(cfg)
  states = training.stack_copies(training.init_client_state(init, tx), len(parts))
  if store.is_done(stage):
    log(f"[{stage}] loaded from checkpoint")
    return store.load_result(stage, checkpoints.abstract_like(states.params))
  if train_labels is None:
    train_labels = dataset.train_labels

  plan = training.plan_batches(parts, cfg.batch_size, cfg.epochs, config.seed)
  step_fn = training.make_client_train_step(model, tx, cfg, config.dataset.image_size)
  rngs = training.client_rngs(config.seed, len(parts))
  log(f"[{stage}] {len(parts)} clients, {cfg.mode} mode, steps per client {plan.steps.tolist()}")
  started = time.perf_counter()
  guard = guards.FiniteGuard(stage, "clients.lr")
  if cfg.mode not in ("vmap", "loop"):
    raise ValueError(f"clients.mode: '{cfg.mode}' is unknown; use 'vmap' or 'loop'")
  mesh = training.stage_mesh(cfg.mode, len(parts), cfg.batch_size)  # every device of every process
  with store.progress_manager(stage) as manager:
    start, saved = checkpoints.restore_latest(manager, checkpoints.abstract_like(states))
    if saved is not None:
      states = saved
      log(f"[{stage}] resuming at step {start}")

    # Loop mode also saves when each client finishes, so a finished client is never retrained.
    client_ends = set(np.cumsum(plan.steps).tolist()) if cfg.mode == "loop" else set()

    def save_every(t, states_fn):
      if t % cfg.checkpoint_every_steps == 0 or t in client_ends:
        guard.check(manager.latest_step())  # never save a state that came from a NaN
        manager.save(t, args=checkpoints.standard_save(states_fn()))

    train = training.train_clients_vmap if cfg.mode == "vmap" else training.train_clients_loop
    states = train(step_fn, states, dataset.train_images, train_labels, plan, rngs,
                   start_step=start, on_step=save_every, log_every=cfg.log_every_steps, guard=guard,
                   stage=stage, mesh=mesh)
    guard.check(manager.latest_step())
    manager.wait_until_finished()
  seconds = time.perf_counter() - started
  store.save_result(stage, states.params, {"seconds": seconds, "mode": cfg.mode,
                                           "steps": plan.steps.tolist(), "devices": mesh.size})
  log(f"[{stage}] done in {seconds / 60:.1f} min")
  return states.params


def run_attack(config, dataset, parts, client_params, store: StageStore):
  """The uploads the server receives: the honest clients' parameters with the configured attack
  applied (unchanged when attack.num_malicious = 0). Returns (client_params, facts)."""
  a = config.attack
  if not a.num_malicious:  # nothing to replace (and no need to rebuild the shared init)
    return attacks.apply_attack(client_params, None, a, config.seed)
  model = client_model(config, dataset)
  flipped = None
  if a.kind == "label_flip":
    chosen = attacks.malicious_indices(len(parts), a.num_malicious)
    flipped = run_clients(config, dataset, [parts[k] for k in chosen], store, stage="clients_label_flip",
                          train_labels=attacks.flipped_labels(dataset.train_labels, dataset.num_classes))
  fresh_init = lambda rng: vit.init_params(model, rng, config.dataset.image_size)
  uploads, facts = attacks.apply_attack(client_params, shared_init(config, model), a, config.seed,
                                        fresh_init=fresh_init, flipped_params=flipped)
  log(f"[attack] {a.kind} uploads from clients {facts['indices']}")
  return uploads, facts


def run_screening(config, model, client_params, sizes):
  """Scores every upload (server/screening.py). Returns (facts, the clients the server keeps,
  the probe predictions [K, B, C] for the agreement rule)."""
  e = config.eval
  probe = screening.probe_images(config.seed, e.screen_probe_images, config.dataset.image_size)
  probs = screening.client_probs(model, client_params, probe, config.inversion.teachers_mode)
  facts = screening.screen(client_params, probs, evaluate.client_weights(sizes, e.ensemble_weighting),
                           z_threshold=e.screen_z)
  facts["probe_images"] = e.screen_probe_images
  facts["dropped"] = facts["flagged"] if e.screen_clients else []
  members = [k for k in range(len(sizes)) if k not in facts["dropped"]]
  kept = ", dropped from the server" if facts["dropped"] else " (kept: eval.screen_clients=False)"
  log(f"[screening] flagged {facts['flagged']}{kept if facts['flagged'] else ''}, "
      f"param z {np.round(facts['param_z'], 1).tolist()}, "
      f"agreement z {np.round(facts['agreement_z'], 1).tolist()}")
  return facts, members, probs


def run_baseline_eval(config, dataset, sizes, client_params, ensemble_weights, fedavg,
                      rule=ensemble.MEAN, members=None):
  """fedavg, ensemble (of `members`, combined by `rule`) and every client on the test set."""
  model = client_model(config, dataset)
  e = config.eval
  images, labels = dataset.test_images, dataset.test_labels
  started = time.perf_counter()
  teachers = diagnostics.teacher_diagnostics(model, client_params, images, labels, e.batch_size,
                                             ensemble_weights, dataset.num_classes, rule=rule,
                                             members=members,
                                             image_size=config.dataset.image_size)
  ensemble_seconds = time.perf_counter() - started
  started = time.perf_counter()
  fedavg_predictions = evaluate.predicted_labels(model, fedavg, images, e.batch_size,
                                                image_size=config.dataset.image_size)
  # Server-side wall time of each method (client training is shared by all and reported apart).
  methods = {"fedavg": {"test_acc": evaluate.accuracy_of(fedavg_predictions, labels),
                        "server_seconds": time.perf_counter() - started,
                        "per_class": diagnostics.per_class_accuracy(fedavg_predictions, labels,
                                                                    dataset.num_classes)},
             "ensemble": {"test_acc": teachers["ensemble"]["test_acc"], "server_seconds": ensemble_seconds,
                          "per_class": teachers["ensemble"]["per_class"]}}
  client_rows = [{"test_acc": t["test_acc"], "num_examples": n} for t, n in zip(teachers["clients"], sizes)]
  return methods, client_rows, teachers


def run(config, dataset, workdir) -> dict:
  """Every stage, with each progress report of the run appended to <workdir>/metrics.jsonl;
  <workdir>/curves.png is drawn from it when the run ends."""
  with metrics.recording(workdir, tensorboard=config.log.tensorboard):
    return run_stages(config, dataset, workdir)


def run_stages(config, dataset, workdir) -> dict:
  workdir = epath.Path(workdir)  # a local folder or a bucket path (gs://...)
  store = StageStore(workdir)
  parts = run_partition(config, dataset, store, workdir)
  client_params = run_clients(config, dataset, parts, store)
  client_params, attack_facts = run_attack(config, dataset, parts, client_params, store)
  sizes = [len(p) for p in parts]
  rule = ensemble.rule_from_config(config.eval)
  screening_facts, members, probe_probs = run_screening(config, client_model(config, dataset),
                                                        client_params, sizes)
  server_params = client_params
  if len(members) < len(sizes):  # screening dropped uploads: the server never sees them again
    server_params = jax.tree.map(lambda x: x[np.asarray(members)], client_params)
  member_sizes = [sizes[k] for k in members]
  weights = evaluate.client_weights(member_sizes, config.eval.ensemble_weighting)
  fedavg_weights = evaluate.client_weights(member_sizes, config.eval.fedavg_weighting)
  eval_weights = weights
  if rule.name == "agreement":
    # FedAvg and the test-set ensemble come before any synthetic image exists: agreement on the
    # random probes. Synthesis gets the base weights and measures agreement on its own images.
    eval_weights = ensemble.agreement_weights(probe_probs[members], weights)
    fedavg_weights = ensemble.agreement_weights(probe_probs[members], fedavg_weights)
  fedavg = evaluate.fedavg_params(server_params, fedavg_weights, rule)
  methods, client_rows, teachers = run_baseline_eval(config, dataset, sizes, client_params, eval_weights,
                                                     fedavg, rule, members)
  student_results, bank_facts, banks = data_free.run_data_free(config, dataset, server_params, weights,
                                                               fedavg, store, rule)
  methods.update(student_results)
  methods = {name: methods[name] for name in config.methods if name in methods}
  per_class = {name: entry.pop("per_class") for name, entry in methods.items()}  # -> diagnostics
  results = {"methods": methods, "clients": client_rows, "inversion": bank_facts,
             "client_training": store.load_facts("clients"),
             "diagnostics": {**diagnostics.summary(teachers, per_class, dataset.class_names),
                             # the targets each bank stores, on its own synthetic images
                             "banks": {kind: diagnostics.bank_targets(bank, rule, weights)
                                       for kind, (bank, _) in banks.items()}},
             # Every test pass (clients, ensemble, FedAvg, students) splits its batches over the
             # data mesh of all devices (evaluate.py, diagnostics.py).
             "evaluation": {"devices": jax.device_count(), "batch_size": config.eval.batch_size},
             "attack": attack_facts, "screening": screening_facts,
             "ensemble_rule": {"rule": rule.name, "trim_fraction": rule.trim_fraction,
                               "members": members, "weights": np.asarray(eval_weights).tolist()},
             "config": config.to_dict()}
  if jax.process_index() == 0:  # one writer on multi-host runs
    for kind, (bank, _) in banks.items():
      plots.save_bank_grid(bank, dataset.class_names, config.model.variant, workdir / f"synthetic_{kind}.png")
    diagnostics.save_per_class_heatmap(diagnostics.per_class_table(results["diagnostics"]),
                                       dataset.class_names, workdir / "per_class.png")
    write_json_atomic(workdir / "results.json", results)
    evaluate.write_results_markdown(results, workdir / "results.md")
  for name, entry in methods.items():
    log(f"[evaluate] {name:>14s}: {100 * entry['test_acc']:.2f}%")
  log("[evaluate] clients: " + " ".join(f"{100 * c['test_acc']:.1f}%" for c in client_rows))
  diag = results["diagnostics"]
  log(f"[evaluate] token entropy (uniform {diag['uniform_entropy']:.3f} nats) / token acc: "
      + " ".join(f"{row['token_entropy']:.3f}/{100 * row['token_acc']:.1f}%" for row in diag["clients"])
      + f"; ensemble {diag['ensemble']['token_entropy']:.3f}/{100 * diag['ensemble']['token_acc']:.1f}%")
  for kind, row in diag["banks"].items():
    dropped = ("" if row["token_acc_dropped"] is None else
               f", dropped {row['token_entropy_dropped']:.3f}/{100 * row['token_acc_dropped']:.1f}%")
    log(f"[evaluate] {kind} bank targets: image {row['image_entropy']:.3f}/{100 * row['image_acc']:.1f}%, "
        f"kept tokens {row['token_entropy_kept']:.3f}/{100 * row['token_acc_kept']:.1f}%{dropped}")
  return results
