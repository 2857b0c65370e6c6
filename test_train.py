"""train.py end to end on a tiny configuration: it runs, writes metrics and loadable HF
checkpoints, resumes bit for bit, and is deterministic for a seed."""

import json
import math
import os
import random
import subprocess
import sys
import types

import pytest
import torch

import distributed
import drills
import env
import harmony
import model
import train

TINY = ["--preset", "tiny", "--sft-steps", "2", "--sft-batch", "4", "--prompts", "2", "--group-size", "2",
        "--eval-every", "1", "--eval-episodes", "2", "--max-new-tokens", "24", "--save-every", "1"]


def run(tmp_path, name, *extra):
    train.main([*TINY, "--out", str(tmp_path), "--name", name, *extra])
    with open(tmp_path / name / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_run_writes_metrics_and_a_checkpoint_that_loads(tmp_path):
    rows = run(tmp_path, "a", "--steps", "2")
    rl = [r for r in rows if r["phase"] == "rl"]
    assert [r["step"] for r in rl] == [1, 2]
    for key in ("reward", "success", "response_length", "pg_loss", "pg_clipfrac", "ppo_kl", "entropy",
                "grad_norm", "rollout_corr/kl", "rollout_corr/k3_kl", "rollout_corr/chi2_token",
                "eval/calculator/success", "eval/chain/success", "eval/lookup/reward"):
        assert all(key in r for r in rl), key
    # sampled evaluations: after the warm start and at the end (RL's scheduled ones are greedy)
    assert [r["step"] for r in rows if "eval/guess/success_sampled" in r] == [0, 2]
    assert all(r["pg_clipfrac"] == 0.0 and r["ppo_kl"] == 0.0 for r in rl)  # exactly on-policy
    ckpt = distributed.list_checkpoints(tmp_path / "a")[-1]
    assert ckpt.endswith("step-000002")
    loaded = model.Transformer.from_pretrained(ckpt)
    assert os.path.exists(os.path.join(ckpt, "tokenizer.json"))
    # vLLM reads every *.safetensors at the top of the directory: only the model's may be there
    assert [f for f in os.listdir(ckpt) if f.endswith(".safetensors")] == ["model.safetensors"]
    from transformers import GptOssForCausalLM
    hf = GptOssForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert (hf(ids).logits - loaded(ids)).abs().max().item() < 1e-4
    assert loaded.config.vocab_size == env.toy_tokenizer().get_vocab_size() and loaded.config.num_hidden_layers == 4


def test_same_seed_same_metrics_and_resume_equals_uninterrupted(tmp_path):
    full = run(tmp_path, "full", "--steps", "3")
    again = run(tmp_path, "again", "--steps", "3")
    assert full == again  # metrics.jsonl identical for the same seed
    run(tmp_path, "resumed", "--steps", "2")
    resumed = run(tmp_path, "resumed", "--steps", "3", "--resume")
    assert resumed == full
    a = model.Transformer.from_pretrained(distributed.list_checkpoints(tmp_path / "full")[-1])
    b = model.Transformer.from_pretrained(distributed.list_checkpoints(tmp_path / "resumed")[-1])
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_bad_arguments_exit_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--group-size", "1", "--out", str(tmp_path)])
    assert "--group-size must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main([*TINY, "--out", str(tmp_path), "--name", "none", "--resume"])
    assert "error: --resume but no checkpoint in" in capsys.readouterr().err


def test_mismatch_experiments_show_up_in_the_metrics(tmp_path):
    """The injected mismatches of the experiments are measured: a no-sink trainer beside a
    sampler with sinks gives a nonzero sampler/trainer KL; a routing flip between two passes
    breaks the exact ratio of 1 (ppo_kl != 0); the default is exactly on-policy."""
    nosink = [r for r in run(tmp_path, "nosink", "--steps", "1", "--trainer-attention", "nosink") if r["phase"] == "rl"]
    assert abs(nosink[0]["rollout_corr/kl"]) > 1e-4 and nosink[0]["rollout_corr/max_abs_prob_diff"] > 1e-5
    flip = [r for r in run(tmp_path, "flip", "--steps", "1", "--routing-noise", "1.0") if r["phase"] == "rl"]
    assert flip[0]["ppo_kl"] != 0.0


def test_two_processes_with_fsdp2_match_one_process(tmp_path):
    """torchrun, 2 gloo processes, FSDP2: the same global batch and seed as one process that plays
    the same two rollout shards gives the same losses and parameters (to float rounding). An
    entropy bonus keeps the RL gradient nonzero even when a tiny untrained model earns no reward."""
    extra = ["--steps", "2", "--entropy-coef", "0.1"]
    single = run(tmp_path, "single", *extra, "--rollout-shards", "2")
    assert all(r["grad_norm"] > 0 for r in single if r["phase"] == "rl")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *TINY, *extra, "--out", str(tmp_path), "--name", "two"]
    done = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "two" / "metrics.jsonl") as f:
        two = [json.loads(line) for line in f]
    assert [r["phase"] for r in two] == [r["phase"] for r in single]
    for a, b in zip(single, two):
        for key in ("loss", "pg_loss", "grad_norm", "reward", "eval/guess/success"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5, (a["phase"], a["step"], key, a[key], b[key])
    p1 = model.Transformer.from_pretrained(distributed.list_checkpoints(tmp_path / "single")[-1])
    p2 = model.Transformer.from_pretrained(distributed.list_checkpoints(tmp_path / "two")[-1])  # rank 0's full gather
    worst = max((x - y).abs().max().item() for x, y in zip(p1.parameters(), p2.parameters()))
    assert worst <= 1e-5, worst


def test_two_thread_runs_are_bit_identical(tmp_path):
    """The make-train model on 2 threads, twice, and a resumed run: identical metrics.jsonl.
    (With the experts' biases gathered as bias[expert], whose backward adds with atomics, the
    runs drifted apart from the first supervised step.)"""
    args = ["--threads", "2", "--sft-steps", "6", "--steps", "2", "--eval-every", "1", "--eval-episodes", "3",
            "--save-every", "1", "--out", str(tmp_path)]
    root = os.path.dirname(os.path.abspath(__file__))

    def metrics(name, *extra):
        done = subprocess.run([sys.executable, "train.py", *args, "--name", name, *extra], cwd=root,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        with open(tmp_path / name / "metrics.jsonl", "rb") as f:
            return f.read()

    first = metrics("a")
    assert metrics("b") == first
    metrics("c", "--steps", "1")
    assert metrics("c", "--resume") == first


def test_rl_stops_once_the_target_held_for_two_evaluations(tmp_path, monkeypatch, capsys):
    """--stop-at: two evaluations in a row at the target end RL (with a checkpoint and the full
    evaluation); resuming the stopped run has nothing to do. A target of 0 runs every step."""
    def solved(engine, args, chat, greedy=True, sampled=True):
        modes = [""] * greedy + ["_sampled"] * sampled
        return {f"eval/{name}/{what}{mode}": 1.0 for name in train.env_names(args) for what in ("success", "reward")
                for mode in modes}
    monkeypatch.setattr(train, "evaluate", solved)
    rows = run(tmp_path, "a", "--steps", "6", "--stop-at", "0.9")
    assert [r["step"] for r in rows if r["phase"] == "rl"] == [1, 2]
    assert "eval/lookup/success_sampled" in rows[-1]
    assert "stopped at step 2" in capsys.readouterr().out
    assert distributed.list_checkpoints(tmp_path / "a")[-1].endswith("step-000002")
    run(tmp_path, "a", "--steps", "6", "--stop-at", "0.9", "--resume")
    assert "nothing to do" in capsys.readouterr().out
    assert len([r for r in run(tmp_path, "b", "--steps", "3", "--stop-at", "0") if r["phase"] == "rl"]) == 3


def test_copy_drills_repeat_the_last_number_or_name_with_loss_on_the_answer_only():
    chat = env.make_env("calculator").harmony
    tokens, mask = drills.copy_drills(chat, random.Random(0), 64, n_names=64)
    lengths, sources, doubled = set(), set(), 0
    for i, (row, m) in enumerate(zip(tokens, mask)):
        *context, answer = chat.parse(row[:len(row) - row[::-1].index(chat.ids[harmony.RETURN])], first_role=None)
        kind = str.isdigit if i < 64 else lambda x: x.isalpha() and x[0].isupper() and x[1:].islower()
        assert 1 <= len(context) <= 3 and all(kind(msg.content) for msg in context)
        assert answer.channel == "final" and answer.content == context[-1].content
        lengths.add((i < 64, len(answer.content)))
        sources.add(context[-1].role)
        doubled += any(a == b for a, b in zip(answer.content, answer.content[1:]))
        taught = [t for t, keep in zip(row, m) if keep]
        assert chat.decode(taught) == harmony.completion(answer)
    # the copy distance varies, so no fixed-offset head solves them all
    assert lengths == {(True, n) for n in range(1, 11)} | {(False, n) for n in range(2, 9)}
    assert sources == {"user", "functions.calculator", "functions.search"}
    assert doubled >= 32  # "Otto": a copy that looks one token back cannot tell where it is


def test_bisect_drills_are_expert_guess_episodes_on_other_ranges():
    chat = env.make_env("guess").harmony
    args = types.SimpleNamespace(demo_skip_tool=0.0, demo_mistake=0.0)
    tokens, mask = drills.bisect_drills(chat, random.Random(0), 32, args, {})
    sizes = set()
    for row, m in zip(tokens, mask):
        text = chat.decode(row)
        size = int(text.split(env.GUESS_QUESTION)[1].split(".")[0])
        sizes.add(size)
        thoughts = [t.split("<|end|>")[0] for t in text.split("analysis<|message|>")[1:]]
        lo, hi = (int(x) for x in thoughts[0].split(env.GUESS_BOUNDS))
        assert (lo, hi) == (0, size + 1)  # the expert's first thought: the whole range, exclusive
        assert len(thoughts) <= math.ceil(math.log2(size + 1))  # bisection, no mistakes asked for
        assert text.rstrip().endswith("<|call|>") and any(m)  # found with a guess; loss on the expert's tokens
    assert len(sizes) > 16 and sizes <= set(range(8, 65)) and sizes != {32}
