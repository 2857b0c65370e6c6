"""PPO for agentic RL: advantages, the clipped policy loss, rollout correction, KL, metrics.

Pure functions on tensors; imports only torch. train.py calls `policy_loss` once per mini-batch and
`rollout_mismatch_metrics` once per rollout batch (whatever the correction is set to).

Three policies take part (SPEC.md section 4):
    pi_rollout  the sampler that produced the tokens (its log-probs come back with the rollout),
    pi_old      the trainer's policy before this update (the "proximal" policy of decoupled PPO),
    pi_theta    the policy being optimised (logp, with gradient).
    PPO ratio            r_t = pi_theta / pi_old                  (trust region; has gradient)
    rollout correction   w_t = f(pi_old / pi_rollout)             (importance weight; no gradient)
    L = - agg_t( w_t * min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t) )   (+ dual clip)
The objective inside agg is PPO's (above) by default; GSPO (one ratio per sequence) and CISPO (a
clipped, gradient-free weight on REINFORCE) are in OBJECTIVES, under the same w, agg, KL and entropy.

Design choices
- Shapes: per-token tensors are (B, T); one row is one sequence (a trajectory's tokens). The mask
  (B, T), bool or 0/1 float, selects the tokens the model generated: prompt, tool output,
  environment text and padding are 0 and enter neither the loss nor any ratio or metric.
- Masked positions may hold anything (NaN, inf): every input first goes through
  torch.where(mask, x, 0). Multiplying by the mask would not do (NaN * 0 = NaN, also in backward).
- On-policy exactness: `old_logp=None` means "exactly on-policy": old = logp.detach(), so
  logp - old == 0.0 bit for bit, r == 1 exactly and the clip fraction is exactly 0. Computing
  old_logp in a second forward pass is NOT equivalent for an MoE model (routing can flip).
- Never use pi_rollout as the PPO denominator ("PPO-IS", r = pi_theta / pi_rollout): the
  sampler/trainer mismatch then looks like a policy change, the clip fires on it constantly and
  training degrades. The mismatch belongs in the separate, gradient-free weight w (decoupled PPO).
- Every log-ratio (token, summed or averaged over a sequence) is clamped to [-20, 20] before exp.
- Masking vs rejection: an IcePop-masked token gets weight 0 but stays in the loss's
  denominator; a rejected sequence (MIS / rejection sampling) leaves the loss AND every
  denominator, as if it had never been sampled.
- Fully masked sequences drop out of sequence-level averages (they are not counted as zeros).
- Precision: half-precision inputs are upcast to fp32 for ratios and metrics; fp64 stays fp64.
- Metrics are plain Python floats, gathered with one device sync. An empty selection gives 0.0.
- Correction weights are functions of (old_logp, rollout_logp) only, so recomputing them per
  mini-batch gives the same numbers, except with batch_normalize (normalised per call).
"""

import math
from dataclasses import dataclass, field

import torch

LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 4.9e8: keeps exp finite in fp32 (and bf16)
KL_LOG_CLAMP = 10.0  # k3 KL estimator: clamp of the log difference before exp
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")

# ----------------------------------------------------------------------------------------------
# Small helpers


def _fp(x: torch.Tensor) -> torch.Tensor:
    """Upcast half precision to fp32 (ratios of nearly equal log-probs need the mantissa)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check(name: str, x: torch.Tensor, mask: torch.Tensor) -> None:
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.shape != mask.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected the mask's shape {tuple(mask.shape)}")


def _as_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool (B, T) mask: nonzero = token selected."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be (B, T), got shape {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def _clean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x where selected, 0 elsewhere: NaN/inf in masked positions cannot reach values or gradients."""
    x = _fp(x)
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """sum_{m} x / |m| over all selected entries; 0 when nothing is selected."""
    return _clean(x, m).sum() / m.sum().clamp(min=1)


