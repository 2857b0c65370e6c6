"""MoE routing replay for the trainer (train.py --routing-replay), and the route-mismatch metrics.

Two forward passes of an MoE can pick different experts for the same token (batch composition,
kernels, precision): near-tied router logits swap. Then the sampler and the trainer disagree on
the experts, and even exactly on-policy PPO sees a ratio != 1. Replay pins the experts:
- off: every trainer forward routes freely (the default).
- r3 ("rollout routing replay", arXiv 2510.11370): every trainer forward of the step uses the
  experts the sampler chose (sampler.Trajectory.routes).
- r2: the trainer's first pass of the step routes freely and is recorded; every later forward
  (the loss's epochs and mini-batches) replays it. With one epoch and one mini-batch and no
  second pass there is nothing to replay: r2 is then off.
Replayed experts keep their gradient: model.MoE gates them with the softmax of the *current*
router logits at those experts, so the router still learns.

Design choices:
- Metrics, every step and in every mode: the trainer's first pass of the step (its router's own
  top-k, even where it replays) against the sampler's routes, as expert *sets*, over every
  position the sampler processed (prompt, fed-back generated tokens, tool replies: through
  attention each shapes the loss tokens' log-probs). rollout_corr/route_mismatch is the fraction
  of (token, layer) decisions that differ, rollout_corr/route_mismatch_max the largest per-layer
  fraction. mismatch() also counts tokens that differ in at least one layer (experiments.py).
- Positions the sampler never ran (each row's last sampled token, the padding) get placeholder
  experts 0..k-1 under r3: no loss token's log-prob depends on them (causal attention, and the
  last position predicts nothing).
- --routing-noise stands for the routing flip between two passes. Under r2/r3 the experts are
  pinned in every pass, so the noise (which would only move the gate weights) is not applied:
  `routing_noise` gives 0 there. A replay's residual mismatch (the gate weights' rounding) is what
  the bf16-sampler case measures.
"""

from __future__ import annotations

import functools

import torch

MODES = ("off", "r2", "r3")


def routing_noise(args) -> float:
    """The router-noise std for the old log-probs' pass: --routing-noise, or 0 when replaying."""
    return args.routing_noise if args.routing_replay == "off" else 0.0


class perturbed_routing:
    """Within this context, every router's logits get Gaussian noise of std `sigma` (0: nothing).

    Models what differs between two forward passes of an MoE in a real stack (batch composition,
    kernels, precision): near-tied experts swap, so pi_old from a second pass is not the policy
    that the loss's forward computes, and the PPO ratio is no longer exactly 1."""

    def __init__(self, net, sigma: float, seed: int):
        self.routers = [layer.mlp.router for layer in net.layers] if sigma > 0 else []
        self.sigma, self.gen, self.hooks = sigma, torch.Generator().manual_seed(seed), []

    def _noise(self, module, inputs, logits):
        return logits + self.sigma * torch.randn(logits.shape, generator=self.gen).to(logits)

    def __enter__(self):
        self.hooks = [r.register_forward_hook(self._noise) for r in self.routers]

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()


def sampler_routes(trajectories: list, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler's routes of N trajectories, right-padded to `length` tokens: (N, T, L, k) int64
    with placeholder experts 0..k-1 where the sampler never ran a position, and processed (N, T)
    bool (the positions it did run)."""
    layers, k = trajectories[0].routes.shape[1:]
    routes = torch.full((len(trajectories), length, layers, k), -1, dtype=torch.int64)
    for i, traj in enumerate(trajectories):
        routes[i, :len(traj.routes)] = traj.routes.long()
    processed = routes[:, :, 0, 0] >= 0
    routes[~processed] = torch.arange(k)  # valid, distinct experts (unused by any loss token)
    return routes, processed


def mismatch(a: torch.Tensor, b: torch.Tensor, processed: torch.Tensor) -> dict:
    """Two routings (N, T, L, k) compared as expert sets over the processed (N, T) positions:
    decisions (fraction of (token, layer) sets that differ), max_layer (the largest per-layer
    fraction) and tokens (fraction of tokens that differ in at least one layer)."""
    differ = (a.sort(dim=-1).values != b.to(a.device).sort(dim=-1).values).any(dim=-1)[processed.to(a.device)]
    if not differ.numel():  # (P, L)
        return {"decisions": 0.0, "max_layer": 0.0, "tokens": 0.0}
    return {"decisions": differ.float().mean().item(), "max_layer": differ.float().mean(0).max().item(),
            "tokens": differ.any(dim=-1).float().mean().item()}


class Replay:
    """One RL step's routing: which experts each trainer forward uses, and the mismatch metrics.
    `replay.rows(mb)` is what train.token_logprobs calls instead of net.hidden(tokens)."""

    def __init__(self, mode: str, trajectories: list, length: int, device):
        if mode not in MODES:
            raise ValueError(f"routing replay must be one of {MODES}, got {mode!r}")
        self.mode = mode
        routes, processed = sampler_routes(trajectories, length)
        self.sampler, self.processed = routes.to(device), processed.to(device)
        self.replayed = self.sampler if mode == "r3" else None  # r2: set by the first pass
        self.first: dict | None = None  # the first pass's mismatch

    def rows(self, rows: torch.Tensor | None = None):
        """A callable (net, tokens) -> hidden states for these rows of the batch (None: all)."""
        return functools.partial(self.hidden, rows=rows)

    def hidden(self, net, tokens: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """net.hidden(tokens) with this step's replayed routes; the first call measures the
        mismatch with the sampler and, under r2, records the routes every later call replays."""
        pick = slice(None) if rows is None else rows.to(self.sampler.device)
        routes = None if self.replayed is None else self.replayed[pick]
        h, chosen = net.hidden(tokens, routes=routes, return_routes=True)  # chosen (n, T, L, k)
        if self.first is None:
            self.first = mismatch(self.sampler[pick], chosen, self.processed[pick])
            if self.mode == "r2":
                if rows is not None and len(rows) != len(self.sampler):
                    raise ValueError("r2 records the step's first pass, which must see the whole batch")
                self.replayed = chosen.detach().to(self.sampler.device)
        return h

    def metrics(self) -> dict:
        """rollout_corr/route_mismatch and rollout_corr/route_mismatch_max of the first pass."""
        first = self.first or {"decisions": 0.0, "max_layer": 0.0}
        return {"rollout_corr/route_mismatch": first["decisions"],
                "rollout_corr/route_mismatch_max": first["max_layer"]}
