"""kernels.py against model.py's references: the one-tile dense attention against
naive_attention (forward and every gradient, fp64/fp32/bf16), the FlashAttention-4 wrapper with a
stand-in kernel on the CPU and the real kernel against flash on a GPU when there is one, and the
packed oneDNN experts against model.expert_matmul."""

import copy
import math

import pytest
import torch

import kernels
import model
from conftest import randomize_
from model import attention, naive_attention
from test_attention import CASES, TOL, make_inputs, max_rel_errors, outputs_and_grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_dense_matches_naive(case, dtype):
    shape, kwargs = CASES[case]
    inputs = make_inputs(dtype=dtype, **shape)
    ref = outputs_and_grads(naive_attention, inputs, **kwargs)
    got = outputs_and_grads(kernels.dense_attention, inputs, **kwargs)
    for name, g in zip(["out", "dq", "dk", "dv", "dsinks"], got):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
    errors = max_rel_errors(got, ref)
    assert max(errors) <= TOL[dtype], dict(zip(["out", "dq", "dk", "dv", "dsinks"], errors))


def test_packed_experts_match_expert_matmul_and_follow_weight_updates():
    """set_packed_experts: no-grad fp32 products of 3+ rows on oneDNN-packed matrices (fewer rows
    on MKL, kernels.expert_matmul_packed) equal model.expert_matmul's; a new weight version is
    packed again; grad mode and the batch-invariant mode keep the reference; a deepcopy packs its
    own."""
    cfg = model.preset("tiny", num_local_experts=8, num_experts_per_tok=2)
    net = model.Transformer(cfg)
    randomize_(net, seed=8)
    experts = net.layers[0].mlp.experts
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(6, cfg.hidden_size, generator=gen)
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 1], [0, 2], [4, 5]])  # rows: 4, 3, 2, 1, 1, 1, 0, 0
    weights = torch.rand(6, 2, generator=gen).softmax(-1)
    ids = torch.randint(0, cfg.vocab_size, (3, 9), generator=gen)

    def close(a, b):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()

    ref, ref_logits = experts(x, idx, weights).detach(), net(ids).detach()  # grad mode: grouped_mm
    net.set_packed_experts(True)
    with torch.no_grad():
        close(experts(x, idx, weights), ref)
        packed = kernels._PACKED[experts.gate_up_proj][1]  # expert -> packed matrix
        assert sorted(packed) == [0, 1]  # 3+ rows: packed; 1-2 rows: MKL
        close(net(ids), ref_logits)
        for param in net.parameters():  # an in-place update (a new _version)
            param.mul_(1.5)
    ref, ref_logits = experts(x, idx, weights).detach(), net(ids).detach()
    with torch.no_grad():
        got = net(ids)
        assert kernels._PACKED[experts.gate_up_proj][1] is not packed  # packed again
        close(got, ref_logits)
        close(experts(x, idx, weights), ref)
        assert torch.equal(copy.deepcopy(net)(ids), got)
        net.set_packed_experts(False)
        assert experts.gate_up_proj not in kernels._PACKED
        net(ids)
        assert experts.gate_up_proj not in kernels._PACKED
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 products as expert_matmul casts them
            low = experts(x, idx, weights)
            net.set_packed_experts(True)
            assert torch.equal(experts(x, idx, weights), low)
        assert experts.gate_up_proj not in kernels._PACKED
        net.set_packed_experts(True)
        net.set_batch_invariant(True)  # its own padded products: never packed
        net(ids)
        assert experts.gate_up_proj not in kernels._PACKED


def fake_fa4(q, k, v, softmax_scale=None, causal=False, window_size=(None, None), learnable_sink=None,
             return_lse=False):
    """flash_attn.cute.flash_attn_func's contract as upstream documents it, in plain PyTorch: the
    queries are aligned to the end of the keys; window_size=(left, right) keeps keys
    i - left <= j <= i + right (causal forces right = 0); returns (out, lse) with the sink in lse.
    Like FA4 releases without the sink backward, it gives no gradient to learnable_sink."""
    assert learnable_sink.dtype == torch.bfloat16 and not learnable_sink.requires_grad
    B, Tq, Hq, D = q.shape
    Tk, G = k.shape[1], Hq // k.shape[2]
    i, j = torch.arange(Tk - Tq, Tk)[:, None], torch.arange(Tk)[None, :]
    left, right = window_size
    right = 0 if causal else right
    visible = torch.ones(Tq, Tk, dtype=torch.bool)
    if left is not None:
        visible &= j >= i - left
    if right is not None:
        visible &= j <= i + right
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    scores = torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(G, dim=2)) * scale
    scores = scores.masked_fill(~visible, -math.inf)
    lse = torch.logaddexp(torch.logsumexp(scores, dim=-1), learnable_sink.float().view(1, Hq, 1))
    out = torch.einsum("bhij,bjhd->bihd", torch.exp(scores - lse[..., None]), v.repeat_interleave(G, dim=2))
    return out, lse


@pytest.mark.parametrize("Tq, sliding_window", [(37, None), (37, 7), (5, 7), (1, 7)])
def test_fa4_wrapper_with_a_stand_in_kernel(monkeypatch, Tq, sliding_window):
    # Checks our side of the FA4 call on the CPU: the window mapping, the query alignment, and the
    # sink gradient that _AddSinkGradient adds (compared with autograd through the reference)
    monkeypatch.setattr(kernels, "_fa4_import", [fake_fa4])
    monkeypatch.setattr(kernels, "_fa4_unsupported_reason", lambda *args: None)
    inputs = make_inputs(Tq=Tq, Tk=37)
    with torch.no_grad():
        inputs[3].copy_(torch.tensor([-10.0, -7, -4, -1, 1, 4, 7, 10]))  # exact in bf16
    ref = outputs_and_grads(naive_attention, inputs, sliding_window=sliding_window)
    got = outputs_and_grads(attention, inputs, sliding_window=sliding_window)  # default -> fa4
    errors = max_rel_errors(got, ref)
    assert max(errors) <= 1e-5, dict(zip(["out", "dq", "dk", "dv", "dsinks"], errors))


def _fa4_ready():
    return (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
            and kernels._import_fa4() is not None)


@pytest.mark.skipif(not _fa4_ready(), reason="needs CUDA with compute capability >= 9.0 and "
                    "flash-attn-4 (flash_attn.cute) installed")
@pytest.mark.parametrize("sliding_window", [None, 128])
@pytest.mark.parametrize("Tq", [300, 1])
def test_fa4_matches_flash_on_gpu(sliding_window, Tq):
    inputs = [t.detach().cuda().requires_grad_()
              for t in make_inputs(B=2, Tq=Tq, Tk=300, Hq=8, Hkv=2, D=64, dtype=torch.bfloat16)]
    ref = outputs_and_grads(model.flash_attention, inputs, sliding_window=sliding_window)
    got = outputs_and_grads(kernels.fa4_attention, inputs, sliding_window=sliding_window)
    q, k = inputs[:2]
    assert kernels._fa4_unsupported_reason(q, k, None, None) is None  # so the default backend is fa4
    assert torch.equal(attention(*inputs, sliding_window=sliding_window), got[0])
    errors = max_rel_errors(got, ref)
    assert max(errors) <= 3e-2, dict(zip(["out", "dq", "dk", "dv", "dsinks"], errors))
