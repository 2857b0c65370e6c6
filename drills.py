"""Drills: rows added to each warm-start batch beside the demonstrations, for the skills the
tasks share and a seed can miss when it learns only from them (train.warm_start pads them).

Each returns (token rows, loss-mask rows): the mask is 1 on what the assistant should write.
- copy_drills: numbers and names repeated from an earlier message (a content-based copy);
- bisect_drills: guess demonstrations on other ranges (every interval's middle).
"""

from __future__ import annotations

import random
import string

import env
import harmony


def drill_string(rng: random.Random, alphabet: str, length: int) -> str:
    """`length` characters of `alphabet`, each repeating the one before with probability 1/3:
    doubled characters ("Otto", "100") are where a copy that looks only one token back slips."""
    out = [rng.choice(alphabet)]
    while len(out) < length:
        out.append(out[-1] if rng.random() < 1 / 3 else rng.choice(alphabet))
    return "".join(out)


def copy_drills(chat: harmony.Harmony, rng: random.Random, n: int, n_names: int = 0) -> tuple[list, list]:
    """n rows: one to three messages of 1-10 random digits each (from the user or a tool), then
    the assistant's final answer repeating the last one (loss on the answer); then n_names rows
    the same with name-like strings (a capital, then 1-7 lower-case letters, doubled letters
    frequent). The copy distance varies with the lengths, so only a content-based copy (an
    induction head) solves them all, where the tasks alone let a head per distance form, and some
    seeds lack one after the warm start."""
    rows, masks = [], []
    for i in range(n + n_names):
        if i < n:
            texts = ["".join(rng.choice("0123456789") for _ in range(rng.randint(1, 10)))
                     for _ in range(rng.randint(1, 3))]
        else:
            texts = [rng.choice(string.ascii_uppercase) + drill_string(rng, string.ascii_lowercase, rng.randint(1, 7))
                     for _ in range(rng.randint(1, 3))]
        msgs = [harmony.Message("user", x) if rng.random() < 0.5 else
                harmony.tool_reply(rng.choice(["calculator", "search"]), x) for x in texts]
        prompt = chat.render_for_completion(msgs)
        answer = chat.encode(harmony.completion(harmony.final(texts[-1])))
        rows.append(prompt + answer)
        masks.append([0] * len(prompt) + [1] * len(answer))
    return rows, masks


def bisect_drills(chat: harmony.Harmony, rng: random.Random, n: int, args, cache: dict) -> tuple[list, list]:
    """n guess demonstrations (the expert, with the --demo-* imperfections) on a range 1..N with N
    drawn from 8-64: the tasks' range 1..32 visits the same intervals on every episode (its
    bisection tree), and a seed can fail the middle of one of them, e.g. 22<n<24 -> 22, while
    other ranges put every interval's middle in the demonstrations. The held-out task is unchanged."""
    eps = []
    for _ in range(n):
        size = rng.randint(8, 64)
        if size not in cache:  # an environment renders its prompt once
            cache[size] = env.GuessEnv(chat, n=size)
        eps.append(cache[size].expert_episode(rng.randrange(2**31), p_skip_tool=args.demo_skip_tool,
                                              p_mistake=args.demo_mistake))
    return [e.token_ids for e in eps], [e.loss_mask for e in eps]
