"""sampler.py against the trainer's computation (one full-sequence forward per row) on a tiny
random model with non-trivial values: large sinks of both signs, window 8 shorter than the
sequences, prompts of different lengths in one batch, chunks longer than the window."""

import copy
import json
import os

import pytest
import torch

import kernels
import model
import sampler
from conftest import randomize_

CFG = model.preset("tiny")  # 4 layers (sliding on 0 and 2), window 8, vocab 512
V = CFG.vocab_size


@pytest.fixture(scope="module")
def net():
    return randomize_(model.Transformer(CFG)).eval()


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def full_logits(net, tokens):
    """The trainer's computation: one forward over the whole sequence, (T, V) fp32."""
    return net(torch.tensor([tokens]))[0]


def compare(net, trajectories):
    """Max |sampler - trainer| over generated tokens, and the bit-identical fraction."""
    worst, same, total = 0.0, 0, 0
    for tokens, mask, logprobs in trajectories:
        logp = torch.log_softmax(full_logits(net, tokens), dim=-1)  # position t predicts token t + 1
        idx = [t for t in range(1, len(tokens)) if mask[t]]
        ref = logp[[t - 1 for t in idx], [tokens[t] for t in idx]]
        got = torch.tensor([logprobs[t] for t in idx], dtype=ref.dtype)
        diff = (got - ref).abs()
        worst, same, total = max(worst, diff.max().item()), same + int((diff == 0).sum()), total + len(idx)
    return worst, same / total


def test_logprobs_match_full_forward(net):
    prompts = prompts_of([1, 5, 13, 21])  # different lengths, some longer than the window
    outs = sampler.Sampler(net).generate(prompts, max_new_tokens=24, temperature=1.0, seed=0)
    for o in outs:
        assert len(o.tokens) == 24 and o.finish_reason == "length"
        assert o.logprobs == o.raw_logprobs  # temperature 1, no filter: the same distribution
    worst, identical = compare(net, [(p + o.tokens, [0] * len(p) + [1] * 24, [0.0] * len(p) + o.logprobs)
                                     for p, o in zip(prompts, outs)])
    print(f"\nbatched generation: max |delta logp| = {worst:.3g}, bit-identical {identical:.1%}")
    assert worst <= 1e-5


def test_float64_sampler_is_exact(net):
    """In float64 the cache, the padding and the ring buffer change nothing but rounding."""
    net64 = model.Transformer(CFG).double()
    net64.load_state_dict(net.state_dict())
    prompts = prompts_of([2, 17])
    outs = sampler.Sampler(net64).generate(prompts, max_new_tokens=20, seed=4)
    worst, _ = compare(net64, [(p + o.tokens, [0] * len(p) + [1] * 20, [0.0] * len(p) + o.logprobs)
                               for p, o in zip(prompts, outs)])
    assert worst <= 1e-12


def test_multi_turn_continuation(net):
    stop = list(range(0, V, 3))  # a third of the vocabulary: rows stop at different steps
    s = sampler.Sampler(net).session(prompts_of([4, 9, 2], seed=2), max_len=120)
    first = s.generate(max_new_tokens=12, stop_tokens=stop, seed=3)
    assert sorted(first) == [0, 1, 2] and s.ready == []
    tool = prompts_of([11, 3], seed=4)  # 11 > window: the chunk must see keys before it AND in it
    s.append({0: tool[0], 2: tool[1]})
    s.finish([1])
    second = s.generate(max_new_tokens=15, stop_tokens=stop, seed=5)
    assert sorted(second) == [0, 2]
    s.append({2: []})  # continue row 2 as is: its last sampled token goes in with nothing after it
    third = s.generate(max_new_tokens=6, seed=6)
    assert sorted(third) == [2]
    with pytest.raises(ValueError, match="finished"):
        s.append({1: [1, 2]})

    trajs = s.trajectories()
    assert trajs[1].tokens == s.trajectory(1).tokens and len(trajs[1].finish_reasons) == 1
    t0 = trajs[0]
    n0 = t0.prompt_len + len(first[0].tokens)
    assert t0.tokens[n0:n0 + 11] == tool[0] and t0.mask[n0:n0 + 11] == [0] * 11
    assert t0.tokens[n0 + 11:] == second[0].tokens and t0.mask[-len(second[0].tokens):] == [1] * len(second[0].tokens)
    for t in trajs:
        assert len(t.tokens) == len(t.mask) == len(t.logprobs) == len(t.raw_logprobs)
        assert all(lp == 0.0 for lp, m in zip(t.logprobs, t.mask) if not m)
    worst, identical = compare(net, [(t.tokens, t.mask, t.logprobs) for t in trajs])
    print(f"\nmulti-turn: max |delta logp| = {worst:.3g}, bit-identical {identical:.1%}")
    assert worst <= 1e-5


