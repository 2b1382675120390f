"""A grid of runs of one *_pruned.py script as a SLURM job array (or on this machine), through submitit.

    python -m common.sweep SCRIPT [SCRIPT FLAGS...] --sweep-dir DIR --executor {slurm,local} [--dry-run] [--wait]
           [--max-parallel N] [--slurm-partition P] [--slurm-time-min M] [--slurm-gpus-per-job G]
           [--slurm-cpus-per-job C] [--slurm-mem-gb M] [--slurm-setup "module load ..."] [--checkpoint-frequency STEPS]
    python -m common.sweep --status DIR

A script flag followed by several values is an axis of the grid; the grid is their cartesian product, minus the points
that differ only in flags their pruning method does not use (UNUSED_BY_METHOD: --sparsity with --pruning-method none
gives one dense run, not one per sparsity). Every point is checked by the script's own parser and check_args, in one
subprocess that imports the script, before anything is written or submitted.

Each point is one job (submitit's AutoExecutor: one SLURM job array, at most --max-parallel running; or submitit's
local executor, --max-parallel at a time). A job runs the script as a subprocess in DIR, with a unique --exp-name and
--checkpoint-frequency, so its run directory is DIR/runs/.... When the job gets submitit's preemption/timeout signal
(USR2: SLURM sends it 90 s, submitit's signal delay, before the time limit, and on preemption where the cluster is
set up to), PointJob.checkpoint kills the run and submitit requeues the job (submitit.helpers.Checkpointable); the
new attempt finds the run directory and continues it with --resume, which the scripts make bit-identical on CPU. A
finished point is never run again; a failed one keeps the last line its run wrote to stderr.

Files in DIR: sweep.json (the command, the grid, each point's flags, job id and run directory), runs/ (the scripts' run
directories: `python -m common.plot DIR/runs --out FIGURES` reads them), points/{exp_name}.json (each job's state),
logs/{exp_name}.out and .err (the run's stdout and stderr, every attempt), submitit/ (submitit's pickles and logs),
slots/ (the local executor's --max-parallel locks).
"""

import argparse
import ctypes
import fcntl
import importlib.util
import itertools
import json
import os
import pickle
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import submitit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds common/: the jobs import this module

# flags a point does not use, by its --pruning-method: gmp never draws a random mask nor regrows; static never updates
# its mask; none has no mask at all
UNUSED_BY_METHOD = {
    "none": (
        "--sparsity",
        "--sparsity-distribution",
        "--prune-start-fraction",
        "--prune-end-fraction",
        "--prune-frequency-grad-steps",
        "--drop-fraction",
        "--mask-sampling",
    ),
    "static": ("--prune-start-fraction", "--prune-end-fraction", "--prune-frequency-grad-steps", "--drop-fraction"),
    "gmp": ("--drop-fraction", "--mask-sampling"),
}
# the sweep's own flags and how many values each takes; every other flag after SCRIPT is the script's
SWEEP_FLAGS = {
    "--sweep-dir": 1,
    "--executor": 1,
    "--dry-run": 0,
    "--wait": 0,
    "--max-parallel": 1,
    "--slurm-partition": 1,
    "--slurm-time-min": 1,
    "--slurm-gpus-per-job": 1,
    "--slurm-cpus-per-job": 1,
    "--slurm-mem-gb": 1,
    "--slurm-setup": 1,
    "--checkpoint-frequency": 1,
    "--help": 0,
    "-h": 0,
}
MAX_TIMEOUTS = 20  # requeues after a time limit before submitit gives a job up (preemptions are not counted)
LOCAL_TIMEOUT_MIN = 60 * 24 * 365  # the local executor's time limit (submitit's default is 2 minutes): none, in effect
CHECKPOINT = "checkpoint.pkl"  # what the scripts' --checkpoint-frequency writes into a run directory


class SweepError(ValueError):
    """A bad command line or sweep directory: one line on stderr, exit code 2, nothing submitted."""


