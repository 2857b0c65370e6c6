"""Runs train.py processes for experiments.py: up to --jobs at a time, warm starts before the runs
that need them, finished runs reused, a progress bar over all of them.

Design choices
- Every run of one invocation executes a snapshot of the code (<out>/runs/.code: train.py and
  every project file it imports), so editing the project while a grid runs changes none of its
  runs; a run's process puts the snapshot first on sys.path by running the snapshot's train.py.
- A run is reused when its experiment.json records the same train.py options, the same code hash
  and the same warm-start weights (`spec`); a run whose warm start reruns reruns too.
- Each run writes <run>/train.log; a failed run writes failed.json with its last line, and the
  runs that need it are skipped rather than started.
- Progress is counted in RL steps (a supervised step counts SFT_STEP_COST of one), read from each
  running run's metrics.jsonl.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Run:
    """One train.py process of the experiment and what the runner knows of it."""
    name: str  # run directory under <out>/runs
    argv: list[str]  # train.py options (without --out/--name, which the runner adds)
    kind: str  # "warm", "cell" or "routing"
    seed: int
    mismatch: str = ""
    correction: str = ""
    needs: str | None = None  # the warm start's run name
    total_steps: int = 0  # progress units (supervised or RL steps)
    status: str = "pending"  # pending, reused, running, done, failed, skipped
    info: dict = field(default_factory=dict)


def code_files(entry: str = "train.py") -> list[str]:
    """train.py and every project file it imports, at any depth (lazy imports too): what a run
    executes, so a change in any of them invalidates a finished run."""
    files, todo = set(), [entry]
    while todo:
        name = todo.pop()
        if name in files or not os.path.exists(os.path.join(HERE, name)):
            continue  # done already, or not the project's (torch, tqdm, ...)
        files.add(name)
        with open(os.path.join(HERE, name)) as f:
            for node in ast.walk(ast.parse(f.read())):
                if isinstance(node, ast.Import):
                    todo += [alias.name + ".py" for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    todo.append(node.module + ".py")
    return sorted(files)


def snapshot_code(out: str) -> str:
    """Copy the project's code to <out>/runs/.code and return its hash: every run of one invocation
    runs that copy, so editing train.py while the grid runs changes none of its runs."""
    dest = os.path.join(out, "runs", ".code")
    os.makedirs(dest, exist_ok=True)
    h = hashlib.sha256()
    for name in code_files():
        with open(os.path.join(HERE, name), "rb") as f:
            text = f.read()
        h.update(name.encode() + text)
        with open(os.path.join(dest, name), "wb") as f:
            f.write(text)
    return h.hexdigest()[:16]


def file_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def spec(run: Run, out: str, code: str) -> dict:
    """What a finished run was made from; a run is reused only when this is unchanged."""
    s = {"argv": run.argv, "code": code}
    if run.needs:
        model = os.path.join(out, "runs", run.needs, "checkpoints", "step-000000", "model.safetensors")
        s["warm_start"] = file_hash(model) if os.path.exists(model) else None
    return s


def done_path(out: str, run: Run) -> str:
    return os.path.join(out, "runs", run.name, "experiment.json")


def finished(out: str, run: Run, code: str) -> bool:
    try:
        with open(done_path(out, run)) as f:
            return json.load(f).get("spec") == spec(run, out, code)
    except (OSError, ValueError):
        return False


def command(run: Run, out: str) -> list[str]:
    """The run's process: the snapshot's train.py (its directory comes first on sys.path, so it
    imports the snapshot's modules)."""
    argv = [*run.argv, "--out", os.path.join(out, "runs"), "--name", run.name, "--overwrite"]  # a rerun replaces
    return [sys.executable, os.path.join(out, "runs", ".code", "train.py"), *argv]


def steps_logged(out: str, run: Run) -> int:
    """Progress of a running run: supervised steps (warm start) or RL steps in its metrics.jsonl."""
    phase = "sft" if run.kind == "warm" else "rl"
    try:
        with open(os.path.join(out, "runs", run.name, "metrics.jsonl")) as f:
            return sum(f'"phase": "{phase}"' in line for line in f)
    except OSError:
        return 0


def execute(runs: list[Run], args) -> None:
    """Run what is not finished, up to --jobs at a time, warm starts before the runs that need them."""
    from tqdm import tqdm
    code = snapshot_code(args.out)
    by_name = {r.name: r for r in runs}
    for run in runs:  # warm starts come first: a run whose warm start reruns reruns too
        dep = by_name.get(run.needs) if run.needs else None
        if not args.fresh and finished(args.out, run, code) and (dep is None or dep.status == "reused"):
            run.status = "reused"
    todo = [r for r in runs if r.status == "pending"]
    reused = len(runs) - len(todo)
    print(f"{len(runs)} runs: {reused} reused (finished, same options and code), {len(todo)} to run, "
          f"{args.jobs} at a time, 1 thread each; logs in {os.path.join(args.out, 'runs', '<run>', 'train.log')}")
    running: dict[str, tuple[subprocess.Popen, object, float]] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    bar = tqdm(total=round(sum(cost(r) for r in todo)), unit="RL step", dynamic_ncols=True, desc="experiments",
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} {unit}s [{elapsed}<{remaining}] {postfix}")
    base = 0.0  # work of the runs that ended
    t0 = time.time()
    try:
        loop(todo, running, by_name, args, code, env, bar, base)
    finally:  # Ctrl-C or an error: stop the processes this runner started
        for proc, log, _ in running.values():
            proc.terminate()
            proc.wait()
            log.close()
    bar.close()
    print(f"runs finished in {time.time() - t0:.0f} s")


SFT_STEP_COST = 0.15  # a supervised step costs about this many RL steps (measured: 0.38 s vs 2.5 s of CPU)


def cost(run: Run, steps: int | None = None) -> float:
    """Progress units: RL steps, with supervised steps converted at SFT_STEP_COST."""
    steps = run.total_steps if steps is None else min(steps, run.total_steps)
    return steps * (SFT_STEP_COST if run.kind == "warm" else 1.0)


def loop(todo, running, by_name, args, code, env, bar, base):
    while todo or running:
        for run in list(todo):
            if len(running) >= args.jobs:
                break
            dep = by_name.get(run.needs) if run.needs else None
            if dep is not None and dep.status in ("pending", "running"):
                continue
            todo.remove(run)
            if dep is not None and dep.status in ("failed", "skipped"):
                run.status, run.info["error"] = "skipped", f"warm start {dep.name} failed"
                base += cost(run)
                continue
            run_dir = os.path.join(args.out, "runs", run.name)
            shutil.rmtree(run_dir, ignore_errors=True)
            os.makedirs(run_dir)
            log = open(os.path.join(run_dir, "train.log"), "w")
            proc = subprocess.Popen(command(run, args.out), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=HERE)
            running[run.name] = (proc, log, time.time())
            run.status = "running"
        for name, (proc, log, started) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            run = by_name[name]
            run.info["wall_s"] = round(time.time() - started, 1)
            run_dir = os.path.join(args.out, "runs", name)
            if proc.returncode == 0:
                run.status = "done"
                with open(done_path(args.out, run), "w") as f:
                    json.dump({"spec": spec(run, args.out, code), "wall_s": run.info["wall_s"],
                               "command": command(run, args.out)}, f, indent=2)
                if run.kind != "warm" and not args.keep_checkpoints:
                    for sub in ("checkpoints", "reference"):  # reference: the starting policy (rundir.py)
                        shutil.rmtree(os.path.join(run_dir, sub), ignore_errors=True)
            else:
                run.status = "failed"
                run.info["error"] = last_line(os.path.join(run_dir, "train.log"))
                with open(os.path.join(run_dir, "failed.json"), "w") as f:
                    json.dump({"returncode": proc.returncode, "error": run.info["error"]}, f, indent=2)
                bar.write(f"{name}: exit {proc.returncode}: {run.info['error']}")
            base += cost(run)
        bar.n = base + sum(cost(by_name[n], steps_logged(args.out, by_name[n])) for n in running)
        bar.set_postfix_str(" ".join(sorted(running)))
        bar.refresh()
        time.sleep(1.0)


def last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f.read().replace("\r", "\n").split("\n") if ln.strip()]
        return lines[-1][:300] if lines else ""
    except OSError:
        return ""


def children_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes: the runs' cost without the
    machine's other load (wall time on a shared machine says more about the neighbours)."""
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime
