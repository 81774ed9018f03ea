"""What every command (fedmitr_jax.main, fedmitr_jax.sweep) does around its own work.

  * the command line is checked before anything runs: a config file that does not exist, a
    `--config.x.y` that names no field (with the nearest field paths), a bad value, a workdir that
    is a file: one line `error: ...` on stderr, exit code 2, nothing written;
  * before the first device is used: multi-process setup (`jax.distributed.initialize()`, asked for
    with FEDMITR_DISTRIBUTED=1), and XLA:CPU's flags when the run will be on XLA:CPU;
  * errors become exit codes with one last line on stderr: 2 bad input (validate.InputError),
    3 a loss that became NaN/inf (guards.NonFiniteError), 4 a full disk while saving.
"""
import difflib
import importlib.util
import os
import re
import sys
from importlib import metadata

from absl import app, flags, logging

EXIT_BAD_INPUT, EXIT_NON_FINITE, EXIT_DISK_FULL = 2, 3, 4

# XLA:CPU: its YNNPACK dot fusions made our ViT steps slower on the CPU we measure on (dense
# inversion step 17-21% slower, width-192 training step ~10% slower, nothing faster; see
# benchmarks/README.md), so they are off unless XLA_FLAGS already says otherwise. A CPU flag only:
# set for runs on XLA:CPU (an accelerator's XLA build, e.g. libtpu's, may not know it), and by the
# commands, never on import, so importing the package leaves the process's environment alone.
NO_YNN_FUSIONS = "--xla_cpu_experimental_ynn_fusion_type="


# ---- before the first device is used ------------------------------------------------------------
def runs_on_cpu() -> bool:
  """Whether JAX will run on XLA:CPU, decided without starting a backend (XLA reads XLA_FLAGS
  when the first one starts). JAX_PLATFORMS (jax_platforms) decides when set; otherwise JAX picks
  an accelerator whenever a plugin for one (libtpu, a `jax_plugins` package such as CUDA's) is
  installed, so only a process with none of them is sure to be on CPU."""
  import jax
  platforms = jax.config.jax_platforms or ""
  if platforms:
    return platforms.split(",")[0].strip().lower() == "cpu"
  return not (importlib.util.find_spec("libtpu") or importlib.util.find_spec("jax_plugins")
              or metadata.entry_points(group="jax_plugins"))


def with_cpu_flags(xla_flags: str) -> str:
  """XLA_FLAGS with our XLA:CPU flag added, unless the user's flags already set it."""
  if "xla_cpu_experimental_ynn_fusion_type" in xla_flags:
    return xla_flags
  return f"{xla_flags} {NO_YNN_FUSIONS}".strip()


def use_cpu_flags(env=os.environ) -> None:
  """Adds our XLA:CPU flag to XLA_FLAGS when the run will be on CPU. Call before any device use."""
  if runs_on_cpu():
    env["XLA_FLAGS"] = with_cpu_flags(env.get("XLA_FLAGS", ""))


def distributed_args(env) -> dict:
  """Arguments for jax.distributed.initialize(). TPU pods, SLURM and Open MPI are detected by JAX
  itself; a plain multi-process launch (launch/gpu.sh, the loopback test) names the coordinator
  (JAX_COORDINATOR_ADDRESS, read by JAX) and the process count and id here."""
  if "FEDMITR_NUM_PROCESSES" not in env:
    return {}
  return {"num_processes": int(env["FEDMITR_NUM_PROCESSES"]), "process_id": int(env["FEDMITR_PROCESS_ID"])}


def start_process(env=os.environ) -> None:
  """Logging, XLA:CPU flags and multi-process setup: everything that must precede device use."""
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; progress lines are ours
  use_cpu_flags(env)
  if env.get("FEDMITR_DISTRIBUTED") == "1":  # TPU pods / multi-process: before any JAX call
    import jax
    jax.distributed.initialize(**distributed_args(env))


