r"""Robustness experiment: poisoned uploads against the mean and a robust ensemble rule.

CIFAR-10 Dir(0.1) at the default job's scale (configs/cifar10_cpu.py), for 5 and 10 clients:
a clean run per rule, then 1 and 2 malicious clients of every attack kind under every rule, with
the methods ensemble, fedavg, sparse_kd, fedmitr and coboosting. Each (clients) setting trains its
honest clients once (the clean `mean` run); every other run of that setting gets a copy of its
`partition` and `clients` stages, so only the attack, screening and the server run again (and,
for label_flip, the malicious clients' own `clients_label_flip` stage, shared across rules).

  python benchmarks/robustness.py --root /tmp/robustness            # the whole table (hours)
  python benchmarks/robustness.py --root /tmp/robustness --dry-run  # the runs and a time estimate
  python benchmarks/robustness.py --root /tmp/robustness --clients 5 --kinds scaled --malicious 1
  python benchmarks/robustness.py --root /tmp/robustness --table-only  # table from finished runs

Rules: any of eval.ensemble_rule's values, plus 'mean+screen' (the mean with
eval.screen_clients=True: flagged uploads dropped; where the `mean` run of the same attack flagged
nothing, its results are reused rather than recomputed, marked "reused_from"). A finished run
(results.json present) is not rerun, and an unfinished one resumes from its checkpoints, so the
command can be killed and restarted. Writes ROOT/robustness.md and ROOT/robustness.json: per
run, every method's accuracy and its drop against the clean `mean` run of the same setting (the
server as it was before robust rules), and screening's precision and recall against the true
malicious clients; and ROOT/robustness.png, the drops as one heatmap per (K, rule).
"""
import argparse
import json
import pathlib
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
METHODS = ("ensemble", "fedavg", "sparse_kd", "fedmitr", "coboosting")
KINDS = ("random", "label_flip", "scaled", "sign_flip", "noise")
RULE_ORDER = {"mean": 0, "mean+screen": 1}  # panels: the mean first, then its screened twin
# Minutes per run on a 2-core CPU with nothing else running, from the default job's stage times
# (README: clients 3.4 min, sparse bank 45 s, a bank student ~8 s; Co-Boosting ~32 s per round in
# the full reproduction, 4 rounds here) plus ~1 min of loading, compiling, screening and evaluation.
# Teacher-bound stages scale with the number of clients; client training does not (same data).
MINUTES = {"clients": 3.4, "server_per_5_clients": 3.0, "fixed": 1.0, "label_flip_per_client": 0.7}


def run_name(kind: str, malicious: int, rule: str) -> str:
  return "clean_" + rule if malicious == 0 else f"{kind}_m{malicious}_{rule}"


def overrides(clients: int, kind: str, malicious: int, rule: str, methods) -> list:
  name = rule.replace("+screen", "")
  out = [f"--config=configs/cifar10_cpu.py:alpha=0.1,clients={clients}",
         f"--config.methods={tuple(methods)!r}", f"--config.eval.ensemble_rule={name}",
         f"--config.eval.screen_clients={rule.endswith('+screen')}"]
  if malicious:
    out += [f"--config.attack.kind={kind}", f"--config.attack.num_malicious={malicious}"]
  return out


def plan(args):
  """[(setting dir, run name, kind, malicious, rule)] in the order they must run."""
  runs = []
  for clients in args.clients:
    setting = pathlib.Path(args.root) / f"clients{clients}"
    rules = ["mean"] + [r for r in args.rules if r != "mean"]
    runs += [(setting, run_name("", 0, rule), "", 0, rule) for rule in rules]
    for kind in args.kinds:
      for malicious in args.malicious:
        if malicious:
          runs += [(setting, run_name(kind, malicious, rule), kind, malicious, rule) for rule in args.rules]
  return runs


def estimate_minutes(runs) -> float:
  total = 0.0
  for setting, name, kind, malicious, _ in runs:
    clients = int(setting.name.removeprefix("clients"))
    total += MINUTES["fixed"] + MINUTES["server_per_5_clients"] * clients / 5
    if name == "clean_mean":
      total += MINUTES["clients"]
    if kind == "label_flip" and name.endswith(f"m{malicious}_mean"):
      total += MINUTES["label_flip_per_client"] * malicious
  return total


def seed_workdir(setting: pathlib.Path, name: str, kind: str, malicious: int) -> None:
  """Copies the honest stages (and a finished label_flip stage of the same attack) into the run."""
  workdir = setting / name
  clean = setting / "clean_mean" / "stages"
  wanted = ["partition", "clients"]
  sources = {stage: clean for stage in wanted}
  if kind == "label_flip":  # trained once per (malicious count), reused by every rule
    donor = next((d / "stages" for d in sorted(setting.glob(f"label_flip_m{malicious}_*"))
                  if (d / "stages" / "clients_label_flip" / "DONE").exists()), None)
    if donor is not None:
      wanted.append("clients_label_flip")
      sources["clients_label_flip"] = donor
  for stage in wanted:
    target = workdir / "stages" / stage
    if not target.exists() and (sources[stage] / stage / "DONE").exists():
      shutil.copytree(sources[stage] / stage, target)