# ================================================================================= the grid
def split_command_line(argv: list) -> tuple:
    """(script, [(script flag, [values])], the sweep's own tokens). A script flag's values are the tokens after it
    that do not start with "--" (so negative numbers are values); --flag=value is one value."""
    script, script_flags, sweep_tokens, current = None, [], [], None
    tokens = list(argv)
    while tokens:
        token = tokens.pop(0)
        name, has_value, value = token.partition("=")
        if name in SWEEP_FLAGS:
            sweep_tokens.append(token)
            if SWEEP_FLAGS[name] and not has_value:
                if not tokens:
                    raise SweepError(f"{name} needs a value")
                sweep_tokens.append(tokens.pop(0))
            current = None
        elif token.startswith("--"):
            if script is None:
                raise SweepError(f"{token}: the script's flags come after SCRIPT")
            if name == "--resume":
                raise SweepError("--resume is the sweep's to give: a requeued job resumes its own run")
            if any(name == flag for flag, _ in script_flags):
                raise SweepError(f"{name} is given twice")
            current = (name, [value] if has_value else [])
            script_flags.append(current)
        elif script is None:
            script = token
        elif current is None:
            raise SweepError(f"{token!r} follows no script flag (SCRIPT is {script})")
        else:
            current[1].append(token)
    return script, script_flags, sweep_tokens


def grid_points(script_flags: list) -> list:
    """The cartesian product of the flags' values, the first flag outermost: [[(flag, value or None), ...], ...]."""
    choices = [[(flag, value) for value in values] if values else [(flag, None)] for flag, values in script_flags]
    return [list(point) for point in itertools.product(*choices)]


def tokens_of(point: list) -> list:
    """A point's command-line tokens: [(flag, value or None), ...] -> [flag, value, flag, ...]."""
    return [token for flag, value in point for token in ((flag,) if value is None else (flag, value))]


# ============================================================ checking the grid with the script's own validation
def check_grid(script: str, points: list) -> dict:
    """Runs inside a subprocess (check_grid_in_subprocess): imports the script, parses every point with tyro as its
    command line does, drops the flags its pruning method does not use, drops repeated points, and checks each left
    with the script's check_args and gymnasium's registry (the script's import registers the ALE ids). Returns
    {"points": [...], "unused": [[method, flag], ...]} or {"error": one line}."""
    import contextlib
    import io

    import gymnasium
    import tyro

    name = os.path.basename(script)[: -len(".py")]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # tyro reads the Args docstrings through the module
    spec.loader.exec_module(module)

    def parse(point: list):  # the point's Args, or the one-line reason the script would refuse it
        output = io.StringIO()
        try:
            with contextlib.redirect_stderr(output), contextlib.redirect_stdout(output):
                args = tyro.cli(module.Args, args=tokens_of(point), prog=os.path.basename(script))
            module.check_args(args)
        except SystemExit:  # tyro printed its error box
            return tyro_message(output.getvalue())
        except module.ArgsError as error:
            return str(error)
        try:
            gymnasium.spec(args.env_id)
        except gymnasium.error.Error as error:
            return f"unknown --env-id {args.env_id!r}: {error}"
        return args

    kept, seen, unused, errors = [], set(), set(), []
    for given in points:
        point, args = given, parse(given)
        if not isinstance(args, str):
            drop = UNUSED_BY_METHOD.get(args.pruning_method, ())
            if getattr(args, "dense_warmup", False):  # static's dense phase ends at --prune-start-fraction
                drop = tuple(flag for flag in drop if flag != "--prune-start-fraction")
            point = [(flag, value) for flag, value in given if flag not in drop]
            if tuple(tokens_of(point)) in seen:
                continue
            if len(point) < len(given):  # the flags it lost go back to their defaults: checked again
                unused |= {(args.pruning_method, flag) for flag, _ in given if flag in drop}
                args = parse(point)
        if isinstance(args, str):
            errors.append(f"{os.path.basename(script)} refuses {shlex.join(tokens_of(point))}: {args}")
            continue
        seen.add(tuple(tokens_of(point)))
        kept.append(point)
    if errors:
        more = f" (and {len(errors) - 1} more of the grid's points)" if len(errors) > 1 else ""
        return {"error": errors[0] + more}
    return {"points": kept, "unused": sorted(unused)}


def tyro_message(box: str) -> str:
    """tyro's error box in one line: its message, the text between the box's first and second rules."""
    lines = [line.strip(" │╭╮╰╯") for line in box.splitlines()]
    blocks, block = [], []
    for line in lines:
        if line and set(line) <= set("-─ "):
            blocks.append(block)
            block = []
        elif line and not line.startswith("For full helptext"):
            block.append(line)
    blocks.append(block)
    text = " ".join(blocks[1] if len(blocks) > 1 and blocks[1] else blocks[0])
    return text or "tyro refused the flags"


