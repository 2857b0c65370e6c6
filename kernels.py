"""The fast paths of model.py, each a faster way to compute one of its references and tested
against it in test_kernels.py.

- dense_attention: model.naive_attention's arithmetic in one tile, the query heads of a kv group
  stacked as rows (GQA without copying K/V). attention()'s default for small calls
  (default_backend: DENSE_MAX_SCORES), where flash's per-tile bookkeeping costs more than the
  arithmetic.
- fa4_attention: the FlashAttention-4 kernel (pip package flash-attn-4: CUDA, SM90 and newer)
  with learnable sinks, and the sink gradient that releases before its sink backward lacked.
- expert_matmul_packed: model.expert_matmul on oneDNN, each expert's matrix packed once instead
  of on every product (decoding on the CPU in fp32).
- expert_matmul_op: the experts' products as one opaque operator inside a torch.compile graph.

model.py reaches this file only through model.fast_path, imported on first use.
"""

from __future__ import annotations

import logging
import math
import os

import torch
from torch.utils.weak import WeakIdKeyDictionary

import invariant
import model

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# One tile: attention for small score matrices

# Without FA4 the default runs "dense" (one tile, ordinary autograd) when the queries fit in one
# flash tile (Tq <= BLOCK_Q), no sliding window could let flash skip a key tile
# (Tk <= window + BLOCK_K) and the score tensor B * Hq * Tq * Tk has at most DENSE_MAX_SCORES
# elements (64 MiB in fp32); "flash" otherwise. Measured on CPU, dense is 1.3-2.5x faster there
# (decoding, chunked prefill, sequences up to 128 tokens: flash's per-tile bookkeeping costs
# more than the arithmetic) and flash is faster beyond (it skips masked tiles).
DENSE_MAX_SCORES = 1 << 24


def dense_attention(q, k, v, sinks, *, causal=True, sliding_window=None, q_pos=None, k_pos=None,
                    scale=None):
    """Attention with sinks with every score in one tile (the "dense" backend): the reference's
    arithmetic with the query heads of a kv group stacked as rows (GQA without copying K/V) and
    ordinary autograd. Memory grows with Tq * Tk, so attention() picks it only for small calls
    (see DENSE_MAX_SCORES). Same contract as model.attention()."""
    q_pos, k_pos = model._check_inputs(q, k, v, sinks, causal, sliding_window, q_pos, k_pos)
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qg, kt, vt = model._tiled_layout(q, k, v, scale)  # (B, Hkv, G, Tq, D) scaled; (B, Hkv, Tk, D)
    s = (qg.reshape(B, Hkv, G * Tq, D) @ kt.transpose(-1, -2)).view(B, Hkv, G, Tq, Tk)
    s = s.masked_fill(~model._visible(q_pos, k_pos, causal, sliding_window)[:, None, None], -math.inf)
    sink = sinks.to(qg.dtype).view(1, Hkv, G, 1, 1).expand(B, Hkv, G, Tq, 1)  # not scaled
    p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]  # the sink column joins, then leaves
    o = p.reshape(B, Hkv, G * Tq, Tk) @ vt  # (B, Hkv, G*Tq, D); a row that sees nothing gives 0
    return o.view(B, Hq, Tq, D).transpose(1, 2).to(q.dtype)  # (B, Tq, Hq, D)


def _dense_is_faster(q, k, sliding_window):
    """The default's choice between "dense" and "flash" (see DENSE_MAX_SCORES)."""
    (B, Tq, Hq, _), Tk = q.shape, k.shape[1]
    return (Tq <= model.BLOCK_Q and B * Hq * Tq * Tk <= DENSE_MAX_SCORES
            and (sliding_window is None or Tk <= sliding_window + model.BLOCK_K))


