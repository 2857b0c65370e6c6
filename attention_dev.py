"""Sink-aware attention for GPT-OSS: a naive reference, a pure-PyTorch flash attention with its
own backward, and a dispatcher that uses the FlashAttention-4 kernel when it can.

Design choices:
- Layout (B, T, H, D) for q, k, v, as FlashAttention takes them; GQA: query head h reads kv head
  h // (Hq // Hkv).
- The sink is one learned logit per query head, not multiplied by the softmax scale, that joins
  the softmax as an extra column and is then dropped (it has no value vector):
  P_ij = exp(S_ij) / (exp(sink_h) + sum_j' exp(S_ij')). A row that sees no key gives output 0.
- The mask comes from positions, not indices: query i sees key j iff k_pos_j >= 0 (negative =
  empty cache slot), k_pos_j <= q_pos_i (causal) and q_pos_i - k_pos_j < window. Defaults put
  the queries at the end of the keys, so the same call serves training, prefill and decoding
  against a KV cache (including a ring buffer whose positions are not sorted).
- Flash attention = FlashAttention-2's algorithm in PyTorch ops: keys in tiles of BLOCK_K at
  fixed offsets (the same tiles in the same order whatever Tq is), queries in tiles of BLOCK_Q,
  an online softmax whose running max and sum start from the sink (m = sink, l = 1), and only
  O and the log-sum-exp saved for the backward, which recomputes P tile by tile. Extra memory
  is O(T * D) buffers plus O(BLOCK_Q * BLOCK_K) scores per head, never O(Tq * Tk).
- Tile pairs that cannot hold a visible key (all keys in the future, all out of the window, or
  all empty slots) are skipped, judged from each tile's min/max position, so a sliding-window
  layer costs O(T * window) instead of O(T^2); pairs wholly visible skip building the mask.
- GQA without repeating K/V: the G query heads of one kv head are stacked into the rows of one
  matrix (B, Hkv, G * Tq, D), so each kv head's K and V are read once per tile.
- Precision: scores, softmax statistics and P @ V accumulate in fp32 (fp64 for fp64 inputs);
  bf16 inputs are upcast once (O(T * D) memory) as the GPU kernels upcast in registers.
- Backends: "flash" (above), "naive" (the reference), "fa4" (flash_attn.cute, CUDA SM90+), and
  "nosink", which drops the sinks as FlashAttention-2 did and is WRONG for GPT-OSS: it exists to
  reproduce the training/inference mismatch. Pick one with backend= or GPTOSS_ATTENTION.
"""

import logging
import math
import os

import torch

logger = logging.getLogger(__name__)

BLOCK_Q = 128  # query rows per tile
BLOCK_K = 128  # keys per tile; tiles start at multiples of BLOCK_K in key index
BACKENDS = ("flash", "naive", "fa4", "nosink")
ENV_BACKEND = "GPTOSS_ATTENTION"  # environment variable that forces a backend


# ----------------------------------------------------------------------------------------------
# Shared helpers: argument checks, default positions, the visibility rule


def _accumulation_dtype(dtype):
    # fp64 inputs keep fp64 (gradcheck needs it); everything else accumulates in fp32
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_inputs(q, k, v, sinks, causal, sliding_window, q_pos, k_pos):
    """Validate shapes and options; return (q_pos, k_pos) with the defaults filled in."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be (B, T, H, D); got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}; got {tuple(v.shape)}")
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch or head_dim")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one float dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if sinks.shape != (Hq,):
        raise ValueError(f"sinks must be (num_query_heads,) = ({Hq},); got {tuple(sinks.shape)}")
    if sliding_window is not None:
        if not causal:
            raise ValueError("sliding_window requires causal=True")
        if sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 (or None for full attention); got {sliding_window}")
    # Default: the queries are the last Tq of the Tk keys (a prefix of Tk - Tq keys is cached)
    if q_pos is None:
        q_pos = torch.arange(Tk - Tq, Tk, device=q.device).expand(B, Tq)
    if k_pos is None:
        k_pos = torch.arange(Tk, device=q.device).expand(B, Tk)
    checked = []
    for name, pos, T in (("q_pos", q_pos, Tq), ("k_pos", k_pos, Tk)):
        if pos.shape == (T,):
            pos = pos.expand(B, T)  # one set of positions shared by every row
        if pos.shape != (B, T) or pos.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be an integer tensor of shape ({B}, {T}) or ({T},); "
                             f"got {pos.dtype} {tuple(pos.shape)}")
        checked.append(pos.to(device=q.device, dtype=torch.int64))
    return checked


def _visible(q_pos, k_pos, causal, sliding_window):
    """(B, Tq) and (B, Tk) positions -> (B, Tq, Tk) bool: may query i attend to key j."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    visible = kp >= 0  # a negative position is an empty cache slot
    if causal:
        visible = visible & (kp <= qp)
    if sliding_window is not None:
        visible = visible & (qp - kp < sliding_window)  # the window counts the query itself
    return visible