def check_grid_main() -> None:
    """The subprocess's entry point: {"script", "points"} as JSON on stdin, check_grid's answer as JSON on stdout."""
    request = json.load(sys.stdin)
    answer = check_grid(request["script"], [[tuple(item) for item in point] for point in request["points"]])
    sys.stdout.write("\n" + json.dumps(answer) + "\n")


def check_grid_in_subprocess(script: str, points: list) -> dict:
    """check_grid in one subprocess (importing a script costs seconds: jax, flax; the sweep itself imports none)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    code = "from common import sweep; sweep.check_grid_main()"
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        input=json.dumps({"script": script, "points": points}),
        capture_output=True,
        text=True,
        env=env,
    )
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        last = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        raise SweepError(f"cannot check the grid with {script}: {last}")
    answer = json.loads(lines[-1])
    if "error" in answer:
        raise SweepError(answer["error"])
    return {"points": [[tuple(item) for item in point] for point in answer["points"]], "unused": answer["unused"]}


# =========================================================================================== a job
def state_path(sweep_dir: str, exp_name: str) -> str:
    """DIR/points/{exp_name}.json: the state its job records (state, attempts, job id, host, pid, command, run dir,
    error, start and end times)."""
    return os.path.join(sweep_dir, "points", f"{exp_name}.json")


def read_json(path: str) -> dict:
    """The JSON object in `path`, {} if there is none (or it cannot be read)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def write_json(path: str, data: dict) -> None:
    """Into a temporary file renamed over `path`: a reader sees the old file or the new one, whole."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(temporary, path)


def update_state(sweep_dir: str, exp_name: str, **fields) -> dict:
    """Merges `fields` into the point's state file (only its own job writes it)."""
    state = {**read_json(state_path(sweep_dir, exp_name)), **fields, "updated": time.time()}
    write_json(state_path(sweep_dir, exp_name), state)
    return state


def run_dirs_of(sweep_dir: str, exp_name: str) -> list:
    """The run directories below DIR/runs whose config.json names `exp_name` (each point's is unique)."""
    runs, found = os.path.join(sweep_dir, "runs"), []
    if os.path.isdir(runs):
        for name in sorted(os.listdir(runs)):
            if read_json(os.path.join(runs, name, "config.json")).get("exp_name") == exp_name:
                found.append(os.path.join(runs, name))
    return found