def default_backend(q, k, sliding_window, q_pos, k_pos) -> tuple[str, str]:
    """attention()'s backend when neither its argument nor the environment names one, and why:
    FA4 when the call can use it, else "dense" for small calls, else "flash"."""
    reason = _fa4_unsupported_reason(q, k, q_pos, k_pos)
    if reason is None:
        return "fa4", "default"
    return ("dense" if _dense_is_faster(q, k, sliding_window) else "flash"), f"default; not fa4: {reason}"


# backend -> the line logged the first time it runs
BACKEND_DESCRIPTIONS = {
    "flash": "pure-PyTorch flash attention with sinks",
    "dense": "one tile with sinks, for small score matrices",
    "naive": "reference; materialises the (Tq, Tk) scores",
    "fa4": "FlashAttention-4 kernel with learnable sinks",
    "nosink": "WRONG for GPT-OSS: sinks dropped as FlashAttention-2 did (for mismatch experiments only)",
    "invariant": "flash with tiles fixed in absolute key positions: batch-invariant mode",
}
_backends_logged = set()


def attention_backend(q, k, sliding_window, q_pos, k_pos, backend=None):
    """model.attention's dispatch: the function of `backend`, else of the GPTOSS_ATTENTION
    environment variable's backend, else of default_backend's choice. Logged once per backend."""
    variable = model.ATTENTION_BACKEND_VARIABLE
    if backend is not None:
        why = "backend argument"
    elif os.environ.get(variable, "").strip():
        backend, why = os.environ[variable].strip().lower(), f"{variable} environment variable"
    else:
        backend, why = default_backend(q, k, sliding_window, q_pos, k_pos)
    if backend not in BACKEND_DESCRIPTIONS:
        raise ValueError(f"unknown attention backend {backend!r} ({why}); choose one of {model.BACKENDS}")
    if backend not in _backends_logged:
        _backends_logged.add(backend)
        log = logger.warning if backend == "nosink" else logger.info
        log("attention backend: %s (%s) [%s]", backend, BACKEND_DESCRIPTIONS[backend], why)
    if backend == "invariant":
        return invariant.invariant_attention
    here = {"dense": dense_attention, "fa4": fa4_attention, "nosink": nosink_attention}
    return here.get(backend) or getattr(model, backend + "_attention")


# ----------------------------------------------------------------------------------------------
# The experts' product: F.grouped_mm's requirements, and the packed and compiled variants


def grouped_mm_supported(rows, w) -> bool:
    """Whether F.grouped_mm has a kernel for these operands: fp32/bf16/fp16 (not float64) and
    16-byte-aligned pointers and row strides (what its CPU and CUDA kernels require)."""
    if rows.dtype not in (torch.float32, torch.bfloat16, torch.float16) or w.dtype != rows.dtype:
        return False
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0
               and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1]) for t in (rows, w))


# ----------------------------------------------------------------------------------------------
# The retrospective's bug, on purpose


def nosink_attention(q, k, v, sinks, *, causal=True, sliding_window=None, q_pos=None, k_pos=None,
                     scale=None):
    """WRONG for GPT-OSS, on purpose: attention with the sinks dropped (a plain softmax over the
    keys), which is what FlashAttention-2 computed in the trainer while the inference engine
    honoured the sinks. Kept only to reproduce that training/inference mismatch in experiments.

    Implemented as the flash kernel with every sink at the most negative finite logit, so the sink
    gets no probability mass (exactly a plain softmax) and a row with no visible key still gives 0
    instead of NaN. `sinks` is accepted for the common signature and gets no gradient.
    """
    no_mass = torch.finfo(torch.float32).min  # exp(no_mass - m) == 0 for any finite score m
    return model.flash_attention(q, k, v, torch.full_like(sinks, no_mass, dtype=torch.float32),
                           causal=causal, sliding_window=sliding_window, q_pos=q_pos, k_pos=k_pos,
                           scale=scale)


# ----------------------------------------------------------------------------------------------
# Block sparsity: the key tiles model.flash_attention visits


