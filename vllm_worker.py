"""parity.py's vLLM engine, run under the vLLM venv's python: prompt log-probs of token sequences.

    python vllm_worker.py request.json result.json   # {"checkpoint", "dtypes", "sequences"} -> {dtype: ...}

It imports nothing of this project (parity.py copies it into an empty directory before running it,
so no project file can shadow a module vLLM imports).
"""
import gc
import json
import sys
import time


def main():
    with open(sys.argv[1]) as f:
        req = json.load(f)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    seqs = req["sequences"]
    longest = max(len(s) for s in seqs)
    results = {}
    for dtype in req["dtypes"]:
        t0 = time.time()
        llm = LLM(model=req["checkpoint"], dtype=dtype, skip_tokenizer_init=True, enforce_eager=True,
                  max_model_len=longest + 1, max_num_batched_tokens=max(longest + 1, 2048),
                  enable_prefix_caching=False, distributed_executor_backend="uni", seed=0)
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        outs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], params, use_tqdm=False)
        rows = []
        for s, o in zip(seqs, outs):
            plp = o.prompt_logprobs  # [None, {token: Logprob}, ...]: position 0 has none
            rows.append([None] + [plp[t][tok].logprob for t, tok in enumerate(s) if t > 0])
        results[dtype] = {"logprobs": rows, "seconds": time.time() - t0}
        del llm, outs
        gc.collect()
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":  # vLLM spawns processes: the guard is required
    main()
