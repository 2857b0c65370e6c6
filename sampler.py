"""KV-cached sampler for GPT-OSS: batched prefill and decode, behaviour log-probs, multi-turn.

One-shot, vLLM-shaped:

    s = Sampler(model)                        # shares `model`; Sampler(model, dtype=torch.bfloat16) copies it
    outs = s.generate(prompts, max_new_tokens=128, temperature=1.0, top_p=1.0, top_k=0,
                      stop_tokens=[200002, 200012, 200007], seed=0)
    outs[i].tokens, outs[i].logprobs, outs[i].raw_logprobs, outs[i].finish_reason  # "stop" | "length"

Multi-turn, batched (the RL loop runs B episodes at once):

    sess = s.session(prompts, max_len=4096)   # allocates the cache for len(prompts) rows
    turn = sess.generate(max_new_tokens=256, temperature=1.0, stop_tokens=STOP, seed=0)
        # {row: Completion} for every row that was ready; all of them are paused afterwards
    sess.append({0: tool_reply, 3: tool_reply})  # rows 0 and 3 are ready again; the others stay paused
    sess.finish([1, 2])                        # optional: rows 1 and 2 may never continue
    turn = sess.generate(max_new_tokens=256, ...)  # runs rows 0 and 3 only, without recomputing a prefix
    traj = sess.trajectory(0)  # .tokens = prompt + generated + appended, .mask (1 = generated),
                               # .logprobs / .raw_logprobs (behaviour log-prob; 0.0 where mask is 0)

Design choices:

- Log-probs. `.logprobs` is each sampled token's log-prob under the distribution it was actually
  drawn from: logits / temperature, then top-k, then top-p, renormalised over the survivors
  (vLLM's "processed_logprobs"). This is pi_rollout for rollout correction. Greedy
  (temperature 0) draws from a point mass, so its `.logprobs` are 0.0. `.raw_logprobs` is the
  log-softmax of the raw logits (temperature 1, no filter: vLLM's default "raw_logprobs" and what
  the trainer computes with model.token_logprobs). At temperature 1 without top-k/top-p the two
  are the same numbers. Both in fp32 (fp64 for a float64 model), as the model's logits.
- Cache (KVCache). Full-attention layers: K/V (rows, max_len, Hkv, D) preallocated, slot index =
  absolute position. Sliding-window layers: a ring buffer (rows, W, Hkv, D), position p in slot
  p % W, so it always holds the last W positions. One position tensor per kind (every layer of
  a kind stores the same positions); -1 marks an empty slot, which `attention`'s mask never
  shows. Rows have their own lengths: nothing assumes rows sit at the same position.
  In the batch-invariant mode (model.set_batch_invariant) every layer gets a full cache: the
  "invariant" attention needs keys at the index of their position (costs W -> max_len slots).
- Capacity: session(prompts, max_len) preallocates max_len slots per row (prompt + generated +
  appended tokens). generate() raises ValueError before doing any work when a ready row's tokens
  + max_new_tokens would exceed it, append() when the appended tokens would; Sampler.generate
  sizes it exactly (longest prompt + max_new_tokens). Memory per row: full layers x max_len x
  2 x Hkv x D plus sliding layers x W x 2 x Hkv x D elements in the sampler's dtype.
- Chunks (prefill, and appended environment tokens) run as one forward: rows right-padded,
  pads at position -1 (they see nothing, are seen by nothing, and are never written). A ring
  layer returns cat(ring contents before the chunk, the chunk) with their positions, so a chunk
  longer than the window still sees the keys before it, and then stores only each row's last W
  positions. Full layers write the chunk first and return the cache up to the longest row.
- Decode: one token per active row per step, one model forward for the whole active batch.
  Active rows are kept in cache rows [0, n) by swapping rows (cache included) when the active
  set changes, so each step works on a contiguous prefix of the cache through views: no
  gather per step, and finished rows cost no compute. Stop tokens cost one host sync per step
  (a `nonzero` on the sampled tokens); no stop tokens, no sync from the sampler.
- Sampling is vectorised over rows: one sort for top-k/top-p (topk alone when only top-k), and
  the exponential race argmax(logp - log E), E ~ Exp(1) drawn from the call's torch.Generator
  (the Gumbel-max trick: exact, no normalisation, no sync). Same seed, same prompts: same tokens
  (a row's draws depend on which rows are active, so not on the seed alone).
- Forward: Transformer.hidden (the trainer's embedding, Blocks, `attention` and final norm, with
  the cache hook) then Transformer.logits on the one position per row it samples from: a B x T
  prefill would otherwise materialise B x T x V fp32 logits (V = 201088 for gpt-oss).
- Weights and dtype: with the model's dtype and device the sampler shares the module (nothing to
  refresh). With another dtype/device (a bf16 sampler beside an fp32 trainer) it holds its own
  copy; update_weights(model or state_dict) copy_s into it in place, no reallocation.
- Multi-turn: a row's last sampled token (e.g. <|call|>) has not been through the model when
  the turn ends; append() queues it with the environment's tokens and the next generate() feeds
  them as one chunk. Appended tokens get mask 0 and no log-prob.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field

import torch

import model as M

READY, PAUSED, DONE = "ready", "paused", "done"  # row states in a Session


@dataclass
class Completion:
    """One row's tokens from one turn (or one generate call)."""
    tokens: list[int]
    logprobs: list[float]  # under the distribution sampled from (after temperature/top-k/top-p)
    raw_logprobs: list[float]  # log_softmax of the raw logits (vLLM's default)
    finish_reason: str  # "stop" (ended on a stop token, which is included) or "length"


