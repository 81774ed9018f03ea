r"""Runs one experiment over several Dirichlet alphas and seeds, then tables and plots it.

  python -m fedmitr_jax.sweep --config configs/cifar10_cpu_full.py --workdir /tmp/sweep \
      --alphas 0.1,0.3,0.5 --seeds 0,1 [--config.x=y ...]

Each (alpha, seed) is an ordinary run in `<workdir>/alpha<a>_seed<s>` (resumable stage by stage,
exactly as `fedmitr_jax.main`); runs whose `results.json` already holds every method are reused.
Writes `<workdir>/sweep.{md,csv,json}`, `<workdir>/sweep.png` and the per-run paired differences
`<workdir>/sweep_paired.md` (e.g. fedmitr − sparse_kd on the same bank), also after each finished run,
so a partial sweep already has a table. `--report_only` rebuilds them from the finished runs.
The workdir may be a local folder or a `gs://` path; multi-host runs start as fedmitr_jax.main's
(FEDMITR_DISTRIBUTED=1), every process runs every run, and process 0 alone writes the tables and
plot; exit codes are main's (fedmitr_jax/entry.py).
"""
import json

from absl import flags
from etils import epath
from ml_collections import config_flags

from fedmitr_jax import entry

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Parent directory of the runs and the tables.")
_ALPHAS = flags.DEFINE_list("alphas", ["0.1", "0.3", "0.5"], "Dirichlet concentrations.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds (partition, init, synthesis, distillation).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only rebuild the table from finished runs.")
flags.mark_flags_as_required(["config", "workdir"])


def run_dir(workdir, alpha, seed) -> epath.Path:
  return epath.Path(workdir) / f"alpha{alpha:g}_seed{seed}"


def run_config(config, alpha, seed):
  config = config.copy_and_resolve_references()
  config.partition.alpha, config.seed = alpha, seed
  return config


def finished_results(config, directory: epath.Path):
  """The run's results if it finished with this config and every method, else None."""
  from fedmitr_jax import validate
  path = directory / "results.json"
  if not path.exists():
    return None
  results = json.loads(path.read_text())
  current = json.loads(json.dumps(config.to_dict()))
  if validate.changed_fields(results["config"], current) or set(config.methods) - set(results["methods"]):
    return None
  return results


def write_report(config, workdir, runs) -> None:
  from fedmitr_jax import sweep_report
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  table = sweep_report.aggregate(runs, list(config.methods))
  seeds = sorted({s for _, s in runs})
  note = f"seeds {', '.join(map(str, seeds))}; {len(runs)} runs"
  sweep_report.write_markdown(table, workdir / "sweep.md", note)
  sweep_report.write_csv(table, workdir / "sweep.csv")
  sweep_report.write_json(table, workdir / "sweep.json")
  paired = sweep_report.paired_differences(runs)
  if paired:
    sweep_report.write_paired_markdown(paired, workdir / "sweep_paired.md")
  diagnostics = sweep_report.aggregate_diagnostics(runs)
  if any(rows["ensemble token acc (%)"][2] for rows in diagnostics.values()):
    sweep_report.write_markdown(diagnostics, workdir / "sweep_diagnostics.md", note,
                                what="Teachers' per-token evidence on the test images (token acc: share of "
                                "patch tokens whose argmax is the image label; entropy of the per-token softmax) "
                                "and, for the sparse bank, the same of its stored targets on its own images "
                                "against the generated label (docs/diagnostics.md)")
  sweep_report.save_plot(table, workdir / "sweep.png",
                         f"{config.model.variant}, {config.partition.num_clients} clients, {note}")


def parse_list(values, kind, name):
  from fedmitr_jax import validate
  try:
    return [kind(v) for v in values]
  except ValueError:
    raise validate.InputError(f"--{name}: '{','.join(values)}' is not a comma-separated list of "
                              "numbers") from None


def run_sweep() -> None:
  import jax

  from fedmitr_jax import pipeline, validate
  from fedmitr_jax.progress import log
  base, workdir = _CONFIG.value, epath.Path(_WORKDIR.value)
  alphas = parse_list(_ALPHAS.value, float, "alphas")
  seeds = parse_list(_SEEDS.value, int, "seeds")
  runs = {}
  grid = [(a, s) for a in alphas for s in seeds]  # alpha-major: the first alpha's seeds finish first
  for i, (alpha, seed) in enumerate(grid):
    config, directory = run_config(base, alpha, seed), run_dir(workdir, alpha, seed)
    results = finished_results(config, directory)
    if results is None and not _REPORT_ONLY.value:
      log(f"[sweep] run {i + 1}/{len(grid)}: alpha={alpha:g} seed={seed} -> {directory}")
      dataset = validate.prepare(config, directory)
      results = pipeline.run(config, dataset, directory)
    elif results is not None:
      log(f"[sweep] run {i + 1}/{len(grid)}: alpha={alpha:g} seed={seed} reused from {directory}")
    if results is not None:
      runs[alpha, seed] = results
      if jax.process_index() == 0:
        write_report(config, workdir, runs)
  if not runs:
    raise validate.InputError(f"--workdir: no finished runs under {workdir}; run without --report_only first")
  log(f"[sweep] {len(runs)}/{len(grid)} runs in the table: {workdir / 'sweep.md'}")
  if jax.process_index() == 0:
    print((workdir / "sweep.md").read_text(), flush=True)


if __name__ == "__main__":
  entry.run(run_sweep, _WORKDIR)
