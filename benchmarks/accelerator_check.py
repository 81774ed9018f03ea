r"""Per-stage speed of a real run against the dry run's FLOPs: steps/s, TFLOP/s and MFU.

  python benchmarks/accelerator_check.py --dry_run DRY.jsonl --log RUN.log [--chip h200] \
      -- python -m fedmitr_jax.main --config CONFIG --workdir WORKDIR [--config.x=y ...]
  python benchmarks/accelerator_check.py --dry_run DRY.jsonl --log RUN.log --workdir WORKDIR  # saved log

launch/accelerator_check.sh runs it. Given a command, it runs it, passes its output through as it
comes and stamps every line with the time it arrived (RUN.log: '<seconds>\t<line>'); then, or from
a saved RUN.log, it measures each stage from its progress reports ('[stage] step N/T ...'): the
steps between two of its reports over the seconds between them, summed, so the compilation before
a stage's first report is not counted. A stage run in parts (inversion batches, looped clients)
leaves its first part out when it has others: that part compiles the steps (inversion: one per
token count) the later parts reuse. A stage in one part leaves out its first interval too when it
has others (Co-Boosting's re-weighting first runs, and compiles, in round 2). One row per stage:

  stage  devices  steps  steps/s  TFLOP/step  TFLOP/s  MFU

TFLOP/step is the dry run's tflop_per_step for the stage's step (the whole step, summed over its
devices; a sparse inversion interval uses the line of the token count it reported); TFLOP/s is
TFLOP/step x steps/s and MFU is TFLOP/s over (devices x the chip's peak bf16 TFLOP/s,
dry_run.PEAK_BF16_TFLOPS). The generator baselines report once per round (g_steps generator steps
and the round's KD steps), so their TFLOP/step is a round's, from the run's config.json. The rows
are also written as JSON lines to RUN.log's folder (accelerator_check.jsonl).
"""
import argparse
import json
import pathlib
import re
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from fedmitr_jax.dry_run import PEAK_BF16_TFLOPS  # noqa: E402
from fedmitr_jax.server import distill  # noqa: E402
from fedmitr_jax.server.data_free import DATA_FREE  # noqa: E402

REPORT = re.compile(r"^\[(?P<stage>[^\]]+)\] step (?P<step>\d+)/(?P<total>\d+) ")
TOKENS = re.compile(r"\btokens=(\d+)")
GENERATOR_METHODS = ("dense", "coboosting")
HEADER = ("stage", "devices", "steps", "steps/s", "TFLOP/step", "TFLOP/s", "MFU")


def run_stamped(command: list[str], log_path: pathlib.Path) -> int:
  """Runs `command`, echoing its stdout and writing '<seconds since start>\t<line>' per line."""
  start = time.monotonic()
  with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, bufsize=1) as proc, \
       open(log_path, "w") as log:
    for line in proc.stdout:
      log.write(f"{time.monotonic() - start:.3f}\t{line}")
      log.flush()
      sys.stdout.write(line)
      sys.stdout.flush()
  return proc.returncode


def read_reports(log_path) -> dict:
  """{stage: [(seconds, step, tokens or None), ...]} of the progress reports, in order."""
  reports = {}
  for raw in pathlib.Path(log_path).read_text().splitlines():
    stamp, _, line = raw.partition("\t")
    match = REPORT.match(line)
    if match:
      tokens = TOKENS.search(line)
      reports.setdefault(match["stage"], []).append(
          (float(stamp), int(match["step"]), int(tokens[1]) if tokens else None))
  return reports