def tile_schedule(q_pos, k_pos, block_q, block_k, causal, sliding_window):
    """flash_attention's schedule for (B, Tq) query and (B, Tk) key positions: _tile_schedule of
    the tiles' position bounds."""
    return _tile_schedule(_tile_bounds(q_pos, block_q), _tile_bounds(k_pos, block_k), causal, sliding_window)


def _tile_bounds(pos, block):
    """(B, T) positions -> for each tile of `block` columns, (lowest, highest, complete) over the
    batch: the extreme non-negative positions and whether no position is negative; None for a
    tile holding only negative (empty) positions. One host sync for all tiles."""
    B, T = pos.shape
    if T == 0:
        return []
    n_tiles = -(-T // block)
    padded = pos.new_full((B, n_tiles * block), -1)
    padded[:, :T] = pos
    padded = padded.view(B, n_tiles, block)  # (B, n_tiles, block)
    valid = padded >= 0
    valid[:, -1, block - (n_tiles * block - T):] = True  # the last tile's padding is not a slot
    lowest = torch.where(padded >= 0, padded, torch.iinfo(torch.int64).max).amin(dim=(0, 2))
    highest = padded.amax(dim=(0, 2))  # -1 when the tile has no valid position
    complete = valid.all(dim=2).all(dim=0)
    return [(lo, hi, full) if hi >= 0 else None
            for lo, hi, full in zip(lowest.tolist(), highest.tolist(), complete.tolist())]


def _tile_schedule(q_tiles, k_tiles, causal, sliding_window):
    """For each query tile i, the key tiles j that may hold a visible key, in ascending order, each
    with whether it needs the mask: [(i, [(j, needs_mask), ...]), ...].

    Judged from min/max positions only, so it is safe for any k_pos (a ring buffer's positions are
    unsorted) and exact for contiguous positions. A pair left out is wholly masked (visiting it
    would add exactly 0 to every row). A pair wholly inside the visible region, the bulk of a
    causal matrix, is visited without building a mask.
    """
    schedule = []
    for i, q_tile in enumerate(q_tiles):
        visits = []
        for j, k_tile in enumerate(k_tiles):
            if k_tile is None:
                continue  # only empty cache slots
            k_lo, k_hi, k_complete = k_tile
            if not causal:
                visits.append((j, not k_complete))
                continue
            if q_tile is None:
                break  # every query of the tile sits before position 0: sees nothing
            q_lo, q_hi, q_complete = q_tile
            if k_lo > q_hi:
                continue  # every key is in every query's future
            if sliding_window is not None and q_lo - k_hi >= sliding_window:
                continue  # every key has left every query's window
            inside = (q_complete and k_complete and k_hi <= q_lo
                      and (sliding_window is None or q_hi - k_lo < sliding_window))
            visits.append((j, not inside))
        schedule.append((i, visits))
    return schedule


# ----------------------------------------------------------------------------------------------
# FlashAttention-4 (flash_attn.cute, pip package flash-attn-4): CUDA, SM90 (Hopper) and newer


_fa4_import = []  # memo: [flash_attn_func or None] once the import was tried


def _import_fa4():
    """flash_attn.cute.flash_attn_func, or None when flash-attn-4 is not installed or does not import."""
    if not _fa4_import:  # try once: a failed import is not cached by Python and is slow to repeat
        try:
            from flash_attn.cute import flash_attn_func
        except Exception:  # ImportError, or a CUDA/cutlass-dsl problem raised while importing
            flash_attn_func = None
        _fa4_import.append(flash_attn_func)
    return _fa4_import[0]


def _fa4_unsupported_reason(q, k, q_pos, k_pos):
    """Why this call cannot run on FlashAttention-4, or None when it can."""
    if not q.is_cuda:
        return "q is not on a CUDA device"
    if torch.cuda.get_device_capability(q.device) < (9, 0):
        return "the GPU's compute capability is below 9.0 (FA4 needs Hopper or newer)"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"FA4 takes bf16/fp16 inputs, not {q.dtype}"
    if _import_fa4() is None:
        return "flash_attn.cute (pip install flash-attn-4) does not import"
    if q_pos is not None or k_pos is not None:
        # Explicit positions are fine when they are the defaults (one device sync to check)
        Tq, Tk = q.shape[1], k.shape[1]
        if q_pos is not None and not torch.equal(
                q_pos.to(q.device), torch.arange(Tk - Tq, Tk, device=q.device).expand_as(q_pos)):
            return "q_pos is not arange(Tk - Tq, Tk) for every row: FA4 cannot express it"
        if k_pos is not None and not torch.equal(
                k_pos.to(q.device), torch.arange(Tk, device=q.device).expand_as(k_pos)):
            return "k_pos is not arange(Tk) for every row (cache slots): FA4 cannot express it"
    return None


class _AddSinkGradient(torch.autograd.Function):
    """Identity on the attention output o; its backward adds the sink gradient
    dsink_h = -sum_{b,i} exp(sink_h - lse_i) * rowsum(dO_i * O_i), computed from FA4's lse.

    FA4 gets the sinks detached: releases before the sink backward landed return no gradient for
    them (silently), later ones would return it, and computing it here is right for both. FA4's
    dQ/dK/dV are already correct, since its lse includes the sink."""

    @staticmethod
    def forward(ctx, o, lse, sinks_used, sinks):
        ctx.save_for_backward(o, lse, sinks_used)
        ctx.sinks_dtype = sinks.dtype
        return o.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        o, lse, sinks_used = ctx.saved_tensors
        delta = (dout.float() * o.float()).sum(dim=-1).transpose(1, 2)  # (B, Hq, Tq)
        p_sink = torch.exp(sinks_used.float().view(1, -1, 1) - lse)  # (B, Hq, Tq)
        dsinks = -(p_sink * delta).sum(dim=(0, 2))
        return dout, None, None, dsinks.to(ctx.sinks_dtype)


def fa4_attention(q, k, v, sinks, *, causal=True, sliding_window=None, q_pos=None, k_pos=None,
                  scale=None):
    """The FlashAttention-4 kernel (flash_attn.cute.flash_attn_func with learnable_sink).

    Only for what FA4 can express: CUDA SM90+, bf16/fp16, the default positions (FA4 aligns a
    shorter query block to the end of the keys, as our default q_pos does; explicit positions
    equal to the defaults are accepted). The window maps to FA4's
    window_size=(left, right) = (sliding_window - 1, 0): key j visible iff i - left <= j <= i.
    The sinks are passed in bf16, the dtype every FA4 release accepts for learnable_sink.
    """
    model._check_inputs(q, k, v, sinks, causal, sliding_window, q_pos, k_pos)
    reason = _fa4_unsupported_reason(q, k, q_pos, k_pos)
    if reason is not None:
        raise RuntimeError(f"attention backend 'fa4' is unavailable for this call: {reason}")
    flash_attn_func = _import_fa4()
    window = (sliding_window - 1, 0) if sliding_window is not None else (None, None)
    sinks_used = sinks.detach().to(torch.bfloat16)
    o, lse = flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, window_size=window,
                             learnable_sink=sinks_used, return_lse=True)
    if not (torch.is_grad_enabled() and sinks.requires_grad):
        return o
    return _AddSinkGradient.apply(o, lse, sinks_used, sinks)


