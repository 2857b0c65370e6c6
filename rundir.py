"""A run's directory, kept safe: one live run at a time, nothing half-written, nothing lost.

Design choices
- Every write is a temporary name then a rename (`write_atomically`, `replace_dir`), and every
  delete a rename to a trash name first (`remove_dir`): a run killed at any instant leaves each
  entry either whole or under a name that `list_checkpoints` never shows and the next start removes.
- A lock file (`<run>/.lock`, holding the pid) refuses a second live run on the directory; a lock
  whose process is gone is taken over. Only the process that holds it cleans up leftovers.
- args.json is the run's identity: --resume refuses flags that would make it another run (the
  environment, the model, the seed) and lists them; a new run into a directory that holds another
  run's checkpoints is refused unless --resume or --overwrite.
- The KL term's reference policy is the starting policy, saved once in <run>/reference beside the
  rolling checkpoints (which pruning deletes), so a resumed run uses the same one.
- metrics.jsonl is strict JSON: a non-finite number is written as null. timing.jsonl holds the
  wall clock, and the profile: seconds per phase (warm start, rollouts, update, sync, evaluation,
  checkpoints), kept apart so that metrics.jsonl is the same bits on every rerun.
- A full disk or a read-only directory ends the run with one line naming the file (exit 1); the
  last checkpoint stays intact since it was renamed into place whole.
- Tests kill a run at a named point (GPTOSS_TEST_KILL_AT=<point>, see `kill_point`): deterministic,
  where a timer is not.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import math
import os
import re
import shutil
import time

import cli

KILL_VARIABLE = "GPTOSS_TEST_KILL_AT"
LOCK_FILE = ".lock"
REFERENCE_DIR = "reference"
STEP_DIR = re.compile(r"step-\d{6}$")
# Flags that make a run what it is: a resume that changes one would continue another run.
FIXED_ON_RESUME = ("env", "preset", "init_from", "seed", "sink_init")
WRITE_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG}


_passes: dict[str, int] = {}


def kill_point(name: str):
    """Tests only: die here, as kill -9 would, when GPTOSS_TEST_KILL_AT names this point
    ('save:rename'), or its N-th pass ('save:rename@2')."""
    wanted = os.environ.get(KILL_VARIABLE)
    if not wanted or not wanted.startswith(name):
        return
    _passes[name] = _passes.get(name, 0) + 1
    if wanted in (name, f"{name}@{_passes[name]}"):
        os._exit(137)


fail = cli.fail  # one line on stderr; exit 2 for user input, 1 for the output's storage


# ----------------------------------------------------------------------------------------------
# Atomic files and directories


def write_atomically(path: str, text: str):
    """path holds either its old content or `text`, never a part."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def trash_name(path: str) -> str:
    head, tail = os.path.split(path)
    return os.path.join(head, f".trash-{tail}-{os.getpid()}")


def remove_dir(path: str, point: str = "prune:rmtree"):
    """Rename to a trash name, then delete file by file (a kill in between leaves only trash)."""
    if not os.path.exists(path):
        return
    trash = trash_name(path)
    os.replace(path, trash)
    for root, dirs, files in os.walk(trash, topdown=False):
        for name in files:
            os.remove(os.path.join(root, name))
            kill_point(point)  # the test hook: killed with the directory half deleted
        for name in dirs:
            os.rmdir(os.path.join(root, name))
    os.rmdir(trash)


def replace_dir(tmp: str, final: str):
    """Put the finished directory `tmp` at `final`: an older one there goes to the trash first."""
    if os.path.exists(final):
        trash = trash_name(final)
        os.replace(final, trash)
        os.replace(tmp, final)
        remove_dir(trash)
    else:
        os.replace(tmp, final)


def is_leftover(name: str) -> bool:
    return name.startswith(".trash-") or ".tmp" in name


def clean(root: str):
    """Remove what a killed run left under root: temporary and trash entries."""
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if is_leftover(name):
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def complete(path: str, files: tuple[str, ...]) -> bool:
    """A directory with every one of `files` and its model's weights (single file or index)."""
    weights = ("model.safetensors", "model.safetensors.index.json")
    return (all(os.path.isfile(os.path.join(path, f)) for f in files)
            and any(os.path.isfile(os.path.join(path, f)) for f in weights))


def step_dirs(root: str) -> list[str]:
    """step-NNNNNN directories under root, oldest first, whatever their content."""
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, n) for n in os.listdir(root) if STEP_DIR.match(n))