def _seq_mean(x: torch.Tensor, m: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Per-row masked mean (0 for an empty row)."""
    return _clean(x, m).sum(dim) / m.sum(dim).clamp(min=1)


def _frac(selected: torch.Tensor, among: torch.Tensor) -> torch.Tensor:
    """|selected & among| / |among| for bool tensors (counts, so computed in fp64); 0 if among is empty."""
    return (selected & among).sum().double() / among.sum().clamp(min=1).double()


def _masked_max(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.where(m, _fp(x), -math.inf).max() if m.any() else x.new_zeros((), dtype=_fp(x).dtype)


def _masked_min(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.where(m, _fp(x), math.inf).min() if m.any() else x.new_zeros((), dtype=_fp(x).dtype)


def _floats(metrics: dict) -> dict[str, float]:
    """Tensor-valued metrics -> Python floats with a single device sync."""
    if not metrics:
        return {}
    dev = next((v.device for v in metrics.values() if torch.is_tensor(v)), torch.device("cpu"))
    vals = torch.stack([torch.as_tensor(v).detach().to(dev, torch.float64).reshape(()) for v in metrics.values()])
    return dict(zip(metrics, vals.tolist()))  # .tolist(): the one device -> host copy


# ----------------------------------------------------------------------------------------------
# Advantages (outcome rewards, one scalar per sequence; groups = the n samples of one prompt)


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) rewards, groups of `group_size` consecutive rows -> (B / n, n)."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B,), got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for a group baseline, got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return _fp(rewards).view(-1, group_size)


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: A_i = (r_i - mean_g(r)) / (std_g(r) + eps), std with Bessel's correction (n - 1).

    rewards (B,), B = num_groups * group_size, group k = rows [k n, (k + 1) n). Returns (B,).
    """
    g = _groups(rewards, group_size)
    return ((g - g.mean(-1, keepdim=True)) / (g.std(-1, keepdim=True) + eps)).view(-1)


def dr_grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr. GRPO: A_i = r_i - mean_g(r) (no division by the std, which up-weights easy groups)."""
    g = _groups(rewards, group_size)
    return (g - g.mean(-1, keepdim=True)).view(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: A_i = r_i - (sum_j r_j - r_i) / (n - 1), the mean of the OTHER n - 1 samples.

    Equals n / (n - 1) * (r_i - mean_g(r)): an unbiased baseline (it does not depend on sample i).
    """
    g = _groups(rewards, group_size)
    n = group_size
    return (g - (g.sum(-1, keepdim=True) - g) / (n - 1)).view(-1)


ADVANTAGES = {"grpo": grpo_advantages, "dr-grpo": dr_grpo_advantages, "rloo": rloo_advantages}
ADVANTAGE_ESTIMATORS = tuple(ADVANTAGES)


def compute_advantages(rewards: torch.Tensor, group_size: int, estimator: str = "grpo") -> torch.Tensor:
    """Dispatch on estimator, a name in ADVANTAGES ("grpo", "dr-grpo", "rloo"). Returns (B,)."""
    if estimator not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of {ADVANTAGE_ESTIMATORS}")
    return ADVANTAGES[estimator](rewards, group_size)


# ----------------------------------------------------------------------------------------------
# Loss aggregation


def aggregate(x: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              norm_length: float | None = None) -> torch.Tensor:
    """Reduce a per-token loss x (B, T) over the selected tokens to a scalar.

    token-mean:               sum_{b,t} x / sum_{b,t} m           (every token weighs the same)
    seq-mean-token-sum:       mean_b( sum_t x_bt )                 (long sequences weigh more)
    seq-mean-token-mean:      mean_b( sum_t x_bt / |m_b| )         (every sequence weighs the same)
    seq-mean-token-sum-norm:  mean_b( sum_t x_bt / norm_length )   (Dr. GRPO: a constant, e.g. the
                              maximum response length, instead of the sequence's own length)
    mean_b runs over the sequences with at least one selected token: fully masked rows drop out.
    Nothing selected gives 0 (still attached to the graph).
    """
    m = _as_mask(mask)
    _check("x", x, m)
    x = _clean(x, m)
    if mode == "token-mean":
        return x.sum() / m.sum().clamp(min=1)
    alive = m.any(-1)  # (B,) sequences that take part
    if mode == "seq-mean-token-sum":
        per_seq = x.sum(-1)
    elif mode == "seq-mean-token-mean":
        per_seq = x.sum(-1) / m.sum(-1).clamp(min=1)
    elif mode == "seq-mean-token-sum-norm":
        if norm_length is None or norm_length <= 0:
            raise ValueError("seq-mean-token-sum-norm needs norm_length > 0 (e.g. the max response length)")
        per_seq = x.sum(-1) / norm_length
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {AGG_MODES}")
    return per_seq.sum() / alive.sum().clamp(min=1)  # rows that are not alive contribute 0


def aggregate_count(mask: torch.Tensor, mode: str = "token-mean") -> int:
    """The denominator `aggregate` divides by: selected tokens (token-mean) or sequences with a
    selected token (the seq-mean modes). A data-parallel trainer scales each rank's loss by
    local / global count so the average of the ranks' gradients is the whole batch's."""
    m = _as_mask(mask)
    return int(m.sum()) if mode == "token-mean" else int(m.any(-1).sum())


# ----------------------------------------------------------------------------------------------
# PPO clipped surrogate


def ppo_ratio(logp: torch.Tensor, old_logp: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """r_t = pi_theta / pi_old = exp(clamp(logp - old_logp, -20, 20)); 1 at masked positions.

    old_logp=None means on-policy: old_logp = logp.detach(), so r == 1 exactly (and d r / d logp = 1).
    """
    m = _as_mask(mask)
    logp = _clean(logp, m)
    old = logp.detach() if old_logp is None else _clean(old_logp, m).detach()  # pi_old is a constant
    return torch.exp((logp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, eps_low: float = 0.2, eps_high: float = 0.2,
                      dual_clip: float | None = 3.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO objective (to MAXIMISE) and where its clips are active.

    obj_t = min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)
    dual clip (A < 0 only): obj_t = max(obj_t, c A). Without it a token with A < 0 and a huge r
    would contribute an unbounded -r A; with it the contribution is capped at -c A (zero gradient).
    Returns (obj, clipped, dual_clipped): clipped = the clipped branch is strictly smaller, i.e.
    A > 0 and r > 1 + eps_high, or A < 0 and r < 1 - eps_low (zero gradient there);
    dual_clipped = A < 0 and c A > obj (i.e. r > c).
    """
    surr = ratio * adv
    surr_clip = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    obj = torch.minimum(surr, surr_clip)
    clipped = surr_clip < surr
    dual_clipped = torch.zeros_like(clipped)
    if dual_clip is not None:
        dual_clipped = (adv < 0) & (dual_clip * adv > obj)
        obj = torch.where(adv < 0, torch.maximum(obj, dual_clip * adv), obj)
    return obj, clipped, dual_clipped


# ----------------------------------------------------------------------------------------------
# KL to a reference policy


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from the sampled token (samples from pi_theta).

    k1 = logp - ref                                   (unbiased, can be negative, high variance)
    k2 = 0.5 (logp - ref)^2                           (biased, >= 0; its gradient is that of KL)
    k3 = exp(d) - d - 1,  d = clamp(ref - logp, -10, 10)   (unbiased, >= 0, low variance)
    """
    logp, ref_logp = _fp(logp), _fp(ref_logp)
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if estimator == "k3":
        d = (ref_logp - logp).clamp(-KL_LOG_CLAMP, KL_LOG_CLAMP)
        return torch.exp(d) - d - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


# ----------------------------------------------------------------------------------------------
# Rollout correction (decoupled PPO): weights w = f(pi_old / pi_rollout), rejection of sequences


@dataclass(frozen=True)
class RolloutCorrection:
    """How to correct for pi_rollout != pi_old. Weights never carry gradient.

    log_rho_t = clamp(old_logp_t - rollout_logp_t, -20, 20), rho_t = exp(log_rho_t).

    is_level  "none":     w = 1.
              "token":    w_t = rho_t.
              "sequence": w_t = exp(clamp(sum_s log_rho_s, -20, 20)) for every token of the row.
    is_cap    truncation C (TIS): w = min(w, C). None = no truncation.
    is_band   (low, high) or None. Masked IS (IcePop): w = 0 where the raw weight is outside
              [low, high] (checked before truncation). The token stays in the denominator.
    rs        rejection sampling (MIS); a rejected sequence leaves the loss and its denominator:
              "none";
              "seq" (k1):   accept when low <= exp(sum_t log_rho_t) <= high     (rs_band);
              "geo":        accept when low <= exp(mean_t log_rho_t) <= high    (rs_band; length-
                            invariant, so it needs a tight band such as 0.999..1.001);
              "k3":         accept when mean_t(rho_t - log_rho_t - 1) <= rs_k3_max.
    batch_normalize  divide the weights by their mean over the kept tokens ("token" level) or the
              kept sequences ("sequence" level), so that their mean is 1 in the batch.
    """

    is_level: str = "none"
    is_cap: float | None = 2.0
    is_band: tuple[float, float] | None = None
    rs: str = "none"
    rs_band: tuple[float, float] = (0.5, 2.0)
    rs_k3_max: float = 0.01
    batch_normalize: bool = False

    def __post_init__(self):
        if self.is_level not in ("none", "token", "sequence"):
            raise ValueError(f"is_level must be 'none', 'token' or 'sequence', got {self.is_level!r}")
        if self.rs not in ("none", "seq", "geo", "k3"):
            raise ValueError(f"rs must be 'none', 'seq', 'geo' or 'k3', got {self.rs!r}")
        if self.is_cap is not None and self.is_cap <= 0:
            raise ValueError(f"is_cap must be > 0 or None, got {self.is_cap}")
        for name in ("is_band", "rs_band"):
            band = getattr(self, name)
            if band is not None and not (len(band) == 2 and 0 <= band[0] <= band[1]):
                raise ValueError(f"{name} must be (low, high) with 0 <= low <= high, got {band}")
        if self.is_band is not None and self.is_level == "none":
            raise ValueError("is_band (masked IS) needs is_level 'token' or 'sequence'")

    @property
    def off(self) -> bool:
        return self.is_level == "none" and self.rs == "none"


CORRECTION_PRESETS: dict[str, RolloutCorrection] = {
    # no correction: w = 1, nothing rejected (mismatch metrics are still worth logging)
    "off": RolloutCorrection(),
    # token-level truncated IS, w_t = min(rho_t, 2): biased; delays but does not prevent collapse
    "token-tis": RolloutCorrection(is_level="token", is_cap=2.0),
    # sequence-level truncated IS, w = min(prod_t rho_t, 2) on every token of the sequence
    "seq-tis": RolloutCorrection(is_level="sequence", is_cap=2.0),
    # IcePop: w_t = rho_t inside [0.5, 5], 0 outside (token masked IS)
    "icepop": RolloutCorrection(is_level="token", is_cap=None, is_band=(0.5, 5.0)),
    # sequence rejection only: drop sequences with prod_t rho_t outside [0.5, 2], w = 1
    "seq-rs": RolloutCorrection(rs="seq", rs_band=(0.5, 2.0)),
    # sequence masked IS (Seq-MIS): w = prod_t rho_t, sequences outside [0.5, 2] rejected
    "seq-mis": RolloutCorrection(is_level="sequence", is_cap=None, rs="seq", rs_band=(0.5, 2.0)),
    # geometric rejection only: drop sequences whose per-token geometric mean ratio leaves [0.999, 1.001]
    "geo-rs": RolloutCorrection(rs="geo", rs_band=(0.999, 1.001)),
    # k3 rejection only: drop sequences with mean_t(rho - log rho - 1) > 0.01
    "k3-rs": RolloutCorrection(rs="k3", rs_k3_max=0.01),
    # token TIS (C = 2) on the sequences the geometric rule accepts
    "token-tis+geo-rs": RolloutCorrection(is_level="token", is_cap=2.0, rs="geo", rs_band=(0.999, 1.001)),
    # sequence TIS (C = 2) on the sequences the geometric rule accepts
    "seq-tis+geo-rs": RolloutCorrection(is_level="sequence", is_cap=2.0, rs="geo", rs_band=(0.999, 1.001)),
}


def get_correction(correction: "str | RolloutCorrection") -> RolloutCorrection:
    """A preset name from CORRECTION_PRESETS, or a RolloutCorrection passed through."""
    if isinstance(correction, RolloutCorrection):
        return correction
    if correction not in CORRECTION_PRESETS:
        raise ValueError(f"unknown rollout correction {correction!r}; presets: {sorted(CORRECTION_PRESETS)}")
    return CORRECTION_PRESETS[correction]


def _log_rho(old_logp: torch.Tensor, rollout_logp: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """log_rho_t = clamp(old - rollout, -20, 20) at selected tokens, 0 elsewhere; no gradient."""
    diff = _clean(old_logp.detach(), m) - _clean(rollout_logp.detach(), m)
    return diff.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def rejection_mask(log_rho: torch.Tensor, mask: torch.Tensor, cfg: RolloutCorrection) -> torch.Tensor:
    """(B,) bool: which sequences the rejection rule `cfg.rs` accepts (see RolloutCorrection).

    log_rho (B, T) must already be 0 at unselected tokens. An empty row is accepted (it has no
    tokens to contribute anyway).
    """
    m = _as_mask(mask)
    if cfg.rs == "none":
        return torch.ones(m.shape[0], dtype=torch.bool, device=m.device)
    low, high = cfg.rs_band
    if cfg.rs == "seq":
        stat = torch.exp(log_rho.sum(-1).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        return (stat >= low) & (stat <= high)
    if cfg.rs == "geo":
        stat = torch.exp(_seq_mean(log_rho, m))
        return (stat >= low) & (stat <= high)
    k3 = torch.exp(log_rho) - log_rho - 1.0  # 0 at unselected tokens (log_rho = 0 there)
    return _seq_mean(k3, m) <= cfg.rs_k3_max


def rollout_correction(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                       cfg: "str | RolloutCorrection" = "off"
                       ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Importance weights and rejection for decoupled PPO (no gradient flows through either).

    Returns (weights, keep, metrics):
      weights (B, T): w_t (formulas in RolloutCorrection), 0 at tokens that are not kept;
      keep    (B, T) bool: mask AND accepted-by-rejection; use it as the loss mask (the rejected
              sequences leave the denominators too);
      metrics (prefix "rollout_corr/"), over the kept tokens:
        rollout_is_mean / _std / _min / _max   the applied weights w (std: population, 1/N);
        rollout_is_eff_sample_size             (sum w)^2 / (N sum w^2), in (0, 1]: the fraction of
                                               tokens an unweighted sample of equal variance needs;
        rollout_rs_masked_fraction             selected tokens removed by rejection / selected tokens;
        rollout_rs_seq_masked_fraction         rejected sequences / non-empty sequences.
    Pass pi_old (not pi_theta) as old_logp: the weight corrects the sampling distribution and must
    not change while the policy is optimised. pi_rollout must NOT become PPO's denominator (PPO-IS).
    """
    w, keep, metrics = _rollout_correction(old_logp, rollout_logp, _as_mask(mask), get_correction(cfg))
    return w, keep, _floats(metrics)


def _rollout_correction(old_logp, rollout_logp, m, cfg):
    """`rollout_correction` with tensor-valued metrics (converted by the caller in one sync)."""
    _check("old_logp", old_logp, m)
    _check("rollout_logp", rollout_logp, m)
    log_rho = _log_rho(old_logp, rollout_logp, m)
    accept = rejection_mask(log_rho, m, cfg)  # (B,)
    keep = m & accept[:, None]
    w = _is_weights(log_rho, m, keep, cfg)
    w = torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device))
    alive = m.any(-1)
    mean = masked_mean(w, keep)
    metrics = {
        "rollout_corr/rollout_is_mean": mean,
        "rollout_corr/rollout_is_std": masked_mean((w - mean) ** 2, keep).sqrt(),
        "rollout_corr/rollout_is_min": _masked_min(w, keep),
        "rollout_corr/rollout_is_max": _masked_max(w, keep),
        "rollout_corr/rollout_is_eff_sample_size": _ess(w, keep),
        "rollout_corr/rollout_rs_masked_fraction": _frac(~keep, m),
        "rollout_corr/rollout_rs_seq_masked_fraction": _frac(~accept, alive),
    }
    return w, keep, metrics


def _ess(w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Normalised effective sample size (sum w)^2 / (N sum w^2) over the N kept tokens (w = 0 elsewhere).

    1 when all weights are equal, 1/N when one weight carries everything; 1 for an empty selection.
    """
    if not keep.any():
        return w.new_ones(())
    return w.sum() ** 2 / (keep.sum() * (w**2).sum()).clamp(min=1e-30)


def _is_weights(log_rho: torch.Tensor, m: torch.Tensor, keep: torch.Tensor,
                cfg: RolloutCorrection) -> torch.Tensor:
    """w before rejection is applied: level (token / sequence), IcePop band, TIS cap, normalisation."""
    if cfg.is_level == "none":
        return torch.ones_like(log_rho)
    if cfg.is_level == "token":
        w = torch.exp(log_rho)
    else:  # one weight per sequence, broadcast to its tokens
        w = torch.exp(log_rho.sum(-1, keepdim=True).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).expand_as(log_rho)
    if cfg.is_band is not None:  # IcePop: zero, do not clip, the tokens outside the band
        low, high = cfg.is_band
        w = torch.where((w >= low) & (w <= high), w, torch.zeros_like(w))
    if cfg.is_cap is not None:
        w = w.clamp(max=cfg.is_cap)
    if cfg.batch_normalize:
        if cfg.is_level == "token":
            norm = masked_mean(w, keep)
        else:
            kept_rows = keep.any(-1)
            norm = _seq_mean(w, m)[kept_rows].mean() if kept_rows.any() else w.new_ones(())
        w = w / norm.clamp(min=1e-8)
    return w


# ----------------------------------------------------------------------------------------------
# Rollout mismatch diagnostics (log them every step, whatever the correction)


def rollout_mismatch_metrics(old_logp: torch.Tensor, rollout_logp: torch.Tensor,
                             mask: torch.Tensor) -> dict[str, float]:
    """How far the trainer's pi_old is from the sampler's pi_rollout on the sampled tokens.

    With log_rho_t = clamp(old - rollout, -20, 20), rho_t = exp(log_rho_t), means over selected
    tokens (E_t) or over non-empty sequences (E_b), and the tokens sampled from pi_rollout:
      rollout_corr/kl                 E_t[rollout - old]: estimates KL(pi_rollout || pi_old) (k1)
      rollout_corr/k3_kl              E_t[rho - log_rho - 1]: the same KL, k3 estimator (>= 0)
      rollout_corr/log_ppl_diff       E_b[d_b], d_b = mean_t(rollout) - mean_t(old)
                                      = log PPL_old(b) - log PPL_rollout(b)  (> 0: trainer less sure)
      rollout_corr/log_ppl_abs_diff   E_b|d_b|
      rollout_corr/log_ppl_diff_max   max_b d_b;  rollout_corr/log_ppl_diff_min  min_b d_b
      rollout_corr/ppl_ratio          E_b[exp(d_b)] = E_b[PPL_old / PPL_rollout]
      rollout_corr/chi2_token         E_t[rho^2] - 1: chi^2(pi_old || pi_rollout) per token, the
                                      variance of the token IS weights
      rollout_corr/chi2_seq           E_b[exp(2 clamp(sum_t log_rho_t, -20, 20))] - 1: per sequence
      rollout_corr/max_abs_prob_diff  max_t |exp(old) - exp(rollout)|: the largest probability gap
    All are 0 when old_logp == rollout_logp, and 0.0 when nothing is selected.
    """
    m = _as_mask(mask)
    _check("old_logp", old_logp, m)
    _check("rollout_logp", rollout_logp, m)
    old, roll = _clean(old_logp.detach(), m), _clean(rollout_logp.detach(), m)
    log_rho = (old - roll).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    alive = m.any(-1)
    d = (_seq_mean(roll, m) - _seq_mean(old, m))[alive]  # (B_alive,)
    seq_log_rho = log_rho.sum(-1).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)[alive]
    zero = old.new_zeros(())

    def over_seqs(x):  # mean over non-empty sequences; 0 if there are none
        return x.mean() if x.numel() else zero

    metrics = {
        "kl": masked_mean(roll - old, m),
        "k3_kl": masked_mean(torch.exp(log_rho) - log_rho - 1.0, m),
        "log_ppl_diff": over_seqs(d),
        "log_ppl_abs_diff": over_seqs(d.abs()),
        "log_ppl_diff_max": d.max() if d.numel() else zero,
        "log_ppl_diff_min": d.min() if d.numel() else zero,
        "ppl_ratio": over_seqs(torch.exp(d)) if d.numel() else zero,
        "chi2_token": masked_mean(torch.exp(2 * log_rho), m) - 1.0 if m.any() else zero,
        "chi2_seq": over_seqs(torch.exp(2 * seq_log_rho)) - 1.0 if d.numel() else zero,
        "max_abs_prob_diff": _masked_max((torch.exp(old) - torch.exp(roll)).abs(), m),
    }
    return _floats({f"rollout_corr/{k}": v for k, v in metrics.items()})


# ----------------------------------------------------------------------------------------------
# Objectives: (logp, old_logp, A (B, T), keep, cfg) -> (obj to MAXIMISE, clipped, dual_clipped), (B, T)
# each. On-policy (old_logp None) every ratio is exactly 1, and all three give the policy gradient A_t.


def ppo_objective(logp, old_logp, adv, keep, cfg: "PPOConfig"):
    """PPO: obj_t = clipped_surrogate(r_t, A_t), r_t = ppo_ratio(logp, old_logp): a clip per token."""
    ratio = ppo_ratio(logp, old_logp, keep)
    return clipped_surrogate(ratio, adv, cfg.eps_low, cfg.eps_high, cfg.dual_clip)


def gspo_objective(logp, old_logp, adv, keep, cfg: "PPOConfig"):
    """GSPO (Qwen3, arXiv 2507.18071): one length-normalised ratio per sequence i, in "GSPO-token" form.

    s_i   = exp(clamp(mean_{t in keep_i}(logp_t - old_logp_t), -20, 20))     (no gradient)
    s_it  = s_i * exp(logp_t - sg[logp_t])          value s_i, d s_it / d logp_t = s_i
    obj_t = min(s_it A_t, clip(s_it, 1 - eps_low, 1 + eps_high) A_t)   (+ dual clip; the paper: none)
    d obj_t / d logp_t = s_i A_t where unclipped, 0 where clipped.
    Why the token form: with one advantage per sequence and agg "seq-mean-token-mean" it is the
    paper's sequence objective min(s_i A_i, clip(s_i) A_i) in value and gradient (s_i A_i times the
    gradient of mean_t logp_t); and being per token it takes per-token A_t and w_t and every loss_agg
    as PPO does (the plain form would spread w_t and A_t over the whole sequence's gradient).
    The paper's clip range is eps_low = 3e-4, eps_high = 4e-4 (a ratio of a mean log-ratio stays
    near 1); set them in PPOConfig, which the defaults 0.2 do not match. The clip is one decision
    per sequence (per token only if A_t varies); pg_clipfrac counts tokens, as the paper's figure.
    """
    lp = _clean(logp, keep)
    old = lp.detach() if old_logp is None else _clean(old_logp, keep).detach()
    log_s = _seq_mean(lp.detach() - old, keep).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (B,)
    ratio = torch.exp(log_s)[:, None] * torch.exp(lp - lp.detach())  # (B, T): exactly s_i, gradient s_i
    return clipped_surrogate(ratio, adv, cfg.eps_low, cfg.eps_high, cfg.dual_clip)


def cispo_objective(logp, old_logp, adv, keep, cfg: "PPOConfig"):
    """CISPO (MiniMax-M1, arXiv 2506.13585): clip the importance weight, not the update.

    obj_t = sg[clip(r_t, 1 - eps_low, 1 + eps_high)] * A_t * logp_t,   r_t = ppo_ratio(logp, old_logp)
    d obj_t / d logp_t = clip(r_t) A_t: never 0, every token keeps a gradient (PPO drops clipped ones).
    clipped = r_t outside [1 - eps_low, 1 + eps_high], whatever the sign of A_t (the weight is bounded).
    No dual clip (the weight already is bounded): dual_clipped is all False. MiniMax-M1 sets no lower
    bound in practice (a large eps_low; only eps_high is tuned): eps_low >= 1 does that here.
    The value is REINFORCE's (A_t logp_t on-policy), not a surrogate's: only its gradient counts.
    """
    ratio = ppo_ratio(logp, old_logp, keep).detach()
    low, high = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
    clipped = (ratio < low) | (ratio > high)
    return ratio.clamp(low, high) * adv * _clean(logp, keep), clipped, torch.zeros_like(clipped)


OBJECTIVES = {"ppo": ppo_objective, "gspo": gspo_objective, "cispo": cispo_objective}


# ----------------------------------------------------------------------------------------------
# The policy loss train.py calls


@dataclass(frozen=True)
class PPOConfig:
    """Policy-loss settings.

    objective          a name in OBJECTIVES: "ppo", "gspo" or "cispo" (formulas in their functions).
    eps_low, eps_high  clip range [1 - eps_low, 1 + eps_high] of r (eps_high > eps_low = "clip higher");
                       of s_i for gspo (paper: 3e-4, 4e-4), of the weight for cispo (eps_low >= 1: none).
    dual_clip          c > 1 for the dual clip on A < 0 tokens; None disables it.
    loss_agg           one of AGG_MODES (see `aggregate`).
    norm_length        the constant of "seq-mean-token-sum-norm" (e.g. max response length).
    kl_coef, kl_estimator   + kl_coef * agg(KL to ref) (needs ref_logp when kl_coef > 0).
    entropy_coef       - entropy_coef * agg(entropy) (needs entropy when entropy_coef > 0).
    correction         a CORRECTION_PRESETS name or a RolloutCorrection (needs rollout_logp unless "off").
    """

    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = 3.0
    loss_agg: str = "token-mean"
    norm_length: float | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    correction: "str | RolloutCorrection" = field(default="off")
    objective: str = "ppo"

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {tuple(OBJECTIVES)}")
        if self.loss_agg not in AGG_MODES:
            raise ValueError(f"unknown loss_agg {self.loss_agg!r}; choose one of {AGG_MODES}")
        if self.loss_agg == "seq-mean-token-sum-norm" and (self.norm_length is None or self.norm_length <= 0):
            raise ValueError("loss_agg 'seq-mean-token-sum-norm' needs norm_length > 0 (e.g. max response length)")
        if not (0 <= self.eps_low and (self.eps_low < 1 or self.objective == "cispo") and self.eps_high >= 0):
            raise ValueError(f"need 0 <= eps_low < 1 (any eps_low >= 0 for cispo) and eps_high >= 0, "
                             f"got {self.eps_low}, {self.eps_high}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 or None, got {self.dual_clip}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"unknown kl_estimator {self.kl_estimator!r}; choose one of {KL_ESTIMATORS}")
        get_correction(self.correction)  # validates the preset name


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor,
                cfg: PPOConfig = PPOConfig(), *, rollout_logp: torch.Tensor | None = None,
                ref_logp: torch.Tensor | None = None, entropy: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """Decoupled PPO loss with rollout correction, KL and entropy terms. Returns (loss, metrics).

    logp (B, T)          log pi_theta of the sampled tokens, with gradient.
    old_logp (B, T)|None log pi_old; None = on-policy (one epoch, one mini-batch): logp.detach(),
                         so r == 1 exactly. Never pass rollout_logp here ("PPO-IS", see module doc).
    advantages (B,)|(B, T)  per sequence (broadcast to its tokens) or per token.
    mask (B, T)          tokens the model generated.
    rollout_logp (B, T)  log pi_rollout from the sampler; needed unless cfg.correction is "off".

    keep = mask AND (sequence accepted by the rejection rule);  w = correction weights (no grad)
    pg_loss = - agg_keep( w * obj ),  obj = OBJECTIVES[cfg.objective]: PPO's clipped_surrogate(r, A)
              (PPO clip + dual clip) by default, or gspo_objective / cispo_objective
    loss    = pg_loss + kl_coef * agg_keep(kl(logp, ref_logp)) - entropy_coef * agg_keep(entropy)

    metrics (floats), over the kept tokens:
      loss, pg_loss; pg_clipfrac (fraction of tokens where the objective's clip is active);
      pg_clipfrac_lower (fraction where the dual clip is active); ppo_kl = mean(old - logp);
      entropy (if given); kl_ref (if ref_logp given); rollout_corr/rollout_is_* and
      rollout_corr/rollout_rs_* (if rollout_logp given; see `rollout_correction`).
    The mismatch diagnostics are a separate call: `rollout_mismatch_metrics`.
    """
    m = _as_mask(mask)
    adv = _token_advantages(logp, old_logp, advantages, m)
    corr = get_correction(cfg.correction)
    old = _clean(logp, m).detach() if old_logp is None else old_logp

    metrics = {}
    weights, keep = None, m
    if rollout_logp is not None:
        weights, keep, metrics = _rollout_correction(old, rollout_logp, m, corr)
    elif not corr.off:
        raise ValueError(f"rollout correction {cfg.correction!r} needs rollout_logp (the sampler's log-probs)")

    adv = _clean(adv, keep)
    obj, clipped, dual_clipped = OBJECTIVES[cfg.objective](logp, old_logp, adv, keep, cfg)
    if weights is not None:
        obj = weights * obj
    pg_loss = -aggregate(obj, keep, cfg.loss_agg, cfg.norm_length)
    metrics.update(
        pg_loss=pg_loss.detach(),
        pg_clipfrac=_frac(clipped, keep),
        pg_clipfrac_lower=_frac(dual_clipped, keep),
        ppo_kl=masked_mean(_clean(old, keep).detach() - _clean(logp, keep).detach(), keep),
    )
    loss = _add_kl_and_entropy(pg_loss, logp, m, keep, cfg, ref_logp, entropy, metrics)
    metrics["loss"] = loss.detach()
    return loss, _floats(metrics)


def _token_advantages(logp, old_logp, advantages, m) -> torch.Tensor:
    """Checks policy_loss's inputs against the mask m (B, T); advantages (B,) or (B, T) -> (B, T)."""
    _check("logp", logp, m)
    if old_logp is not None:
        _check("old_logp", old_logp, m)
    if advantages.dim() == 1 and advantages.shape[0] != m.shape[0]:
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, "
                         f"expected ({m.shape[0]},) or {tuple(m.shape)}")
    adv = advantages[:, None].expand_as(m) if advantages.dim() == 1 else advantages
    _check("advantages", adv, m)
    return adv


def _add_kl_and_entropy(loss, logp, m, keep, cfg: PPOConfig, ref_logp, entropy, metrics: dict) -> torch.Tensor:
    """loss + kl_coef * agg_keep(kl(logp, ref_logp)) - entropy_coef * agg_keep(entropy), in that
    order; kl_ref and entropy go into metrics whenever ref_logp and entropy are given."""
    if ref_logp is not None:
        _check("ref_logp", ref_logp, m)
        kl = kl_penalty(_clean(logp, keep), _clean(ref_logp, keep).detach(), cfg.kl_estimator)
        metrics["kl_ref"] = masked_mean(kl.detach(), keep)
        if cfg.kl_coef:
            loss = loss + cfg.kl_coef * aggregate(kl, keep, cfg.loss_agg, cfg.norm_length)
    elif cfg.kl_coef:
        raise ValueError("kl_coef > 0 needs ref_logp (the reference policy's log-probs)")
    if entropy is not None:
        _check("entropy", entropy, m)
        metrics["entropy"] = masked_mean(entropy.detach(), keep)
        if cfg.entropy_coef:
            loss = loss - cfg.entropy_coef * aggregate(entropy, keep, cfg.loss_agg, cfg.norm_length)
    elif cfg.entropy_coef:
        raise ValueError("entropy_coef > 0 needs the per-token entropy tensor")
    return loss
