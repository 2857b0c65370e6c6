"""Agentic environments for GPT-OSS, written in the harmony chat format (harmony.py).

An episode is a conversation: the environment renders a prompt that ends with `<|start|>assistant`,
the policy generates one assistant turn (thoughts if any, then a tool call or an answer: it stops
at <|call|> or <|return|>), the environment answers a tool call with the tool's reply message
followed by `<|start|>assistant`, and so on until a final answer, an error or the turn limit ends
the episode with a reward.

    env = make_env("calculator")              # toy tokenizer, compact prompt
    ids = env.reset(seed=0).token_ids         # ends with <|start|>assistant
    while True:
        gen = sample(model, ids, stop=env.stop_token_ids)   # includes the stop token
        tokens, reward, done, info = env.step(gen)          # or env.step(text)
        ids = ids + gen + tokens                             # tokens get loss mask 0 ([] when done)
        if done: break                                       # info["success"], info["reason"]

Design choices
- The toy tokenizer (toy_tokenizer()) gives one token to every recurring piece of text of these
  environments (roles, channels, recipients, JSON argument prefixes, tool replies, names and words
  of the tasks). A tool call is 9-21 tokens and a whole episode 21-74 (guess, with a thought in
  every turn: 15-240), so a tiny model learns the tasks on a CPU in minutes.
- Two prompt modes: compact (one user message; the task is recognisable from it, encoded in one
  call so the toy's pieces are one token each) for the toy model, full (openai-harmony's system
  and developer content, the tools as JSON schemas, then the user) for a real checkpoint. The
  full prompt and the tool replies are Harmony.render_for_completion's tokens: what
  openai-harmony (and so vLLM's gpt-oss serving) renders, token for token. The assistant side
  of the format is the same in both.
- Untrusted model output never raises: a broken message (no stop token, bad header, a stop token
  that does not fit the channel, invalid ids, overlong output, text that is not valid Unicode
  such as a lone surrogate) ends the episode with reward 0
  and `info["reason"] == "malformed"`; a broken tool call (unknown tool, bad JSON, wrong argument
  type, arithmetic error) gets an "error: ..." reply from the tool and the episode goes on.
  Every step does bounded work: actions, tool arguments and expressions have size limits.
- The calculator evaluates arithmetic with calc.py's safe parser. Nothing here calls eval or
  exec, and nothing loads a pickle.
- Tasks are drawn from random.Random seeded with a string built from the environment's name
  and the seed, so an episode is the same on every machine and in every process.
- Expert demonstrations come from a scripted policy driven through reset/step itself, so its
  token sequence is exactly what the live rollout loop would build. Two knobs make it imperfect
  on purpose (p_skip_tool, p_mistake) to leave room for RL after a warm start.
- Rewards are in [0, 1] and are plain functions (calculator_reward, lookup_reward, guess_reward).
"""
from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import islice
from typing import NamedTuple, Sequence

from tokenizers import Tokenizer

import harmony
from calc import calculate
from harmony import (CALL, CHANNELS, END, RETURN, START, DeveloperContent, Harmony, HarmonyError, Message,
                     SystemContent, ToolDescription, ToolNamespace, completion, final, load_tokenizer, render,
                     render_conversation, tool_call)

_TOOL_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*\.[A-Za-z0-9_.\-]+")  # functions.NAME, browser.search, ...

# ----------------------------------------------------------------------------------------------
# What an environment hands out: prompts, steps, episodes; and how it declares its tools

class Prompt(NamedTuple):
    messages: list[Message]
    token_ids: list[int]  # ends with <|start|>assistant
    text: str


class Step(NamedTuple):
    """What step() returns. info["reason"] is "tool_call" or "thinking" while the episode goes on,
    and "correct", "wrong_answer", "max_turns" or "malformed" (details in info["detail"]) at the end."""
    tokens: list[int]  # to append after the generated tokens (tool reply + <|start|>assistant); [] when done
    reward: float  # the episode's reward on the terminal step, 0 before
    done: bool
    info: dict  # success, reason, detail, turn, reply (the tool's text), env; answer when done