def test_greedy_is_argmax_of_full_forward(net):
    prompts = prompts_of([3, 12])
    outs = sampler.Sampler(net).generate(prompts, max_new_tokens=20, temperature=0)
    for p, o in zip(prompts, outs):
        seq = p + o.tokens
        logits = full_logits(net, seq)
        assert logits[len(p) - 1:-1].argmax(-1).tolist() == o.tokens
        assert o.logprobs == [0.0] * 20  # a point mass
        raw = torch.log_softmax(logits, -1)[range(len(p) - 1, len(seq) - 1), o.tokens]
        assert (raw - torch.tensor(o.raw_logprobs)).abs().max() <= 1e-5


def test_packed_experts_sampler(net):
    """pack_experts=True: the greedy tokens and log-probs of the grouped-matmul sampler; after a
    write through .data (no new _version) update_weights drops the stale packed matrices."""
    policy = copy.deepcopy(net)
    prompts = prompts_of([5, 9, 7, 3])
    plain = sampler.Sampler(policy).generate(prompts, max_new_tokens=12, temperature=0)
    smp = sampler.Sampler(policy, pack_experts=True)
    packed = smp.generate(prompts, max_new_tokens=12, temperature=0)
    assert any(kernels._PACKED.get(e.gate_up_proj, (0, {}))[1] for e in policy.modules() if isinstance(e, model.Experts))
    for a, b in zip(plain, packed):
        assert a.tokens == b.tokens
        assert max(abs(x - y) for x, y in zip(a.raw_logprobs, b.raw_logprobs)) <= 1e-5
    for p in policy.parameters():
        p.data.mul_(1.5)  # .data: the parameter's _version does not change
    smp.update_weights(policy)
    fresh = sampler.Sampler(copy.deepcopy(policy)).generate(prompts, max_new_tokens=12, temperature=0)
    again = smp.generate(prompts, max_new_tokens=12, temperature=0)
    assert [o.tokens for o in again] == [o.tokens for o in fresh]
    assert max(abs(x - y) for a, b in zip(again, fresh) for x, y in zip(a.raw_logprobs, b.raw_logprobs)) <= 1e-5


def test_compiled_decode_matches_eager(net):
    """compile=True (with packed experts, as bench.py runs it): the eager sampler's greedy tokens
    and log-probs within 1e-5 over two batches of different sizes and a second turn, from one
    compiled graph whose experts' packed matrices are packed once; not with batch_invariant."""
    from torch._dynamo.utils import counters

    policy = copy.deepcopy(net)
    experts = [m for m in policy.modules() if isinstance(m, model.Experts)]
    eager, compiled = sampler.Sampler(policy, pack_experts=True), sampler.Sampler(policy, pack_experts=True, compile=True)
    packs, graphs, breaks = [], counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    for lengths in ([5, 9, 7, 3, 12, 4], [6, 2]):
        prompts = prompts_of(lengths, seed=len(lengths))
        sessions = [smp.session(prompts, max_len=64) for smp in (eager, compiled)]
        for turn in range(2):
            a, b = (s.generate(max_new_tokens=10, temperature=0) for s in sessions)
            assert [o.tokens for o in a.values()] == [o.tokens for o in b.values()]
            assert max(abs(x - y) for r in a for x, y in zip(a[r].raw_logprobs, b[r].raw_logprobs)) <= 1e-5
            for s in sessions:
                s.append({r: [1, 2, 3] for r in range(len(prompts))})
        packs.append([kernels._PACKED[e.gate_up_proj][1] for e in experts])
    assert all(packs[0]) and all(x is y for x, y in zip(*packs))  # packed once, reused by the graph
    assert counters["stats"]["unique_graphs"] - graphs == 1  # every batch size and length: one graph
    assert sum(counters["graph_break"].values()) == breaks
    with pytest.raises(ValueError, match="batch-invariant"):
        sampler.Sampler(policy, compile=True, batch_invariant=True, pack_experts=True)
    assert not policy.batch_invariant  # refused before touching the shared model: packs kept
    assert all(kernels._PACKED[e.gate_up_proj][1] is p for e, p in zip(experts, packs[0]))


