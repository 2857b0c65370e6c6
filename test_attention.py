"""Tests of the sink-aware attention: the flash path against the naive reference (forward and every
gradient, fp64/fp32/bf16), gradcheck, the sink gradient's closed form, parity with transformers'
gpt_oss eager attention, tile skipping and the dispatcher (kernels.py's backends: test_kernels.py)."""

import logging
import math
import types

import pytest
import torch

import kernels
import model
from model import attention, naive_attention

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}
SMALL_BLOCKS = dict(block_q=16, block_k=16)  # several tiles on small shapes


def make_inputs(B=2, Tq=37, Tk=None, Hq=8, Hkv=2, D=16, dtype=torch.float32, sink_scale=10.0, seed=0):
    """q, k, v and sinks spread over +-sink_scale (large sinks: a dropped sink cannot hide)."""
    Tk = Tq if Tk is None else Tk
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, Hq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Tk, Hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Tk, Hkv, D, generator=g, dtype=torch.float64)
    sinks = torch.linspace(-sink_scale, sink_scale, Hq, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (q, k, v, sinks)]


def ring_buffer_positions(lengths, size):
    """k_pos of a ring-buffer cache of `size` slots after writing lengths[b] tokens to row b:
    slot s holds the latest position p with p % size == s; -1 marks a slot never written."""
    k_pos = torch.full((len(lengths), size), -1, dtype=torch.int64)
    for b, n in enumerate(lengths):
        for p in range(n):
            k_pos[b, p % size] = p
    return k_pos


def outputs_and_grads(fn, inputs, seed=1, **kwargs):
    out = fn(*inputs, **kwargs)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, inputs, dout.to(out))
    return [out] + list(grads)


def max_rel_errors(got, ref):
    """max |got - ref| / max(1, max |ref|) for each tensor: absolute error at unit scale."""
    return [((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1)).item()
            for a, b in zip(got, ref)]


# Each case: make_inputs kwargs, attention kwargs (positions built for B=3 where they are per row)
CASES = {
    "causal": (dict(), dict()),
    "window": (dict(), dict(sliding_window=7)),
    "non_causal": (dict(), dict(causal=False)),
    "mha_T_multiple_of_tile": (dict(Tq=32, Hq=4, Hkv=4), dict()),
    "decode": (dict(Tq=1, Tk=37), dict()),
    "decode_window": (dict(Tq=1, Tk=37), dict(sliding_window=8)),
    "chunked_prefill_window": (dict(Tq=9, Tk=40), dict(sliding_window=12)),
    "rows_at_different_lengths": (
        dict(B=3, Tq=1, Tk=24),
        dict(q_pos=torch.tensor([[23], [10], [3]]),
             k_pos=torch.tensor([list(range(24)), list(range(11)) + [-1] * 13, list(range(4)) + [-1] * 20]))),
    "ring_buffer_window": (
        dict(B=3, Tq=1, Tk=16),
        dict(sliding_window=16, q_pos=torch.tensor([[40], [9], [16]]),
             k_pos=ring_buffer_positions([41, 10, 17], 16))),
    "non_causal_empty_slots": (
        dict(B=3, Tq=4, Tk=24),
        dict(causal=False, k_pos=torch.tensor([list(range(24)), list(range(11)) + [-1] * 13, [-1] * 24]))),
    "fully_masked_rows": (
        dict(B=2, Tq=5, Tk=20),
        dict(q_pos=torch.tensor([[-1, 0, 3, 19, -5], [2, 2, 2, 2, 2]]),
             k_pos=torch.tensor([list(range(20)), [-1] * 20]))),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_flash_matches_naive(case, dtype):
    shape, kwargs = CASES[case]
    inputs = make_inputs(dtype=dtype, **shape)
    ref = outputs_and_grads(naive_attention, inputs, **kwargs)
    got = outputs_and_grads(model.flash_attention, inputs, **kwargs, **SMALL_BLOCKS)
    for name, g in zip(["out", "dq", "dk", "dv", "dsinks"], got):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
    errors = max_rel_errors(got, ref)
    assert max(errors) <= TOL[dtype], dict(zip(["out", "dq", "dk", "dv", "dsinks"], errors))


def test_fully_masked_row_gives_zero_and_zero_grads():
    shape, kwargs = CASES["fully_masked_rows"]
    for fn in (naive_attention, model.flash_attention, kernels.dense_attention):
        out, dq, dk, dv, dsinks = outputs_and_grads(fn, make_inputs(**shape), **kwargs)
        assert (out[0, [0, 4]] == 0).all() and (out[1] == 0).all()  # rows that see no key
        assert (dq[0, [0, 4]] == 0).all() and (dq[1] == 0).all()
        assert (dk[1] == 0).all() and (dv[1] == 0).all()  # batch row 1 has only empty slots
        assert out[0, [1, 2, 3]].abs().amax() > 0


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(sliding_window=4),
    dict(sliding_window=3, q_pos=torch.tensor([[6, 7, 8], [2, 3, 9]]),
         k_pos=torch.tensor([[8, 1, 2, 3, 4, 5, 6, 7, 0, -1, -1], [0, 1, 2, 3, 9, -1, -1, 7, 8, 4, 5]])),
], ids=["causal", "window", "positions"])
def test_gradcheck_flash_float64(kwargs):
    # GQA (Hq = 2 Hkv), T = 11 not a multiple of the 4-wide tiles, sinks of +-3
    Tq = 3 if "q_pos" in kwargs else 11
    q, k, v, sinks = make_inputs(B=2, Tq=Tq, Tk=11, Hq=4, Hkv=2, D=3, dtype=torch.float64, sink_scale=3.0)
    fn = lambda q, k, v, s: model.flash_attention(q, k, v, s, block_q=4, block_k=4, **kwargs)
    assert torch.autograd.gradcheck(fn, (q, k, v, sinks))