@dataclass
class Episode:
    """A whole episode as the rollout loop builds it: prompt + generated + appended tokens."""
    token_ids: list[int]
    loss_mask: list[int]  # 1 on generated tokens (stop tokens included), 0 on prompt and environment tokens
    reward: float
    success: bool
    turns: int
    info: dict = field(default_factory=dict)


class _Malformed(Exception):
    pass


@dataclass(frozen=True)
class Tool:
    """A function tool, declared to a real model in the developer message (full prompt mode)."""
    name: str
    description: str
    params: tuple[tuple[str, str, str], ...]  # (name, JSON schema type, description), all required

    def as_harmony(self) -> ToolDescription:
        """As openai-harmony declares a function tool: its parameters as a JSON schema object."""
        properties = {name: {"type": typ, "description": desc} for name, typ, desc in self.params}
        return ToolDescription(self.name, self.description,
                               {"type": "object", "properties": properties, "required": list(properties)})


class Env:
    """Base class: harmony plumbing, turn counting, error handling. Subclasses define the task.

    Subclass hooks: _new_task(rng) -> user text; _tool(name, args) -> reply text (may call
    self._finish to end the episode); _final(answer) -> (reward, success, reason);
    expert_action(rng, p_skip_tool, p_mistake) -> text of the next assistant message.
    """
    name = "env"
    tools: tuple[Tool, ...] = ()
    instructions = ""
    default_max_turns = 4

    def __init__(self, tokenizer: Tokenizer | Harmony | str | None = None, compact: bool = True,
                 max_turns: int | None = None, max_action_tokens: int = 2048,
                 max_action_chars: int = 16384, reasoning: str = "low"):
        if isinstance(tokenizer, Harmony):
            self.harmony = tokenizer
        else:
            if isinstance(tokenizer, (str, os.PathLike)):
                tokenizer = load_tokenizer(str(tokenizer))
            self.harmony = Harmony(tokenizer if tokenizer is not None else toy_tokenizer())
        self.compact = compact
        self.max_turns = max_turns or self.default_max_turns
        self.max_action_tokens = max_action_tokens
        self.max_action_chars = max_action_chars
        self.reasoning = reasoning
        self.stop_token_ids = self.harmony.action_stop_token_ids  # a turn may think before it acts
        self._tools = {tool.name: tool for tool in self.tools}
        self._active = False
        self._continue_ids = self.harmony.encode(START + "assistant")

    # -- the interface ------------------------------------------------------------------------

    def reset(self, seed: int) -> Prompt:
        """Start the episode of `seed` (same seed, same episode). The prompt ends with <|start|>assistant."""
        self.seed, self.turn, self.replies = seed, 0, []
        self.blind = False  # the scripted expert makes its systematic error (set by expert_episode)
        self._outcome = None
        self._active = True
        user = self._new_task(random.Random(f"{self.name}:{seed}"))
        if self.compact:  # the toy's prompt: encoded in one call, so its pieces become one token each
            messages = [Message("user", user)]
            text = render_conversation(messages)
            return Prompt(messages, self.harmony.encode(text), text)
        messages = [Message("system", SystemContent(reasoning_effort=self.reasoning)),
                    Message("developer", DeveloperContent(self.instructions, (ToolNamespace(
                        "functions", None, tuple(tool.as_harmony() for tool in self.tools)),))),
                    Message("user", user)]
        ids = self.harmony.render_for_completion(messages)  # openai-harmony's tokens, token for token
        return Prompt(messages, ids, self.harmony.decode(ids))

    def step(self, action: Sequence[int] | str | bytes) -> Step:
        """One assistant turn: its generated token ids (stop token included) or its text.

        Returns (tokens to append, reward, done, info). Model output never raises; calling step
        before reset or after done does (that is a bug in the caller).
        """
        if not self._active:
            raise RuntimeError("step() needs reset(seed) first, and again after an episode is done")
        self.turn += 1
        try:
            msgs = self.harmony.parse(self._action_ids(action))
            if not msgs:
                raise _Malformed("empty action")
            for msg in msgs[:-1]:  # a sampler that stops only at <|return|>/<|call|> may pass thoughts first
                if msg.role != "assistant" or msg.end != END or msg.recipient or msg.channel not in ("analysis", "commentary"):
                    raise _Malformed("only analysis/commentary messages ending with <|end|> may precede the last one")
            return self._act(msgs[-1])
        except (_Malformed, HarmonyError) as err:
            return self._end(0.0, False, "malformed", str(err))

    def expert_action(self, rng: random.Random | None = None, p_skip_tool: float = 0.0,
                      p_mistake: float = 0.0) -> str:
        """The scripted policy's next assistant message (text, stop token included) for the current state."""
        raise NotImplementedError

    def in_blind_spot(self) -> bool:
        """Whether the current task is of the kind the scripted expert gets systematically wrong
        (see expert_episode's p_blind_spot). None by default."""
        return False

    def expert_episode(self, seed: int, p_skip_tool: float = 0.0, p_mistake: float = 0.0,
                       rng: random.Random | None = None, p_blind_spot: float = 0.0) -> Episode:
        """Play episode `seed` with the scripted expert, through reset/step like a live rollout.

        p_skip_tool: probability that the expert answers at once from memory (usually wrong)
        instead of calling the tool. p_blind_spot: probability of the expert's systematic error on
        the kind of task it gets wrong (in_blind_spot()): calculator a+b*c questions it types as
        (a+b)*c (operator precedence misread); lookup questions about lockers it answers from
        memory ("I remember everyone's locker"). Above 0.5 a model that imitates the expert makes
        the error when decoding greedily, yet avoids it on some samples: an error RL can find and
        fix. p_mistake: probability of a wrong step (calculator: a typo in the expression;
        lookup: searching the wrong name; guess: a guess at the edge of the feasible interval
        instead of its midpoint, per guess). Skipping is decided on the first turn only. With all
        0 the expert gets reward 1 on every seed.
        rng defaults to one seeded from the seed, so demonstrations are reproducible.
        """
        rng = rng or random.Random(f"expert:{self.name}:{seed}")
        prompt = self.reset(seed)
        self.blind = self.in_blind_spot() and rng.random() < p_blind_spot
        ids, mask = list(prompt.token_ids), [0] * len(prompt.token_ids)
        while True:
            gen = self.harmony.encode(self.expert_action(rng, p_skip_tool, p_mistake))
            st = self.step(gen)
            ids += gen + st.tokens
            mask += [1] * len(gen) + [0] * len(st.tokens)
            if st.done:
                return Episode(ids, mask, st.reward, st.info["success"], st.info["turn"], st.info)

    def transcript(self, ids: Sequence[int], raw: bool = False) -> str:
        return self.harmony.transcript(ids, raw)

    # -- plumbing -------------------------------------------------------------------------------

    def _action_ids(self, action) -> list[int]:
        if isinstance(action, (bytes, bytearray)):
            action = bytes(action[: 4 * self.max_action_chars]).decode("utf-8", errors="replace")
        if isinstance(action, str):
            if len(action) > self.max_action_chars:
                raise _Malformed(f"overlong output (more than {self.max_action_chars} characters)")
            try:  # a lone surrogate ("\ud800") is a str that no tokenizer (and no UTF-8) can encode
                action.encode("utf-8")
            except UnicodeEncodeError as err:
                raise _Malformed(f"text that is not valid Unicode ({err.reason} at character {err.start})") from None
            ids = self.harmony.encode(action)
        else:
            try:  # lists, tuples, numpy arrays, tensors: anything iterable of integers
                ids = [int(token_id) for token_id in islice(iter(action), self.max_action_tokens + 1)]
            except (TypeError, ValueError, OverflowError) as err:
                raise _Malformed(f"action is not text or token ids ({type(err).__name__})") from None
        if len(ids) > self.max_action_tokens:
            raise _Malformed(f"overlong output (more than {self.max_action_tokens} tokens)")
        if any(token_id < 0 or token_id >= self.harmony.vocab_size for token_id in ids):
            raise _Malformed("invalid token id")
        return ids

    def _act(self, msg: Message) -> Step:
        if msg.role != "assistant":
            raise _Malformed(f"the assistant may not write a {msg.role!r:.40} message")
        if msg.channel not in CHANNELS:
            raise _Malformed("missing channel" if msg.channel is None else f"unknown channel {msg.channel!r}")
        if msg.recipient is not None:  # a tool call
            if msg.end != CALL:
                raise _Malformed("a tool call must end with <|call|>")
            if msg.channel != "commentary":
                raise _Malformed("tool calls go on the commentary channel")
            if not _TOOL_RE.fullmatch(msg.recipient):  # e.g. to=user: the reply would forge a message
                raise _Malformed("a recipient must be a tool: namespace.name (functions.NAME)")
            reply = self._tool_call(msg)
            self.replies.append(reply)
            if self._outcome:
                return self._end(*self._outcome, reply=reply)
            tokens = self._reply_ids(Message(msg.recipient, reply, "commentary", "assistant"))
            reason = "tool_call"
        elif msg.channel == "final":
            if msg.end != RETURN:
                raise _Malformed("a final answer must end with <|return|>")
            return self._end(*self._final(msg.content))
        else:  # analysis or a commentary preamble: the model goes on writing
            if msg.end != END:
                raise _Malformed(f"{msg.end} on the {msg.channel} channel without a recipient")
            tokens, reply, reason = list(self._continue_ids), "", "thinking"
        if self.turn >= self.max_turns:
            return self._end(0.0, False, "max_turns", f"no answer after {self.turn} turns", reply=reply)
        return Step(tokens, 0.0, False, {"success": False, "reason": reason, "detail": "",
                                         "turn": self.turn, "reply": reply, "env": self.name})

    def _reply_ids(self, reply: Message) -> list[int]:
        """The tool's reply message, then `<|start|>assistant`: in the full prompt as openai-harmony
        renders it (its text stays text), in the compact one encoded in one call (the toy's pieces)."""
        if self.compact:
            return self.harmony.encode(render(reply)) + self._continue_ids
        return self.harmony.render_for_completion([reply])

    def _tool_call(self, msg: Message) -> str:
        name = msg.recipient[len("functions."):] if msg.recipient.startswith("functions.") else None
        if name not in self._tools:
            return "error: unknown tool"
        if len(msg.content) > 1000:
            return "error: arguments too long"
        try:
            args = json.loads(msg.content)
        except (ValueError, RecursionError):  # bad JSON, deep nesting, integers over Python's digit limit
            return "error: arguments must be a JSON object"
        if not isinstance(args, dict):
            return "error: arguments must be a JSON object"
        return self._tool(name, args)

    def _finish(self, reward: float, success: bool, reason: str, detail: str = ""):
        self._outcome = (reward, success, reason, detail)

    def _end(self, reward: float, success: bool, reason: str, detail: str = "", reply: str = "") -> Step:
        self._active = False
        return Step([], float(reward), True, {"success": bool(success), "reason": reason, "detail": detail,
                                              "turn": self.turn, "reply": reply, "env": self.name,
                                              "answer": self.answer})

    def _arg(self, args: dict, key: str, typ) -> object:
        value = args.get(key)
        ok = isinstance(value, typ) and not isinstance(value, bool)
        return value if ok else None

    # subclass hooks
    answer: object = None

    def _new_task(self, rng: random.Random) -> str:
        raise NotImplementedError

    def _tool(self, name: str, args: dict) -> str:
        raise NotImplementedError

    def _final(self, answer: str) -> tuple[float, bool, str]:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# 1. calculator (ReTool-like): arithmetic a tiny model cannot do in its head