def test_seeds(net):
    s, prompts = sampler.Sampler(net), prompts_of([5, 7, 2])
    a = [o.tokens for o in s.generate(prompts, max_new_tokens=16, seed=11)]
    b = [o.tokens for o in s.generate(prompts, max_new_tokens=16, seed=11)]
    c = [o.tokens for o in s.generate(prompts, max_new_tokens=16, seed=12)]
    assert a == b and a != c


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 1.0), (0.7, 0, 0.6), (1.3, 7, 0.8)])
def test_top_k_top_p_sample_only_allowed_tokens(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 40, generator=g) * 2  # 3 distributions over 40 tokens
    N = 4000
    logits = base.repeat_interleave(N, dim=0)  # (3N, 40)
    tok, logp, raw = sampler.sample(logits, temperature, top_k, top_p, generator=g)
    for d in range(3):
        x = base[d] / temperature
        order = x.argsort(descending=True)
        allowed = order[:top_k] if top_k else order
        p = torch.softmax(x[allowed], -1)
        if top_p < 1:
            allowed = allowed[(p.cumsum(-1) - p) < top_p]
        probs = torch.zeros(40)
        probs[allowed] = torch.softmax(x[allowed], -1)
        t = tok[d * N:(d + 1) * N]
        assert set(t.tolist()) <= set(allowed.tolist())  # never outside the allowed set
        freq = torch.bincount(t, minlength=40).float() / N
        assert ((freq - probs).abs() <= 4 * (probs * (1 - probs) / N).sqrt() + 1e-3).all()
        assert torch.allclose(logp[d * N:(d + 1) * N], probs[t].log(), atol=1e-5)
        assert torch.allclose(raw[d * N:(d + 1) * N], torch.log_softmax(base[d], -1)[t], atol=1e-6)


def test_filtered_logprobs_are_the_sampled_distribution(net):
    prompts = prompts_of([6, 10])
    outs = sampler.Sampler(net).generate(prompts, max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9, seed=1)
    for p, o in zip(prompts, outs):
        logits = full_logits(net, p + o.tokens)[len(p) - 1:-1] / 0.8  # (12, V)
        for step, (tok, lp) in enumerate(zip(o.tokens, o.logprobs)):
            x = logits[step]
            order = x.argsort(descending=True)[:20]
            q = torch.softmax(x[order], -1)
            allowed = order[(q.cumsum(-1) - q) < 0.9]
            assert tok in allowed.tolist()
            assert abs(lp - torch.log_softmax(x[allowed], -1)[allowed.tolist().index(tok)].item()) <= 1e-5


def test_stop_tokens_max_new_tokens_and_shrinking_batch(net):
    stop = set(range(0, V, 8))
    sizes = []
    hook = net.embed_tokens.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        outs = sampler.Sampler(net).generate(prompts_of([3] * 8), max_new_tokens=10, stop_tokens=sorted(stop), seed=2)
    finally:
        hook.remove()
    reasons = {o.finish_reason for o in outs}
    assert reasons == {"stop", "length"}  # both happen with this seed
    for o in outs:
        assert 1 <= len(o.tokens) <= 10
        assert not stop & set(o.tokens[:-1])  # nothing after a stop token
        if o.finish_reason == "stop":
            assert o.tokens[-1] in stop
        else:
            assert len(o.tokens) == 10 and o.tokens[-1] not in stop
    assert sizes[0] == 8 and sizes == sorted(sizes, reverse=True) and sizes[-1] < 8  # finished rows leave
    assert sum(sizes[1:]) == sum(len(o.tokens) - 1 for o in outs)  # one decode row per fed token