def test_dsink_closed_form():
    q, k, v, sinks = make_inputs(B=2, Tq=21, Hq=4, Hkv=2, D=8, dtype=torch.float64)
    dout = torch.randn(2, 21, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = naive_attention(q, k, v, sinks, sliding_window=5)
    (d_naive,) = torch.autograd.grad(out, sinks, dout)
    (d_flash,) = torch.autograd.grad(model.flash_attention(q, k, v, sinks, sliding_window=5, block_k=4), sinks, dout)
    # lse_i = log(exp(sink_h) + sum_j exp(S_ij)); Delta_i = dO_i . O_i
    scores = torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(2, dim=2)) / math.sqrt(8)
    i, j = torch.arange(21)[:, None], torch.arange(21)[None, :]
    scores = scores.masked_fill(~((j <= i) & (i - j < 5)), -math.inf)
    lse = torch.logaddexp(torch.logsumexp(scores, dim=-1), sinks.view(1, 4, 1))  # (B, Hq, T)
    delta = (dout * out).sum(-1).transpose(1, 2)  # (B, Hq, T)
    closed_form = -(torch.exp(sinks.view(1, 4, 1) - lse) * delta).sum(dim=(0, 2))
    torch.testing.assert_close(d_naive, closed_form, rtol=0, atol=1e-12)
    torch.testing.assert_close(d_flash, closed_form, rtol=0, atol=1e-12)
    assert closed_form.abs().min() > 1e-6  # nonzero for every head: the test can fail


def test_naive_matches_transformers_gpt_oss_eager():
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward
    B, T, Hq, Hkv, D, W = 2, 23, 8, 2, 16, 6
    q, k, v, sinks = [t.detach() for t in make_inputs(B=B, Tq=T, Hq=Hq, Hkv=Hkv, D=D, sink_scale=8.0)]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    visible = (j <= i) & (i - j < W)
    mask = torch.zeros(B, 1, T, T).masked_fill(~visible, torch.finfo(torch.float32).min)  # additive
    module = types.SimpleNamespace(num_key_value_groups=Hq // Hkv, sinks=sinks, training=False)
    ref, _ = eager_attention_forward(module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                     mask, scaling=D ** -0.5)  # takes (B, H, T, D), returns (B, T, H, D)
    got = naive_attention(q, k, v, sinks, sliding_window=W)
    assert (got - ref).abs().max() <= 1e-6
    assert (model.flash_attention(q, k, v, sinks, sliding_window=W, **SMALL_BLOCKS) - ref).abs().max() <= 1e-6


def test_nosink_is_plain_softmax_and_clearly_wrong():
    q, k, v, sinks = [t.detach() for t in make_inputs(Hq=8, Hkv=2)]
    nosink = attention(q, k, v, sinks, backend="nosink")
    plain = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)  # what FlashAttention-2 computed: softmax over the keys only
    assert (nosink - plain).abs().max() <= 1e-5
    correct = naive_attention(q, k, v, sinks)
    assert (nosink - correct).abs().max() > 0.1  # sinks of +-10 take real probability mass


def test_tile_skipping_makes_windowed_attention_linear():
    # Count the matmul work the kernel really does (forward + backward)
    from torch.utils.flop_counter import FlopCounterMode

    def matmul_flops(T, **kwargs):
        q, k, v, sinks = make_inputs(B=1, Tq=T, Hq=2, Hkv=1, D=4)
        with FlopCounterMode(display=False) as counter:
            model.flash_attention(q, k, v, sinks, block_q=16, block_k=16, **kwargs).sum().backward()
        return counter.get_total_flops()

    per_tile = matmul_flops(16)  # one query tile against one key tile
    windowed = [matmul_flops(T, sliding_window=16) / per_tile for T in (32, 64, 128)]
    assert windowed == [3, 7, 15]  # 2 key tiles per query tile (1 for the first): linear in T
    full = [matmul_flops(T) / per_tile for T in (32, 64, 128)]
    assert full == [3, 10, 36]  # causal: the lower triangle n (n + 1) / 2