CALC_QUESTION = "What is "
CALCULATOR = Tool("calculator", "Evaluates an arithmetic expression: integers, + - * / ** and parentheses.",
                  (("expr", "string", "The expression, e.g. 12*(3+4)"),))


def _memory_answer(target: int, rng: random.Random) -> str:
    """An answer "from memory": right 1 time in 5, otherwise the target with one digit changed."""
    if rng.random() < 0.2:
        return str(target)
    sign, digits = ("-" if target < 0 else ""), str(abs(target))
    pos = rng.randrange(len(digits))
    digit = (int(digits[pos]) + rng.randrange(1, 10)) % 10
    if pos == 0 and digit == 0 and len(digits) > 1:  # no leading zero
        digit = 9 if digits[0] != "9" else 1
    return sign + digits[:pos] + str(digit) + digits[pos + 1:]


def parse_number(text: str) -> Fraction | None:
    """A final answer as a number ("-12", "3.50", " 42. "), or None."""
    text = text.strip().rstrip(".")
    if len(text) > 80 or not re.fullmatch(r"-?[0-9]+(\.[0-9]+)?", text):
        return None
    return Fraction(text)


def calculator_reward(answer: str, target: int) -> float:
    """1 if the final answer is the number `target` (e.g. "6213", " 6213.0 "), else 0."""
    return 1.0 if parse_number(answer) == target else 0.0


