"""MoE routing replay: the model's routes argument (replayed experts, gates from the current
router), its argument checks, the sampler's recorded routes against the trainer's, and
train.py --routing-replay (replay.py)."""

import json
import types

import pytest
import torch

import model
import replay
import sampler
import train
from conftest import randomize_


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return randomize_(model.Transformer(model.preset("tiny")).eval())


def tokens(seed=0, shape=(3, 17)):
    return torch.randint(0, 512, shape, generator=torch.Generator().manual_seed(seed))


def test_forward_returns_routes_in_the_routers_top_k_order(net):
    x = tokens()
    logits, routes = net(x, return_routes=True)
    cfg = net.config
    assert routes.shape == (3, 17, cfg.num_hidden_layers, cfg.num_experts_per_tok) and routes.dtype == torch.int64
    assert torch.equal(logits, net(x))  # asking for the routes changes nothing
    h = net.embed_tokens(x)  # layer 0's router sees the first block's post-attention input
    cos, sin = net.rope(torch.arange(17).expand(3, 17), h.dtype)
    block = net.layers[0]
    h = h + block.self_attn(block.input_layernorm(h), cos, sin)
    router_logits = block.mlp.router(block.post_attention_layernorm(h))
    assert torch.equal(routes[:, :, 0], router_logits.topk(cfg.num_experts_per_tok, dim=-1).indices)


def test_replaying_own_routes_is_bitwise_identical(net):
    x = tokens(1)
    logits, routes = net(x, return_routes=True)
    assert torch.equal(net(x, routes=routes), logits)
    assert torch.equal(net(x, routes=routes.to(torch.int8)), logits)  # the sampler's compact dtype
    h, again = net.hidden(x, routes=routes, return_routes=True)
    assert torch.equal(again, routes) and torch.equal(net.logits(h), logits)


def test_replay_with_perturbed_routers_uses_the_given_experts_and_trains_the_router(net):
    x = tokens(2)
    routes = net(x, return_routes=True)[1]
    other = randomize_(model.Transformer(net.config), seed=0)  # same weights ...
    with torch.no_grad():
        for layer in other.layers:  # ... but every router moved
            layer.mlp.router.weight.add_(0.5 * torch.randn_like(layer.mlp.router.weight))
    free_logits, free_routes = other(x, return_routes=True)
    assert not torch.equal(free_routes, routes)  # the moved routers choose other experts
    used, gates, router_out = [], [], []

    def experts_inputs(module, args):  # Experts.forward(x, expert_idx, weights)
        used.append(args[1])
        gates.append(args[2])

    hooks = [layer.mlp.experts.register_forward_pre_hook(experts_inputs) for layer in other.layers]
    hooks += [layer.mlp.router.register_forward_hook(lambda module, args, out: router_out.append(out) and None)
              for layer in other.layers]
    replayed = other(x, routes=routes)
    for hook in hooks:
        hook.remove()
    k = net.config.num_experts_per_tok
    for i in range(net.config.num_hidden_layers):
        assert torch.equal(used[i], routes[:, :, i].reshape(-1, k))  # the replayed experts are the ones run
        expected = router_out[i].gather(-1, used[i]).softmax(-1)  # gates: the current router's logits there
        assert torch.equal(gates[i], expected)
    assert not torch.allclose(replayed, free_logits)
    replayed.logsumexp(-1).sum().backward()
    for layer in other.layers:
        assert layer.mlp.router.weight.grad is not None and layer.mlp.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("make, message", [
    (lambda r: r + 8, "out of range"),  # the tiny preset has 8 experts
    (lambda r: r - 8, "out of range"),
    (lambda r: r[:, :-1], "shape"),
    (lambda r: r[..., :1], "shape"),
    (lambda r: r.float(), "integer"),
    (lambda r: r.tolist(), "integer"),
    (lambda r: torch.cat([r[..., :1], r[..., :1]], dim=-1), "same expert twice"),
])
def test_bad_routes_are_rejected_with_a_message(net, make, message):
    x = tokens(3)
    routes = net(x, return_routes=True)[1]
    with pytest.raises(ValueError, match=message):
        net(x, routes=make(routes))


def test_route_storage_is_compact():
    cfg = model.preset("tiny")
    sess = sampler.Sampler(model.Transformer(cfg)).session([[1, 2, 3]], max_len=8)
    assert sess.routes.dtype == torch.int8 and sess.routes.shape == (1, 8, 4, 2)
    wide = model.preset("tiny", num_local_experts=128)
    assert sampler.Sampler(model.Transformer(wide)).session([[1]], max_len=4).routes.dtype == torch.int16