# ----------------------------------------------------------------------------------------------
# Packed experts: model.expert_matmul on oneDNN

# Decoding on the CPU in fp32. MKL packs a matrix into its kernel's layout on every product, and
# with a few rows per expert (decoding: batch x top-k rows spread over all experts) packing costs
# as much as the product: F.grouped_mm reaches 11 / 19 / 33 GFLOP/s at 4 / 8 / 16 rows per expert
# where oneDNN with the weights packed once reaches 25 / 41 / 63 (`python bench.py experts
# --threads 1`: 96 matrices of 512 x 1024, 201 MB, one thread, matmul peak 84). With
# Transformer.set_packed_experts (the sampler's pack_experts=True), no-grad fp32 forwards on the
# CPU multiply an expert's 3+ rows by its matrix packed for oneDNN, packed on first use and again
# after the weight changes (an in-place update bumps the tensor's _version; fused optimizers and
# writes through .data do not: call Sampler.update_weights after them). 1-2 rows stay on MKL:
# packing them gained nothing in decoding.
PACKED_MIN_ROWS = 3


def _packable(rows, w) -> bool:
    """Whether this product may use packed experts: a no-grad fp32 product on the CPU (not under
    autocast, where model.expert_matmul casts to the autocast dtype)."""
    return (not torch.is_grad_enabled() and rows.device.type == "cpu" and rows.dtype == torch.float32
            and w.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and torch.backends.mkldnn.is_available())