# ---- the command line, checked before it is parsed -------------------------------------------------
def _flag_value(argv, name: str):
  """The value of `--name=v` / `--name v` in argv (the last one wins, as in absl), else None."""
  value = None
  for i, arg in enumerate(argv):
    if re.fullmatch(rf"--?{name}=.*", arg):
      value = arg.split("=", 1)[1]
    elif re.fullmatch(rf"--?{name}", arg) and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _load_config_file(spec: str):
  """Runs `get_config` of 'path.py[:arg]' as ml_collections' --config flag would."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("fedmitr_config_check", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def field_paths(config, prefix: str = "") -> list[str]:
  """Every leaf field of a ConfigDict as a dotted path ('inversion.stops')."""
  paths = []
  for key, value in config.items():
    if hasattr(value, "items"):
      paths += field_paths(value, f"{prefix}{key}.")
    else:
      paths.append(prefix + key)
  return paths


def _has_field(config, path: str) -> bool:
  node = config
  for part in path.split("."):
    if not hasattr(node, "items") or part not in node:
      return False
    node = node[part]
  return True


def command_line_error(argv) -> str | None:
  """The one-line error for a command line whose config or workdir is wrong, else None.
  Only reads: a wrong command line leaves nothing behind."""
  spec = _flag_value(argv, "config")
  if spec is not None:
    path = spec.partition(":")[0]
    if not os.path.isfile(path):
      return (f"error: --config: no such file: {path}; give a config file such as configs/smoke.py "
              "(a relative path is read from the current folder)")
    try:
      config = _load_config_file(spec)
    except ValueError as e:  # the config's own args ('file.py:key=value') are checked there
      return f"error: --config: {e}"
    known = field_paths(config)
    for arg in argv:
      match = re.match(r"--?(?:no)?config\.([^=]+)", arg)
      if match and not _has_field(config, match.group(1)):
        field = match.group(1)
        nearest = difflib.get_close_matches(field, known, n=3, cutoff=0.0)
        return f"error: --config.{field}: no such field; nearest: {', '.join(nearest)}"
  workdir = _flag_value(argv, "workdir")
  if workdir and "://" not in workdir and os.path.exists(workdir) and not os.path.isdir(workdir):
    return f"error: --workdir: {workdir} is a file, not a folder; give a folder path (it is created if missing)"
  return None


def parse_flags(argv):
  """absl's flag parsing, with every command-line mistake turned into one line and exit code 2."""
  error = command_line_error(argv[1:])
  if error is None:
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:  # a value of the wrong type, a missing required flag, ...
      error = "error: " + " ".join(str(e).split())
  print(error, file=sys.stderr, flush=True)
  sys.exit(EXIT_BAD_INPUT)


# ---- errors -> exit codes --------------------------------------------------------------------------
def run(body, workdir_flag) -> None:
  """`absl.app.run` of `body()` (after `start_process`), with errors turned into exit codes."""

  def main(argv):
    del argv
    start_process()
    from fedmitr_jax import checkpoints, guards, validate  # after the process setup: they use JAX
    try:
      body()
    except validate.InputError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(EXIT_BAD_INPUT)
    except guards.NonFiniteError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(EXIT_NON_FINITE)
    except Exception as e:  # noqa: BLE001 (only a full disk is turned into a one-line error)
      if not checkpoints.is_disk_full(e):
        raise
      exit_with_last_line(
          f"error: workdir: disk full while saving under {workdir_flag.value} ({type(e).__name__}); "
          "free space and rerun the same command: finished stages and the last complete save are kept",
          code=EXIT_DISK_FULL)

  app.run(main, flags_parser=parse_flags)


def exit_with_last_line(message: str, code: int) -> None:
  """Writes `message` as the last line on stderr and exits at once. Orbax's background save
  threads can still be printing tracebacks of the same failed write (and would go on while the
  interpreter waits for them): stderr is pointed at /dev/null before the message is written to a
  copy of it, so nothing of theirs lands after it, and os._exit does not wait for them."""
  sys.stdout.flush()
  sys.stderr.flush()
  own_stderr = os.dup(2)
  os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
  os.write(own_stderr, (message + "\n").encode())
  os._exit(code)
