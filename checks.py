"""Argument checks with clear errors for model.py: a configuration's fields, attention's inputs,
token ids, positions and replayed MoE routes. Each raises ValueError naming what is wrong. They
live apart so that model.py reads as the architecture; model.py calls them on every use.
"""

import torch

import model


def config(cfg: "model.ModelConfig"):
    """Raise ValueError naming the first field of cfg that is wrong."""
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim",
                 "num_local_experts", "num_experts_per_tok"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"config: {name} must be a positive integer, got {value!r}")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ValueError(f"config: num_attention_heads ({cfg.num_attention_heads}) must be divisible "
                         f"by num_key_value_heads ({cfg.num_key_value_heads})")
    if cfg.head_dim % 2:
        raise ValueError(f"config: head_dim must be even for RoPE, got {cfg.head_dim}")
    if cfg.num_experts_per_tok > cfg.num_local_experts:
        raise ValueError(f"config: num_experts_per_tok ({cfg.num_experts_per_tok}) exceeds "
                         f"num_local_experts ({cfg.num_local_experts})")
    if len(cfg.layer_types) != cfg.num_hidden_layers:
        raise ValueError(f"config: layer_types has {len(cfg.layer_types)} entries, "
                         f"expected num_hidden_layers = {cfg.num_hidden_layers}")
    bad = sorted(set(cfg.layer_types) - {"sliding_attention", "full_attention"})
    if bad:
        raise ValueError(f"config: unknown layer_types {bad}; use 'sliding_attention' or 'full_attention'")
    if "sliding_attention" in cfg.layer_types and not (isinstance(cfg.sliding_window, int)
                                                        and cfg.sliding_window > 0):
        raise ValueError(f"config: sliding_window must be a positive integer, got {cfg.sliding_window!r}")
    if cfg.tie_word_embeddings:
        raise ValueError("config: tie_word_embeddings=True is not GPT-OSS (its embeddings are untied)")
    if cfg.rope_parameters.get("rope_type") != "yarn":
        raise ValueError(f"config: rope_type must be 'yarn', got {cfg.rope_parameters.get('rope_type')!r}")
    low, high = model.yarn_bounds(cfg)
    if not 0 < low < high < cfg.head_dim / 2 - 1:
        raise ValueError(f"config: YaRN ramp bounds low={low:.4f}, high={high:.4f} must satisfy "
                         f"0 < low < high < head_dim/2 - 1 = {cfg.head_dim / 2 - 1}")


def attention_inputs(q, k, v, sinks, causal, sliding_window, q_pos, k_pos):
    """Validate attention()'s shapes and options; return (q_pos, k_pos) with the defaults filled in."""
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


def in_range(tensor: torch.Tensor, limit: int, what: str):
    """ValueError when tensor holds a value outside [0, limit). Free on the CPU; on an accelerator an
    asynchronous device-side assert, so a decode step never waits for the device to answer."""
    if torch.compiler.is_compiling():  # a compiled graph cannot branch on data: the sampler's
        return  # compiled decode step feeds back the tokens it sampled (checked prompts first)
    message = f"{what} out of range [0, {limit})"
    if tensor.device.type == "cpu":
        if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) >= limit):
            raise ValueError(message)
    elif tensor.numel():
        torch._assert_async(((tensor >= 0) & (tensor < limit)).all(), message)


def forward_inputs(cfg: "model.ModelConfig", input_ids: torch.Tensor, rope_pos: torch.Tensor, routes):
    """Transformer.hidden's inputs: token ids and positions in range, replayed routes valid
    (routes_checked). Returns the routes as one (B*T, k) int64 tensor per layer, or None per layer."""
    in_range(input_ids, cfg.vocab_size, "token id")
    in_range(rope_pos, cfg.max_position_embeddings, "position (max_position_embeddings)")
    return [None] * cfg.num_hidden_layers if routes is None else list(routes_checked(cfg, input_ids, routes))


def routes_checked(cfg: "model.ModelConfig", input_ids: torch.Tensor, routes) -> tuple:
    """Replayed MoE routes: an integer tensor (B, T, num_hidden_layers, num_experts_per_tok) whose
    ids lie in [0, num_local_experts), k distinct experts per token and layer (the order is the
    router's top-k order, but any order gives the same output up to the k-term sum's rounding).
    Any integer dtype (the sampler stores int8/int16); returns (B*T, k) int64 per layer on
    input_ids' device."""
    L, k, E = cfg.num_hidden_layers, cfg.num_experts_per_tok, cfg.num_local_experts
    expected = (*input_ids.shape, L, k)
    if (not isinstance(routes, torch.Tensor) or routes.dtype.is_floating_point or routes.dtype.is_complex
            or routes.dtype == torch.bool):
        what = f"{routes.dtype} tensor" if isinstance(routes, torch.Tensor) else type(routes).__name__
        raise ValueError(f"routes must be an integer tensor of shape (B, T, num_hidden_layers, "
                         f"num_experts_per_tok) = {expected}; got a {what}")
    if tuple(routes.shape) != expected:
        raise ValueError(f"routes must have shape (B, T, num_hidden_layers, num_experts_per_tok) = "
                         f"{expected}; got {tuple(routes.shape)}")
    routes = routes.to(device=input_ids.device, dtype=torch.int64)
    in_range(routes, E, f"routes: expert id (num_local_experts = {E})")
    if not torch.compiler.is_compiling():  # a compiled graph cannot branch on data (as in_range)
        _distinct(routes)
    return routes.reshape(-1, L, k).unbind(dim=1)


def _distinct(routes: torch.Tensor):
    """ValueError (CPU) or a device-side assert when a token's k experts in one layer repeat."""
    repeated = (routes.sort(dim=-1).values.diff(dim=-1) == 0).any(dim=-1)  # (B, T, L)
    if routes.device.type != "cpu":
        torch._assert_async(~repeated.any(), "routes: the same expert twice for one token")
    elif repeated.any():
        b, t, layer = repeated.nonzero()[0].tolist()
        raise ValueError(f"routes: the same expert twice for one token (row {b}, position {t}, "
                         f"layer {layer}: {routes[b, t, layer].tolist()}); a token's k experts must differ")
