"""GPT-OSS in one file: config, RMSNorm, YaRN RoPE, attention with sinks, MoE, HF checkpoints.

Read top to bottom; the numbers are SPEC.md section 1's. Design choices:
- HF field and parameter names ("model." aside): config.json and checkpoints map name for name.
- RMSNorm and softmax statistics in at least fp32; logits in fp32; float64 stays float64.
- YaRN RoPE without rounding the ramp bounds (truncate=False), tables built once in float64.
- Sinks are one extra softmax column per head. `attention` serves the trainer and the KV-cached
  sampler alike; its mask comes from absolute positions, so a cache may hold rows of different
  lengths or a ring buffer. `naive_attention` is the reference, `flash_attention`
  FlashAttention-2's algorithm with the sink in the online softmax and in its own backward.
- MoE sorts the (token, expert) pairs by expert and runs every expert on its rows in one grouped
  product (`expert_matmul`): no expert weight is gathered per token, and training and inference
  share the path (the retrospective's OOM came from an inference path that ran every expert).
- Apart, imported on use: the fast paths (kernels.py) and the batch-invariant mode (invariant.py),
  reached through `fast_path` as a model's `Kernels` says; argument checks (checks.py); the
  checkpoint files' plumbing (hf_checkpoint.py).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Configuration

YARN_ROPE = {  # GPT-OSS's rope_parameters (SPEC 1)
    "rope_type": "yarn",
    "rope_theta": 150000.0,
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "original_max_position_embeddings": 4096,
    "truncate": False,  # GPT-OSS does NOT round the YaRN ramp bounds
}


@dataclass
class ModelConfig:
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880  # per expert; the fused gate_up projection is twice as wide
    num_hidden_layers: int = 24
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    num_local_experts: int = 32
    num_experts_per_tok: int = 4
    sliding_window: int = 128
    layer_types: list[str] | None = None  # default: sliding on even layers, full on odd
    rope_parameters: dict = field(default_factory=lambda: dict(YARN_ROPE))
    rms_norm_eps: float = 1e-5
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    attention_bias: bool = True
    initializer_range: float = 0.02
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = [
                "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(self.num_hidden_layers)
            ]
        self.layer_types = list(self.layer_types)
        self.rope_parameters = {**YARN_ROPE, **self.rope_parameters}
        self.validate()

    def validate(self):
        """Raise ValueError naming the first field that is wrong (checks.py)."""
        import checks  # argument checks live apart (not needed to read the model)

        checks.config(self)

    @classmethod
    def from_json(cls, path: str) -> "ModelConfig":
        """Read an HF config.json: `rope_parameters`, or the legacy `rope_scaling` + `rope_theta`."""
        import hf_checkpoint  # the file plumbing (not needed to read the model)

        return hf_checkpoint.read_config(path, cls)

    def to_hf_dict(self) -> dict:
        hf = asdict(self)
        hf["rope_theta"] = self.rope_parameters["rope_theta"]
        return {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", **hf}


PRESETS = {
    "gpt-oss-20b": dict(num_hidden_layers=24, num_local_experts=32),
    "gpt-oss-120b": dict(num_hidden_layers=36, num_local_experts=128),
    # CPU configurations: "tiny" for tests (seconds), "small" for benchmarks and training.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8,
                 num_experts_per_tok=2, sliding_window=8, max_position_embeddings=4096),
    "small": dict(vocab_size=2048, hidden_size=512, intermediate_size=512, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_local_experts=16,
                  num_experts_per_tok=4, sliding_window=32, max_position_embeddings=4096),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named configuration, optionally with fields overridden: preset("tiny", vocab_size=300)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------------------------
# RMSNorm and RoPE


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32, fp64 for fp64 (the float64 ground truth stays float64 throughout)."""
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * w, computed in at least fp32 (no "1 + w")."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.to(_at_least_fp32(x.dtype))
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(x32.dtype)).to(x.dtype)