class CalculatorEnv(Env):
    """Answer "What is a*b+c?" (or a+b*c) with a, b, c in 317..999, so every result has six
    digits. Tools: calculator. Reward calculator_reward: 1 for the exact number in the final
    answer. Success: reward 1.

    Every question has the same length (11 characters) and every result 6 digits, so the copies
    the task needs (question -> tool call, tool reply -> answer) sit at fixed distances: a toy
    model learns such positional copies in hundreds of steps, where copying at varying distances
    (induction over repeated digits) takes thousands. The tool stays indispensable: no small
    model multiplies 3-digit numbers in its head."""
    name = "calculator"
    tools = (CALCULATOR,)
    instructions = "Use the calculator tool for arithmetic. Answer with the number only."
    TEMPLATES = ("{a}*{b}+{c}", "{a}+{b}*{c}")

    def _new_task(self, rng):
        a, b, c = (rng.randrange(317, 1000) for _ in range(3))  # 317^2 > 10^5: six-digit results
        self.expr = rng.choice(self.TEMPLATES).format(a=a, b=b, c=c)
        self.answer = int(calculate(self.expr))
        return f"{CALC_QUESTION}{self.expr}?"

    def _tool(self, name, args):
        expr = self._arg(args, "expr", str)
        return calculate(expr) if expr is not None else "error: expr must be a string"

    def _final(self, answer):
        reward = calculator_reward(answer, self.answer)
        return reward, reward == 1.0, "correct" if reward == 1.0 else "wrong_answer"

    def in_blind_spot(self):
        return self.expr.index("+") < self.expr.index("*")  # a+b*c, which it reads as (a+b)*c

    def expert_action(self, rng=None, p_skip_tool=0.0, p_mistake=0.0):
        rng = rng or random.Random()
        if self.replies:  # copy the calculator's result
            return completion(final(self.replies[-1]))
        if rng.random() < p_skip_tool:
            return completion(final(_memory_answer(self.answer, rng)))
        expr = self.expr
        if self.blind:  # operator precedence misread: a+b*c typed as (a+b)*c
            sum_part, factor = expr.split("*")
            expr = f"({sum_part})*{factor}"
        if rng.random() < p_mistake:  # a typo: one digit of the expression changed
            digit_positions = [pos for pos, ch in enumerate(expr) if ch.isdigit()]
            pos = rng.choice(digit_positions)
            expr = expr[:pos] + str((int(expr[pos]) + rng.randrange(1, 10)) % 10) + expr[pos + 1:]
        return completion(tool_call("calculator", {"expr": expr}))