def play(engine, rows=8):
    """A multi-turn session: prompts, a sampled turn, appended tool replies, another turn."""
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 512, (int(n),), generator=gen).tolist() for n in torch.randint(3, 20, (rows,))]
    sess = engine.session(prompts, max_len=80)
    sess.generate(max_new_tokens=12, seed=0)
    sess.append({r: torch.randint(0, 512, (5,), generator=gen).tolist() for r in range(0, rows, 2)})
    sess.generate(max_new_tokens=12, seed=1)
    return sess.trajectories()


def decisions(net, trajs):
    """(decisions compared, decisions equal) between the sampler's routes and a full forward's."""
    total = same = 0
    for traj in trajs:
        routes = net.hidden(torch.tensor([traj.tokens]), return_routes=True)[1][0]
        done = traj.routes[:, 0, 0] >= 0
        assert done.sum() == len(traj.tokens) - 1  # every position but the last sampled token
        a, b = traj.routes[done].long().sort(-1).values, routes[done].sort(-1).values
        total += a.shape[0] * a.shape[1]
        same += int((a == b).all(-1).sum())
    return total, same


def test_sampler_routes_equal_the_trainers(net):
    with torch.no_grad():
        total, same = decisions(net, play(sampler.Sampler(net)))
    assert total > 1000 and same / total >= 0.999  # fp32: a near-tie may flip, rarely
    invariant = randomize_(model.Transformer(net.config).eval())
    with torch.no_grad():
        total, same = decisions(invariant, play(sampler.Sampler(invariant, batch_invariant=True)))
    assert same == total  # batch-invariant: every decision


def test_replay_r2_records_the_first_pass_and_r3_uses_the_samplers(net):
    with torch.no_grad():
        trajs = play(sampler.Sampler(net), rows=4)
    x = train.pad([t.tokens for t in trajs])
    recorded, processed = replay.sampler_routes(trajs, x.shape[1])
    lengths = torch.tensor([len(t.tokens) for t in trajs])
    assert torch.equal(processed, torch.arange(x.shape[1]) < lengths[:, None] - 1)  # all but the last token
    other = randomize_(model.Transformer(net.config), seed=1)  # a trainer that routes differently
    r3 = replay.Replay("r3", trajs, x.shape[1], "cpu")
    assert torch.equal(r3.rows()(other, x), other.hidden(x, routes=recorded))
    assert r3.metrics()["rollout_corr/route_mismatch"] > 0.1  # the other model's own choice differs
    r2 = replay.Replay("r2", trajs, x.shape[1], "cpu")
    first, own = other.hidden(x, return_routes=True)
    assert torch.equal(r2.rows()(other, x), first)
    with torch.no_grad():
        other.layers[0].mlp.router.weight.add_(1.0)  # an update between passes
    mb = torch.tensor([1, 3])
    assert torch.equal(r2.rows(mb)(other, x[mb]), other.hidden(x[mb], routes=own[mb]))
    same = replay.Replay("off", trajs, x.shape[1], "cpu")
    same.rows()(net, x)
    assert same.metrics() == {"rollout_corr/route_mismatch": 0.0, "rollout_corr/route_mismatch_max": 0.0}


def test_routing_noise_is_left_out_under_replay():
    args = types.SimpleNamespace(routing_noise=0.3, routing_replay="off")
    assert replay.routing_noise(args) == 0.3
    args.routing_replay = "r3"
    assert replay.routing_noise(args) == 0.0


TINY = ["--preset", "tiny", "--sft-steps", "2", "--sft-batch", "4", "--prompts", "2", "--group-size", "2",
        "--eval-every", "2", "--eval-episodes", "1", "--max-new-tokens", "16", "--steps", "2"]


def rl_rows(tmp_path, name, *extra):
    train.main([*TINY, "--out", str(tmp_path), "--name", name, *extra])
    with open(tmp_path / name / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["phase"] == "rl"]


def test_r3_is_exactly_on_policy_under_router_noise_where_off_is_not(tmp_path):
    off = rl_rows(tmp_path, "off", "--routing-noise", "1.0")
    r3 = rl_rows(tmp_path, "r3", "--routing-noise", "1.0", "--routing-replay", "r3")
    assert any(r["ppo_kl"] != 0 for r in off)
    assert all(r["ppo_kl"] == 0 and r["pg_clipfrac"] == 0 for r in r3)
    assert any(r["rollout_corr/route_mismatch"] > 0 for r in off)  # the noisy pass flips experts
    for r in off + r3:
        assert 0 <= r["rollout_corr/route_mismatch"] <= r["rollout_corr/route_mismatch_max"] <= 1


def test_short_r2_and_r3_runs_complete(tmp_path):
    for mode in ("r2", "r3"):
        rows = rl_rows(tmp_path, mode, "--routing-replay", mode, "--ppo-epochs", "2", "--minibatches", "2")
        assert [r["step"] for r in rows] == [1, 2]
        assert all(r["rollout_corr/route_mismatch"] == 0 for r in rows)  # fp32 sampler sharing the module