# ----------------------------------------------------------------------------------------------
# The reference


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
    acc = _accumulation_dtype(q.dtype)
    qh = q.to(acc).transpose(1, 2)  # (B, Hq, Tq, D)
    kh = k.to(acc).transpose(1, 2).repeat_interleave(G, dim=1)  # (B, Hq, Tk, D): kv head h // G
    vh = v.to(acc).transpose(1, 2).repeat_interleave(G, dim=1)  # (B, Hq, Tk, D)
    scores = (qh @ kh.transpose(-1, -2)) * scale  # (B, Hq, Tq, Tk)
    scores = scores.masked_fill(~_visible(q_pos, k_pos, causal, sliding_window)[:, None], -math.inf)
    sink_column = sinks.to(acc).view(1, Hq, 1, 1).expand(B, Hq, Tq, 1)  # not scaled
    probs = torch.softmax(torch.cat([scores, sink_column], dim=-1), dim=-1)  # (B, Hq, Tq, Tk + 1)
    o = probs[..., :-1] @ vh  # drop the sink column: it has no value vector
    return o.transpose(1, 2).to(q.dtype)  # (B, Tq, Hq, D)


# ----------------------------------------------------------------------------------------------
# Pure-PyTorch flash attention


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


def _tiled_layout(q, k, v, scale):
    """Cast to the accumulation dtype and stack each kv group's query heads: q -> (B, Hkv, G, Tq, D)
    already multiplied by the scale; k, v -> (B, Hkv, Tk, D) contiguous, so a key tile is a plain
    view that matmul reads without copying."""
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    acc = _accumulation_dtype(q.dtype)
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
        schedule = _tile_schedule(_tile_bounds(q_pos, block_q), _tile_bounds(k_pos, block_k),
                                  causal, sliding_window)
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
    return flash_attention(q, k, v, torch.full_like(sinks, no_mass, dtype=torch.float32),
                           causal=causal, sliding_window=sliding_window, q_pos=q_pos, k_pos=k_pos,
                           scale=scale)


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
        B, Tq, Tk = q.shape[0], q.shape[1], k.shape[1]
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
    _check_inputs(q, k, v, sinks, causal, sliding_window, q_pos, k_pos)
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
# Dispatch

_BACKEND_FUNCTIONS = {"flash": flash_attention, "naive": naive_attention, "fa4": fa4_attention,
                      "nosink": nosink_attention}
_BACKEND_LOG_LINES = {
    "flash": "attention backend: flash (pure-PyTorch flash attention with sinks)",
    "naive": "attention backend: naive (reference; materialises the (Tq, Tk) scores)",
    "fa4": "attention backend: fa4 (FlashAttention-4 kernel with learnable sinks)",
    "nosink": "attention backend: nosink -- WRONG for GPT-OSS: sinks dropped as FlashAttention-2 "
              "did (for mismatch experiments only)",
}
_backends_logged = set()


def _log_backend_once(backend, why):
    if backend in _backends_logged:
        return
    _backends_logged.add(backend)
    log = logger.warning if backend == "nosink" else logger.info
    log("%s [%s]", _BACKEND_LOG_LINES[backend], why)


def attention(q, k, v, sinks, *, causal=True, sliding_window=None, q_pos=None, k_pos=None,
              scale=None, backend=None):
    """Attention with sinks. q (B, Tq, Hq, D); k, v (B, Tk, Hkv, D); sinks (Hq,) -> o (B, Tq, Hq, D).

    Key j is visible to query i iff k_pos_j >= 0 and (not causal or k_pos_j <= q_pos_i) and
    (sliding_window is None or q_pos_i - k_pos_j < sliding_window). q_pos (B, Tq) defaults to
    arange(Tk - Tq, Tk), k_pos (B, Tk) to arange(Tk); scale defaults to 1/sqrt(D).

    backend: "flash", "naive", "fa4" or "nosink" (WRONG: drops the sinks). The argument wins over
    the GPTOSS_ATTENTION environment variable; with neither, FA4 runs when the call can use it
    and the pure-PyTorch flash attention otherwise.
    """
    _check_inputs(q, k, v, sinks, causal, sliding_window, q_pos, k_pos)  # clear errors first
    if backend is not None:
        why = "backend argument"
    elif os.environ.get(ENV_BACKEND, "").strip():
        backend, why = os.environ[ENV_BACKEND].strip().lower(), f"{ENV_BACKEND} environment variable"
    else:
        reason = _fa4_unsupported_reason(q, k, q_pos, k_pos)
        backend = "fa4" if reason is None else "flash"
        why = "default" if reason is None else f"default; not fa4: {reason}"
    if backend not in _BACKEND_FUNCTIONS:
        raise ValueError(f"unknown attention backend {backend!r} ({why}); choose one of {BACKENDS}")
    _log_backend_once(backend, why)
    return _BACKEND_FUNCTIONS[backend](q, k, v, sinks, causal=causal, sliding_window=sliding_window,
                                       q_pos=q_pos, k_pos=k_pos, scale=scale)


# ----------------------------------------------------------------------------------------------
# Benchmark: python attention_dev.py [T]  (peak memory and time of forward + backward, flash vs naive;
# Linux only: it reads /proc/self/status)


def _rss_mib(field):
    """VmRSS (resident now) or VmHWM (peak resident) of this process, in MiB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _measure_in_this_process(backend, T):
    """Forward + backward of one backend at B=1, Hq=8, Hkv=2, D=64, fp32 (causal); returns the
    peak resident memory during the call minus the resident memory before it (MiB), and seconds."""
    import time
    torch.manual_seed(0)
    q = torch.randn(1, T, 8, 64, requires_grad=True)
    k = torch.randn(1, T, 2, 64, requires_grad=True)
    v = torch.randn(1, T, 2, 64, requires_grad=True)
    sinks = torch.randn(8, requires_grad=True)
    warm = [t[:, :256].detach().requires_grad_() for t in (q, k, v)]
    attention(*warm, sinks.detach(), backend=backend).sum().backward()  # first-call costs, not counted
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current RSS, forgetting the import's peak
    rss_before = _rss_mib("VmRSS")
    start = time.perf_counter()
    attention(q, k, v, sinks, backend=backend).sum().backward()
    seconds = time.perf_counter() - start
    return _rss_mib("VmHWM") - rss_before, seconds


def _benchmark(T):
    import subprocess
    import sys
    print(f"causal attention forward + backward, B=1 T={T} Hq=8 Hkv=2 D=64 fp32, "
          f"{torch.get_num_threads()} threads; each backend in a fresh process")
    results = {}
    for backend in ("flash", "naive"):
        # A fresh process per backend: ru_maxrss never goes down, so runs must not share one
        code = (f"import attention_dev as a; m, s = a._measure_in_this_process({backend!r}, {T}); "
                f"print(m, s)")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)))
        if done.returncode != 0:
            print(f"{backend:>6}: failed (exit {done.returncode}): {done.stderr.strip()[-300:]}")
            continue
        results[backend] = tuple(float(x) for x in done.stdout.split())
        print(f"{backend:>6}: peak extra memory {results[backend][0]:9.1f} MiB   "
              f"time {results[backend][1]:7.2f} s")
    if len(results) == 2:
        print(f"naive / flash: memory {results['naive'][0] / max(results['flash'][0], 1e-9):.1f}x, "
              f"time {results['naive'][1] / results['flash'][1]:.2f}x")


if __name__ == "__main__":
    import sys
    _benchmark(int(sys.argv[1]) if len(sys.argv) > 1 else 8192)