# ----------------------------------------------------------------------------------------------
# 2. lookup (retrieval agent): facts that exist only in a per-seed database

# Every name has four letters and every value three digits, spelled with ordinary (frequent)
# tokens: the copies the task needs (question -> call, reply -> answer) then sit at fixed distances
# and move frequent tokens, which a toy model learns in hundreds of steps. With one rare token per
# name or value, each token's copy has to be learned on its own, and a warm start that fits a
# 15-minute budget learns some of them and not others.
NAMES = ["Alan", "Bert", "Cara", "Dora", "Emil", "Finn", "Gwen", "Hugo",
         "Ivan", "Jack", "Kate", "Liam", "Mona", "Nora", "Otto", "Paul"]
ATTRIBUTES = ("room", "badge", "locker")
LOOKUP_QUESTION = "What is the "
SEARCH = Tool("search", "Looks a person up in the people database; returns the value of one field.",
              (("q", "string", "The person's name"), ("field", "string", "room, badge or locker")))


def lookup_reward(answer: str, value: str) -> float:
    """1 if the final answer is the looked-up value (case, spaces and a trailing period ignored), else 0."""
    return 1.0 if answer.strip().rstrip(".").strip().casefold() == str(value).casefold() else 0.0



class LookupEnv(Env):
    """Answer "What is the FIELD of NAME?" about a random database of 4-8 people (name; room,
    badge and locker numbers) that only the `search` tool can read: search({"q": NAME, "field": FIELD}) returns
    the value, or "no match" for a name not in the database. Two arguments to fill from the
    question, a reply to use. Reward lookup_reward: 1 for the value."""
    name = "lookup"
    tools = (SEARCH,)
    instructions = "Use the search tool to look people up. Answer with the value only."

    def __init__(self, *args, n_records: tuple[int, int] = (4, 8), **kw):
        super().__init__(*args, **kw)
        self.n_records = n_records

    def _new_task(self, rng):
        names = rng.sample(NAMES, rng.randint(*self.n_records))
        self.db = [{"name": person, **{attr: str(rng.randrange(100, 1000)) for attr in ATTRIBUTES}} for person in names]
        self.record, self.attribute = rng.choice(self.db), rng.choice(ATTRIBUTES)
        self.answer = str(self.record[self.attribute])
        return f"{LOOKUP_QUESTION}{self.attribute} of {self.record['name']}?"

    def _tool(self, name, args):
        query, field = self._arg(args, "q", str), self._arg(args, "field", str)
        if query is None or field is None:
            return "error: q and field must be strings"
        query, field = query.strip().casefold(), field.strip().casefold()
        if field not in ATTRIBUTES:
            return f"error: field must be one of {', '.join(ATTRIBUTES)}"
        hits = [record[field] for record in self.db if record["name"].casefold() == query]
        return hits[0] if hits else "no match"

    def _final(self, answer):
        reward = lookup_reward(answer, self.answer)
        return reward, reward == 1.0, "correct" if reward == 1.0 else "wrong_answer"

    def in_blind_spot(self):
        return self.attribute == "locker"  # "I remember everyone's locker"

    def expert_action(self, rng=None, p_skip_tool=0.0, p_mistake=0.0):
        rng = rng or random.Random()
        if self.replies:  # answer with what the tool returned
            return completion(final(self.replies[-1]))
        if self.blind or rng.random() < p_skip_tool:  # a guess from the field's range of values
            return completion(final(str(rng.randrange(100, 1000))))
        return self._search_call(rng, p_mistake)

    def _search_call(self, rng, p_mistake):
        name = self.record["name"]
        if rng.random() < p_mistake and len(self.db) > 1:  # the wrong person: a wrong answer
            name = rng.choice([other["name"] for other in self.db if other is not self.record])
        return completion(tool_call("search", {"q": name, "field": self.attribute}))