def last_line(path: str, offset: int) -> str:
    """The last non-blank line written to `path` after byte `offset` ("" if none)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
PR_SET_PDEATHSIG = 1  # prctl(2)


class PointJob(submitit.helpers.Checkpointable):
    """One grid point: runs `command` (python SCRIPT FLAGS...) in the sweep directory, or `python SCRIPT --resume
    RUN_DIR` where an earlier attempt left a checkpoint. submitit calls checkpoint() on the preemption/timeout signal
    and requeues what it returns: a fresh PointJob for the same point."""

    def __init__(self, sweep_dir: str, exp_name: str, command: list, slots: int = 0, child_env: dict | None = None):
        self.sweep_dir, self.exp_name, self.command = sweep_dir, exp_name, command
        # the local executor: at most `slots` points run at once (file locks in DIR/slots); 0: no limit
        self.slots = slots
        self.child_env = child_env or {}  # variables to set (a value) or unset (None) for the run
        self._child = None  # the running subprocess (not pickled)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_child": None}

    def __call__(self) -> str:
        """What submitit runs, again after each requeue: the run directory of the finished point."""
        state = read_json(state_path(self.sweep_dir, self.exp_name))
        if state.get("state") == "done":  # a finished run is never started again
            return state["run_dir"]
        slot = self._take_slot() if self.slots else None
        try:
            return self._attempt(state.get("attempts", 0) + 1)
        finally:
            if slot is not None:
                os.close(slot)

    def _attempt(self, attempt: int) -> str:
        """Runs the point (resuming its run if it has a checkpoint) and records how it went; returns the run
        directory, or raises RuntimeError with the run's last error line."""
        resume = self._run_to_resume()
        command = [*self.command[:2], "--resume", resume] if resume else self.command
        logs = os.path.join(self.sweep_dir, "logs", self.exp_name)
        os.makedirs(os.path.dirname(logs), exist_ok=True)
        with open(logs + ".out", "ab") as out, open(logs + ".err", "ab") as err:
            start = err.tell()
            update_state(
                self.sweep_dir,
                self.exp_name,
                state="running",
                attempts=attempt,
                job_id=submitit.JobEnvironment().job_id,
                host=socket.gethostname(),
                pid=os.getpid(),
                command=command,
                error=None,
                started=time.time(),
                ended=None,
            )
            env = {k: v for k, v in os.environ.items() if self.child_env.get(k, v) is not None}
            env.update({k: v for k, v in self.child_env.items() if v is not None})
            self._child = subprocess.Popen(
                command,
                cwd=self.sweep_dir,
                stdout=out,
                stderr=err,
                env=env,
                preexec_fn=self._child_setup,  # noqa: PLW1509 (the job runs no threads)
            )
            code = self._child.wait()
            self._child = None
        found = run_dirs_of(self.sweep_dir, self.exp_name)
        run_dir = found[-1] if found else None
        if code == 0:
            update_state(self.sweep_dir, self.exp_name, state="done", run_dir=run_dir, ended=time.time())
            return run_dir
        reason = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        error = reason if code < 0 else last_line(logs + ".err", start) or reason  # a killed run wrote no error
        update_state(self.sweep_dir, self.exp_name, state="failed", error=error, run_dir=run_dir, ended=time.time())
        raise RuntimeError(f"{self.exp_name}: {error} ({reason})")

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """On the preemption/timeout signal: kills the run (it goes on from its last checkpoint) and returns the job
        to requeue. The signal arrives while __call__ waits for the run, so the run is reaped with os.waitpid here,
        not through Popen, whose lock that wait holds."""
        if self._child is not None and self._child.returncode is None:
            try:
                os.kill(self._child.pid, signal.SIGKILL)
                os.waitpid(self._child.pid, 0)
            except (ProcessLookupError, ChildProcessError):  # already gone, or already reaped
                pass
        state = read_json(state_path(self.sweep_dir, self.exp_name))
        if state and state.get("state") != "done":
            update_state(self.sweep_dir, self.exp_name, state="requeued")
        return submitit.helpers.DelayedSubmission(
            PointJob(self.sweep_dir, self.exp_name, self.command, self.slots, self.child_env)
        )

    def _run_to_resume(self):
        """The run directory an earlier attempt left with a checkpoint (None: start afresh). A run directory without
        one (the attempt stopped before its first checkpoint) is removed, so that DIR/runs holds one run per point."""
        found = run_dirs_of(self.sweep_dir, self.exp_name)
        resumable = [d for d in found if os.path.isfile(os.path.join(d, CHECKPOINT))]
        for run_dir in found:
            if run_dir not in resumable:
                shutil.rmtree(run_dir)
        return max(resumable, key=lambda d: os.path.getmtime(os.path.join(d, CHECKPOINT))) if resumable else None

    def _take_slot(self) -> int:
        """Blocks until one of the sweep's `slots` lock files is free; returns its descriptor, locked (the lock goes
        with the process, however it ends)."""
        os.makedirs(os.path.join(self.sweep_dir, "slots"), exist_ok=True)
        while True:
            for k in range(self.slots):
                fd = os.open(os.path.join(self.sweep_dir, "slots", f"{k}.lock"), os.O_RDWR | os.O_CREAT)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    os.close(fd)
            time.sleep(0.5)

    @staticmethod
    def _child_setup() -> None:
        """In the run's process before it starts the script: the preemption signal is the job's to handle (SLURM
        sends it to every process of the job), and the run dies with the job (Linux: prctl PR_SET_PDEATHSIG)."""
        signal.signal(signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG], signal.SIG_IGN)
        if _LIBC is not None:
            _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