def test_errors(net):
    s = sampler.Sampler(net)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        s.generate([[1, 2], []])
    with pytest.raises(ValueError, match=r"token id 512 is out of range \[0, 512\)"):
        s.generate([[1, 512]])
    with pytest.raises(ValueError, match="out of range"):
        s.generate([[-1]])
    with pytest.raises(ValueError, match="non-empty list"):
        s.generate([])
    for kw, name in [(dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
                     (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k"),
                     (dict(max_new_tokens=0), "max_new_tokens"), (dict(stop_tokens=[V]), "stop_tokens")]:
        with pytest.raises(ValueError, match=name):
            s.generate([[1, 2]], **kw)
    sess = s.session([[1, 2, 3]], max_len=8)
    with pytest.raises(ValueError, match="max_len=8"):
        sess.generate(max_new_tokens=6)
    sess.generate(max_new_tokens=5, seed=0)
    with pytest.raises(ValueError, match="max_len=8"):
        sess.append({0: [1]})
    with pytest.raises(ValueError, match="no row 3"):
        sess.append({3: [1]})
    with pytest.raises(ValueError, match="max_len"):
        s.session([[1] * 10], max_len=4)


def test_bf16_copy_and_update_weights(net):
    trainer = model.Transformer(CFG)
    trainer.load_state_dict(net.state_dict())
    assert sampler.Sampler(trainer).model is trainer  # same dtype: shared, nothing to refresh
    s = sampler.Sampler(trainer, dtype=torch.bfloat16)
    assert s.model is not trainer and all(p.dtype == torch.bfloat16 for p in s.model.parameters())
    assert all(p.dtype == torch.float32 for p in trainer.parameters())
    out = s.generate(prompts_of([7]), max_new_tokens=8, seed=0)[0]
    ref = torch.log_softmax(full_logits(trainer, prompts_of([7])[0] + out.tokens)[6:-1], -1)
    gap = (ref[range(8), out.tokens] - torch.tensor(out.raw_logprobs)).abs().max().item()
    assert 0 < gap < 0.5  # bf16 differs measurably from the fp32 trainer, but not wildly
    with torch.no_grad():
        trainer.lm_head.weight.mul_(2)
    s.update_weights(trainer)
    assert torch.equal(s.model.lm_head.weight, trainer.lm_head.weight.to(torch.bfloat16))
    ptr = s.model.lm_head.weight.data_ptr()
    s.update_weights(trainer.state_dict())
    assert s.model.lm_head.weight.data_ptr() == ptr  # copied in place


def test_cli_with_toy_checkpoint(net, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<|start|>", "<|end|>", "<|message|>", "<|return|>", "<|call|>", "<|channel|>", "<|constrain|>",
                "<|startoftext|>", "<|endoftext|>"]  # a harmony tokenizer has all nine
    words = ["user", "assistant", "hello", "world", "final", "analysis"]
    vocab = {w: i for i, w in enumerate(["[UNK]"] + specials + words + [f"w{i}" for i in range(V - 16)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    net.save_pretrained(tmp_path)
    tok.save(str(tmp_path / "tokenizer.json"))
    out = sampler.main(["--checkpoint", str(tmp_path), "--prompt", "hello world", "--max-new-tokens", "5",
                        "--temperature", "0"])
    printed = capsys.readouterr().out.strip()
    assert 1 <= len(out.tokens) <= 5 and printed == tok.decode(out.tokens, skip_special_tokens=False)


# ---------------------------------------------------------------------------------------------
# The command line: the conversation as openai-harmony renders it; every bad option one line
# `error: --OPTION VALUE: why`, exit status 2, no traceback, before the model is read

@pytest.fixture
def cli_checkpoint(net, tmp_path):
    import harmony

    path = tmp_path / "ckpt"
    net.save_pretrained(path)
    harmony.save_tokenizer(harmony.toy_tokenizer(), str(path))
    return str(path)


def cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        sampler.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_cli_renders_the_conversation_as_openai_harmony(cli_checkpoint, tmp_path, monkeypatch, capsys):
    import harmony

    seen = []
    generate = sampler.Sampler.generate
    monkeypatch.setattr(sampler.Sampler, "generate", lambda self, prompts, *a, **k: seen.append(prompts) or generate(self, prompts, *a, **k))
    chat = harmony.Harmony(harmony.load_tokenizer(cli_checkpoint))
    sampler.main(["--checkpoint", cli_checkpoint, "--prompt", "What is <|end|> 2+2?", "--max-new-tokens", "3"])
    assert seen[-1] == [chat.render_for_completion([harmony.Message("user", "What is <|end|> 2+2?")])]
    assert seen[-1][0].count(chat.ids[harmony.END]) == 1  # the prompt's "<|end|>" is text, as in openai-harmony
    conv = {"messages": [{"role": "system", "content": [{"type": "system_content", "reasoning_effort": "low"}]},
                         {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    (tmp_path / "conv.json").write_text(json.dumps(conv))
    sampler.main(["--checkpoint", cli_checkpoint, "--conversation", str(tmp_path / "conv.json"), "--max-new-tokens", "3"])
    assert seen[-1] == [chat.render_for_completion(harmony.conversation_from_json(conv))]
    capsys.readouterr()


@pytest.mark.parametrize("option, value, why", [
    ("--temperature", "-1", "must be >= 0"), ("--temperature", "nan", "finite"), ("--top-p", "0", "must be > 0"),
    ("--top-p", "1.5", "must be > 0 and <= 1"), ("--top-k", "-1", "must be >= 0"), ("--max-new-tokens", "0", "must be >= 1"),
    ("--seed", "-1", "must be >= 0"), ("--device", "nope", "not a device"), ("--device", "cuda:99", "CUDA"),
    ("--stop-tokens", "<|nope|>", "no such token"), ("--prompt", "bad \udcff byte", "not valid UTF-8")])
def test_cli_bad_option_is_reported_before_loading_the_model(option, value, why, cli_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(model.Transformer, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["--checkpoint", cli_checkpoint, "--prompt", "hi", option, value]
    err = cli_error(argv, capsys)
    assert option in err and why in err and (value in err or repr(value)[1:-1] in err), err


def test_cli_checkpoint_file_is_not_a_directory_not_a_missing_tokenizer(cli_checkpoint, tmp_path, capsys):
    config = os.path.join(cli_checkpoint, "config.json")
    assert "not a directory" in cli_error(["--checkpoint", config, "--prompt", "hi"], capsys)
    assert "no such directory" in cli_error(["--checkpoint", str(tmp_path / "nope"), "--prompt", "hi"], capsys)
    os.remove(os.path.join(cli_checkpoint, "tokenizer.json"))
    assert "no tokenizer.json in this directory" in cli_error(["--checkpoint", cli_checkpoint, "--prompt", "hi"], capsys)


def test_cli_bad_checkpoint_is_one_line_not_a_traceback(cli_checkpoint, capsys):
    weights = [name for name in os.listdir(cli_checkpoint) if name.endswith(".safetensors")][0]
    with open(os.path.join(cli_checkpoint, weights), "r+b") as fh:
        fh.truncate(os.path.getsize(fh.name) // 2)
    err = cli_error(["--checkpoint", cli_checkpoint, "--prompt", "hi"], capsys)
    assert "--checkpoint" in err and "cannot load the model" in err and "Traceback" not in err
    with open(os.path.join(cli_checkpoint, "tokenizer.json"), "w") as fh:
        fh.write("{not json")
    assert "tokenizer.json" in cli_error(["--checkpoint", cli_checkpoint, "--prompt", "hi"], capsys)


def test_cli_argparse_and_conversation_errors_are_one_line(cli_checkpoint, tmp_path, capsys):
    assert "--max-new-tokens" in cli_error(["--checkpoint", cli_checkpoint, "--prompt", "hi", "--max-new-tokens", "x"], capsys)
    assert "--prompt" in cli_error(["--checkpoint", cli_checkpoint], capsys)
    assert "no such file" in cli_error(["--checkpoint", cli_checkpoint, "--conversation", str(tmp_path / "none.json")], capsys)
    (tmp_path / "bad.json").write_text('{"messages": [{"role": "user"}]}')
    assert "not an openai-harmony conversation" in cli_error(["--checkpoint", cli_checkpoint, "--conversation",
                                                              str(tmp_path / "bad.json")], capsys)