def step_tflop(group: str, tokens, dry: dict, config: dict) -> tuple[float, int]:
  """(TFLOP of one progress step of `group`, devices) from the dry run's lines."""
  if group == "inversion_sparse":
    line = dry[f"inversion_sparse/{tokens}_tokens"]
  elif group in ("clients", "inversion_dense"):
    line = dry[group]
  elif group.removeprefix("distill_") in DATA_FREE:
    line = dry["distill_relabel" if DATA_FREE[group.removeprefix("distill_")][1] else "distill_kd"]
  elif group.removeprefix("distill_") in GENERATOR_METHODS:  # a progress step is a round
    method, inv, dcfg = group.removeprefix("distill_"), config["inversion"], config["distill"]
    rounds = inv["num_batches"]
    kd_steps = distill.plan_steps(rounds * inv["batch_size"], dcfg["batch_size"], dcfg["epochs"])
    kd_per_round = -(-kd_steps // rounds)  # as generator_kd.train plans it
    gen, kd = dry[f"generator_kd/{method}/generator"], dry[f"generator_kd/{method}/kd"]
    return (gen["tflop_per_step"] * config["generator_kd"]["g_steps"] + kd["tflop_per_step"] * kd_per_round,
            max(gen["devices"], kd["devices"]))
  else:
    raise KeyError(group)
  return line["tflop_per_step"], line["devices"]


def table(reports: dict, dry: dict, config: dict, chip) -> list[dict]:
  """One row per stage group, in the order the stages first reported."""
  groups = {}
  for stage in reports:
    groups.setdefault(stage.partition(" ")[0], []).append(stage)
  rows = []
  for group, parts in groups.items():
    if len(parts) > 1:
      intervals = [i for part in parts[1:] for i in zip(reports[part][:-1], reports[part][1:])]
    else:  # its second interval may still compile (Co-Boosting's first re-weighting is in round 2)
      intervals = list(zip(reports[parts[0]][:-1], reports[parts[0]][1:]))
      intervals = intervals[1:] if len(intervals) > 1 else intervals
    steps = seconds = tflop = 0.0
    devices = 1
    for (t0, s0, _), (t1, s1, tokens) in intervals:
      per_step, devices = step_tflop(group, tokens, dry, config)
      steps, seconds, tflop = steps + (s1 - s0), seconds + (t1 - t0), tflop + per_step * (s1 - s0)
    if not steps or seconds <= 0:
      rows.append({"stage": group, "devices": devices, "steps": 0, "steps_per_s": None,
                   "tflop_per_step": None, "tflop_per_s": None, "mfu": None,
                   "note": "fewer than two progress reports after its first part: lower its log interval"})
      continue
    rate = tflop / seconds
    peak = PEAK_BF16_TFLOPS.get(chip)
    rows.append({"stage": group, "devices": devices, "steps": int(steps), "steps_per_s": steps / seconds,
                 "tflop_per_step": tflop / steps, "tflop_per_s": rate,
                 "mfu": rate / (devices * peak) if peak else None})
  return rows


def format_rows(rows: list[dict]) -> list[str]:
  show = lambda x, fmt: "-" if x is None else format(x, fmt)
  cells = [HEADER] + [(r["stage"], str(r["devices"]), str(r["steps"]), show(r["steps_per_s"], ".3g"),
                       show(r["tflop_per_step"], ".4g"), show(r["tflop_per_s"], ".4g"),
                       "-" if r["mfu"] is None else f"{100 * r['mfu']:.3g}%") for r in rows]
  widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
  return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cell, widths)))
          for cell in cells]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dry_run", required=True, help="the dry run's JSON lines (its stdout)")
  parser.add_argument("--log", required=True, help="the stamped log: written when a command is given")
  parser.add_argument("--chip", choices=sorted(PEAK_BF16_TFLOPS), help="for MFU (none: no MFU column)")
  parser.add_argument("--workdir", help="the run's workdir (its config.json); default: the command's")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- python -m fedmitr_jax.main ...")
  args = parser.parse_args()
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  log_path = pathlib.Path(args.log)
  workdir = args.workdir or next((command[i + 1] for i, a in enumerate(command[:-1]) if a == "--workdir"),
                                 None)
  if workdir is None:
    parser.error("--workdir: give the run's workdir (or a command with --workdir)")
  if command:
    code = run_stamped(command, log_path)
    if code:
      print(f"error: the run exited with code {code}; no table", file=sys.stderr)
      sys.exit(code)
  lines = [json.loads(text) for text in pathlib.Path(args.dry_run).read_text().splitlines()
           if text.startswith("{")]
  dry = {line["stage"]: line for line in lines if "stage" in line}  # the last line is the summary
  config = json.loads((pathlib.Path(workdir) / "config.json").read_text())
  rows = table(read_reports(log_path), dry, config, args.chip)
  print("\n".join(format_rows(rows)), flush=True)
  with open(log_path.parent / "accelerator_check.jsonl", "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
  main()