def reuse_unscreened(setting: pathlib.Path, name: str, kind: str, malicious: int, rule: str) -> bool:
  """A `<rule>+screen` run whose `<rule>` twin flagged no upload drops none, so it computes exactly
  what the twin computed (screening runs, and flags, in both; only `eval.screen_clients` differs):
  its results.json is the twin's, marked `"reused_from"`, instead of a second identical run."""
  twin = setting / run_name(kind, malicious, rule.removesuffix("+screen")) / "results.json"
  if not twin.exists():
    return False
  result = json.loads(twin.read_text())
  if result["screening"]["flagged"]:
    return False
  result["reused_from"] = twin.parent.name
  (setting / name).mkdir(parents=True, exist_ok=True)
  (setting / name / "results.json").write_text(json.dumps(result, indent=2))
  print(f"{setting / name}: screening flagged nothing in {twin.parent.name}, so its results stand", flush=True)
  return True


def execute(args, runs) -> None:
  """Runs what is not finished. A run that fails is recorded (FAILED file with the exit code and
  the log's last line) and the next one starts: a server stopped by a non-finite loss (exit 3) is
  itself a result. Only the clean mean run of a setting is needed by the others."""
  for setting, name, kind, malicious, rule in runs:
    workdir = setting / name
    if (workdir / "results.json").exists() or (workdir / "FAILED").exists():
      continue
    if rule.endswith("+screen") and reuse_unscreened(setting, name, kind, malicious, rule):
      continue
    if name != "clean_mean":
      seed_workdir(setting, name, kind, malicious)
    command = [args.python, "-m", "fedmitr_jax.main", "--workdir", str(workdir),
               *overrides(int(setting.name.removeprefix("clients")), kind, malicious, rule, args.methods),
               *args.override]
    print(" ".join(command), flush=True)
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir.with_suffix(".log"), "a") as log:
      code = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    if code and name == "clean_mean":
      sys.exit(f"run {workdir} failed (exit {code}); see {workdir.with_suffix('.log')}")
    if code:
      lines = workdir.with_suffix(".log").read_text().strip().splitlines() or [""]
      (workdir / "FAILED").write_text(f"exit {code}: {lines[-1]}\n")
      print(f"  failed (exit {code}): {lines[-1]}", flush=True)


def precision_recall(flagged, malicious):
  flagged, malicious = set(flagged), set(malicious)
  hits = len(flagged & malicious)
  precision = hits / len(flagged) if flagged else (1.0 if not malicious else 0.0)
  recall = hits / len(malicious) if malicious else 1.0
  return precision, recall