def yarn_bounds(cfg: ModelConfig, truncate: bool | None = None) -> tuple[float, float]:
    """The YaRN ramp bounds in units of frequency index j (SPEC 1); rounded only if truncate."""
    rp = cfg.rope_parameters
    truncate = rp["truncate"] if truncate is None else truncate
    d, base, ctx = cfg.head_dim, rp["rope_theta"], rp["original_max_position_embeddings"]

    def dim_for(rotations):  # the frequency index that turns `rotations` times over the context
        return d / 2 * math.log(ctx / (rotations * 2 * math.pi)) / math.log(base)

    low, high = dim_for(rp["beta_fast"]), dim_for(rp["beta_slow"])
    if truncate:  # the bug vLLM and SGLang shipped: changes some frequencies by up to 76%
        low, high = math.floor(low), math.ceil(high)
    return low, high


def yarn_inv_freq(cfg: ModelConfig, truncate: bool | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) in float64 and the cos/sin concentration factor."""
    rp = cfg.rope_parameters
    d, factor = cfg.head_dim, rp["factor"]
    j = torch.arange(d // 2, dtype=torch.float64)
    inv_freq = rp["rope_theta"] ** (-2 * j / d)
    low, high = yarn_bounds(cfg, truncate)
    ramp = ((j - low) / (high - low)).clamp(0, 1)  # 0: keep (extrapolate), 1: interpolate
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    concentration = 0.1 * math.log(factor) + 1.0
    return inv_freq, concentration


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions 0 .. max_position_embeddings - 1, built once in float64 and
    cached per (device, dtype): a step only indexes them (no growth check that waits on a device)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self._tables: dict = {}  # (device, dtype) -> (cos, sin), each (max_position_embeddings, head_dim/2)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions (B, T), each in [0, max_position_embeddings) -> cos, sin (B, T, 1, head_dim/2) in `dtype`."""
        key = (positions.device, dtype)
        if key not in self._tables:
            inv_freq, concentration = yarn_inv_freq(self.cfg)
            angles = torch.arange(self.cfg.max_position_embeddings, dtype=torch.float64)[:, None] * inv_freq
            cos, sin = angles.cos() * concentration, angles.sin() * concentration  # (L, D/2)
            self._tables[key] = (cos.to(positions.device, dtype), sin.to(positions.device, dtype))
        cos, sin = self._tables[key]
        return cos[positions].unsqueeze(2), sin[positions].unsqueeze(2)


def apply_rope(x, cos, sin):
    """Half-split rotation (not interleaved). x (B, T, H, D); cos, sin (B, T, 1, D/2). Returns x's
    dtype (under autocast q, k are bf16 while the tables follow the fp32 residual stream)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Attention with sinks


BLOCK_Q = 128  # query rows per tile
BLOCK_K = 128  # keys per tile; tiles start at multiples of BLOCK_K in key index


def _check_inputs(q, k, v, sinks, causal, sliding_window, q_pos, k_pos):
    """checks.attention_inputs: the shapes and options; (q_pos, k_pos) with the defaults filled in."""
    import checks  # argument checks live apart (not needed to read the model)
    return checks.attention_inputs(q, k, v, sinks, causal, sliding_window, q_pos, k_pos)


def _visible(q_pos, k_pos, causal, sliding_window):
    """(B, Tq) and (B, Tk) positions -> (B, Tq, Tk) bool: may query i attend to key j."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    visible = kp >= 0  # a negative position is an empty cache slot
    if causal:
        visible = visible & (kp <= qp)
    if sliding_window is not None:
        visible = visible & (qp - kp < sliding_window)  # the window counts the query itself
    return visible


# --- The reference


