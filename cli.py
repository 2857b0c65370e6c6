"""Command-line input of the tools (train.py through options.py, sampler.py, parity.py): checked
before any work, reported in one line.

    ap = cli.Parser(prog="sampler.py")       # argparse's own errors become one line too
    args = ap.parse_args(argv)
    cli.number("--top-p", args.top_p, low=0, high=1, low_open=True)
    path = cli.checkpoint_dir("--checkpoint", args.checkpoint)
    device = cli.device("--device", args.device)

Design choices
- A bad option is user input, not a bug: it gets one line `error: --OPTION VALUE: why` on stderr
  and exit status 2 (SystemExit), no usage block and no traceback. Tracebacks stay for bugs.
- Every check takes the option's name and the value given, so every message names both.
- Checks run before anything slow (loading a model, building a checkpoint), so a typo costs nothing.
This module imports torch only to ask whether a device is present.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import NoReturn


def fail(message: str, code: int = 2) -> NoReturn:
    """`error: MESSAGE` on stderr and the exit status: 2 for user input, 1 for the output's storage."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def bad(option: str, value, why: str) -> NoReturn:
    fail(f"{option} {value if isinstance(value, (int, float)) else repr(value)}: {why}")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (unknown option, 'abc' for a number, a missing option)."""

    def error(self, message: str) -> NoReturn:
        fail(message)


def number(option: str, value, low: float | None = None, high: float | None = None,
           low_open: bool = False, integer: bool = False):
    """A finite number in [low, high] ((low, high] with low_open); None passes (an unset option)."""
    if value is None:
        return None
    if integer and (not isinstance(value, int) or isinstance(value, bool)):
        bad(option, value, "must be an integer")
    if not math.isfinite(value):
        bad(option, value, "must be a finite number")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        bounds = [f"{'>' if low_open else '>='} {low}"] if low is not None else []
        bad(option, value, "must be " + " and ".join(bounds + ([f"<= {high}"] if high is not None else [])))
    return value


def text(option: str, value: str) -> str:
    """Text that UTF-8 can encode (bytes that are not UTF-8 reach Python as lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        bad(option, value, f"not valid UTF-8 text ({err.reason} at character {err.start})")
    return value


def existing_file(option: str, path: str) -> str:
    if not os.path.exists(path):
        bad(option, path, "no such file")
    if not os.path.isfile(path):
        bad(option, path, "not a file")
    return path


def checkpoint_dir(option: str, path: str, needs: tuple[str, ...] = ("config.json", "tokenizer.json")) -> str:
    """An HF-format checkpoint directory holding `needs` and at least one *.safetensors file."""
    if not os.path.exists(path):
        bad(option, path, "no such directory")
    if not os.path.isdir(path):
        bad(option, path, "not a directory (give the checkpoint's directory, which holds config.json)")
    for name in needs:
        if not os.path.isfile(os.path.join(path, name)):
            bad(option, path, f"no {name} in this directory")
    if not any(name.endswith(".safetensors") for name in os.listdir(path)):
        bad(option, path, "no *.safetensors file in this directory")
    return path


def writable_file(option: str, path: str) -> str:
    """A file that can be written: its directory exists and is writable, and it is not a directory."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        bad(option, path, "is a directory")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        bad(option, path, f"cannot write into {folder}")
    return path


def device(option: str, value: str | None):
    """A torch device that is present; None means cuda when available, else cpu."""
    import torch

    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        bad(option, value, "not a device (cpu, cuda, cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            bad(option, value, "CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            bad(option, value, f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        backend = getattr(torch.backends, dev.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            bad(option, value, f"{dev.type} is not available on this machine")
    return dev