# ==================================================================================== status
def point_status(sweep: dict, point: dict) -> tuple:
    """(state, requeues, error) of one point: state is pending, running, requeued, done or failed; error is a failed
    point's last error line. A job that ended without a word is failed too: its submitit result says it raised, or a
    process of this machine is gone (the running job's, or the local executor's controller of a job not running)."""
    state = read_json(state_path(sweep["sweep_dir"], point["exp_name"]))
    name, error, attempts = state.get("state", "pending"), state.get("error"), state.get("attempts", 0)
    if name not in ("done", "failed") and point.get("job_id"):
        why = job_error(sweep, point["job_id"], state.get("updated", 0))
        if why is None and name == "running" and state.get("host") == socket.gethostname():
            why = None if alive(state["pid"]) else "its job stopped without a word (killed?)"
        elif why is None and sweep["executor"] == "local" and sweep.get("host") == socket.gethostname():
            why = None if alive(int(point["job_id"])) else "its job stopped without a word (killed?)"
        if why is not None:
            name, error = "failed", why
    requeues = attempts if name == "requeued" else max(attempts - 1, 0)
    return name, requeues, error if name == "failed" else None


def job_error(sweep: dict, job_id: str, state_time: float):
    """The last line of the error a job's submitit result holds, if it ended with one after `state_time`; else None."""
    result = submitit.core.utils.JobPaths(os.path.join(sweep["sweep_dir"], "submitit"), job_id, 0).result_pickle
    if not result.exists() or result.stat().st_mtime < state_time:
        return None
    try:
        with open(result, "rb") as f:
            outcome, value = pickle.load(f)
    except (OSError, EOFError, ValueError, pickle.UnpicklingError):  # being written, or unreadable: no answer
        return None
    return (str(value).strip().splitlines() or ["the job raised"])[-1] if outcome == "error" else None


def alive(pid: int) -> bool:
    """Whether process `pid` of this machine exists (a local job id is its controller's pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def status_lines(sweep_dir: str) -> tuple:
    """(one line per point and a count line, [state of each point]); records the run directories found in sweep.json.
    A point's line: index, state, exp name, job id, run directory, its values of the grid's axes, then the requeues and
    a failed point's last error line."""
    path = os.path.join(sweep_dir, "sweep.json")
    sweep = read_json(path)
    if not sweep:
        raise SweepError(f"{sweep_dir} holds no sweep.json")
    axes = {flag for flag, values in sweep["grid"].items() if len(values) > 1}  # the flags that tell points apart
    lines, states, changed = [], [], False
    for point in sweep["points"]:
        name, requeues, error = point_status(sweep, point)
        states.append(name)
        run_dir = read_json(state_path(sweep_dir, point["exp_name"])).get("run_dir")
        if run_dir and point.get("run_dir") != run_dir:
            point["run_dir"], changed = run_dir, True
        where = os.path.relpath(run_dir, sweep_dir) if run_dir else "-"
        values = shlex.join(tokens_of([f for f in point["flags"] if f[0] in axes]))
        parts = [f"{point['index']:>4}", f"{name:<8}", point["exp_name"], f"job {point['job_id']}", where, values]
        parts += [f"(requeued {requeues} time{'s' * (requeues > 1)})" if requeues else ""]
        lines.append("  ".join(filter(None, parts + [f"last error: {error}" if error else ""])))
    if changed:
        write_json(path, sweep)
    counts = ", ".join(
        f"{states.count(k)} {k}" for k in ("pending", "running", "requeued", "done", "failed") if k in states
    )
    lines.append(f"{len(states)} points: {counts}")
    return lines, states


# ==================================================================================== submit
def slurm_parameters(options) -> dict:
    """submitit AutoExecutor parameters of a SLURM array from the --slurm-* flags (None: SLURM's default)."""
    parameters = {
        "name": f"sweep_{os.path.basename(os.path.abspath(options.sweep_dir))}",
        "nodes": 1,
        "tasks_per_node": 1,
        "timeout_min": options.slurm_time_min,
        "gpus_per_node": options.slurm_gpus_per_job,
        "cpus_per_task": options.slurm_cpus_per_job,
        "mem_gb": options.slurm_mem_gb,
        "slurm_partition": options.slurm_partition,
        "slurm_setup": options.slurm_setup,
        "slurm_array_parallelism": options.max_parallel,
    }
    return {k: v for k, v in parameters.items() if v is not None}


def make_executor(options):
    """submitit's AutoExecutor for the sweep: SLURM with the --slurm-* flags, or the local executor, whose own time
    limit is lifted; both requeue a job at most MAX_TIMEOUTS times after a time limit."""
    folder = os.path.join(options.sweep_dir, "submitit")
    if options.executor == "slurm":
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=MAX_TIMEOUTS)
        executor.update_parameters(**slurm_parameters(options))
    else:
        executor = submitit.AutoExecutor(folder=folder, cluster="local", local_max_num_timeout=MAX_TIMEOUTS)
        executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN)
    return executor