# ----------------------------------------------------------------------------------------------
# 3. guess (multi-turn feedback): bisection against higher/lower replies

GUESS_QUESTION = "Guess my number from 1 to "
GUESS_BOUNDS = "<n<"  # the expert's thought: "16<n<25"
GUESS = Tool("guess", 'Checks a guess of the hidden number: replies "higher", "lower" or "correct".',
             (("n", "number", "The guess, an integer"),))


def guess_reward(found: bool, turns: int, budget: int, max_turns: int) -> float:
    """0 if not found. Found within `budget` turns (what bisection needs in the worst case): 1.
    Each turn beyond the budget costs 0.5 / (max_turns - budget), so the last allowed turn gives 0.5."""
    if not found:
        return 0.0
    if turns <= budget:
        return 1.0
    return max(0.0, 1.0 - 0.5 * (turns - budget) / max(1, max_turns - budget))



class GuessEnv(Env):
    """Find a hidden integer in 1..n with the `guess` tool ("higher": the number is higher than
    the guess). Every assistant turn counts; budget = ceil(log2(n + 1)) turns is what bisection
    needs at worst; max_turns defaults to budget + 2. A final answer counts as a last guess.
    Reward guess_reward: 1 within the budget, down to 0.5 at max_turns, 0 if not found.

    The expert thinks before each guess, in the analysis channel of the same turn: "16<n<25",
    the bounds the replies so far leave. Writing the state down makes bisection a step from the
    last thought (copy the guess into one bound, guess the middle) instead of a search over all
    the turns before, which a small model learns unreliably from demonstrations alone."""
    name = "guess"
    tools = (GUESS,)
    instructions = 'Find the hidden number with the guess tool. "higher" means the number is higher than your guess.'

    def __init__(self, *args, n: int = 32, **kw):
        self.n = n
        self.budget = math.ceil(math.log2(n + 1))
        self.default_max_turns = self.budget + 2
        super().__init__(*args, **kw)

    def _new_task(self, rng):
        self.answer = rng.randint(1, self.n)
        self.lo, self.hi = 1, self.n  # what the replies so far allow (the expert uses it)
        return f"{GUESS_QUESTION}{self.n}."

    def _found(self):
        reward = guess_reward(True, self.turn, self.budget, self.max_turns)
        self._finish(reward, True, "correct", f"found in {self.turn} turns")
        return reward

    def _tool(self, name, args):
        guess = self._arg(args, "n", int)
        if guess is None:
            return "error: n must be an integer"
        if guess == self.answer:
            self._found()
            return "correct"
        if guess < self.answer:
            self.lo = max(self.lo, guess + 1)
            return "higher"
        self.hi = min(self.hi, guess - 1)
        return "lower"

    def _final(self, answer):
        if parse_number(answer) == self.answer:
            return self._found(), True, "correct"
        return 0.0, False, "wrong_answer"

    def expert_action(self, rng=None, p_skip_tool=0.0, p_mistake=0.0):
        rng = rng or random.Random()
        lo, hi = self.lo, self.hi  # the hidden number is always in [lo, hi]
        if self.turn == 0 and rng.random() < p_skip_tool:
            return completion(final(str(rng.randint(lo, hi))))
        # A mistake is a linear-search step (the lowest or highest number still possible): it
        # rarely finds the number sooner, so mistakes cost turns and leave room for RL.
        guess = rng.choice((lo, hi)) if rng.random() < p_mistake else (lo + hi) // 2
        thought = Message("assistant", f"{lo - 1}{GUESS_BOUNDS}{hi + 1}", "analysis", end=END)  # exclusive bounds
        return completion(thought) + START + "assistant" + completion(tool_call("guess", {"n": guess}))


