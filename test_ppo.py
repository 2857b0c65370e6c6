"""Tests for ppo.py: every expected number below is worked out by hand in the test (math module,
literals), never by the code under test. fp64 tensors make the boundary cases crisp."""

import math

import pytest
import torch

import ppo

D = torch.float64
NAN, INF = float("nan"), float("inf")
L = math.log


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def flat(x):
    return [v for row in x for v in flat(row)] if isinstance(x, (list, tuple)) else [x]


def approx(x, rel=1e-9, abs=1e-12):
    """pytest.approx for scalars and (nested) lists; compare with tensor.flatten().tolist()."""
    return pytest.approx(flat(x) if isinstance(x, (list, tuple)) else x, rel=rel, abs=abs)


# ---------------------------------------------------------------------------------------------
# Advantages


def test_advantages_hand_example():
    # group 1: [1, 2, 6], mean 3, deviations [-2, -1, 3], unbiased var (4 + 1 + 9) / 2 = 7
    # group 2: all equal -> every estimator gives 0 (and GRPO must not divide 0 by 0)
    r = t([1.0, 2.0, 6.0, 0.0, 0.0, 0.0])
    s7 = math.sqrt(7) + 1e-6
    assert ppo.grpo_advantages(r, 3).tolist() == approx([-2 / s7, -1 / s7, 3 / s7, 0, 0, 0])
    assert ppo.dr_grpo_advantages(r, 3).tolist() == approx([-2, -1, 3, 0, 0, 0])
    # RLOO: r_i minus the mean of the other two: 1 - 8/2, 2 - 7/2, 6 - 3/2
    assert ppo.rloo_advantages(r, 3).tolist() == approx([-3, -1.5, 4.5, 0, 0, 0])
    assert ppo.compute_advantages(r, 3, "rloo").tolist() == approx([-3, -1.5, 4.5, 0, 0, 0])


