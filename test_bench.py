"""bench.py: the FLOP count behind its FLOP/s figures, its command line, and each entry end to end
on a tiny model (no timing is asserted: a benchmark prints numbers, it does not test them)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
import model


def test_model_flops_match_the_matmuls_torch_counts():
    """bench's count (3 x forward) against FlopCounterMode on a float64 forward (its experts run
    as plain matmuls, which the counter sees) with the dense backend, which computes every
    (query, key) pair: the counted FLOPs minus the masked pairs' are bench's forward."""
    cfg = model.preset("tiny", sliding_window=5)
    B, T = 2, 12
    net = model.Transformer(cfg).double()
    net.set_attention_backend("dense")
    with FlopCounterMode(display=False) as counter:
        net(torch.randint(0, cfg.vocab_size, (B, T)))
    all_pairs = cfg.num_hidden_layers * T * T
    visible = sum(min(i + 1, 5 if kind == "sliding_attention" else T)
                  for kind in cfg.layer_types for i in range(T))
    masked_flops = 4 * cfg.head_dim * cfg.num_attention_heads * (all_pairs - visible) * B
    assert bench.model_flops_per_step(cfg, B, T) == 3 * (counter.get_total_flops() - masked_flops)


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    text = capsys.readouterr().out
    for action in bench.parse_args([])._get_kwargs():
        assert "--" + action[0].replace("_", "-") in text or action[0] in ("entry", "worker")
    for entry in bench.ENTRIES + ["all"]:
        assert entry in text


def test_entries_run_end_to_end_on_a_tiny_model(tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = bench.main(["train", "--preset", "tiny", "--threads", "1", "--repeats", "1",
                          "--train-batch", "2", "--train-len", "16", "--peak-size", "64",
                          "--json", str(out)])
    text = capsys.readouterr().out
    assert "training step" in text and "matmul peak" in text and out.exists()
    for dt in ("float32", "bfloat16"):
        assert all(isinstance(results["train"][dt][e], float) for e in ("model", "transformers"))
    results = bench.main(["attention-memory", "--threads", "1", "--repeats", "1", "--attention-len", "1024"])
    flash_mib, naive_mib = results["attention_memory"]["flash"][0], results["attention_memory"]["naive"][0]
    # 1024 keys: naive keeps 8 heads x 1024^2 fp32 scores and probabilities (>= 64 MiB); at 256
    # both stayed within the ~8 MiB the allocator already held, and the comparison was noise
    assert 0 <= flash_mib < naive_mib and naive_mib > 32
    results = bench.main(["memory", "--preset", "tiny", "--threads", "1", "--repeats", "1",
                          "--memory-len", "64"])
    assert set(results["logprob_memory"]) == {"model", "transformers"}


def test_decode_entry_without_vllm(capsys):
    results = bench.main(["decode", "--preset", "tiny", "--threads", "1", "--repeats", "1", "--batches", "2",
                          "--new-tokens", "3", "--prompt-len", "4", "--engines", "sampler", "eager", "unpacked",
                          "transformers"])
    tps = results["decode_tokens_per_s"]
    assert all(tps[e][2] > 0 for e in ("sampler", "eager", "unpacked", "transformers"))
    out = capsys.readouterr().out
    assert "greedy tokens identical to transformers" in out and "vs sampler.py unpacked" in out
    assert "greedy tokens identical to sampler.py eager: 100.0%" in out  # compiling changes no token here


def test_experts_entry_compares_grouped_mm_and_packed(capsys):
    results = bench.main(["experts", "--preset", "tiny", "--threads", "1", "--repeats", "1", "--peak-size", "64"])
    assert sorted(results["experts_gflops"]) == [1, 2, 3, 4, 8, 16, 32]
    assert results["matmul_peak_fp32"] > 0 and results["read_gb_per_s"] > 0
    assert "packed speed-up" in capsys.readouterr().out


def test_invariant_entry_reports_both_modes(capsys):
    results = bench.main(["invariant", "--preset", "tiny", "--threads", "1", "--repeats", "1", "--batches", "1", "2",
                          "--new-tokens", "3", "--prompt-len", "4", "--train-batch", "2", "--train-len", "16"])
    seconds = results["invariant_seconds"]
    assert set(seconds) == {f"{k} {m}" for k in ("decode batch 1", "decode batch 2", "train step fp32")
                            for m in ("off", "on")}
    assert all(v > 0 for v in seconds.values()) and "invariant speed" in capsys.readouterr().out