def expert_matmul_packed(rows, w, ends, packed: dict):
    """model.expert_matmul(rows, w, ends) on oneDNN: expert e's matrix packed once into packed[e]
    (from its linear layout [N, K]); MKL for fewer than PACKED_MIN_ROWS rows."""
    out = []
    for e, x in model._rows_by_expert(rows, ends):  # x (n_e, K)
        if len(x) >= PACKED_MIN_ROWS:
            if e not in packed:
                packed[e] = torch.ops.mkldnn._reorder_linear_weight(w[e].detach().T.contiguous())
            out.append(torch.ops.mkldnn._linear_pointwise(x, packed[e], None, "none", [], ""))
        elif len(x):
            out.append(x @ w[e])
    return torch.cat(out) if out else rows.new_empty(0, w.shape[-1])


# weight -> ((_version, data_ptr) when packed, {expert: packed matrix}). Keyed by the weight
# tensor itself, so a copied module packs its own and the entries go when the weight does.
_PACKED = WeakIdKeyDictionary()


def _packed_for(w) -> dict:
    """w's packed matrices so far, emptied when w changed since (a new _version or storage)."""
    key = (w._version, w.data_ptr())
    if _PACKED.get(w, (None,))[0] != key:
        _PACKED[w] = (key, {})
    return _PACKED[w][1]


def drop_packed(net: model.Transformer):
    """Forget the packed copies of every expert matrix of `net` (they are packed again on use)."""
    for module in net.modules():
        if isinstance(module, model.Experts):
            for w in (module.gate_up_proj, module.down_proj):
                _PACKED.pop(w, None)


def expert_matmul_fast(rows: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, pack: bool) -> torch.Tensor:
    """model.expert_matmul(rows, w, ends), on packed matrices when `pack` and the product allows it."""
    if pack and _packable(rows, w):
        return expert_matmul_packed(rows, w, ends, _packed_for(w))
    return model.expert_matmul(rows, w, ends)


# torch.compile (the sampler's compile=True) traces a decode step into one graph and fuses the
# small elementwise ops around the matrix products. The experts' products cannot be traced: they
# split their rows by counts that are data, and F.grouped_mm's shape function accepts no fp32.
# So a compiled graph calls them as one opaque operator (no autograd: for no-grad decoding).
expert_matmul_op = torch.library.custom_op("gptoss::expert_matmul", expert_matmul_fast, mutates_args=())


@expert_matmul_op.register_fake
def _(rows, w, ends, pack):
    return rows.new_empty(rows.shape[0], w.shape[-1])


def expert_matmul_variant(rows, w, ends, pack: bool):
    """Experts.expert_matmul's fast variant: inside a torch.compile graph the opaque operator,
    else expert_matmul_fast (packed matrices when `pack` and the product allows it)."""
    variant = expert_matmul_op if torch.compiler.is_compiling() else expert_matmul_fast
    return variant(rows, w, ends, pack)