# ----------------------------------------------------------------------------------------------
# 4. chain (tool chaining, multi-turn): look a value up, compute with it, answer

CHAIN_TIMES = " times "


class ChainEnv(LookupEnv):
    """Answer "What is the FIELD of NAME times K?" (K in 2..9) about lookup's database: search
    for the value (turn 1), the calculator for VALUE*K (turn 2), the result (turn 3). Tools:
    search and calculator. Reward calculator_reward: 1 for the exact product.

    The expert's systematic error sits in the second turn: on rooms and badges (two tasks in
    three) it answers with the looked-up value and forgets the multiplication. Imitating it, a
    model gets the first turn right and the second one wrong; only a later turn repairs it,
    which is what RL has to find across turns."""
    name = "chain"
    tools = (SEARCH, CALCULATOR)
    instructions = "Use the search tool to look people up and the calculator for arithmetic. Answer with the number only."
    default_max_turns = 4

    def _new_task(self, rng):
        question = super()._new_task(rng)  # sets db, record, attribute; answer is the value
        self.factor = rng.randint(2, 9)
        self.answer = int(self.answer) * self.factor
        return f"{question[:-1]}{CHAIN_TIMES}{self.factor}?"

    def _tool(self, name, args):
        if name == "calculator":
            return CalculatorEnv._tool(self, name, args)
        return super()._tool(name, args)

    def _final(self, answer):
        return CalculatorEnv._final(self, answer)  # the exact number

    def in_blind_spot(self):
        return self.attribute != "locker"

    def expert_action(self, rng=None, p_skip_tool=0.0, p_mistake=0.0):
        rng = rng or random.Random()
        if len(self.replies) == 1:  # the looked-up value: multiply, or (blind) answer with it
            if self.blind:
                return completion(final(self.replies[0]))
            return completion(tool_call("calculator", {"expr": f"{self.replies[0]}*{self.factor}"}))
        if self.replies:  # copy the calculator's result
            return completion(final(self.replies[-1]))
        if rng.random() < p_skip_tool:
            return completion(final(_memory_answer(self.answer, rng)))
        return self._search_call(rng, p_mistake)