def test_tile_schedule_exact_for_contiguous_and_safe_for_ring_buffer():
    # Contiguous positions: a pair is visited iff it holds a visible key, and left unmasked iff
    # every key of it is visible
    T, W, block = 100, 20, 16
    pos = torch.arange(T)[None]
    schedule = kernels._tile_schedule(kernels._tile_bounds(pos, block), kernels._tile_bounds(pos, block), True, W)
    full = model._visible(pos, pos, True, W)[0]
    n_masked = 0
    for i, visits in schedule:
        needs_mask = dict(visits)
        for j in range(-(-T // block)):
            tile = full[i * block:(i + 1) * block, j * block:(j + 1) * block]
            assert tile.any().item() == (j in needs_mask), (i, j)
            if j in needs_mask:
                assert needs_mask[j] == (not tile.all().item()), (i, j)
                n_masked += needs_mask[j]
    assert n_masked < sum(len(v) for _, v in schedule)  # some tiles really skip the mask
    # Ring buffer (unsorted positions): exactly the tiles holding a visible key are visited
    q_pos, k_pos = torch.tensor([[40]]), ring_buffer_positions([41], 32)  # slots hold 32..40, 9..31
    schedule = kernels._tile_schedule(kernels._tile_bounds(q_pos, 4), kernels._tile_bounds(k_pos, 4), True, 16)
    visible = model._visible(q_pos, k_pos, True, 16)
    needed = [j for j in range(8) if visible[:, :, 4 * j:4 * j + 4].any()]
    assert [j for j, _ in schedule[0][1]] == needed == [0, 1, 2, 6, 7]  # window 25..40 wraps around
    assert schedule[0][1] == [(0, False), (1, False), (2, True), (6, True), (7, False)]


def test_dispatch_env_argument_errors_and_logging(monkeypatch, caplog):
    q, k, v, sinks = [t.detach() for t in make_inputs(B=1, Tq=5, Hq=2, Hkv=1, D=4)]
    monkeypatch.setattr(kernels, "_backends_logged", set())
    monkeypatch.delenv(model.ATTENTION_BACKEND_VARIABLE, raising=False)
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        attention(q, k, v, sinks)  # CPU, 5 queries, 50 score elements: the one-tile dense path
        assert torch.equal(attention(q, k, v, sinks), kernels.dense_attention(q, k, v, sinks))
        monkeypatch.setattr(kernels, "DENSE_MAX_SCORES", 49)  # one element too many: the tiled flash kernel
        assert torch.equal(attention(q, k, v, sinks), model.flash_attention(q, k, v, sinks))
        monkeypatch.setattr(kernels, "DENSE_MAX_SCORES", 50)
        monkeypatch.setattr(model, "BLOCK_Q", 4)  # queries span two tiles: flash
        assert torch.equal(attention(q, k, v, sinks), model.flash_attention(q, k, v, sinks))
        monkeypatch.setattr(model, "BLOCK_Q", 128)
        monkeypatch.setattr(model, "BLOCK_K", 2)  # 5 keys > window 2 + 2-key tiles: flash could skip one
        assert torch.equal(attention(q, k, v, sinks, sliding_window=2),
                           model.flash_attention(q, k, v, sinks, sliding_window=2))
        assert torch.equal(attention(q, k, v, sinks, sliding_window=3),
                           kernels.dense_attention(q, k, v, sinks, sliding_window=3))
        attention(q, k, v, sinks)
        monkeypatch.setenv(model.ATTENTION_BACKEND_VARIABLE, "nosink")
        assert torch.equal(attention(q, k, v, sinks), kernels.nosink_attention(q, k, v, sinks))
        assert torch.equal(attention(q, k, v, sinks, backend="naive"), naive_attention(q, k, v, sinks))
    messages = [r.getMessage() for r in caplog.records]
    assert sum("backend: flash" in m for m in messages) == 1  # logged once
    assert sum("backend: dense" in m for m in messages) == 1
    assert any("backend: nosink" in m and "WRONG" in m for m in messages)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, sinks, backend="flash2")
    with pytest.raises(RuntimeError, match="'fa4' is unavailable.*CUDA"):
        attention(q, k, v, sinks, backend="fa4")
    with pytest.raises(ValueError, match="sliding_window requires causal"):
        attention(q, k, v, sinks, causal=False, sliding_window=4, backend="flash")
    with pytest.raises(ValueError, match="sinks must be"):
        naive_attention(q, k, v, sinks[:1])
    with pytest.raises(ValueError, match="multiple of kv heads"):
        naive_attention(q, k.expand(1, 5, 3, 4), v.expand(1, 5, 3, 4), sinks)