def test_advantages_reject_bad_groups():
    with pytest.raises(ValueError, match="group_size"):
        ppo.grpo_advantages(t([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="groups of 3"):
        ppo.rloo_advantages(t([1.0, 2.0, 3.0, 4.0]), 3)
    with pytest.raises(ValueError, match="unknown advantage"):
        ppo.compute_advantages(t([1.0, 2.0]), 2, "ppo")


# ---------------------------------------------------------------------------------------------
# Aggregation


AGG_X = [[1.0, 2.0, 3.0], [4.0, NAN, INF], [NAN, NAN, NAN]]
AGG_M = [[1, 1, 1], [1, 0, 0], [0, 0, 0]]  # row 3 is fully masked: it must drop out


@pytest.mark.parametrize("mode,expected", [
    ("token-mean", (1 + 2 + 3 + 4) / 4),
    ("seq-mean-token-sum", (6 + 4) / 2),
    ("seq-mean-token-mean", (2 + 4) / 2),
    ("seq-mean-token-sum-norm", (6 / 4 + 4 / 4) / 2),  # norm_length 4
])
def test_aggregation_modes_differ_as_documented(mode, expected):
    out = ppo.aggregate(t(AGG_X), t(AGG_M), mode, norm_length=4)
    assert out.item() == approx(expected)


def test_aggregation_needs_norm_length_and_known_mode():
    with pytest.raises(ValueError, match="norm_length"):
        ppo.aggregate(t(AGG_X), t(AGG_M), "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        ppo.aggregate(t(AGG_X), t(AGG_M), "sum")
    with pytest.raises(ValueError, match="norm_length"):
        ppo.PPOConfig(loss_agg="seq-mean-token-sum-norm")


def test_aggregation_of_nothing_is_zero_with_graph():
    x = t([[NAN, 1.0]]).requires_grad_()
    out = ppo.aggregate(x, t([[0, 0]]), "seq-mean-token-mean")
    out.backward()
    assert out.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


# ---------------------------------------------------------------------------------------------
# PPO clipped surrogate


# (r, A) and the hand-computed objective with eps 0.2 and dual clip 3
CLIP_CASES = [
    # r,   A,    obj,   clipped, dual
    (1.1, 1.0, 1.1, False, False),   # inside the band
    (1.5, 1.0, 1.2, True, False),    # A > 0, r > 1.2: clipped to 1.2 A
    (0.5, 1.0, 0.5, False, False),   # A > 0, r small: min keeps r A (no clip)
    (0.5, -1.0, -0.8, True, False),  # A < 0, r < 0.8: clipped to 0.8 A
    (1.5, -1.0, -1.5, False, False),  # A < 0, 1.2 < r < 3: unclipped (pessimistic)
    (4.0, -1.0, -3.0, False, True),  # A < 0, r > 3: dual clip caps at 3 A
    (1.0, 0.0, 0.0, False, False),
]


def test_clipped_surrogate_hand_cases():
    r = t([c[0] for c in CLIP_CASES])
    a = t([c[1] for c in CLIP_CASES])
    obj, clipped, dual = ppo.clipped_surrogate(r, a, 0.2, 0.2, 3.0)
    assert obj.tolist() == approx([c[2] for c in CLIP_CASES])
    assert clipped.tolist() == [c[3] for c in CLIP_CASES]
    assert dual.tolist() == [c[4] for c in CLIP_CASES]
    obj, _, dual = ppo.clipped_surrogate(r, a, 0.2, 0.2, None)  # no dual clip: -4 stays
    assert obj[5].item() == approx(-4.0) and not dual.any()


def test_separate_low_and_high_eps():
    # eps_low 0.1, eps_high 0.3: r = 1.25 with A > 0 is inside [0.9, 1.3]; r = 0.85 with A < 0 is clipped to 0.9
    obj, clipped, _ = ppo.clipped_surrogate(t([1.25, 0.85, 1.35]), t([1.0, -1.0, 1.0]), 0.1, 0.3, 3.0)
    assert obj.tolist() == approx([1.25, -0.9, 1.3])
    assert clipped.tolist() == [False, True, True]


def test_policy_loss_metrics_and_gradient_hand_example():
    # one row of the 7 CLIP_CASES, old_logp = 0 so r = exp(logp)
    logp = t([[L(c[0]) for c in CLIP_CASES]]).requires_grad_()
    adv = t([[c[1] for c in CLIP_CASES]])
    mask = torch.ones(1, 7, dtype=torch.bool)
    loss, m = ppo.policy_loss(logp, torch.zeros(1, 7, dtype=D), adv, mask, ppo.PPOConfig())
    assert loss.item() == approx(-(1.1 + 1.2 + 0.5 - 0.8 - 1.5 - 3.0 + 0.0) / 7)
    assert m["pg_clipfrac"] == approx(2 / 7) and m["pg_clipfrac_lower"] == approx(1 / 7)
    assert m["ppo_kl"] == approx(-sum(L(c[0]) for c in CLIP_CASES) / 7)
    loss.backward()
    # d/dlogp_t of -(1/7) r_t A_t is -(1/7) A_t r_t where the unclipped branch is active, 0 where clipped
    assert logp.grad[0].tolist() == approx([-1.1 / 7, 0, -0.5 / 7, 0, 1.5 / 7, 0, 0])


def test_gradient_with_token_tis_and_seq_mean_token_mean():
    # rows: [r = 1.1, r = 0.9 | A = 2] and [r = 1.0 | A = -1, padding]; token TIS weights
    # w = min(pi_old / pi_rollout, 2) = [1.5, 3 -> 2 | 0.5]
    # L = -1/2 ( (w1 r1 A + w2 r2 A) / 2 + w3 r3 A3 ) ; dL/dlogp_t = -1/2 * w_t r_t A_t / |m_b|
    old = t([[L(0.3), L(0.6)], [L(0.2), NAN]])
    logp = (old + t([[L(1.1), L(0.9)], [0.0, NAN]])).detach().requires_grad_()
    roll = t([[L(0.2), L(0.2)], [L(0.4), NAN]])
    mask = t([[1, 1], [1, 0]])
    cfg = ppo.PPOConfig(loss_agg="seq-mean-token-mean", correction="token-tis")
    loss, m = ppo.policy_loss(logp, old, t([2.0, -1.0]), mask, cfg, rollout_logp=roll)
    expected = -0.5 * ((1.5 * 1.1 * 2 + 2.0 * 0.9 * 2) / 2 + 0.5 * 1.0 * -1)
    assert loss.item() == approx(expected)
    loss.backward()
    expected_grad = [[-0.5 * 1.5 * 1.1 * 2 / 2, -0.5 * 2.0 * 0.9 * 2 / 2], [0.5 * 0.5, 0.0]]
    assert logp.grad.flatten().tolist() == approx(expected_grad)
    assert m["rollout_corr/rollout_is_max"] == approx(2.0) and m["rollout_corr/rollout_is_min"] == approx(0.5)


# ---------------------------------------------------------------------------------------------
# On-policy exactness


def test_on_policy_ratio_is_exactly_one_and_clipfrac_exactly_zero():
    g = torch.Generator().manual_seed(0)
    logp = (-5 * torch.rand(4, 6, generator=g)).requires_grad_()  # fp32, like the trainer
    mask = torch.rand(4, 6, generator=g) > 0.3
    adv = 100 * torch.randn(4, generator=g)  # huge advantages: any ratio != 1 would clip
    r = ppo.ppo_ratio(logp, None, mask)
    assert torch.equal(r, torch.ones_like(r))
    assert torch.equal(ppo.ppo_ratio(logp, logp.detach().clone(), mask), torch.ones_like(r))
    loss, m = ppo.policy_loss(logp, None, adv, mask, ppo.PPOConfig(eps_low=0.0, eps_high=0.0))
    assert m["pg_clipfrac"] == 0.0 and m["pg_clipfrac_lower"] == 0.0 and m["ppo_kl"] == 0.0
    loss.backward()
    # on-policy the loss is plain policy gradient: dL/dlogp_t = -A_b / N exactly on selected tokens
    n = mask.sum()
    expected = torch.where(mask, -adv[:, None].expand(4, 6) / n, torch.zeros(()))
    assert torch.allclose(logp.grad, expected, rtol=1e-6, atol=0)


def test_on_policy_ratio_is_exact_in_bf16():
    logp = torch.tensor([[-0.1234, -3.5, -7.25]], dtype=torch.bfloat16)
    r = ppo.ppo_ratio(logp, None, torch.ones(1, 3, dtype=torch.bool))
    assert r.dtype == torch.float32 and torch.equal(r, torch.ones_like(r))


def test_ppo_is_clips_where_decoupled_ppo_does_not():
    # Why pi_rollout must not be PPO's denominator: on-policy with a sampler mismatch of +-0.3 nats,
    # "PPO-IS" (old_logp = rollout_logp) sees ratios of exp(+-0.3) and clips; decoupled PPO does not.
    logp = t([[-1.0, -2.0, -0.5, -1.5]]).requires_grad_()
    roll = logp.detach() + t([[0.3, -0.3, 0.3, -0.3]])
    adv, mask = t([1.0]), torch.ones(1, 4, dtype=torch.bool)
    _, ppo_is = ppo.policy_loss(logp, roll, adv, mask)
    _, decoupled = ppo.policy_loss(logp, None, adv, mask, ppo.PPOConfig(correction="token-tis"), rollout_logp=roll)
    assert ppo_is["pg_clipfrac"] == approx(0.5)  # the two tokens with r = exp(0.3) > 1.2
    assert decoupled["pg_clipfrac"] == 0.0


# ---------------------------------------------------------------------------------------------
# Masking: NaN/inf in masked positions, fully masked rows


def _loss_and_grad(logp, old, roll, adv, ref, ent, mask, cfg):
    logp = logp.clone().requires_grad_()
    loss, m = ppo.policy_loss(logp, old, adv, mask, cfg, rollout_logp=roll, ref_logp=ref, entropy=ent)
    loss.backward()
    return loss.detach(), logp.grad, m


@pytest.mark.parametrize("agg", ppo.AGG_MODES)
@pytest.mark.parametrize("correction", ["off", "token-tis", "seq-mis", "icepop", "seq-tis+geo-rs", "k3-rs"])
def test_garbage_in_masked_positions_changes_nothing(agg, correction):
    g = torch.Generator().manual_seed(1)
    shape = (3, 5)
    logp = -2 * torch.rand(shape, generator=g, dtype=D)
    old = logp + 0.1 * torch.randn(shape, generator=g, dtype=D)
    roll = old + 0.01 * torch.randn(shape, generator=g, dtype=D)
    adv = torch.randn(shape, generator=g, dtype=D)
    ref = logp + 0.2 * torch.randn(shape, generator=g, dtype=D)
    ent = torch.rand(shape, generator=g, dtype=D)
    mask = t([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 0, 1, 0, 0]])
    cfg = ppo.PPOConfig(loss_agg=agg, norm_length=5, kl_coef=0.1, entropy_coef=0.01, correction=correction)
    clean = _loss_and_grad(logp, old, roll, adv, ref, ent, mask, cfg)
    dirty = [x.clone() for x in (logp, old, roll, adv, ref, ent)]
    for i, x in enumerate(dirty):
        x[mask == 0] = [NAN, INF, -INF, NAN, INF, NAN][i]
    loss, grad, m = _loss_and_grad(*dirty, mask, cfg)
    assert torch.equal(loss, clean[0]) and torch.equal(grad, clean[1]) and m == clean[2]
    assert torch.equal(grad[mask == 0], torch.zeros_like(grad[mask == 0]))
    assert all(math.isfinite(v) for v in m.values())


@pytest.mark.parametrize("agg", ppo.AGG_MODES)
def test_fully_masked_sequence_drops_out(agg):
    logp = t([[-1.0, -2.0], [-0.5, -0.7]])
    old = t([[-1.1, -1.8], [-0.5, -0.9]])
    adv = t([1.0, -2.0])
    cfg = ppo.PPOConfig(loss_agg=agg, norm_length=2)
    base, _ = ppo.policy_loss(logp, old, adv, t([[1, 1], [1, 0]]), cfg)
    loss, _ = ppo.policy_loss(torch.cat([logp, t([[NAN, NAN]])]), torch.cat([old, t([[INF, NAN]])]),
                              t([1.0, -2.0, NAN]), t([[1, 1], [1, 0], [0, 0]]), cfg)
    assert torch.equal(loss, base)


# ---------------------------------------------------------------------------------------------
# Rollout correction: TIS, IcePop, rejection at their boundaries


EPS = 1e-6


def _weights(log_rho, cfg, mask=None):
    log_rho = t(log_rho)
    mask = torch.ones_like(log_rho, dtype=torch.bool) if mask is None else t(mask)
    w, keep, m = ppo.rollout_correction(log_rho, torch.zeros_like(log_rho), mask, cfg)
    return w, keep, m


def test_token_tis_cap_boundary():
    w, keep, _ = _weights([[L(2 - EPS), L(2 + EPS), L(0.1)]], "token-tis")
    assert w.flatten().tolist() == approx([[2 - EPS, 2.0, 0.1]]) and keep.all()


def test_seq_tis_cap_boundary_and_broadcast():
    # sequence weight = 1.5 * (2 +- eps) / 1.5 = 2 -+ eps, broadcast to both tokens of the row
    w, _, _ = _weights([[L(1.5), L((2 - EPS) / 1.5)], [L(1.5), L((2 + EPS) / 1.5)]], "seq-tis")
    assert w.flatten().tolist() == approx([[2 - EPS, 2 - EPS], [2.0, 2.0]])


def test_weights_carry_no_gradient_and_log_ratio_is_clamped():
    old = t([[0.0, 0.0]]).requires_grad_()
    roll = t([[-30.0, 30.0]])  # log_rho = +-30 -> clamped to +-20 before exp
    w, _, _ = ppo.rollout_correction(old, roll, torch.ones(1, 2, dtype=torch.bool),
                                     ppo.RolloutCorrection(is_level="token", is_cap=None))
    assert not w.requires_grad
    assert w.flatten().tolist() == approx([[math.exp(20), math.exp(-20)]])


def test_icepop_band_boundaries_zero_but_keep_in_denominator():
    w, keep, m = _weights([[L(0.5 + EPS), L(0.5 - EPS), L(5 - EPS), L(5 + EPS)]], "icepop")
    assert w.flatten().tolist() == approx([[0.5 + EPS, 0.0, 5 - EPS, 0.0]])
    assert keep.all() and m["rollout_corr/rollout_rs_masked_fraction"] == 0.0
    # on-policy (r = 1), token-mean: the zeroed tokens still count in the denominator (4 tokens)
    roll = -t([[L(0.5 + EPS), L(0.5 - EPS), L(5 - EPS), L(5 + EPS)]])
    loss, _ = ppo.policy_loss(torch.zeros(1, 4, dtype=D), None, t([1.0]), torch.ones(1, 4, dtype=torch.bool),
                              ppo.PPOConfig(correction="icepop"), rollout_logp=roll)
    assert loss.item() == approx(-(0.5 + EPS + 5 - EPS) / 4)


def test_seq_k1_rejection_boundaries():
    # rows: prod rho = 2 - eps (in), 2 + eps (out), 0.5 + eps (in), 0.5 - eps (out); two tokens each
    rows = [[L(1.25), L(v / 1.25)] for v in (2 - EPS, 2 + EPS, 0.5 + EPS, 0.5 - EPS)]
    w, keep, m = _weights(rows, "seq-rs")
    assert keep.all(-1).tolist() == [True, False, True, False]
    assert w.tolist() == [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]
    assert m["rollout_corr/rollout_rs_masked_fraction"] == 0.5
    assert m["rollout_corr/rollout_rs_seq_masked_fraction"] == 0.5
    # seq-mis: same rule, and the accepted rows carry their sequence weight
    w, keep, _ = _weights(rows, "seq-mis")
    assert keep.all(-1).tolist() == [True, False, True, False]
    assert w.flatten().tolist() == approx([[2 - EPS] * 2, [0.0] * 2, [0.5 + EPS] * 2, [0.0] * 2])


def test_geometric_rejection_boundaries_and_length_invariance():
    d = 1e-7
    rows = [[L(1.001) - d + 0.3, L(1.001) - d - 0.3, 0.0],  # mean log rho = log 1.001 - d over 2 tokens: in
            [L(1.001) + d, L(1.001) + d, L(1.001) + d],  # 3 tokens, geometric mean 1.001 (1 + tiny): out
            [L(0.999) + d, 0.0, 0.0],  # one token: in
            [L(0.999) - d, 0.0, 0.0]]  # out
    mask = [[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 0, 0]]
    _, keep, _ = _weights(rows, "geo-rs", mask)
    assert keep.any(-1).tolist() == [True, False, True, False]


def test_k3_rejection_boundaries():
    x = 0.14  # one token with log rho = 0.14: k3 = e^0.14 - 0.14 - 1 = 0.0102738
    k3 = math.exp(x) - x - 1
    assert k3 == approx(0.010273799, rel=1e-7)
    for threshold, accepted in [(k3 + 1e-9, True), (k3 - 1e-9, False)]:
        cfg = ppo.RolloutCorrection(rs="k3", rs_k3_max=threshold)
        _, keep, _ = _weights([[x, NAN]], cfg, [[1, 0]])
        assert keep[0, 0].item() is accepted
    # the preset's 0.01: mean over a row's tokens; [0.14, 0] has mean k3 0.00514 -> accepted
    _, keep, _ = _weights([[x, 0.0], [x, x]], "k3-rs")
    assert keep.all(-1).tolist() == [True, False]


def test_rejected_sequences_leave_the_denominator():
    # row 0 (2 tokens, A = 1) accepted, row 1 (1 token, A = -5, prod rho = 3) rejected; on-policy r = 1
    logp = t([[-1.0, -1.0], [-1.0, NAN]])
    roll = t([[-1.0, -1.0], [-1.0 - L(3), NAN]])
    mask, adv = t([[1, 1], [1, 0]]), t([1.0, -5.0])
    off, _ = ppo.policy_loss(logp, None, adv, mask, ppo.PPOConfig(), rollout_logp=roll)
    rs, m = ppo.policy_loss(logp, None, adv, mask, ppo.PPOConfig(correction="seq-rs"), rollout_logp=roll)
    assert off.item() == approx(-(1 + 1 - 5) / 3)
    assert rs.item() == approx(-(1 + 1) / 2)
    assert m["rollout_corr/rollout_rs_masked_fraction"] == approx(1 / 3)
    assert m["rollout_corr/rollout_rs_seq_masked_fraction"] == approx(1 / 2)


def test_batch_normalize_divides_by_masked_mean():
    cfg = ppo.RolloutCorrection(is_level="token", batch_normalize=True)
    w, _, _ = _weights([[L(1.25), 0.0], [L(1.6), NAN]], cfg, [[1, 1], [1, 0]])
    mean = (1.25 + 1 + 1.6) / 3
    assert w.flatten().tolist() == approx([[1.25 / mean, 1 / mean], [1.6 / mean, 0.0]])
    cfg = ppo.RolloutCorrection(is_level="sequence", batch_normalize=True)  # mean over sequences
    w, _, _ = _weights([[L(1.25), 0.0], [L(1.6), NAN]], cfg, [[1, 1], [1, 0]])
    mean = (1.25 + 1.6) / 2
    assert w.flatten().tolist() == approx([[1.25 / mean, 1.25 / mean], [1.6 / mean, 0.0]])


@pytest.mark.parametrize("name", sorted(ppo.CORRECTION_PRESETS))
def test_every_preset_gives_finite_loss_gradient_and_metrics(name):
    g = torch.Generator().manual_seed(2)
    logp = (-2 * torch.rand(4, 6, generator=g)).requires_grad_()
    roll = logp.detach() + 0.3 * torch.randn(4, 6, generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.2
    loss, m = ppo.policy_loss(logp, None, torch.randn(4, generator=g), mask, ppo.PPOConfig(correction=name),
                              rollout_logp=roll)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    if name == "off":  # "off" with the sampler's log-probs is the plain loss
        adv = torch.randn(4, generator=g)
        plain, _ = ppo.policy_loss(logp, None, adv, mask)
        same, _ = ppo.policy_loss(logp, None, adv, mask, rollout_logp=roll)
        assert torch.equal(plain, same)


def test_presets_and_config_errors():
    assert {"off", "token-tis", "seq-tis", "icepop", "seq-rs", "seq-mis", "geo-rs", "k3-rs",
            "token-tis+geo-rs", "seq-tis+geo-rs"} <= set(ppo.CORRECTION_PRESETS)
    with pytest.raises(ValueError, match="unknown rollout correction"):
        ppo.PPOConfig(correction="tis")
    with pytest.raises(ValueError, match="is_band"):
        ppo.RolloutCorrection(is_band=(0.5, 2.0))
    logp, mask = t([[-1.0]]), t([[1]])
    with pytest.raises(ValueError, match="needs rollout_logp"):
        ppo.policy_loss(logp, None, t([1.0]), mask, ppo.PPOConfig(correction="seq-tis"))
    with pytest.raises(ValueError, match="needs ref_logp"):
        ppo.policy_loss(logp, None, t([1.0]), mask, ppo.PPOConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="old_logp has shape"):
        ppo.policy_loss(logp, t([-1.0]), t([1.0]), mask)
    with pytest.raises(ValueError, match="advantages has shape"):
        ppo.policy_loss(logp, None, t([1.0, 2.0]), mask)


# ---------------------------------------------------------------------------------------------
# KL to the reference policy, entropy


def test_kl_estimators_hand_values():
    logp, ref = t([L(0.5)]), t([L(0.25)])
    assert ppo.kl_penalty(logp, ref, "k1").item() == approx(L(2))
    assert ppo.kl_penalty(logp, ref, "k2").item() == approx(0.5 * L(2) ** 2)
    assert ppo.kl_penalty(logp, ref, "k3").item() == approx(0.5 + L(2) - 1)  # d = -log 2
    # k3 clamps the log difference to [-10, 10]
    far = ppo.kl_penalty(t([0.0, -50.0]), t([-50.0, 0.0]), "k3")
    assert far.tolist() == approx([math.exp(-10) + 10 - 1, math.exp(10) - 10 - 1])


def test_kl_and_entropy_terms_in_the_loss():
    # on-policy, A = 0: the loss is only kl_coef * mean(k1) - entropy_coef * mean(entropy)
    logp = t([[L(0.5), L(0.25)]]).requires_grad_()
    ref = t([[L(0.25), L(0.25)]])
    ent = t([[1.0, 3.0]])
    cfg = ppo.PPOConfig(kl_coef=0.5, kl_estimator="k1", entropy_coef=0.1)
    loss, m = ppo.policy_loss(logp, None, t([0.0]), t([[1, 1]]), cfg, ref_logp=ref, entropy=ent)
    assert loss.item() == approx(0.5 * L(2) / 2 - 0.1 * 2.0)
    assert m["kl_ref"] == approx(L(2) / 2) and m["entropy"] == approx(2.0) and m["pg_loss"] == 0.0
    loss.backward()
    assert logp.grad.flatten().tolist() == approx([[0.25, 0.25]])  # d(0.5 * mean(logp - ref)) / dlogp_t


# ---------------------------------------------------------------------------------------------
# Mismatch metrics


def test_rollout_mismatch_metrics_hand_example():
    # tokens (pi_old, pi_rollout): (0.5, 0.4), (0.25, 0.25) | (0.8, 0.5), padding
    old = t([[L(0.5), L(0.25)], [L(0.8), NAN]])
    roll = t([[L(0.4), L(0.25)], [L(0.5), INF]])
    m = ppo.rollout_mismatch_metrics(old, roll, t([[1, 1], [1, 0]]))
    p = "rollout_corr/"
    # rho = [1.25, 1, 1.6]
    assert m[p + "kl"] == approx((L(0.8) + 0 + L(0.625)) / 3)  # = log(0.5) / 3
    assert m[p + "k3_kl"] == approx((0.25 - L(1.25) + 0.6 - L(1.6)) / 3)
    assert m[p + "chi2_token"] == approx((1.5625 + 1 + 2.56) / 3 - 1)
    assert m[p + "chi2_seq"] == approx((1.5625 + 2.56) / 2 - 1)
    d0, d1 = L(0.8) / 2, L(0.625)  # mean_t rollout - mean_t old, per sequence
    assert m[p + "log_ppl_diff"] == approx((d0 + d1) / 2)
    assert m[p + "log_ppl_abs_diff"] == approx((abs(d0) + abs(d1)) / 2)
    assert m[p + "log_ppl_diff_max"] == approx(d0) and m[p + "log_ppl_diff_min"] == approx(d1)
    assert m[p + "ppl_ratio"] == approx((math.sqrt(0.8) + 0.625) / 2)
    assert m[p + "max_abs_prob_diff"] == approx(0.3)
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())


def test_rollout_mismatch_metrics_zero_when_identical_or_empty():
    x = t([[-1.0, -2.0]])
    same = ppo.rollout_mismatch_metrics(x, x, t([[1, 1]]))
    assert all(v == (1.0 if k.endswith("ppl_ratio") else 0.0) for k, v in same.items())
    empty = ppo.rollout_mismatch_metrics(x, x + 1, t([[0, 0]]))
    assert all(v == 0.0 for v in empty.values())


def test_correction_weight_metrics_hand_example():
    # token TIS on rho = [1.25, 1, 1.6] (below the cap 2)
    _, _, m = _weights([[L(1.25), 0.0], [L(1.6), NAN]], "token-tis", [[1, 1], [1, 0]])
    p = "rollout_corr/rollout_is_"
    mean = 3.85 / 3
    assert m[p + "mean"] == approx(mean)
    assert m[p + "std"] == approx(math.sqrt((1.5625 + 1 + 2.56) / 3 - mean**2))
    assert m[p + "min"] == approx(1.0) and m[p + "max"] == approx(1.6)
    assert m[p + "eff_sample_size"] == approx(3.85**2 / (3 * (1.5625 + 1 + 2.56)))  # 0.9645


# ---------------------------------------------------------------------------------------------
# Objectives: GSPO and CISPO against their closed forms (autograd vs the formula, fp64)


def _objective_inputs(seed=0):
    """4 sequences of lengths 5, 3, 1, 4 (NaN in the padding); old = logp - a per-row shift + noise,
    so that the mean log-ratios are about [0.3, -0.3, 0.02, 0.0]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 3, 1, 4])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    logp = -3 * torch.rand(4, 5, generator=g, dtype=D)
    shift = t([0.3, -0.3, 0.02, 0.0])[:, None] + 0.05 * torch.randn(4, 5, generator=g, dtype=D)
    old = torch.where(mask, logp - shift, NAN)
    logp = torch.where(mask, logp, NAN).requires_grad_()
    return logp, old, mask, lengths


def _grad(loss, logp):
    (grad,) = torch.autograd.grad(loss, logp)
    return grad


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_gspo_gradient_equals_the_sequence_formula(agg):
    logp, old, mask, n = _objective_inputs()
    adv = t([1.0, -1.0, 2.0, -0.5])
    eps_low, eps_high = 0.1, 0.2
    cfg = ppo.PPOConfig(objective="gspo", eps_low=eps_low, eps_high=eps_high, dual_clip=None, loss_agg=agg)
    loss, metrics = ppo.policy_loss(logp, old, adv, mask, cfg)
    # the closed form, sequence by sequence
    diff = [[(logp[b, i] - old[b, i]).item() for i in range(n[b])] for b in range(4)]
    s = [math.exp(sum(d) / len(d)) for d in diff]
    obj = [min(s_i * a, min(max(s_i, 1 - eps_low), 1 + eps_high) * a) for s_i, a in zip(s, adv.tolist())]
    clipped = [(a > 0 and s_i > 1 + eps_high) or (a < 0 and s_i < 1 - eps_low) for s_i, a in zip(s, adv.tolist())]
    assert clipped == [True, True, False, False]  # s ~ [1.35, 0.74, 1.02, 1.0]: two clipped, two not
    weight = [n_b / n.sum().item() for n_b in n.tolist()] if agg == "token-mean" else [0.25] * 4
    assert loss.item() == approx(-sum(w * o for w, o in zip(weight, obj)))
    # d loss / d logp_t = - weight_b * s_b * A_b / |y_b| where unclipped (s_b times d mean_t logp_t)
    expected = torch.zeros(4, 5, dtype=D)
    for b in range(4):
        if not clipped[b]:
            expected[b, : n[b]] = -weight[b] * s[b] * adv[b].item() / n[b].item()
    grad = _grad(loss, logp)
    assert grad.flatten().tolist() == approx(expected.flatten().tolist())
    # the same as autograd through the plain sequence form min(s_i A_i, clip(s_i) A_i)
    log_s = torch.where(mask, logp - old, 0.0).sum(-1) / n
    s_plain = torch.exp(log_s)
    plain = torch.minimum(s_plain * adv, s_plain.clamp(1 - eps_low, 1 + eps_high) * adv)
    per_tok = plain[:, None].expand(4, 5)
    assert torch.allclose(_grad(-ppo.aggregate(per_tok, mask, agg), logp), grad, rtol=1e-12, atol=1e-15)
    # pg_clipfrac counts tokens: the clipped sequences' tokens over all tokens
    assert metrics["pg_clipfrac"] == approx((5 + 3) / 13) and metrics["pg_clipfrac_lower"] == 0.0
    assert metrics["ppo_kl"] == approx(-sum(sum(d) for d in diff) / 13)


def test_gspo_per_token_advantages_and_dual_clip():
    # GSPO-token: A_t per token, the clip decision per token from the sequence's s_i; the dual clip
    # caps A < 0 tokens at c A when s_i > c. One row, mean log-ratio log 4: s = 4 > c = 3.
    logp = t([[-1.0, -2.0]]).requires_grad_()
    old = logp.detach() - L(4)
    cfg = ppo.PPOConfig(objective="gspo", eps_low=0.2, eps_high=0.2, dual_clip=3.0)
    loss, m = ppo.policy_loss(logp, old, t([[1.0, -1.0]]), torch.ones(1, 2, dtype=torch.bool), cfg)
    assert loss.item() == approx(-(1.2 * 1.0 + 3.0 * -1.0) / 2)  # clipped to 1.2 A and dual-clipped to 3 A
    assert m["pg_clipfrac"] == approx(0.5) and m["pg_clipfrac_lower"] == approx(0.5)
    assert _grad(loss, logp).tolist() == [[0.0, 0.0]]


@pytest.mark.parametrize("eps_low", [0.1, 10.0])  # 10: no lower bound, as MiniMax-M1 runs it
def test_cispo_gradient_equals_the_formula(eps_low):
    logp, old, mask, n = _objective_inputs(1)
    g = torch.Generator().manual_seed(2)
    adv = torch.randn(4, 5, generator=g, dtype=D)  # per-token advantages, both signs
    eps_high = 0.2
    cfg = ppo.PPOConfig(objective="cispo", eps_low=eps_low, eps_high=eps_high)
    loss, metrics = ppo.policy_loss(logp, old, adv, mask, cfg)
    # token loss - sg(clip(r_t)) A_t logp_t, token-mean over the 13 tokens
    total, expected, n_clipped = 0.0, torch.zeros(4, 5, dtype=D), 0
    for b in range(4):
        for i in range(n[b]):
            r = math.exp(logp[b, i].item() - old[b, i].item())
            w = min(max(r, 1 - eps_low), 1 + eps_high)
            n_clipped += w != r
            total += w * adv[b, i].item() * logp[b, i].item()
            expected[b, i] = -w * adv[b, i].item() / 13  # nonzero also where clipped
    assert 0 < n_clipped < 13  # some weights clipped, some not
    assert loss.item() == approx(-total / 13)
    assert _grad(loss, logp).flatten().tolist() == approx(expected.flatten().tolist())
    assert metrics["pg_clipfrac"] == approx(n_clipped / 13) and metrics["pg_clipfrac_lower"] == 0.0


@pytest.mark.parametrize("objective", list(ppo.OBJECTIVES))
def test_on_policy_is_exact_for_every_objective(objective):
    g = torch.Generator().manual_seed(0)
    logp = (-5 * torch.rand(4, 6, generator=g)).requires_grad_()  # fp32, like the trainer
    mask = torch.rand(4, 6, generator=g) > 0.3
    adv = 100 * torch.randn(4, generator=g)  # huge advantages, zero-width clip: any ratio != 1 clips
    cfg = ppo.PPOConfig(objective=objective, eps_low=0.0, eps_high=0.0)
    for old in (None, logp.detach().clone()):
        adv_t = torch.where(mask, adv[:, None].expand(4, 6), 0.0)
        obj, clipped, dual = ppo.OBJECTIVES[objective](logp, old, adv_t, mask, cfg)
        ratio_one = adv_t * torch.where(mask, logp, 0.0) if objective == "cispo" else adv_t  # r == 1: obj = A (logp)
        assert torch.equal(obj, ratio_one) and not clipped.any() and not dual.any()
        loss, m = ppo.policy_loss(logp, old, adv, mask, cfg)
        assert m["pg_clipfrac"] == 0.0 and m["pg_clipfrac_lower"] == 0.0 and m["ppo_kl"] == 0.0
        # on-policy all three are plain policy gradient: dL/dlogp_t = -A_b / N on selected tokens
        expected = torch.where(mask, -adv[:, None].expand(4, 6) / mask.sum(), torch.zeros(()))
        assert torch.allclose(_grad(loss, logp), expected, rtol=1e-6, atol=0)


def test_objectives_compose_with_rollout_correction_kl_and_entropy():
    logp, old, mask, n = _objective_inputs()
    g = torch.Generator().manual_seed(3)
    # log rho per row ~ [0.05, 1.0, 0.3, -0.1] per token: Seq-MIS rejects row 1 (prod rho ~ e^3 > 2)
    log_rho = t([0.05, 1.0, 0.3, -0.1])[:, None] + 0.02 * torch.randn(4, 5, generator=g, dtype=D)
    roll = torch.where(mask, old - log_rho, NAN)
    adv = t([1.0, -1.0, 2.0, -0.5])
    for objective, preset in [(o, p) for o in ("gspo", "cispo") for p in ("seq-mis", "token-tis")]:
        cfg = ppo.PPOConfig(objective=objective, correction=preset, loss_agg="seq-mean-token-mean")
        loss, m = ppo.policy_loss(logp, old, adv, mask, cfg, rollout_logp=roll)
        w, keep, corr = ppo.rollout_correction(old, roll, mask, preset)
        assert {k: m[k] for k in corr} == corr  # the same correction metrics as PPO's
        kept = keep.any(-1)  # a rejected sequence leaves the loss and its denominator
        assert kept.tolist() == ([True, False, True, True] if preset == "seq-mis" else [True] * 4)
        expected = torch.zeros(4, 5, dtype=D)
        for b in range(4):
            if not kept[b]:
                continue
            d = [(logp[b, i] - old[b, i]).item() for i in range(n[b])]
            for i in range(n[b]):
                if objective == "gspo":  # s_b A_b / |y_b| where unclipped
                    s = math.exp(sum(d) / len(d))
                    unclipped = not ((adv[b] > 0 and s > 1.2) or (adv[b] < 0 and s < 0.8))
                    grad = s * adv[b].item() / n[b].item() if unclipped else 0.0
                else:
                    grad = min(max(math.exp(d[i]), 0.8), 1.2) * adv[b].item() / n[b].item()
                expected[b, i] = -w[b, i].item() * grad / kept.sum().item()
        assert _grad(loss, logp).flatten().tolist() == approx(expected.flatten().tolist())
        # KL and entropy terms add on top, the same as for PPO
        ref, ent = torch.where(mask, old - 0.1, NAN), torch.where(mask, 0.5 + 0 * old, NAN)
        cfg2 = ppo.PPOConfig(objective=objective, correction=preset, loss_agg="seq-mean-token-mean",
                             kl_coef=0.3, entropy_coef=0.01)
        loss2, m2 = ppo.policy_loss(logp, old, adv, mask, cfg2, rollout_logp=roll, ref_logp=ref, entropy=ent)
        kl = ppo.kl_penalty(torch.where(keep, logp, 0.0), torch.where(keep, ref, 0.0))
        extra = 0.3 * ppo.aggregate(kl, keep, "seq-mean-token-mean") - 0.01 * 0.5
        assert loss2.item() == approx(loss.item() + extra.item()) and m2["pg_loss"] == approx(m["pg_loss"])


def test_objective_config_errors():
    with pytest.raises(ValueError, match="unknown objective"):
        ppo.PPOConfig(objective="grpo")
    with pytest.raises(ValueError, match="eps_low"):
        ppo.PPOConfig(objective="gspo", eps_low=1.0)
    with pytest.raises(ValueError, match="eps_low"):
        ppo.PPOConfig(eps_low=2.0)
    assert ppo.PPOConfig(objective="cispo", eps_low=1e9).eps_low == 1e9  # no lower bound on the weight


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["gspo", "cispo"])
def test_train_runs_with_each_objective(tmp_path, objective):
    import test_train

    rows = test_train.run(tmp_path, objective, "--steps", "1", "--objective", objective, "--clip-low", "3e-4",
                          "--clip-high", "4e-4")
    rl = [r for r in rows if r["phase"] == "rl"]
    assert len(rl) == 1 and math.isfinite(rl[0]["loss"]) and math.isfinite(rl[0]["grad_norm"])
    assert rl[0]["pg_clipfrac"] == 0.0 and rl[0]["ppo_kl"] == 0.0  # exactly on-policy, even with a tiny clip