def naive_attention(q, k, v, sinks, *, causal=True, sliding_window=None, q_pos=None, k_pos=None,
                    scale=None):
    """Attention with sinks, written the obvious way (materialises the (Tq, Tk) scores).

    q (B, Tq, Hq, D); k, v (B, Tk, Hkv, D); sinks (Hq,). Returns o (B, Tq, Hq, D) in q's dtype.
    The sink is one extra softmax column per head, dropped after the softmax. Ordinary autograd.
    """
    q_pos, k_pos = _check_inputs(q, k, v, sinks, causal, sliding_window, q_pos, k_pos)
    B, Tq, Hq, D = q.shape
    G = Hq // k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    acc = _at_least_fp32(q.dtype)
    qh = q.to(acc).transpose(1, 2)  # (B, Hq, Tq, D)
    kh = k.to(acc).transpose(1, 2).repeat_interleave(G, dim=1)  # (B, Hq, Tk, D): kv head h // G
    vh = v.to(acc).transpose(1, 2).repeat_interleave(G, dim=1)  # (B, Hq, Tk, D)
    scores = (qh @ kh.transpose(-1, -2)) * scale  # (B, Hq, Tq, Tk)
    scores = scores.masked_fill(~_visible(q_pos, k_pos, causal, sliding_window)[:, None], -math.inf)
    sink_column = sinks.to(acc).view(1, Hq, 1, 1).expand(B, Hq, Tq, 1)  # not scaled
    probs = torch.softmax(torch.cat([scores, sink_column], dim=-1), dim=-1)  # (B, Hq, Tq, Tk + 1)
    o = probs[..., :-1] @ vh  # drop the sink column: it has no value vector
    return o.transpose(1, 2).to(q.dtype)  # (B, Tq, Hq, D)


# --- Pure-PyTorch flash attention