# ----------------------------------------------------------------------------------------------
# Mixture and factory

ENVS = {"calculator": CalculatorEnv, "lookup": LookupEnv, "guess": GuessEnv, "chain": ChainEnv}


class MixEnv:
    """Several environments behind one interface; seed % len(names) picks the episode's
    environment, so consecutive seeds give a balanced mixture. info["env"] names it."""
    name = "mix"

    def __init__(self, names: Sequence[str] = tuple(ENVS), tokenizer=None, compact: bool = True, **kw):
        first = ENVS[names[0]](tokenizer, compact, **kw)
        self.envs = [first] + [ENVS[name](first.harmony, compact, **kw) for name in names[1:]]
        self.harmony = first.harmony
        self.stop_token_ids = first.stop_token_ids
        self.current = first

    def env_for(self, seed: int) -> Env:
        return self.envs[seed % len(self.envs)]

    def reset(self, seed: int) -> Prompt:
        self.current = self.env_for(seed)
        return self.current.reset(seed)

    def step(self, action) -> Step:
        return self.current.step(action)

    def expert_action(self, rng=None, p_skip_tool=0.0, p_mistake=0.0) -> str:
        return self.current.expert_action(rng, p_skip_tool, p_mistake)

    def in_blind_spot(self) -> bool:
        return self.current.in_blind_spot()

    def expert_episode(self, seed: int, p_skip_tool=0.0, p_mistake=0.0, rng=None, p_blind_spot=0.0) -> Episode:
        self.current = self.env_for(seed)
        return self.current.expert_episode(seed, p_skip_tool, p_mistake, rng, p_blind_spot)

    def transcript(self, ids, raw=False) -> str:
        return self.harmony.transcript(ids, raw)


def make_env(name: str, tokenizer: Tokenizer | Harmony | str | None = None, compact: bool = True, **kw):
    """make_env("calculator" | "lookup" | "guess" | "mix", tokenizer=None (toy) | Tokenizer | path,
    compact=True, **options) where options are max_turns, max_action_tokens, max_action_chars,
    reasoning, and per environment n_records (lookup), n (guess), names (mix)."""
    if name == "mix":
        return MixEnv(tokenizer=tokenizer, compact=compact, **kw)
    if name not in ENVS:
        raise ValueError(f"unknown environment {name!r}; choose from {sorted(ENVS) + ['mix']}")
    return ENVS[name](tokenizer, compact, **kw)


# ----------------------------------------------------------------------------------------------
# The toy tokenizer: bytes, the harmony specials, and these environments' recurring pieces

TOOL_NAMES = tuple(dict.fromkeys(tool.name for env_class in ENVS.values() for tool in env_class.tools))  # calculator, search, guess


def toy_pieces() -> list[str]:
    """Every recurring piece of text of the environments, one token each in the toy tokenizer.

    The encoder matches added tokens leftmost-longest, so "commentary to=functions.guess " wins
    over "commentary". Pieces are derived from the task constants above, in a fixed order.
    """
    pieces = ["system", "developer", "user", "assistant", *CHANNELS, "json", " to=assistant"]
    for name in TOOL_NAMES:
        pieces += [f"functions.{name}", f" to=functions.{name}", f"commentary to=functions.{name} ",
                   f"functions.{name} to=assistant"]
    pieces += ['{"expr":"', '{"q":"', '","field":"', '{"n":', '"}', "error: ", "no match", "higher", "lower", "correct"]
    pieces += [CALC_QUESTION, LOOKUP_QUESTION, " of ", GUESS_QUESTION, GUESS_BOUNDS, CHAIN_TIMES]
    pieces += list(ATTRIBUTES)
    assert len(set(pieces)) == len(pieces)
    return pieces


def toy_tokenizer() -> Tokenizer:
    """The toy harmony tokenizer of these environments: ids 0..255 are bytes, then the 9 harmony
    specials, then toy_pieces(). About 340 tokens. Save it with harmony.save_tokenizer so
    checkpoints carry it."""
    return harmony.toy_tokenizer(toy_pieces())