@dataclass
class Trajectory:
    """A row's whole sequence: what the trainer needs."""
    tokens: list[int]  # prompt + generated + appended, in order
    mask: list[int]  # 1 = generated by the sampler, 0 = prompt or appended
    logprobs: list[float]  # behaviour log-prob where mask is 1, else 0.0
    raw_logprobs: list[float]
    prompt_len: int = 0
    finish_reasons: list[str] = field(default_factory=list)  # one per turn


# ----------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated K/V for `rows` rows: full layers (rows, max_len, Hkv, D) with slot = position,
    sliding layers a ring (rows, W, Hkv, D) with slot = position % W. The sampler sets a plan
    (plan_decode / plan_chunk) before each forward; Attention calls update() once per layer."""

    def __init__(self, cfg: M.ModelConfig, rows: int, max_len: int, dtype, device, ring: bool = True):
        # ring=False (the batch-invariant mode): sliding layers get full caches too, so every key
        # sits at the index of its position (the window is still applied by attention's mask)
        self.sliding = [ring and t == "sliding_attention" for t in cfg.layer_types]
        self.max_len = max_len
        self.ring = min(cfg.sliding_window, max_len) if any(self.sliding) else 1
        shape = (rows, cfg.num_key_value_heads, cfg.head_dim)
        self.k = [torch.zeros(shape[0], self.ring if s else max_len, *shape[1:], dtype=dtype, device=device)
                  for s in self.sliding]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.pos_full = torch.full((rows, max_len), -1, dtype=torch.long, device=device)
        self.pos_ring = torch.full((rows, self.ring), -1, dtype=torch.long, device=device)
        self.lens = torch.zeros(rows, dtype=torch.long, device=device)  # tokens stored per row
        self.arange = torch.arange(rows, device=device)
        self.plan = None

    def swap(self, a: list[int], b: list[int]):
        """Exchange rows a[i] <-> b[i] of every tensor (the active set moves to the front)."""
        dst = torch.tensor(a + b, device=self.lens.device)
        src = torch.tensor(b + a, device=self.lens.device)
        for t in (*self.k, *self.v, self.pos_full, self.pos_ring, self.lens):
            t.index_copy_(0, dst, t.index_select(0, src))

    def plan_decode(self, n: int, view: int) -> torch.Tensor:
        """Rows [0, n) each feed one token at position lens[row]; returns positions (n, 1)."""
        pos = self.lens[:n].clone()  # (n,)
        rows = self.arange[:n]
        full_idx = rows * self.max_len + pos  # flat slot in (rows, max_len)
        ring_idx = rows * self.ring + pos % self.ring
        self.pos_full.view(-1).index_copy_(0, full_idx, pos)
        self.pos_ring.view(-1).index_copy_(0, ring_idx, pos)
        self.plan = ("decode", n, view, full_idx, ring_idx)
        return pos[:, None]

    def plan_chunk(self, n: int, chunk_lens: torch.Tensor) -> torch.Tensor:
        """Rows [0, n) each feed chunk_lens[i] >= 1 tokens (right-padded to T); returns positions
        (n, T) with -1 on pads. Builds the write indices once for all layers."""
        device = self.lens.device
        T = int(chunk_lens.max())
        start = self.lens[:n]  # (n,)
        cols = torch.arange(T, device=device)
        valid = cols < chunk_lens[:, None]  # (n, T)
        positions = torch.where(valid, start[:, None] + cols, -1)  # (n, T)
        end = start + chunk_lens  # (n,) lengths after the chunk
        r, c = valid.nonzero(as_tuple=True)  # every real token
        full_dst, full_src = r * self.max_len + positions[r, c], r * T + c
        keep = valid & (positions >= (end - self.ring)[:, None])  # each row's last `ring` positions
        rr, rc = keep.nonzero(as_tuple=True)
        ring_dst, ring_src = rr * self.ring + positions[rr, rc] % self.ring, rr * T + rc
        ring_kpos = torch.cat([self.pos_ring[:n], positions], dim=1)  # (n, ring + T): before the chunk
        self.pos_full.view(-1).index_copy_(0, full_dst, positions[r, c])
        self.pos_ring.view(-1).index_copy_(0, ring_dst, positions[rr, rc])
        view = int(end.max())
        self.plan = ("chunk", n, view, full_dst, full_src, ring_dst, ring_src, ring_kpos)
        self.lens[:n] = end
        return positions

    def update(self, layer: int, k, v, positions):
        """Store the new keys k, v (n, T, Hkv, D) of `layer`; return (k, v, k_pos) for every key
        rows [0, n) may attend to (the mask in `attention` sorts out visibility)."""
        kc, vc = self.k[layer], self.v[layer]
        n, L = kc.shape[0], kc.shape[1]
        flat_k, flat_v = kc.view(n * L, *kc.shape[2:]), vc.view(n * L, *vc.shape[2:])
        mode, rows, view = self.plan[:3]
        if mode == "decode":
            idx = self.plan[4] if self.sliding[layer] else self.plan[3]
            flat_k.index_copy_(0, idx, k[:, 0])
            flat_v.index_copy_(0, idx, v[:, 0])
            if self.sliding[layer]:
                return kc[:rows], vc[:rows], self.pos_ring[:rows]
            return kc[:rows, :view], vc[:rows, :view], self.pos_full[:rows, :view]
        _, _, _, full_dst, full_src, ring_dst, ring_src, ring_kpos = self.plan
        k_rows, v_rows = k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:])  # (n * T, Hkv, D)
        if self.sliding[layer]:
            k_all = torch.cat([kc[:rows], k], dim=1)  # (n, ring + T, Hkv, D): before the chunk + chunk
            v_all = torch.cat([vc[:rows], v], dim=1)
            flat_k.index_copy_(0, ring_dst, k_rows.index_select(0, ring_src))
            flat_v.index_copy_(0, ring_dst, v_rows.index_select(0, ring_src))
            return k_all, v_all, ring_kpos
        flat_k.index_copy_(0, full_dst, k_rows.index_select(0, full_src))
        flat_v.index_copy_(0, full_dst, v_rows.index_select(0, full_src))
        return kc[:rows, :view], vc[:rows, :view], self.pos_full[:rows, :view]


# ----------------------------------------------------------------------------------------------
# Sampling


def check_sampling(temperature, top_p, top_k, max_new_tokens=1):
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None):
    """logits (n, V) fp32 -> tokens (n,), logprobs (n,) under the distribution sampled from
    (temperature, then top-k, then top-p, renormalised), raw_logprobs (n,) = log_softmax(logits)."""
    raw = torch.log_softmax(logits, dim=-1)  # (n, V)
    if temperature == 0:  # greedy: a point mass, log-prob 0
        tokens = logits.argmax(dim=-1)
        return tokens, torch.zeros_like(tokens, dtype=raw.dtype), raw.gather(-1, tokens[:, None])[:, 0]
    V = logits.shape[-1]
    top_k = 0 if top_k >= V else top_k
    x = logits / temperature if temperature != 1 else logits
    idx = None
    if top_p < 1:  # one descending sort serves top-k and top-p
        x, idx = x.sort(dim=-1, descending=True)
        if top_k:
            x = x[:, :top_k]
            idx = idx[:, :top_k]
        p = torch.softmax(x, dim=-1)
        before = p.cumsum(dim=-1) - p  # mass strictly above each token: the first is always kept
        x = x.masked_fill(before >= top_p, -math.inf)
    elif top_k:
        x, idx = x.topk(top_k, dim=-1)  # (n, k), descending
    logp = torch.log_softmax(x, dim=-1)  # (n, V) or (n, k): the distribution actually sampled
    e = torch.empty_like(logp).exponential_(generator=generator).clamp_(min=1e-30)
    choice = (logp - e.log()).argmax(dim=-1)  # exponential race == sampling from softmax(logp)
    chosen_logp = logp.gather(-1, choice[:, None])[:, 0]
    tokens = choice if idx is None else idx.gather(-1, choice[:, None])[:, 0]
    return tokens, chosen_logp, raw.gather(-1, tokens[:, None])[:, 0]


# ----------------------------------------------------------------------------------------------
# Sampler and Session


class Sampler:
    """Wraps a Transformer for generation. dtype/device default to the model's (module shared);
    any other dtype/device gives the sampler its own copy (refresh it with update_weights).
    batch_invariant: None follows the model's flag (Transformer.set_batch_invariant); True/False
    sets it on the sampler's model. In that mode the caches are full (no ring buffer) and the
    log-probs equal a same-dtype trainer's full-sequence log-probs bit for bit.
    pack_experts: fp32 on the CPU, multiply by expert matrices packed once for oneDNN (1.4x faster
    decoding at batch 32 on the "small" preset, slower for small matrices such as the "tiny"
    preset's; Transformer.set_packed_experts). A shared model changed by a fused optimizer or
    through .data needs update_weights(model) afterwards.
    compile: run the decode steps through torch.compile (one graph for every batch size and
    length; the first generate compiles it, 20-45 s on this CPU), which fuses the small ops
    between the matrix products: 1.1-1.2x faster decoding at batch 8-32 on the "small" preset,
    nothing at batch 1. Its kernels round differently from the eager ones (fp32 log-probs within
    1e-5; in bf16 greedy rows may part after a few tokens), so not with batch_invariant."""

    def __init__(self, model: M.Transformer, dtype: torch.dtype | None = None, device=None,
                 batch_invariant: bool | None = None, pack_experts: bool = False, compile: bool = False):
        on = model.batch_invariant if batch_invariant is None else batch_invariant
        if compile and on:  # before anything changes a shared model
            raise ValueError("compile=True cannot keep the batch-invariant mode's bits: compiled "
                             "kernels fuse and round differently from the trainer's eager ones")
        p0 = next(model.parameters())
        self.pack_experts = pack_experts
        self.dtype = dtype or p0.dtype
        self.device = torch.device(device) if device is not None else p0.device
        if self.dtype == p0.dtype and self.device == p0.device:
            self.model, self.shared = model, True
        else:
            with torch.device("meta"):
                copy = type(model)(model.config)
            self.model, self.shared = copy.to(self.dtype).to_empty(device=self.device), False
            self.model.requires_grad_(False)
            self.update_weights(model)
        if pack_experts:
            self.model.set_packed_experts(True)
        if on != self.model.batch_invariant:  # a shared module changes for its trainer too
            self.model.set_batch_invariant(on)
        self.config = model.config
        # dynamic: the rows and the cache length change from step to step, one graph serves all
        self.decode_hidden = torch.compile(self.model.hidden, dynamic=True) if compile else self.model.hidden

    @torch.no_grad()
    def update_weights(self, source):
        """Copy a module's (or a state_dict's) parameters into the sampler's, converting dtype in
        place. When the sampler shares `source` itself, only drops the packed experts (a weight
        changed in place without a new _version would leave them stale)."""
        if source is self.model:
            if self.pack_experts:
                self.model.set_packed_experts(True)
            return
        state = source.state_dict() if isinstance(source, torch.nn.Module) else source
        params = dict(self.model.named_parameters())
        missing = sorted(set(params) - set(state))
        if missing:
            raise ValueError(f"update_weights: missing {len(missing)} parameter(s), e.g. {missing[:4]}")
        for name, p in params.items():
            if tuple(state[name].shape) != tuple(p.shape):
                raise ValueError(f"update_weights: {name} has shape {tuple(state[name].shape)}, "
                                 f"expected {tuple(p.shape)}")
            p.copy_(state[name])

    def session(self, prompts: list[list[int]], max_len: int | None = None) -> "Session":
        """A batch of rows with a preallocated cache; max_len bounds each row's total tokens
        (prompt + generated + appended); default: longest prompt + 1024."""
        return Session(self, prompts, max_len)

    def generate(self, prompts: list[list[int]], max_new_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, stop_tokens=None, seed: int | None = None,
                 max_len: int | None = None) -> list[Completion]:
        """One Completion per prompt, in order. A thin wrapper over one Session turn."""
        check_sampling(temperature, top_p, top_k, max_new_tokens)
        prompts = _check_prompts(prompts, self.config.vocab_size)
        if max_len is None:
            max_len = max(len(p) for p in prompts) + max_new_tokens
        out = self.session(prompts, max_len).generate(max_new_tokens, temperature, top_p, top_k,
                                                      stop_tokens, seed=seed)
        return [out[i] for i in range(len(prompts))]


def _check_tokens(tokens, vocab_size: int, what: str) -> list[int]:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.tolist()
    tokens = list(tokens)
    for t in tokens:
        if not isinstance(t, int) or isinstance(t, bool):
            raise ValueError(f"{what}: token ids must be integers, got {t!r}")
        if not 0 <= t < vocab_size:
            raise ValueError(f"{what}: token id {t} is out of range [0, {vocab_size})")
    return tokens


def _check_prompts(prompts, vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        p = _check_tokens(p, vocab_size, f"prompt {i}")
        if not p:
            raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
        out.append(p)
    return out


class Session:
    """B rows sharing one cache. Row states: ready (will run on the next generate), paused (its
    turn ended; append() makes it ready again), done (finish() called). See the module docstring."""

    def __init__(self, sampler: Sampler, prompts, max_len: int | None = None):
        cfg = sampler.config
        prompts = _check_prompts(prompts, cfg.vocab_size)
        longest = max(len(p) for p in prompts)
        if max_len is None:
            max_len = longest + 1024
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
        if longest > max_len:
            raise ValueError(f"a prompt has {longest} tokens, more than max_len={max_len}")
        self.sampler, self.model, self.cfg, self.max_len = sampler, sampler.model, cfg, max_len
        self.device = sampler.device
        B = len(prompts)
        self.cache = KVCache(cfg, B, max_len, sampler.dtype, self.device, ring=not self.model.batch_invariant)
        self.row_of_slot = list(range(B))  # cache row -> session row
        self.slot_of_row = list(range(B))
        self.row_dev = torch.arange(B, device=self.device)  # the same map on the device
        self.cur = torch.zeros(B, dtype=torch.long, device=self.device)  # token each slot feeds next
        self.tokens = [list(p) for p in prompts]
        self.mask = [[0] * len(p) for p in prompts]
        self.logprobs = [[0.0] * len(p) for p in prompts]
        self.raw_logprobs = [[0.0] * len(p) for p in prompts]
        self.prompt_lens = [len(p) for p in prompts]
        self.fed = [0] * B  # tokens of the row already through the model (== cache.lens of its slot)
        self.state = [READY] * B
        self.finish_reasons = [[] for _ in range(B)]

    def __len__(self):
        return len(self.tokens)

    @property
    def ready(self) -> list[int]:
        return [r for r, s in enumerate(self.state) if s == READY]

    def trajectory(self, row: int) -> Trajectory:
        return Trajectory(list(self.tokens[row]), list(self.mask[row]), list(self.logprobs[row]),
                          list(self.raw_logprobs[row]), self.prompt_lens[row], list(self.finish_reasons[row]))

    def trajectories(self) -> list[Trajectory]:
        return [self.trajectory(r) for r in range(len(self))]

    def append(self, tokens_by_row: dict[int, list[int]]):
        """Queue tokens the model did not generate (a tool's reply) on those rows and make them ready.
        An empty list just continues the row. Mask 0, no log-prob."""
        checked = {}
        for row, toks in tokens_by_row.items():
            if not isinstance(row, int) or not 0 <= row < len(self):
                raise ValueError(f"append: no row {row!r} in a session of {len(self)} rows")
            if self.state[row] == DONE:
                raise ValueError(f"append: row {row} was finished")
            toks = _check_tokens(toks, self.cfg.vocab_size, f"append to row {row}")
            if len(self.tokens[row]) + len(toks) > self.max_len:
                raise ValueError(f"append: row {row} would hold {len(self.tokens[row]) + len(toks)} tokens, "
                                 f"more than max_len={self.max_len}")
            checked[row] = toks
        for row, toks in checked.items():
            self.tokens[row] += toks
            self.mask[row] += [0] * len(toks)
            self.logprobs[row] += [0.0] * len(toks)
            self.raw_logprobs[row] += [0.0] * len(toks)
            self.state[row] = READY

    def finish(self, rows):
        """Those rows never continue (append to them raises)."""
        for row in rows:
            if not isinstance(row, int) or not 0 <= row < len(self):
                raise ValueError(f"finish: no row {row!r} in a session of {len(self)} rows")
            self.state[row] = DONE

    # -- the engine ------------------------------------------------------------------------------

    def _to_front(self, slots: list[int]):
        """Move these cache rows to [0, len(slots)) by pairwise swaps (cache and maps)."""
        n, keep = len(slots), set(slots)
        holes = [i for i in range(n) if i not in keep]
        movers = [s for s in slots if s >= n]
        if not holes:
            return
        self.cache.swap(holes, movers)
        dst = torch.tensor(holes + movers, device=self.device)
        src = torch.tensor(movers + holes, device=self.device)
        for t in (self.row_dev, self.cur):
            t.index_copy_(0, dst, t.index_select(0, src))
        for a, b in zip(holes, movers):
            self.row_of_slot[a], self.row_of_slot[b] = self.row_of_slot[b], self.row_of_slot[a]
            self.slot_of_row[self.row_of_slot[a]] = a
            self.slot_of_row[self.row_of_slot[b]] = b

    def _forward(self, ids, positions, last=None):
        """The model on cache rows [0, n): logits (n, V) (fp32; fp64 for a float64 model) at column
        `last` per row (default the only column). The vocabulary projection runs on those
        positions alone: a B x T prefill would otherwise make B x T x V logits (V = 201088)."""
        hidden = self.model.hidden if last is not None else self.sampler.decode_hidden  # a decode step
        h = hidden(ids, positions, self.cache)  # (n, T, H), final-normed
        h = h[:, 0] if last is None else h[torch.arange(h.shape[0], device=h.device), last]  # (n, H)
        return self.model.logits(h)

    @torch.no_grad()
    def generate(self, max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, stop_tokens=None, seed: int | None = None,
                 generator: torch.Generator | None = None) -> dict[int, Completion]:
        """Run every ready row until it samples a stop token or max_new_tokens; returns
        {row: Completion} for those rows, which are paused afterwards."""
        check_sampling(temperature, top_p, top_k, max_new_tokens)
        stops = _check_tokens(stop_tokens or [], self.cfg.vocab_size, "stop_tokens")
        rows = self.ready
        if not rows:
            return {}
        for r in rows:
            if len(self.tokens[r]) + max_new_tokens > self.max_len:
                raise ValueError(f"row {r} holds {len(self.tokens[r])} tokens; {max_new_tokens} more would "
                                 f"exceed max_len={self.max_len} (pass a larger max_len to session())")
        if generator is None and seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        stop_t = torch.tensor(stops, device=self.device) if stops else None

        # Prefill / append: every ready row's unfed tokens in one chunk forward.
        self._to_front([self.slot_of_row[r] for r in rows])
        n = len(rows)
        rows = self.row_of_slot[:n]  # in slot order
        chunks = [self.tokens[r][self.fed[r]:] for r in rows]
        T = max(len(c) for c in chunks)
        ids = torch.tensor([c + [0] * (T - len(c)) for c in chunks], device=self.device)  # (n, T)
        chunk_lens = torch.tensor([len(c) for c in chunks], device=self.device)
        positions = self.cache.plan_chunk(n, chunk_lens)
        logits = self._forward(ids, positions, chunk_lens - 1)
        fed0 = {r: len(self.tokens[r]) for r in rows}
        view0 = max(fed0.values())  # the longest row's length when the decode steps start

        # Decode: one token per active row per step; finished rows leave the batch.
        # tokens, logp, raw per session row and step (token ids < 2^24 are exact in fp32)
        buf = torch.empty(3, max_new_tokens, len(self), dtype=logits.dtype, device=self.device)
        ended = {}  # row -> tokens generated this turn
        for t in range(max_new_tokens):
            if t > 0:
                positions = self.cache.plan_decode(n, view0 + t)
                logits = self._forward(self.cur[:n, None], positions)
                self.cache.lens[:n] += 1
            tok, logp, raw = sample(logits, temperature, top_k, top_p, generator)
            self.cur[:n] = tok
            buf[:, t].index_copy_(1, self.row_dev[:n], torch.stack([tok.to(buf.dtype), logp, raw]))
            if t == max_new_tokens - 1:
                break
            if stop_t is not None:
                hit = torch.isin(tok, stop_t).nonzero()[:, 0].tolist()  # the one host sync per step
                if hit:
                    for i in hit:
                        ended[self.row_of_slot[i]] = t + 1
                    hitset = set(hit)
                    self._to_front([i for i in range(n) if i not in hitset])
                    n -= len(hit)
                    if n == 0:
                        break
        steps = t + 1
        toks, lps, raws = (x.T.tolist() for x in buf[:, :steps].unbind(0))  # one transfer per turn
        out = {}
        stopset = set(stops)
        for r in rows:
            k = ended.get(r, steps)
            gen = [int(x) for x in toks[r][:k]]
            reason = "stop" if gen[-1] in stopset else "length"
            out[r] = Completion(gen, lps[r][:k], raws[r][:k], reason)
            self.tokens[r] += gen
            self.mask[r] += [1] * k
            self.logprobs[r] += lps[r][:k]
            self.raw_logprobs[r] += raws[r][:k]
            self.fed[r] = fed0[r] + k - 1  # the last sampled token is not through the model yet
            self.finish_reasons[r].append(reason)
            self.state[r] = PAUSED
        return out


# ----------------------------------------------------------------------------------------------
# Command line: render a one-message harmony conversation, sample, print the reply.

# The assistant's turn ends at <|return|> (final answer) or <|call|> (tool call). <|end|> also
# closes a message (e.g. gpt-oss's analysis message, after which the final one follows), so it
# is a stop token only when asked for (--stop-tokens "<|return|>" "<|call|>" "<|end|>").
HARMONY_STOPS = ("<|return|>", "<|call|>")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Sample a reply from an HF-format GPT-OSS checkpoint "
                                 "(config.json + safetensors + tokenizer.json) in the harmony format.")
    ap.add_argument("--checkpoint", required=True, help="directory with config.json, *.safetensors, tokenizer.json")
    ap.add_argument("--prompt", required=True, help="the user message")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1.0 = off)")
    ap.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0 = off)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="weights dtype (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--stop-tokens", nargs="+", default=list(HARMONY_STOPS),
                    help="special tokens that end the reply (default: <|return|> <|call|>)")
    args = ap.parse_args(argv)

    from tokenizers import Tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    tok_path = os.path.join(args.checkpoint, "tokenizer.json")
    if not os.path.exists(tok_path):
        raise SystemExit(f"no tokenizer.json in {args.checkpoint}")
    tokenizer = Tokenizer.from_file(tok_path)
    net = M.Transformer.from_pretrained(args.checkpoint, dtype=dtype, device=device).eval()
    # Harmony, one user message, then the assistant's turn header (the model writes the rest).
    text = f"<|start|>user<|message|>{args.prompt}<|end|><|start|>assistant"
    prompt = tokenizer.encode(text, add_special_tokens=False).ids
    stops = [tokenizer.token_to_id(s) for s in args.stop_tokens]
    if None in stops:
        raise SystemExit(f"tokenizer.json has no token {args.stop_tokens[stops.index(None)]!r}")
    out = Sampler(net).generate([prompt], args.max_new_tokens, args.temperature, args.top_p,
                                args.top_k, stops, seed=args.seed)[0]
    print(tokenizer.decode(out.tokens, skip_special_tokens=False))
    return out


if __name__ == "__main__":
    main()