# ----------------------------------------------------------------------------------------------
# The lock


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def lock(run_dir: str) -> str:
    """Take <run>/.lock for this process, or refuse while another live process holds it."""
    path = os.path.join(run_dir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return path
    except FileExistsError:
        pass
    try:
        with open(path) as f:
            other = int(f.read().strip() or 0)
    except (OSError, ValueError):
        other = 0
    if other and other != os.getpid() and pid_alive(other):
        fail(f"another run (pid {other}) is using {run_dir} (lock file {path}); wait for it to end "
             f"or choose another --name")
    write_atomically(path, str(os.getpid()))  # stale: its process is gone
    return path


def unlock(path: str):
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            mine = int(f.read().strip()) == os.getpid()
        if mine:
            os.remove(path)


# ----------------------------------------------------------------------------------------------
# The run's identity and state


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def check_resume(run_dir: str, args, last_checkpoint: str):
    """--resume: the fixed flags equal the saved run's, and there are steps left to run."""
    saved_path = os.path.join(run_dir, "args.json")
    try:
        saved = read_json(saved_path)
    except (OSError, ValueError) as e:
        fail(f"--resume: cannot read the saved run's options {saved_path}: {e}")
    differ = [f"--{k.replace('_', '-')} {getattr(args, k)!r} (saved: {saved.get(k)!r})"
              for k in FIXED_ON_RESUME if k in saved and saved[k] != getattr(args, k)]
    if differ:
        fail(f"--resume with options that differ from the saved run ({saved_path}): " + ", ".join(differ)
             + "; these cannot change on resume (start a new run with another --name instead)")
    step = read_json(os.path.join(last_checkpoint, "trainer_state.json"))["step"]
    if step >= args.steps:
        print(f"nothing to do: {run_dir} is at step {step} and --steps is {args.steps} (raise --steps to "
              f"continue it)")
        raise SystemExit(0)


def prepare(run_dir: str, args, checkpoints: list[str], main: bool):
    """Before anything is built: a resume continues this very run; a new run does not write over
    another's checkpoints unless --overwrite (which removes them, atomically, first)."""
    if args.resume:
        if not checkpoints:
            fail(f"--resume but no checkpoint in {run_dir}/checkpoints")
        check_resume(run_dir, args, checkpoints[-1])
    elif checkpoints or os.path.isdir(os.path.join(run_dir, REFERENCE_DIR)):
        if not args.overwrite:
            found = os.path.basename(checkpoints[-1]) if checkpoints else REFERENCE_DIR
            fail(f"{run_dir} holds another run's checkpoints ({found}); pass --resume to continue it or "
                 f"--overwrite to replace it")
        if main:
            for path in [*step_dirs(os.path.join(run_dir, "checkpoints")), os.path.join(run_dir, REFERENCE_DIR)]:
                remove_dir(path, point="overwrite:rmtree")
    if main:
        write_atomically(os.path.join(run_dir, "args.json"), json.dumps(vars(args), indent=2))


@contextlib.contextmanager
def opened(args, main: bool, list_checkpoints):
    """The run's directory for the `with` block: created, locked (by the main process), cleaned
    of a killed run's leftovers and checked (`prepare`); write failures end it in one line."""
    run_dir = os.path.join(args.out, args.name)
    lock_path = None
    try:
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        if main:
            lock_path = lock(run_dir)
            clean(run_dir)
            clean(os.path.join(run_dir, "checkpoints"))
        prepare(run_dir, args, list_checkpoints(run_dir), main)
        yield run_dir
    except OSError as e:
        if e.errno not in WRITE_ERRORS:
            raise
        kept = list_checkpoints(run_dir) if os.path.isdir(run_dir) else []
        fail(f"cannot write {e.filename or run_dir}: {e.strerror}; "
             + (f"the last checkpoint, {kept[-1]}, is intact" if kept else "no checkpoint was written"), code=1)
    finally:
        if lock_path:
            unlock(lock_path)


def reference_path(run_dir: str) -> str:
    """Where the starting policy (the KL term's reference) is kept: written once, at step 0."""
    return os.path.join(run_dir, REFERENCE_DIR)


def json_line(row: dict) -> str:
    """One strict JSON line: non-finite numbers (NaN, inf) become null."""
    clean_row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
    return json.dumps(clean_row, allow_nan=False) + "\n"


class Log:
    """metrics.jsonl (deterministic) and timing.jsonl (wall clock), appended line by line, and
    the profile: seconds per phase (`with log.span("rollouts"): ...`), in each timing row since
    the one before, and summed over the run in `profile()`."""

    def __init__(self, run_dir: str, keep_lines: int | None, write: bool = True, drop: list = ()):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.timing = os.path.join(run_dir, "timing.jsonl")
        self.rows: list[dict] = []
        self.write, self.t0 = write, time.time()  # write: this is the rank that logs
        self.spent, self.total = collections.Counter(), collections.Counter()
        if keep_lines is not None:  # resume: drop what was logged after the checkpoint, and the keys
            with open(self.path) as f:  # of an evaluation off the schedule (`drop`: the run's last step)
                self.rows = [json.loads(line) for line in f.read().splitlines()[:keep_lines]]  # not a torn last line
            for key in drop:
                self.rows[-1].pop(key, None)
        if write:  # strict JSON (json_line: NaN -> null), never half rewritten
            write_atomically(self.path, "".join(map(json_line, self.rows)))
            if keep_lines is None:
                open(self.timing, "w").close()

    def __call__(self, row: dict):
        self.rows.append(row)
        if self.write:
            with open(self.path, "a") as f:
                f.write(json_line(row))

    @contextlib.contextmanager
    def span(self, phase: str):
        start = time.time()
        try:
            yield
        finally:
            self.spent[phase] += time.time() - start

    def time(self, **row):
        spent, self.spent = self.spent, collections.Counter()
        self.total.update(spent)
        if self.write:
            with open(self.timing, "a") as f:
                f.write(json_line({**row, **{f"{k}_s": round(v, 3) for k, v in spent.items()},
                                   "wall_s": round(time.time() - self.t0, 3)}))

    def profile(self) -> str:
        """Where the run's time went, e.g. "warm_start 150 s, rollouts 60 s, ..."."""
        total = self.total + self.spent
        return ", ".join(f"{phase} {seconds:.0f} s" for phase, seconds in total.items())