def local_child_env(options) -> dict:
    """What a local run's environment needs back or added: submitit's local executor hides every GPU from its jobs
    (CUDA_VISIBLE_DEVICES = its own gpus_per_node, 0), so the launcher's value is restored; and several runs share
    the GPUs, so jax does not preallocate 75% of one for each unless told otherwise."""
    env = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if options.max_parallel > 1 and not any(
        k in os.environ for k in ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION")
    ):
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return env


def wait(sweep_dir: str, jobs: list, poll: float) -> int:
    """Prints each point's line when it changes until every job has ended, then the status; 1 if a point is not done."""
    printed = {}
    while True:
        ended = all(job.done() for job in jobs)
        lines, states = status_lines(sweep_dir)
        for index, line in enumerate(lines[:-1]):
            if printed.get(index) != line:
                print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)
                printed[index] = line
        if ended:
            break
        time.sleep(poll)
    print(lines[-1], flush=True)
    return 0 if states.count("done") == len(states) else 1


def make_parser() -> argparse.ArgumentParser:
    """The sweep's own flags (split_command_line hands every other flag to the script)."""
    parser = OneLineParser(prog="python -m common.sweep", description=__doc__.split("\n\n")[0], add_help=True)
    parser.add_argument("--sweep-dir", required=True, help="directory of the sweep: sweep.json, runs/, logs/, ...")
    parser.add_argument(
        "--executor", required=True, choices=("slurm", "local"), help="a SLURM job array, or this machine"
    )
    parser.add_argument("--dry-run", action="store_true", help="print one command line per point; submit nothing")
    parser.add_argument("--wait", action="store_true", help="block until every job ends; exit 1 if a point is not done")
    parser.add_argument(
        "--max-parallel",
        type=positive,
        help="jobs running at once (slurm: the array's limit; local: default the number of cores)",
    )
    parser.add_argument("--slurm-partition", help="SLURM partition")
    parser.add_argument(
        "--slurm-time-min", type=positive, help="time limit of one attempt in minutes; the job requeues itself at it"
    )
    parser.add_argument("--slurm-gpus-per-job", type=positive, help="GPUs of each job")
    parser.add_argument("--slurm-cpus-per-job", type=positive, help="CPU cores of each job")
    parser.add_argument("--slurm-mem-gb", type=positive, help="memory of each job in GB")
    parser.add_argument(
        "--slurm-setup", action="append", help="a shell line run before each job (e.g. module load ...); repeatable"
    )
    parser.add_argument(
        "--checkpoint-frequency",
        type=positive,
        default=250_000,
        help="the scripts' --checkpoint-frequency (env steps; gradient steps in cql_pruned.py): a requeued job loses "
        "at most this much work",
    )
    return parser


class OneLineParser(argparse.ArgumentParser):
    """argparse, its errors raised as SweepError (one line) instead of printed with the usage."""

    def error(self, message: str):
        raise SweepError(message)


def positive(text: str) -> int:
    """An integer >= 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def plan(argv: list):
    """Parses the command line and checks the grid: (options, script path, script flags, points, notes). Writes
    nothing."""
    script, script_flags, sweep_tokens = split_command_line(argv)
    options = make_parser().parse_args(sweep_tokens)
    if script is None:
        raise SweepError("no SCRIPT given (e.g. dqn_pruned.py)")
    if not script.endswith(".py") or not os.path.isfile(script):
        raise SweepError(f"SCRIPT {script!r} is not a Python file")
    if os.path.exists(os.path.join(options.sweep_dir, "sweep.json")):
        raise SweepError(
            f"{options.sweep_dir} already holds a sweep (sweep.json): see --status, or use another --sweep-dir"
        )
    if options.executor == "slurm" and not options.dry_run and not (shutil.which("sbatch") and shutil.which("srun")):
        raise SweepError(
            "--executor slurm needs SLURM's sbatch and srun on PATH (not found here); --executor local runs on this "
            "machine"
        )
    slurm_flags = [f"--{k.replace('_', '-')}" for k, v in vars(options).items() if k.startswith("slurm_") and v]
    if options.executor == "local" and slurm_flags:
        raise SweepError(f"{', '.join(slurm_flags)}: for --executor slurm only")
    if options.executor == "slurm" and options.slurm_time_min is None:
        raise SweepError("--executor slurm needs --slurm-time-min (submitit's default time limit is 5 minutes)")
    if options.executor == "local" and options.max_parallel is None:
        options.max_parallel = os.cpu_count() or 1
    script = os.path.abspath(script)
    product = grid_points(script_flags)
    checked = check_grid_in_subprocess(script, product)
    notes = [
        f"--pruning-method {method} does not use {flag}: its points run without it"
        for method, flag in checked["unused"]
    ]
    notes.append(
        f"{len(checked['points'])} points (a product of {len(product)}), run in {os.path.abspath(options.sweep_dir)}"
    )
    return options, script, script_flags, checked["points"], notes


def main(argv: list | None = None) -> int:
    """The command line; returns the exit code (2: bad input, nothing submitted; 1: a submission failed, or with
    --wait a point is not done)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["--status"]:
            if len(argv) != 2:
                raise SweepError("usage: python -m common.sweep --status DIR")
            lines, _ = status_lines(argv[1])
            print("\n".join(lines))
            return 0
        options, script, script_flags, points, notes = plan(argv)
    except SweepError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    sweep_dir = os.path.abspath(options.sweep_dir)
    stem, width = os.path.basename(script)[: -len(".py")], max(3, len(str(len(points) - 1)))
    records = []
    for index, point in enumerate(points):
        base = dict(point).get("--exp-name") or stem
        exp_name = f"{base}-{index:0{width}d}"
        flags = [(flag, value) for flag, value in point if flag != "--exp-name"]
        command = [sys.executable, script, *tokens_of(flags), "--exp-name", exp_name]
        command += ["--checkpoint-frequency", str(options.checkpoint_frequency)]
        records.append(
            {"index": index, "exp_name": exp_name, "flags": flags, "command": command, "job_id": None, "run_dir": None}
        )
    for note in notes:
        print(note, file=sys.stderr)
    if options.dry_run:
        for record in records:
            print(shlex.join(record["command"]))
        if options.executor == "slurm":
            print(f"slurm parameters: {slurm_parameters(options)}", file=sys.stderr)
        print("nothing submitted (--dry-run)", file=sys.stderr)
        return 0

    os.makedirs(sweep_dir, exist_ok=True)
    # the jobs import common.sweep: on the local executor and on SLURM (sbatch exports the environment) they inherit
    # this
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    slots = options.max_parallel if options.executor == "local" else 0
    child_env = local_child_env(options) if options.executor == "local" else {}
    try:
        executor = make_executor(options)
        with executor.batch():
            jobs = [
                executor.submit(PointJob(sweep_dir, r["exp_name"], r["command"], slots, child_env)) for r in records
            ]
    except Exception as error:  # noqa: BLE001 (sbatch's or submitit's refusal, in one line; nothing was recorded)
        print(
            f"error: submitting to {options.executor} failed: {(str(error).strip().splitlines() or [repr(error)])[-1]}",
            file=sys.stderr,
        )
        return 1
    for record, job in zip(records, jobs):
        record["job_id"] = str(job.job_id)
    sweep = {
        "command": [sys.executable, "-m", "common.sweep", *argv],
        "script": script,
        "sweep_dir": sweep_dir,
        "executor": options.executor,
        "host": socket.gethostname(),
        "max_parallel": options.max_parallel,
        "checkpoint_frequency": options.checkpoint_frequency,
        "slurm": slurm_parameters(options) if options.executor == "slurm" else None,
        "grid": dict(script_flags),
        "points": records,
        "submitted": time.time(),
    }
    write_json(os.path.join(sweep_dir, "sweep.json"), sweep)
    print(
        f"submitted {len(jobs)} jobs ({options.executor}); follow them with: "
        f"python -m common.sweep --status {options.sweep_dir}"
    )
    if options.wait:
        return wait(sweep_dir, jobs, poll=1.0 if options.executor == "local" else 60.0)
    return 0


if __name__ == "__main__":
    # run as common.sweep, not as __main__: the jobs must pickle common.sweep.PointJob, which the workers import
    sys.exit(importlib.import_module("common.sweep").main())
