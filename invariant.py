"""The batch-invariant mode (Transformer.set_batch_invariant): a token's log-prob gets the same
bits whatever else is computed with it (rows in the batch, cached positions, prefill or decode),
so a sampler and a trainer running one model agree bit for bit (test_invariant.py).

- linear and padded_groups: every matrix product (the projections, the router, the unembedding,
  each expert's products) has a multiple of MIN_ROWS rows; zero rows are appended, their results
  dropped.
- invariant_attention: model.flash_attention with its key tiles fixed in absolute positions and
  its query tiles padded to a multiple of MIN_ROWS rows.

model.py reaches this file only through model.fast_path, imported on first use.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import model

# On this CPU (torch 2.13, MKL) a matrix product with fewer than 4 rows runs another kernel, and
# the last bits of each row change (measured: F.linear, matmul, F.grouped_mm per group). With
# several threads MKL splits the rows into blocks of 8, so 9 rows on 2 threads give one thread a
# single row and that kernel again. A row count that is a multiple of MIN_ROWS = 8 avoids both:
# each row then has the same bits whatever the number of rows (measured for 8..4096 rows on 1
# and 2 threads). The batch-invariant mode pads every product to such a count. Row-wise
# reductions (RMSNorm, softmax, log_softmax, sums over the last dim) were measured to be
# row-count invariant already and need nothing.
MIN_ROWS = 8


def _padded_rows(n: int, multiple: int) -> int:
    """The smallest positive multiple of `multiple` >= n."""
    return max(multiple, -(-n // multiple) * multiple)


def linear(forward, x):
    """forward(x) for a row-wise product (an nn.Linear's forward) on x (..., K), computed as one
    2-D product whose row count is a positive multiple of MIN_ROWS (zero rows appended, their
    results dropped)."""
    lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
    n = x2.shape[0]
    pad = _padded_rows(n, MIN_ROWS) - n
    if pad:
        x2 = torch.cat([x2, x2.new_zeros(pad, x2.shape[1])])
    return forward(x2)[:n].reshape(*lead, -1)


def _pad_groups(rows, expert, counts, multiple):
    """Rows grouped by expert (expert (S,) of each row, counts (E,)) -> each non-empty group
    zero-padded to a multiple of `multiple` rows: (padded rows, padded counts, the expert of each
    padded row, the index of each original row in the padded tensor)."""
    padded = (counts + multiple - 1) // multiple * multiple  # empty groups stay empty
    start, padded_start = counts.cumsum(0) - counts, padded.cumsum(0) - padded  # (E,) group starts
    keep = torch.arange(rows.shape[0], device=rows.device) + (padded_start - start)[expert]
    out = rows.new_zeros(int(padded.sum()), rows.shape[1]).index_copy(0, keep, rows)
    experts = torch.arange(len(counts), device=rows.device)
    return out, padded, torch.repeat_interleave(experts, padded), keep


def padded_groups(grouped_mlp, rows, expert, counts):
    """grouped_mlp(rows, expert, ends) (Experts.grouped_mlp) with every expert's group of rows
    padded to a multiple of MIN_ROWS rows; returns the real rows' results, in expert order."""
    rows, counts, expert, keep = _pad_groups(rows, expert, counts, MIN_ROWS)
    return grouped_mlp(rows, expert, counts.cumsum(0))[keep]


def invariant_attention(q, k, v, sinks, *, causal=True, sliding_window=None, q_pos=None, k_pos=None,
                        scale=None):
    """The "invariant" backend: the flash algorithm arranged so that a query's output has the same
    bits whether it comes from the trainer's full sequence, a prefill chunk or one decode step
    against a cache, in a batch of any size. Same contract as model.attention().

    - Key tiles in absolute positions: key index j must hold position j (or be empty, k_pos < 0),
      as in the trainer's sequences and the sampler's full caches (not a ring buffer), and the keys
      are zero-padded to whole BLOCK_K tiles. Every p @ v then sums the same BLOCK_K products in
      the same order for a query, whoever calls.
    - Every query tile has a multiple of MIN_ROWS rows (queries at position -1, which see
      nothing, fill the last one up): otherwise the CPU matmul kernel changes (see MIN_ROWS).
    - Which tiles a call visits does not matter: a tile wholly masked for a query leaves its
      running max, sum and output exactly as they were (alpha = exp(0) = 1, p = 0).
    Cost: up to BLOCK_K - 1 padded keys per call (decoding pays the most) and a host sync for the
    position check; the backward is flash's."""
    q_pos, k_pos = model._check_inputs(q, k, v, sinks, causal, sliding_window, q_pos, k_pos)
    B, Tq, Hq, D = q.shape
    Tk, G = k.shape[1], Hq // k.shape[2]
    index = torch.arange(Tk, device=k.device)
    if not ((k_pos == index) | (k_pos < 0)).all():
        raise ValueError("invariant attention needs each key at the index of its position (key j at "
                         "position j, or an empty slot): a full cache, not a ring buffer")
    last = Tq % model.BLOCK_Q or model.BLOCK_Q  # queries in the last tile; a tile has G rows per query
    pad_q = -(-_padded_rows(G * last, MIN_ROWS) // G) - last
    pad_k = -Tk % model.BLOCK_K
    q = F.pad(q, (0, 0, 0, 0, 0, pad_q))
    k, v = F.pad(k, (0, 0, 0, 0, 0, pad_k)), F.pad(v, (0, 0, 0, 0, 0, pad_k))
    q_pos, k_pos = F.pad(q_pos, (0, pad_q), value=-1), F.pad(k_pos, (0, pad_k), value=-1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = model.FlashAttentionWithSinks.apply(q, k, v, sinks, q_pos, k_pos, causal, sliding_window,
                                              scale, model.BLOCK_Q, model.BLOCK_K)
    return out[:, :Tq]
