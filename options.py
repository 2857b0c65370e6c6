"""train.py's options checked before any work starts: ranges, paths, the device.

Design choices
- Every mistake in the input ends in one line `error: --option ...` that names the option and the
  value, and exit code 2 (argparse's own errors too, through cli.Parser); tracebacks stay for bugs.
- A table per kind of rule (integer minima, float ranges) so that every option is covered in one
  place and a new one is one line; NaN fails every range (`math.isfinite`).
- Paths are checked for what the run will do with them (--out a directory, --init-from a checkpoint
  directory with its tokenizer), the device for its presence, before the warm start's minutes.
"""

from __future__ import annotations

import argparse
import math
import os

import cli
import env
import model
import rundir
import vllm_engine

# option -> its smallest value (and why, when it is not obvious)
INT_MINIMA = {"sft_steps": 0, "steps": 0, "threads": 0, "rollout_shards": 0, "eval_every": 1, "save_every": 1,
              "prompts": 1, "sft_batch": 1, "copy_drills": 0, "name_drills": 0, "bisect_drills": 0, "eval_episodes": 1,
              "max_new_tokens": 1, "ppo_epochs": 1, "minibatches": 1, "group_size": 2}
INT_WHY = {"group_size": " (advantages compare rollouts of the same prompt)"}
# option -> (low, high, low included): every float option of train.py but --sink-init (any finite value)
FLOAT_RANGES = {"sft_lr": (0, math.inf, True), "lr": (0, math.inf, True), "grad_clip": (0, math.inf, False),
                "clip_low": (0, 1, True), "clip_high": (0, math.inf, True), "kl_coef": (0, math.inf, True),
                "entropy_coef": (-math.inf, math.inf, True), "routing_noise": (0, math.inf, True),
                "temperature": (0, math.inf, True), "demo_skip_tool": (0, 1, True),
                "demo_blind_spot": (0, 1, True), "demo_mistake": (0, 1, True), "stop_at": (0, 1, True)}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_ranges(args):
    for name, low in INT_MINIMA.items():
        if getattr(args, name) < low:
            rundir.fail(f"{flag(name)} must be >= {low}{INT_WHY.get(name, '')}, got {getattr(args, name)}")
    for name, (low, high, low_included) in FLOAT_RANGES.items():
        value = getattr(args, name)
        inside = math.isfinite(value) and (value >= low if low_included else value > low) and value <= high
        if not inside:
            bounds = (f"{'>=' if low_included else '>'} {low}" if high == math.inf
                      else "a finite number" if low == -math.inf else f"in [{low}, {high}]")
            rundir.fail(f"{flag(name)} must be {bounds}, got {value}")
    if args.sink_init is not None and not math.isfinite(args.sink_init):
        rundir.fail(f"--sink-init must be a finite number, got {args.sink_init}")


def check_combinations(args):
    if args.rollout_shards and args.prompts % args.rollout_shards:
        rundir.fail(f"--rollout-shards must divide --prompts ({args.prompts}), got {args.rollout_shards}")
    if (args.prompts * args.group_size) % args.minibatches:
        rundir.fail(f"--minibatches must divide prompts * group-size ({args.prompts * args.group_size}), "
                    f"got {args.minibatches}")
    if args.batch_invariant and (args.sampler_dtype != "float32" or args.trainer_attention != "auto"):
        rundir.fail("--batch-invariant needs the sampler and trainer to run the same model: --sampler-dtype "
                    f"float32 and --trainer-attention auto, got {args.sampler_dtype} and {args.trainer_attention}")
    if args.resume and args.overwrite:
        rundir.fail("--resume continues the run in the directory, --overwrite replaces it: give one of them")


def check_paths(args):
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        rundir.fail(f"--out {args.out!r} is a file, not a directory")
    if not args.name or os.sep in args.name or args.name in (".", ".."):
        rundir.fail(f"--name must be a plain directory name, got {args.name!r}")
    if args.init_from is not None:
        if not os.path.isdir(args.init_from):
            what = "is a file, not a checkpoint directory" if os.path.exists(args.init_from) else "does not exist"
            rundir.fail(f"--init-from {args.init_from!r} {what}")
        for needed in ("config.json", "tokenizer.json"):
            if not os.path.isfile(os.path.join(args.init_from, needed)):
                rundir.fail(f"--init-from {args.init_from!r} has no {needed}")


def parse_mix(text: str) -> dict[str, float]:
    try:
        mix = {key: float(value) for key, value in (pair.split("=") for pair in text.split(","))}
    except ValueError:
        rundir.fail(f"--sft-mix must look like calculator=1,lookup=2,guess=1; got {text!r}")
    unknown = set(mix) - set(env.ENVS)
    if unknown or any(not math.isfinite(w) or w < 0 for w in mix.values()) or not any(mix.values()):
        rundir.fail(f"--sft-mix: environments must be among {list(env.ENVS)} with weights >= 0, not all 0; "
                    f"got {text!r}")
    return mix


def init_model(path: str):
    """--init-from's model; a bad checkpoint (its file and tensor named by hf_checkpoint) is user
    input, so one line and exit 2, not a traceback."""
    try:
        return model.Transformer.from_pretrained(path)
    except ValueError as e:
        rundir.fail(f"--init-from {path!r}: {e}")


def checked(args: argparse.Namespace) -> argparse.Namespace:
    """args after every check, with the defaults that depend on others (--name) filled in and
    --sft-mix parsed into a dict; the first failed check ends the process (exit 2)."""
    args.name = args.name or f"{args.env}-s{args.seed}"
    check_ranges(args)
    check_combinations(args)
    vllm_engine.check_args(args, rundir.fail)  # --rollout-engine vllm: its venv, one process, no batch invariance
    check_paths(args)
    if args.device != "auto":  # present on this machine (cli.device: the same check as sampler.py's)
        cli.device("--device", args.device)
    args.sft_mix = parse_mix(args.sft_mix)
    return args