def _tiled_layout(q, k, v, scale):
    """Cast to the accumulation dtype and stack each kv group's query heads: q -> (B, Hkv, G, Tq, D)
    already multiplied by the scale; k, v -> (B, Hkv, Tk, D) contiguous, so a key tile is a plain
    view that matmul reads without copying."""
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    acc = _at_least_fp32(q.dtype)
    qg = (q.to(acc) * scale).transpose(1, 2).reshape(B, Hkv, Hq // Hkv, Tq, D)  # head h = kv*G + g
    return qg, k.to(acc).transpose(1, 2).contiguous(), v.to(acc).transpose(1, 2).contiguous()


class FlashAttentionWithSinks(torch.autograd.Function):
    """Tiled attention with sinks: forward saves only O and lse; backward recomputes P per tile."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, q_pos, k_pos, causal, sliding_window, scale, block_q, block_k):
        B, Tq, Hq, D = q.shape
        Tk, Hkv = k.shape[1], k.shape[2]
        G = Hq // Hkv
        qg, kt, vt = _tiled_layout(q, k, v, scale)
        acc = qg.dtype
        sink = sinks.detach().to(acc).view(1, Hkv, G, 1, 1)  # per query head
        # Which key tiles each query tile visits, and which need the mask (kernels.py skips the
        # tiles wholly masked; visiting them would add exactly 0 to every row)
        schedule = fast_path("kernels").tile_schedule(q_pos, k_pos, block_q, block_k, causal, sliding_window)
        o = qg.new_empty(B, Hkv, G, Tq, D)
        lse = qg.new_empty(B, Hkv, G, Tq)
        for i, visits in schedule:
            i0, i1 = i * block_q, min((i + 1) * block_q, Tq)
            tq = i1 - i0
            q_tile = qg[:, :, :, i0:i1].reshape(B, Hkv, G * tq, D)  # rows (g, i) of one kv head
            # The sink is the first "key": running max m = sink, running sum l = exp(sink - m) = 1
            m = sink.expand(B, Hkv, G, tq, 1)
            l = torch.ones_like(m)
            o_tile = qg.new_zeros(B, Hkv, G, tq, D)
            for j, needs_mask in visits:
                j0, j1 = j * block_k, min((j + 1) * block_k, Tk)
                s = (q_tile @ kt[:, :, j0:j1].transpose(-1, -2)).view(B, Hkv, G, tq, j1 - j0)
                if needs_mask:
                    visible = _visible(q_pos[:, i0:i1], k_pos[:, j0:j1], causal, sliding_window)
                    s.masked_fill_(~visible[:, None, None], -math.inf)  # (B, 1, 1, tq, bk) broadcast
                m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))  # finite: m starts at the sink
                alpha = torch.exp(m - m_new)  # rescales what was accumulated under the old max
                p = torch.exp(s - m_new)  # masked entries become exactly 0
                l = l * alpha + p.sum(dim=-1, keepdim=True)
                pv = p.view(B, Hkv, G * tq, j1 - j0) @ vt[:, :, j0:j1]  # (B, Hkv, G*tq, D)
                o_tile = o_tile * alpha + pv.view(B, Hkv, G, tq, D)
                m = m_new
            o[:, :, :, i0:i1] = o_tile / l  # a row that saw no key keeps 0 / 1 = 0
            lse[:, :, :, i0:i1] = (m + torch.log(l)).squeeze(-1)  # includes the sink
        out = o.view(B, Hq, Tq, D).transpose(1, 2).to(q.dtype)  # (B, Tq, Hq, D)
        ctx.save_for_backward(q, k, v, sinks, q_pos, k_pos, out, lse.view(B, Hq, Tq))
        ctx.options = (causal, sliding_window, scale, block_q, block_k, schedule)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, sinks, q_pos, k_pos, out, lse = ctx.saved_tensors
        causal, sliding_window, scale, block_q, block_k, schedule = ctx.options
        B, Tq, Hq, D = q.shape
        Tk, Hkv = k.shape[1], k.shape[2]
        G = Hq // Hkv
        qg, kt, vt = _tiled_layout(q, k, v, scale)
        acc = qg.dtype
        lse = lse.view(B, Hkv, G, Tq)  # saved as (B, Hq, Tq); rows regrouped like qg
        dog = dout.to(acc).transpose(1, 2).reshape(B, Hkv, G, Tq, D)  # same row layout as qg
        og = out.to(acc).transpose(1, 2).reshape(B, Hkv, G, Tq, D)
        delta = (dog * og).sum(dim=-1)  # (B, Hkv, G, Tq): Delta_i = dO_i . O_i
        dq = torch.zeros_like(qg)  # (B, Hkv, G, Tq, D)
        dk = torch.zeros_like(kt)  # (B, Hkv, Tk, D): summed over the G query heads of the group
        dv = torch.zeros_like(vt)
        for i, visits in schedule:
            i0, i1 = i * block_q, min((i + 1) * block_q, Tq)
            tq = i1 - i0
            q_tile = qg[:, :, :, i0:i1].reshape(B, Hkv, G * tq, D)
            do_tile = dog[:, :, :, i0:i1].reshape(B, Hkv, G * tq, D)
            lse_tile = lse[:, :, :, i0:i1].reshape(B, Hkv, G * tq, 1)
            delta_tile = delta[:, :, :, i0:i1].reshape(B, Hkv, G * tq, 1)
            dq_tile = torch.zeros_like(q_tile)
            for j, needs_mask in visits:
                j0, j1 = j * block_k, min((j + 1) * block_k, Tk)
                k_tile, v_tile = kt[:, :, j0:j1], vt[:, :, j0:j1]  # (B, Hkv, bk, D)
                s = (q_tile @ k_tile.transpose(-1, -2)).view(B, Hkv, G, tq, j1 - j0)
                if needs_mask:
                    visible = _visible(q_pos[:, i0:i1], k_pos[:, j0:j1], causal, sliding_window)
                    s.masked_fill_(~visible[:, None, None], -math.inf)
                p = torch.exp(s.view(B, Hkv, G * tq, j1 - j0) - lse_tile)  # P recomputed, sink-normalised
                dv[:, :, j0:j1] += p.transpose(-1, -2) @ do_tile  # sums rows of all G heads
                dp = do_tile @ v_tile.transpose(-1, -2)  # (B, Hkv, G*tq, bk)
                ds = p * (dp - delta_tile)  # dS = P (dP - Delta), same form as without a sink
                dq_tile += ds @ k_tile
                dk[:, :, j0:j1] += ds.transpose(-1, -2) @ q_tile  # q_tile carries the scale
            dq[:, :, :, i0:i1] = dq_tile.view(B, Hkv, G, tq, D)
        dq = (dq * scale).view(B, Hq, Tq, D).transpose(1, 2)  # (B, Tq, Hq, D)
        # The sink's probability is exp(sink - lse); its gradient is -sum_i P_sink,i * Delta_i
        sink = sinks.detach().to(acc).view(1, Hkv, G, 1)
        dsinks = -(torch.exp(sink - lse) * delta).sum(dim=(0, 3)).reshape(Hq)
        return (dq.to(q.dtype), dk.transpose(1, 2).to(k.dtype), dv.transpose(1, 2).to(v.dtype),
                dsinks.to(sinks.dtype), None, None, None, None, None, None, None)


def flash_attention(q, k, v, sinks, *, causal=True, sliding_window=None, q_pos=None, k_pos=None,
                    scale=None, block_q=BLOCK_Q, block_k=BLOCK_K):
    """Pure-PyTorch flash attention with sinks (the "flash" backend); same contract as attention()."""
    q_pos, k_pos = _check_inputs(q, k, v, sinks, causal, sliding_window, q_pos, k_pos)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return FlashAttentionWithSinks.apply(q, k, v, sinks, q_pos, k_pos, causal, sliding_window,
                                         scale, block_q, block_k)


# --- Dispatch: the one door to the fast paths


@dataclass
class Kernels:
    """Which kernels a model runs on, shared by all its modules (set by Transformer.set_*)."""

    attention_backend: str | None = None  # None: attention() chooses
    batch_invariant: bool = False  # invariant.py: padded row counts, fixed attention tiles
    packed_experts: bool = False  # kernels.py: oneDNN-packed expert matrices (CPU, fp32, no grad)


def fast_path(name: str):
    """kernels.py (name "kernels") or invariant.py ("invariant"), imported on first use; an import
    statement rather than importlib, since torch.compile traces it."""
    import invariant
    import kernels
    return kernels if name == "kernels" else invariant


ATTENTION_BACKEND_VARIABLE = "GPTOSS_ATTENTION"  # the environment variable that forces a backend
BACKENDS = ("flash", "dense", "naive", "fa4", "nosink", "invariant")  # kernels.py: what each is


def attention(q, k, v, sinks, *, causal=True, sliding_window=None, q_pos=None, k_pos=None,
              scale=None, backend=None):
    """Attention with sinks. q (B, Tq, Hq, D); k, v (B, Tk, Hkv, D); sinks (Hq,) -> o (B, Tq, Hq, D).

    Key j is visible to query i iff k_pos_j >= 0 and (not causal or k_pos_j <= q_pos_i) and
    (sliding_window is None or q_pos_i - k_pos_j < sliding_window). q_pos (B, Tq) defaults to
    arange(Tk - Tq, Tk), k_pos (B, Tk) to arange(Tk); scale defaults to 1/sqrt(D).

    backend: one of BACKENDS ("nosink" is WRONG: it drops the sinks). The argument wins over the
    GPTOSS_ATTENTION environment variable; with neither, kernels.attention_backend chooses: FA4
    when the call can use it, else "dense" for small calls, else flash_attention.
    """
    _check_inputs(q, k, v, sinks, causal, sliding_window, q_pos, k_pos)  # clear errors first
    function = fast_path("kernels").attention_backend(q, k, sliding_window, q_pos, k_pos, backend)
    return function(q, k, v, sinks, causal=causal, sliding_window=sliding_window,
                    q_pos=q_pos, k_pos=k_pos, scale=scale)


class Linear(nn.Linear):
    """nn.Linear, with a multiple of 8 rows per product in the batch-invariant mode (invariant.py)."""

    def __init__(self, n_in: int, n_out: int, bias: bool, kernels: Kernels):
        super().__init__(n_in, n_out, bias=bias)
        self.kernels = kernels

    def forward(self, x):
        if self.kernels.batch_invariant:
            return fast_path("invariant").linear(super().forward, x)
        return super().forward(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, kernels: Kernels):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = Linear(cfg.hidden_size, self.n_head * self.head_dim, bias, kernels)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias, kernels)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias, kernels)
        self.o_proj = Linear(self.n_head * self.head_dim, cfg.hidden_size, bias, kernels)
        self.sinks = nn.Parameter(torch.zeros(self.n_head))  # one learned logit per query head
        sliding = cfg.layer_types[layer_idx] == "sliding_attention"
        self.sliding_window = cfg.sliding_window if sliding else None
        self.kernels = kernels  # kernels.attention_backend: None, attention() chooses

    def forward(self, x, cos, sin, positions=None, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)  # (B, T, Hq, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_pos = positions
        if cache is not None:  # the sampler's KV cache returns every key it holds for these rows
            k, v, k_pos = cache.update(self.layer_idx, k, v, positions)
        o = attention(q, k, v, self.sinks, sliding_window=self.sliding_window, q_pos=positions, k_pos=k_pos,
                      backend=self.kernels.attention_backend)
        return self.o_proj(o.reshape(B, T, self.n_head * self.head_dim))


# ----------------------------------------------------------------------------------------------
# Mixture of experts


def expert_matmul(rows, w, ends):
    """Each expert's rows times its matrix: rows (S, K) grouped by expert (expert e owns rows
    ends[e-1]:ends[e]), w (E, K, N) -> (S, N). No weight is gathered per row.

    One F.grouped_mm call for all experts (forward and backward, under autocast too: it is not on
    autocast's list, so the operands are cast here as a matmul would be). float64 (the ground
    truth) and misaligned operands, which it has no kernel for, run expert_matmul_loop."""
    device = rows.device.type
    if torch.is_autocast_enabled(device) and rows.is_floating_point():
        dtype = torch.get_autocast_dtype(device)
        rows, w = rows.to(dtype), w.to(dtype)
    if fast_path("kernels").grouped_mm_supported(rows, w):  # dtype and alignment
        return F.grouped_mm(rows, w, offs=ends.to(torch.int32))
    return expert_matmul_loop(rows, w, ends)


def expert_matmul_loop(rows, w, ends):
    """expert_matmul one expert at a time: the plain reference loop."""
    return torch.cat([x @ w[e] for e, x in _rows_by_expert(rows, ends)])


def _rows_by_expert(rows, ends):
    """(e, expert e's rows) for every expert, from rows grouped by expert and their ends (E,)."""
    return enumerate(rows.split(torch.diff(ends, prepend=ends.new_zeros(1)).tolist()))


class Experts(nn.Module):
    """E experts, each a clamped SwiGLU MLP. Weights in the HF bf16-form layout [in, out]."""

    def __init__(self, cfg: ModelConfig, kernels: Kernels | None = None):
        super().__init__()
        E, H, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, H, 2 * I))  # columns interleave gate, linear
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(E, 2 * I))
        self.down_proj = nn.Parameter(torch.empty(E, I, H))
        self.down_proj_bias = nn.Parameter(torch.zeros(E, H))
        self.limit, self.alpha = cfg.swiglu_limit, cfg.swiglu_alpha
        self.kernels = Kernels() if kernels is None else kernels

    def activation(self, h):
        """(n, 2I) -> (n, I): the clamped SwiGLU of GPT-OSS."""
        gate, lin = h[:, 0::2], h[:, 1::2]  # INTERLEAVED: even columns gate, odd columns linear
        gate = gate.clamp(max=self.limit)
        lin = lin.clamp(-self.limit, self.limit)
        return gate * torch.sigmoid(self.alpha * gate) * (lin + 1)

    def mlp(self, e: int, x):
        """Expert e on its rows x (n, H) -> (n, H): the reference for grouped_mlp's every expert at once."""
        h = x @ self.gate_up_proj[e] + self.gate_up_proj_bias[e]  # (n, 2I)
        return self.activation(h) @ self.down_proj[e] + self.down_proj_bias[e]

    def expert_matmul(self, rows, w, ends):
        """expert_matmul(rows, w, ends), or a variant from kernels.py: on oneDNN-packed matrices
        (Transformer.set_packed_experts) and, inside a torch.compile graph, as one opaque
        operator. The batch-invariant mode keeps the reference."""
        kernels = self.kernels
        if kernels.batch_invariant or not (kernels.packed_experts or torch.compiler.is_compiling()):
            return expert_matmul(rows, w, ends)
        return fast_path("kernels").expert_matmul_variant(rows, w, ends, kernels.packed_experts)

    def grouped_mlp(self, rows, expert, ends):
        """Every expert's MLP on its own rows: rows (S, H) grouped by expert, expert (S,) the
        expert of each row, ends (E,) where each expert's rows end -> (S, H)."""
        # index_select: bias[expert]'s backward (index_put_) adds with atomics, in a run-dependent order
        bias_up, bias_down = (bias.index_select(0, expert) for bias in (self.gate_up_proj_bias, self.down_proj_bias))
        h = self.expert_matmul(rows, self.gate_up_proj, ends) + bias_up  # (S, 2I)
        return self.expert_matmul(self.activation(h), self.down_proj, ends) + bias_down

    def forward(self, x, expert_idx, weights):
        """x (N, H); expert_idx, weights (N, k) -> sum_k weights * expert(x), (N, H).

        The N*k (token, expert) pairs are sorted by expert, so each expert's rows are contiguous
        and one grouped product runs every expert on its rows; the results go back to (token,
        slot) order and the k slots are summed in that fixed order."""
        N, k = expert_idx.shape
        flat = expert_idx.reshape(-1)  # (N*k,) the expert of each (token, slot) pair
        expert, order = torch.sort(flat, stable=True)  # pairs grouped by expert
        # (E,) rows per expert; not bincount, whose output size depends on the data (torch.compile)
        counts = flat.new_zeros(self.gate_up_proj.shape[0]).index_add_(0, flat, torch.ones_like(flat))
        rows = x.index_select(0, order // k)  # (N*k, H): each pair's token, in expert order (as above)
        if self.kernels.batch_invariant:  # every expert multiplies a multiple of 8 rows
            y = fast_path("invariant").padded_groups(self.grouped_mlp, rows, expert, counts)
        else:
            y = self.grouped_mlp(rows, expert, counts.cumsum(0))  # (N*k, H)
        y = y * weights.reshape(-1)[order, None].to(y.dtype)  # (N*k, H)
        y = torch.empty_like(y).index_copy(0, order, y)  # back to (token, slot) order
        return y.view(N, k, -1).sum(dim=1).to(x.dtype)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.router = Linear(cfg.hidden_size, cfg.num_local_experts, True, kernels)
        self.experts = Experts(cfg, kernels)

    def forward(self, x, routes=None, chosen=None):
        B, T, H = x.shape
        x = x.reshape(B * T, H)
        logits = self.router(x)  # (N, E)
        top_logits, top_idx = torch.topk(logits, self.top_k, dim=-1)  # top-k of the RAW logits
        if chosen is not None:  # the router's own choice, also beside a replay (the route mismatch)
            chosen.append(top_idx.view(B, T, -1))
        if routes is not None:  # replay (N, k): the current logits at those experts (a router gradient)
            top_idx, top_logits = routes, logits.gather(-1, routes)
        weights = top_logits.softmax(dim=-1)  # softmax over the k chosen only
        return self.experts(x, top_idx, weights).view(B, T, H)


# ----------------------------------------------------------------------------------------------
# The transformer


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, kernels: Kernels):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx, kernels)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg, kernels)

    def forward(self, x, cos, sin, positions=None, cache=None, routes=None, chosen=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache)
        return x + self.mlp(self.post_attention_layernorm(x), routes, chosen)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.kernels = Kernels()  # shared by every module below; see fast_path
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i, self.kernels) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, self.kernels)  # untied
        self.rope = RotaryEmbedding(cfg)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """Normal(0, initializer_range) matrices, zero biases and sinks, unit norms; the two
        residual projections scaled by 1/sqrt(2 * layers) so the residual stream stays O(1)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.dim() == 1 or name.endswith("_bias"):
                p.zero_()
            else:
                s = std / math.sqrt(2 * self.config.num_hidden_layers) if name.endswith(
                    ("o_proj.weight", "down_proj")) else std
                p.copy_(torch.randn(p.shape, generator=gen) * s)

    def set_attention_backend(self, backend: str | None):
        """Force an attention backend (one of BACKENDS; None: automatic) for this model only: a
        trainer may run "nosink" beside a sampler copy that keeps the sinks."""
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
        self.kernels.attention_backend = backend

    def set_batch_invariant(self, on: bool = True):
        """The batch-invariant mode (invariant.py): a token's log-prob gets the same bits whatever is
        computed with it, so sampler and trainer agree bit for bit. A caching sampler must keep
        keys at their positions (full caches, as sampler.py does then)."""
        self.kernels.batch_invariant = on
        self.set_attention_backend("invariant" if on else None)

    @property
    def batch_invariant(self) -> bool:
        return self.kernels.batch_invariant

    def set_packed_experts(self, on: bool = True):
        """No-grad fp32 CPU forwards on oneDNN-packed expert matrices (kernels.expert_matmul_packed:
        faster decoding, up to twice the experts' memory). The copies made so far are dropped."""
        self.kernels.packed_experts = on
        fast_path("kernels").drop_packed(self)

    def hidden(self, input_ids, positions=None, cache=None, routes=None, return_routes=False):
        """input_ids (B, T) -> the final-normed hidden states (B, T, H), before the unembedding.

        positions (B, T): absolute positions (default 0..T-1; -1: a padding slot that sees nothing
        and is seen by nothing). cache: the sampler's KV cache (sampler.KVCache.update). routes
        (B, T, layers, k), integer: every MoE layer uses these experts (replay; checks.routes_checked).
        return_routes: also return the router's own top-k, (B, T, layers, k) int64 in its order.
        """
        import checks  # argument checks live apart (not needed to read the model)

        B, T = input_ids.shape
        rope_pos = torch.arange(T, device=input_ids.device).expand(B, T) if positions is None else positions.clamp(min=0)
        routes = checks.forward_inputs(self.config, input_ids, rope_pos, routes)  # per layer: (B*T, k) or None
        x = self.embed_tokens(input_ids)  # (B, T, H)
        cos, sin = self.rope(rope_pos, x.dtype)
        chosen = [] if return_routes else None
        for layer, layer_routes in zip(self.layers, routes):
            x = layer(x, cos, sin, positions, cache, layer_routes, chosen)
        return (self.norm(x), torch.stack(chosen, dim=2)) if return_routes else self.norm(x)

    def logits(self, h):
        """Hidden states (..., H) -> logits (..., V) in fp32 (fp64 for a float64 model)."""
        logits = self.lm_head(h)
        return logits.to(_at_least_fp32(logits.dtype))

    def forward(self, input_ids, positions=None, cache=None, routes=None, return_routes=False):
        """input_ids (B, T) -> logits (B, T, V) in fp32 (fp64 for a float64 model); see hidden()."""
        out = self.hidden(input_ids, positions, cache, routes, return_routes)
        return (self.logits(out[0]), out[1]) if return_routes else self.logits(out)

    # ------------------------------------------------------------------------------------------
    # HF-format checkpoints

    def hf_state_names(self) -> dict[str, nn.Parameter]:
        """HF checkpoint name -> parameter (everything but lm_head lives under 'model.')."""
        return {(name if name.startswith("lm_head") else "model." + name): param
                for name, param in self.named_parameters()}

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.float32, device="cpu") -> "Transformer":
        """Load an HF-format directory: config.json + *.safetensors (sharded or not), experts in
        bf16 form or MXFP4. Every expected tensor must be present with its shape; nothing extra."""
        import hf_checkpoint  # the file plumbing (not needed to read the model)

        cfg = ModelConfig.from_json(os.path.join(path, "config.json"))
        with torch.device("meta"):  # no memory until each tensor is copied in
            model = cls(cfg)
        model = model.to(dtype).to_empty(device=device)
        with hf_checkpoint.CheckpointReader(path) as ckpt:
            ckpt.copy_into(model.hf_state_names())  # every name and shape checked
        return model

    def save_pretrained(self, path: str, max_shard_bytes: int = 4 << 30):
        """Write config.json and safetensors (experts in bf16 form, [in, out]) in the HF layout."""
        import hf_checkpoint  # the file plumbing (not needed to read the model)

        os.makedirs(path, exist_ok=True)
        dtype = next(self.parameters()).dtype
        with open(os.path.join(path, "config.json"), "w") as file:
            json.dump({**self.config.to_hf_dict(), "dtype": str(dtype).removeprefix("torch.")}, file, indent=2)
        tensors = {name: param.detach().contiguous().cpu() for name, param in self.hf_state_names().items()}
        hf_checkpoint.write_safetensors(tensors, path, max_shard_bytes)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens] in at least fp32. logits (B, T, V), tokens (B, T) -> (B, T)."""
    logp = torch.log_softmax(logits.to(_at_least_fp32(logits.dtype)), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of a configuration, counted on the meta device (no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(cfg).parameters())