def table(runs, methods) -> tuple[str, list]:
  """Markdown table and rows from the finished runs' results.json files."""
  rows = []
  for setting, name, kind, malicious, rule in runs:
    path = setting / name / "results.json"
    clean_path = setting / "clean_mean" / "results.json"
    failed = setting / name / "FAILED"
    if failed.exists():  # e.g. exit 3: the loss became non-finite and the server stopped
      rows.append({"clients": int(setting.name.removeprefix("clients")), "kind": kind or "none",
                   "malicious": malicious, "rule": rule, "failed": failed.read_text().strip()})
      continue
    if not path.exists() or not clean_path.exists():
      continue
    result, clean = json.loads(path.read_text()), json.loads(clean_path.read_text())
    precision, recall = precision_recall(result["screening"]["flagged"], result["attack"]["indices"])
    row = {"clients": len(result["clients"]), "kind": kind or "none", "malicious": malicious, "rule": rule,
           "flagged": result["screening"]["flagged"], "screen_precision": precision, "screen_recall": recall}
    for m in methods:
      if m in result["methods"]:
        acc = 100 * result["methods"][m]["test_acc"]
        row[m] = acc
        row[m + "_drop"] = 100 * clean["methods"][m]["test_acc"] - acc
    rows.append(row)
  head = ["K", "attack", "m", "rule"] + [f"{m} (drop)" for m in methods] + ["flagged", "precision", "recall"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    if "failed" in r:
      lines.append("| " + " | ".join([str(r["clients"]), r["kind"], str(r["malicious"]), r["rule"],
                                      f"failed: {r['failed']}"] + [""] * (len(head) - 5)) + " |")
      continue
    accs = [f"{r[m]:.2f} ({r[m + '_drop']:+.2f})" if m in r else "" for m in methods]
    lines.append("| " + " | ".join([str(r["clients"]), r["kind"], str(r["malicious"]), r["rule"], *accs,
                                    str(r["flagged"]), f"{r['screen_precision']:.2f}",
                                    f"{r['screen_recall']:.2f}"]) + " |")
  note = ("Accuracy in %, (drop) = clean `mean` run minus this run, in points (positive: worse). "
          "Screening precision / recall: flagged uploads against the attacked clients (with no "
          "attack, precision 1 means nothing was flagged).")
  return "\n".join(lines + ["", note]) + "\n", rows


def save_heatmap(rows, methods, path) -> None:
  """One panel per (K, rule), a row of panels per K: attack rows × method columns, coloured by
  the accuracy drop against the clean `mean` run (red: worse, blue: better), the drop written in
  each cell; a run the server stopped reads "stop", on grey; each row is labelled with what
  screening flagged."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  panels = sorted({(r["clients"], r["rule"]) for r in rows},
                  key=lambda p: (p[0], RULE_ORDER.get(p[1], len(RULE_ORDER)), p[1]))
  if not panels:
    return
  labels = sorted({(r["kind"], r["malicious"]) for r in rows}, key=lambda a: (a[0] != "none", a[0], a[1]))
  limit = max([abs(r[m + "_drop"]) for r in rows for m in methods if m + "_drop" in r] + [1.0])
  ks = sorted({k for k, _ in panels})  # one row of panels per K
  cols = max(sum(k == c for c, _ in panels) for k in ks)
  size = (2.2 + 0.9 * len(methods) * cols, (0.9 + 0.36 * len(labels)) * len(ks))
  fig, axes = plt.subplots(len(ks), cols, figsize=size, squeeze=False)
  places = {}
  for clients, rule in panels:
    row = ks.index(clients)
    places[(clients, rule)] = axes[row, sum(1 for c, _ in places if c == clients)]
  for ax in axes.flat:
    if ax not in places.values():
      ax.axis("off")
  for (clients, rule), ax in places.items():
    by_label = {(r["kind"], r["malicious"]): r for r in rows if r["clients"] == clients and r["rule"] == rule}
    grid = np.full((len(labels), len(methods)), np.nan)
    for i, label in enumerate(labels):
      for j, m in enumerate(methods):
        if m + "_drop" in by_label.get(label, {}):
          grid[i, j] = by_label[label][m + "_drop"]
    ax.imshow(np.ones_like(grid), cmap="Greys", vmin=0, vmax=4)  # grey under missing / stopped runs
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit)
    for i, label in enumerate(labels):
      row = by_label.get(label)
      for j in range(len(methods)):
        text = "stop" if row and "failed" in row else ("" if np.isnan(grid[i, j]) else f"{grid[i, j]:+.1f}")
        ax.text(j, i, text, ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=8)
    names = []
    for kind, malicious in labels:
      flagged = by_label.get((kind, malicious), {}).get("flagged")
      names.append(f"{kind} m={malicious}" + (f" {flagged}" if flagged else ""))
    ax.set_yticks(range(len(labels)), names, fontsize=7)
    ax.set_title(f"K = {clients}, {rule}", fontsize=9)
  fig.subplots_adjust(hspace=0.45)  # room for the rotated method names above the next row's titles
  fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="drop vs clean mean (points)")
  fig.savefig(path, dpi=130, bbox_inches="tight")
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--root", required=True, help="one workdir per run is made under it")
  parser.add_argument("--clients", type=int, nargs="+", default=[5, 10])
  parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
  parser.add_argument("--malicious", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--rules", nargs="+", default=["mean", "median"],
                      help="eval.ensemble_rule values, or 'mean+screen'")
  parser.add_argument("--methods", nargs="+", default=list(METHODS))
  parser.add_argument("--python", default=sys.executable)
  parser.add_argument("--override", action="append", default=[],
                      help="an extra flag for every run, e.g. --override=--config.dataset.tarball=/d/c.tgz")
  parser.add_argument("--dry-run", action="store_true", help="print the runs and the time estimate")
  parser.add_argument("--table-only", action="store_true", help="only rebuild the table")
  args = parser.parse_args(argv)
  if "mean" not in args.rules:
    args.rules = ["mean"] + args.rules  # the drop is measured against the clean mean run
  runs = plan(args)
  todo = [r for r in runs if not (r[0] / r[1] / "results.json").exists()]
  print(f"{len(runs)} runs, {len(todo)} to do, about {estimate_minutes(todo) / 60:.1f} h on a 2-core CPU "
        "with nothing else running", flush=True)
  if args.dry_run:
    for setting, name, kind, malicious, rule in todo:
      print(setting / name, " ".join(overrides(int(setting.name.removeprefix("clients")), kind, malicious,
                                                rule, args.methods)))
    return
  if not args.table_only:
    execute(args, runs)
  text, rows = table(runs, args.methods)
  root = pathlib.Path(args.root)
  root.mkdir(parents=True, exist_ok=True)
  (root / "robustness.md").write_text(text)
  (root / "robustness.json").write_text(json.dumps(rows, indent=2))
  save_heatmap(rows, args.methods, root / "robustness.png")
  print(text)


if __name__ == "__main__":
  main()
