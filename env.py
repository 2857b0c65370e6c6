"""Agentic environments for GPT-OSS, written in the harmony chat format.

An episode is a conversation: the environment renders a prompt that ends with `<|start|>assistant`,
the policy generates one assistant message (stopping at <|call|>, <|return|> or <|end|>), the
environment answers a tool call with the tool's reply message followed by `<|start|>assistant`,
and so on until a final answer, an error or the turn limit ends the episode with a reward.

    env = make_env("calculator")              # toy tokenizer, compact prompt
    ids = env.reset(seed=0).token_ids         # ends with <|start|>assistant
    while True:
        gen = sample(model, ids, stop=env.stop_token_ids)   # includes the stop token
        tokens, reward, done, info = env.step(gen)          # or env.step(text)
        ids = ids + gen + tokens                             # tokens get loss mask 0 ([] when done)
        if done: break                                       # info["success"], info["reason"]

Design choices
- One harmony renderer for every tokenizer: a conversation is rendered to a string and encoded
  in one call; `tokenizers` splits special tokens out before anything else, so the same code
  serves the real o200k_harmony tokenizer.json and the toy tokenizer. Special token ids are
  always looked up by their string, never hard-coded.
- Parsing works on token ids, not on decoded text: ids become segments (a special token or a run
  of ordinary text), so a model that spells "<|call|>" with ordinary characters has not called
  anything. Text actions are encoded first and parsed the same way.
- The toy tokenizer is byte-level (every string encodes, nothing is unknown) plus the harmony
  special tokens plus one token for every recurring piece of text (roles, channels, recipients,
  JSON argument prefixes, tool replies, names and words of the tasks). A tool call is 9-21
  tokens and a whole episode 40-115, so a tiny model learns the tasks on a CPU in minutes.
- Two prompt modes: compact (one user message; the task is recognisable from it) for the toy
  model, full (system + developer message declaring the tools in harmony's TypeScript-namespace
  style + user) for a real checkpoint. The assistant side of the format is the same in both.
- Untrusted model output never raises: a broken message (no stop token, bad header, a stop token
  that does not fit the channel, invalid ids, overlong output) ends the episode with reward 0
  and `info["reason"] == "malformed"`; a broken tool call (unknown tool, bad JSON, wrong argument
  type, arithmetic error) gets an "error: ..." reply from the tool and the episode goes on.
  Every step does bounded work: actions, tool arguments and expressions have size limits.
- The calculator evaluates arithmetic with a small recursive-descent parser over exact
  fractions, with limits on length, nesting and number size. Nothing here calls eval or exec,
  and nothing loads a pickle.
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
from typing import Iterable, NamedTuple, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

# ----------------------------------------------------------------------------------------------
# Harmony format (SPEC.md section 3)

START, END, MESSAGE = "<|start|>", "<|end|>", "<|message|>"
CHANNEL, CONSTRAIN = "<|channel|>", "<|constrain|>"
CALL, RETURN = "<|call|>", "<|return|>"
STARTOFTEXT, ENDOFTEXT = "<|startoftext|>", "<|endoftext|>"
# In o200k_harmony id order (199998, 199999, 200002, 200003, 200005, 200006, 200007, 200008, 200012).
HARMONY_SPECIALS = (STARTOFTEXT, ENDOFTEXT, RETURN, CONSTRAIN, CHANNEL, START, END, MESSAGE, CALL)
STOP_TOKENS = (RETURN, CALL, END)  # the full assistant stop set; RETURN and CALL alone also work
CHANNELS = ("analysis", "commentary", "final")
_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # roles and recipients
_WORD_RE = re.compile(r"[A-Za-z0-9_\-]{1,32}")  # channels and constrain types
_TOOL_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*\.[A-Za-z0-9_.\-]+")  # functions.NAME, browser.search, ...


class HarmonyError(ValueError):
    """Token ids or text that are not well-formed harmony messages."""


@dataclass(frozen=True)
class Message:
    """One harmony message. `end` is the token that closes it: <|end|>, <|call|> or <|return|>."""
    role: str
    content: str
    channel: str | None = None
    recipient: str | None = None  # "functions.NAME" for a tool call, "assistant" for a tool reply
    constrain: str | None = None  # "json" for tool-call arguments
    end: str = END


def render(m: Message) -> str:
    """`<|start|>{role}[ to={recipient}][<|channel|>{channel}[ to={recipient}]][ <|constrain|>{type}]<|message|>{content}{end}`.

    The assistant writes its recipient after the channel (as GPT-OSS generates tool calls);
    every other author (a tool replying) writes it after the role, as in SPEC's examples.
    """
    in_header = m.recipient is not None and (m.role != "assistant" or m.channel is None)
    s = START + m.role + (f" to={m.recipient}" if in_header else "")
    if m.channel is not None:
        s += CHANNEL + m.channel
        if m.recipient is not None and not in_header:
            s += f" to={m.recipient}"
    if m.constrain is not None:
        s += f" {CONSTRAIN}{m.constrain}"
    return s + MESSAGE + m.content + m.end


def render_conversation(messages: Iterable[Message], next_role: str | None = "assistant") -> str:
    """Messages back to back, then `<|start|>{next_role}` so that the model writes the next one."""
    return "".join(render(m) for m in messages) + (START + next_role if next_role else "")


def completion(m: Message) -> str:
    """An assistant message as the model generates it: without the `<|start|>assistant` the prompt holds."""
    assert m.role == "assistant", m.role
    return render(m)[len(START + "assistant"):]


def tool_call(name: str, args: dict, channel: str = "commentary") -> Message:
    """The assistant calling functions.NAME with JSON arguments (compact separators, one token each in the toy)."""
    return Message("assistant", json.dumps(args, separators=(",", ":")), channel,
                   f"functions.{name}", "json", CALL)


def tool_reply(name: str, output: str) -> Message:
    """functions.NAME's output, addressed to the assistant on the commentary channel."""
    return Message(f"functions.{name}" if "." not in name else name, output, "commentary", "assistant")


def final(answer: str) -> Message:
    """A final answer as generated (ends with <|return|>; the episode ends there, so it never enters history)."""
    return Message("assistant", answer, "final", end=RETURN)


class Special(str):
    """A special token among segments; a plain str segment is ordinary text (which may spell '<|end|>')."""


def _is(seg, token: str) -> bool:
    return isinstance(seg, Special) and seg == token


_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in HARMONY_SPECIALS) + ")")


def split_specials(text: str) -> list[str]:
    """Text -> segments, treating the harmony special-token strings as special (as an encoder does)."""
    parts = _SPECIAL_RE.split(text)
    return [Special(p) if i % 2 else p for i, p in enumerate(parts) if p]


def parse(x: str | Sequence[str], first_role: str | None = "assistant") -> list[Message]:
    """Segments (or text) of one or more complete messages -> messages; raises HarmonyError.

    The first message may omit `<|start|>{role}` (generated text starts after the prompt's
    `<|start|>assistant`); it then gets `first_role`. Every message must end with a stop token.
    """
    segs = split_specials(x) if isinstance(x, str) else list(x)
    msgs, cur = [], []
    for seg in segs:
        cur.append(seg)
        if isinstance(seg, Special) and seg in STOP_TOKENS:
            msgs.append(_parse_one(cur, first_role if not msgs else None))
            cur = []
    if cur:
        raise HarmonyError("missing stop token" if not msgs else "output continues after the stop token")
    return msgs


def parse_message(x: str | Sequence[str], first_role: str | None = "assistant") -> Message:
    """Exactly one message (e.g. one assistant turn): parse(render(m)) == [m], parse_message(...) == m."""
    msgs = parse(x, first_role)
    if len(msgs) != 1:
        raise HarmonyError(f"expected one message, got {len(msgs)}")
    return msgs[0]


def _split_to(text: str) -> tuple[str | None, str | None]:
    """'commentary to=functions.x ' -> ('commentary', 'functions.x'); ' to=x' -> (None, 'x')."""
    words = text.split()
    rcp = [w[3:] for w in words if w.startswith("to=")]
    rest = [w for w in words if not w.startswith("to=")]
    if len(rcp) > 1 or len(rest) > 1:
        raise HarmonyError(f"bad message header {text!r:.60}")
    return (rest[0] if rest else None), (rcp[0] if rcp else None)


def _parse_one(segs: list[str], default_role: str | None) -> Message:
    end, body, i = segs[-1], segs[:-1], 0
    # Header: [<|start|>] role-text [<|channel|> channel-text] [<|constrain|> type-text] <|message|>
    if body and _is(body[0], START):
        i, default_role = 1, None
    elif default_role is None:
        raise HarmonyError("a message must begin with <|start|>")
    parts = {}
    key = "role"
    while i < len(body) and not _is(body[i], MESSAGE):
        seg = body[i]
        if isinstance(seg, Special):
            nxt = {CHANNEL: "channel", CONSTRAIN: "constrain"}.get(seg)
            if nxt is None or nxt in parts or (nxt == "channel" and "constrain" in parts):
                raise HarmonyError(f"unexpected {seg} in message header")
            key = nxt
            parts[key] = ""
        else:
            parts[key] = parts.get(key, "") + seg
        i += 1
    if i == len(body):
        raise HarmonyError("missing <|message|>")
    content = body[i + 1:]
    if any(isinstance(s, Special) for s in content):
        raise HarmonyError(f"unexpected {next(s for s in content if isinstance(s, Special))} in message content")

    role, recipient = _split_to(parts.get("role", ""))
    role = role or default_role
    if role is None or not _NAME_RE.fullmatch(role):
        raise HarmonyError(f"bad role {role!r:.40}")
    channel = None
    if "channel" in parts:
        channel, rcp = _split_to(parts["channel"])
        if channel is None or not _WORD_RE.fullmatch(channel):
            raise HarmonyError(f"bad channel {channel!r:.40}")
        if rcp is not None:
            if recipient is not None:
                raise HarmonyError("two recipients")
            recipient = rcp
    if recipient is not None and not _NAME_RE.fullmatch(recipient):
        raise HarmonyError(f"bad recipient {recipient!r:.40}")
    constrain = None
    if "constrain" in parts:
        constrain = parts["constrain"].strip()
        if not _WORD_RE.fullmatch(constrain):
            raise HarmonyError(f"bad constrain type {constrain!r:.40}")
    return Message(role, "".join(content), channel, recipient, constrain, str(end))


class Harmony:
    """Harmony rendering and parsing on top of any `tokenizers.Tokenizer` that has the harmony specials."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids = {}
        for s in HARMONY_SPECIALS:
            i = tokenizer.token_to_id(s)
            if i is None:
                raise ValueError(f"tokenizer has no {s} token: it is not a harmony tokenizer")
            self.ids[s] = i
        added = tokenizer.get_added_tokens_decoder()
        self.special_ids = {i for i, t in added.items() if t.special} | set(self.ids.values())
        self.stop_token_ids = [self.ids[s] for s in STOP_TOKENS]  # [<|return|>, <|call|>, <|end|>]
        # Ids may be sparse (o200k reserves some), so the valid range is up to the largest id.
        self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def render_ids(self, messages: Iterable[Message], next_role: str | None = "assistant") -> list[int]:
        return self.encode(render_conversation(messages, next_role))

    def segments(self, ids: Sequence[int]) -> list[str]:
        """Ids -> [Special | text]: each special token alone, each run of ordinary tokens decoded."""
        out, run = [], []
        for t in ids:
            if t in self.special_ids:
                if run:
                    out.append(self.decode(run))
                    run = []
                out.append(Special(self.tokenizer.id_to_token(t)))
            else:
                run.append(t)
        if run:
            out.append(self.decode(run))
        return out

    def parse(self, ids: Sequence[int], first_role: str | None = "assistant") -> list[Message]:
        return parse(self.segments(ids), first_role)

    def parse_message(self, ids: Sequence[int], first_role: str | None = "assistant") -> Message:
        return parse_message(self.segments(ids), first_role)

    def transcript(self, ids: Sequence[int], raw: bool = False) -> str:
        """A readable transcript: one line per message (`role/channel -> recipient: content`), or
        with raw=True the exact harmony text with a line break after every stop token."""
        segs = self.segments(ids)
        if raw:
            return "".join(s + "\n" if isinstance(s, Special) and s in STOP_TOKENS else s for s in segs).rstrip("\n")
        chunks, cur = [], []
        for s in segs:  # one chunk per <|start|>
            if _is(s, START) and cur:
                chunks.append(cur)
                cur = []
            cur.append(s)
        chunks.append(cur)
        lines = []
        for chunk in chunks:
            if not chunk:
                continue
            if len(chunk) == 2 and _is(chunk[0], START) and not isinstance(chunk[1], Special):
                lines.append(f"{chunk[1]}: ...")  # the open `<|start|>assistant` at the end
                continue
            try:
                for m in parse(chunk, first_role="assistant"):
                    head = m.role + (f"/{m.channel}" if m.channel else "") + (f" -> {m.recipient}" if m.recipient else "")
                    tail = "" if m.end == END else f"  {m.end}"
                    lines.append(f"{head}: {m.content}".replace("\n", "\n    ") + tail)
            except HarmonyError as e:
                lines.append(f"!! malformed ({e}): {''.join(chunk)!r:.300}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The toy tokenizer

def _byte_to_char() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what ByteLevel pre-tokenizers expect in the vocab)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def toy_pieces() -> list[str]:
    """Every recurring piece of text of the environments, one token each in the toy tokenizer.

    The encoder matches added tokens leftmost-longest, so "commentary to=functions.guess " wins
    over "commentary". Pieces are derived from the task constants below, in a fixed order.
    """
    pieces = ["system", "developer", "user", "assistant", *CHANNELS, "json", " to=assistant"]
    for t in TOOL_NAMES:
        pieces += [f"functions.{t}", f" to=functions.{t}", f"commentary to=functions.{t} ",
                   f"functions.{t} to=assistant"]
    pieces += ['{"expr":"', '{"q":"', '","field":"', '{"n":', '"}', "error: ", "no match", "higher", "lower", "correct"]
    pieces += [CALC_QUESTION, LOOKUP_QUESTION, " of ", GUESS_QUESTION]
    pieces += list(ATTRIBUTES)
    assert len(set(pieces)) == len(pieces)
    return pieces


def toy_tokenizer() -> Tokenizer:
    """Deterministic toy harmony tokenizer: ids 0..255 are bytes, then the 9 harmony specials, then
    toy_pieces(). About 340 tokens. Save it with save_tokenizer so checkpoints carry it."""
    b2c = _byte_to_char()
    tok = Tokenizer(models.BPE(vocab={b2c[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in HARMONY_SPECIALS])
    tok.add_tokens([AddedToken(p, special=False, normalized=False) for p in toy_pieces()])
    return tok


def save_tokenizer(tokenizer: Tokenizer, path: str) -> str:
    """Write tokenizer.json (into `path` if it is a directory). Returns the file written."""
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    tokenizer.save(path)
    return path


def load_tokenizer(path: str) -> Tokenizer:
    """Read a tokenizer.json (or a directory holding one): the toy's or a checkpoint's o200k_harmony."""
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    return Tokenizer.from_file(path)


# ----------------------------------------------------------------------------------------------
# Tools: declarations and the safe calculator

TOOL_NAMES = ("calculator", "search", "guess")  # one per environment; declared in each one's section


@dataclass(frozen=True)
class Tool:
    """A function tool, declared to a real model in the developer message (full prompt mode)."""
    name: str
    description: str
    params: tuple[tuple[str, str, str], ...]  # (name, TypeScript type, description)


def developer_message(instructions: str, tools: Sequence[Tool]) -> str:
    """Developer message content: instructions, then tools as a TypeScript namespace (harmony style)."""
    lines = ["# Instructions", "", instructions, "", "# Tools", "", "## functions", "", "namespace functions {", ""]
    for t in tools:
        lines += [f"// {t.description}", f"type {t.name} = (_: {{"]
        for name, typ, desc in t.params:
            lines += [f"// {desc}", f"{name}: {typ},"]
        lines += ["}) => any;", ""]
    return "\n".join(lines + ["} // namespace functions"])


SYSTEM_PROMPT = ("You are ChatGPT, a large language model trained by OpenAI.\n"
                 "Knowledge cutoff: 2024-06\n\n"
                 "Reasoning: {reasoning}\n\n"
                 "# Valid channels: analysis, commentary, final. Channel must be included for every message.\n"
                 "Calls to these tools must go to the commentary channel: 'functions'.")

MAX_EXPR_CHARS = 200  # the calculator reads at most this much
MAX_DEPTH = 40  # parentheses plus unary signs
MAX_BITS = 256  # numerators and denominators stay below 2**256 (~77 digits): bounded work and replies
_CALC_TOKEN = re.compile(r"\s*(?:([0-9]+(?:\.[0-9]+)?)|(\*\*|[-+*/^()]))")


class CalcError(ValueError):
    pass


def calculate(expr: str) -> str:
    """Evaluate arithmetic safely; returns the result as text, or "error: ..." (never raises).

    Grammar (Python precedence; `^` is a synonym of `**`, which is right-associative):
        expr  := term (("+" | "-") term)*
        term  := unary (("*" | "/") unary)*
        unary := ("+" | "-") unary | power
        power := atom (("**" | "^") unary)?
        atom  := NUMBER | "(" expr ")"
    Values are exact fractions; non-integers are shown rounded to 6 decimals.
    """
    try:
        if not isinstance(expr, str):
            raise CalcError("expression must be a string")
        if len(expr) > MAX_EXPR_CHARS:
            raise CalcError(f"expression longer than {MAX_EXPR_CHARS} characters")
        return _format(_Calc(expr).run())
    except CalcError as e:
        return f"error: {e}"
    except ZeroDivisionError:
        return "error: division by zero"


def _check(v: Fraction) -> Fraction:
    if v.numerator.bit_length() > MAX_BITS or v.denominator.bit_length() > MAX_BITS:
        raise CalcError("number too large")
    return v


def _format(v: Fraction) -> str:
    if v.denominator == 1:
        return str(v.numerator)
    q = round(v * 10**6)
    s = f"{abs(q) // 10**6}.{abs(q) % 10**6:06d}".rstrip("0").rstrip(".")
    return ("-" if q < 0 else "") + s


class _Calc:
    """Recursive-descent evaluator; depth is bounded so recursion stays far below Python's limit."""

    def __init__(self, text: str):
        self.toks, pos, text = [], 0, text.rstrip()
        while pos < len(text):
            m = _CALC_TOKEN.match(text, pos)
            if not m:
                raise CalcError(f"unexpected character {text[pos:].lstrip()[:1]!r}")
            if m.group(1) is not None and len(m.group(1)) > 40:
                raise CalcError("number literal too long")
            self.toks.append(m.group(1) or m.group(2))
            pos = m.end()
        self.i, self.depth = 0, 0

    def run(self) -> Fraction:
        if not self.toks:
            raise CalcError("empty expression")
        v = self.expr()
        if self.i != len(self.toks):
            raise CalcError(f"unexpected {self.toks[self.i]!r}")
        return v

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self):
        t = self.peek()
        if t is None:
            raise CalcError("unexpected end of expression")
        self.i += 1
        return t

    def expr(self) -> Fraction:
        v = self.term()
        while self.peek() in ("+", "-"):
            v = _check(v + self.term() if self.take() == "+" else v - self.term())
        return v

    def term(self) -> Fraction:
        v = self.unary()
        while self.peek() in ("*", "/"):
            op = self.take()
            rhs = self.unary()
            v = _check(v * rhs if op == "*" else v / rhs)  # Fraction / 0 raises ZeroDivisionError
        return v

    def unary(self) -> Fraction:
        if self.peek() in ("+", "-"):
            op = self.take()
            v = self.nested(self.unary)
            return -v if op == "-" else v
        return self.power()

    def power(self) -> Fraction:
        base = self.atom()
        if self.peek() in ("**", "^"):
            self.take()
            exp = self.nested(self.unary)
            if exp.denominator != 1:
                raise CalcError("exponent must be an integer")
            size = max(base.numerator.bit_length(), base.denominator.bit_length())
            if abs(exp) > 4 * MAX_BITS or (size > 1 and (size - 1) * abs(exp) > MAX_BITS):
                raise CalcError("number too large")  # decided before computing the power
            return _check(base ** int(exp))  # 0 ** -1 raises ZeroDivisionError
        return base

    def atom(self) -> Fraction:
        t = self.take()
        if t == "(":
            v = self.nested(self.expr)
            if self.take() != ")":
                raise CalcError("missing )")
            return v
        if t[0].isdigit():
            return _check(Fraction(t))
        raise CalcError(f"unexpected {t!r}")

    def nested(self, f):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise CalcError("expression nested too deeply")
        try:
            return f()
        finally:
            self.depth -= 1


def parse_number(text: str) -> Fraction | None:
    """A final answer as a number ("-12", "3.50", " 42. "), or None."""
    text = text.strip().rstrip(".")
    if len(text) > 80 or not re.fullmatch(r"-?[0-9]+(\.[0-9]+)?", text):
        return None
    return Fraction(text)


# ----------------------------------------------------------------------------------------------
# Rewards (all in [0, 1])

def calculator_reward(answer: str, target: int) -> float:
    """1 if the final answer is the number `target` (e.g. "6213", " 6213.0 "), else 0."""
    return 1.0 if parse_number(answer) == target else 0.0


def lookup_reward(answer: str, value: str) -> float:
    """1 if the final answer is the looked-up value (case, spaces and a trailing period ignored), else 0."""
    return 1.0 if answer.strip().rstrip(".").strip().casefold() == str(value).casefold() else 0.0


def guess_reward(found: bool, turns: int, budget: int, max_turns: int) -> float:
    """0 if not found. Found within `budget` turns (what bisection needs in the worst case): 1.
    Each turn beyond the budget costs 0.5 / (max_turns - budget), so the last allowed turn gives 0.5."""
    if not found:
        return 0.0
    if turns <= budget:
        return 1.0
    return max(0.0, 1.0 - 0.5 * (turns - budget) / max(1, max_turns - budget))


# ----------------------------------------------------------------------------------------------
# Environment interface

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
        self.stop_token_ids = self.harmony.stop_token_ids
        self._tools = {t.name: t for t in self.tools}
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
        messages = [Message("user", user)]
        if not self.compact:
            messages = [Message("system", SYSTEM_PROMPT.format(reasoning=self.reasoning)),
                        Message("developer", developer_message(self.instructions, self.tools))] + messages
        text = render_conversation(messages)
        return Prompt(messages, self.harmony.encode(text), text)

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
            for m in msgs[:-1]:  # a sampler that stops only at <|return|>/<|call|> may pass thoughts first
                if m.role != "assistant" or m.end != END or m.recipient or m.channel not in ("analysis", "commentary"):
                    raise _Malformed("only analysis/commentary messages ending with <|end|> may precede the last one")
            return self._act(msgs[-1])
        except (_Malformed, HarmonyError) as e:
            return self._end(0.0, False, "malformed", str(e))

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
            ids = self.harmony.encode(action)
        else:
            try:  # lists, tuples, numpy arrays, tensors: anything iterable of integers
                ids = [int(t) for t in islice(iter(action), self.max_action_tokens + 1)]
            except (TypeError, ValueError, OverflowError) as e:
                raise _Malformed(f"action is not text or token ids ({type(e).__name__})") from None
        if len(ids) > self.max_action_tokens:
            raise _Malformed(f"overlong output (more than {self.max_action_tokens} tokens)")
        if any(t < 0 or t >= self.harmony.vocab_size for t in ids):
            raise _Malformed("invalid token id")
        return ids

    def _act(self, m: Message) -> Step:
        if m.role != "assistant":
            raise _Malformed(f"the assistant may not write a {m.role!r:.40} message")
        if m.channel not in CHANNELS:
            raise _Malformed("missing channel" if m.channel is None else f"unknown channel {m.channel!r}")
        if m.recipient is not None:  # a tool call
            if m.end != CALL:
                raise _Malformed("a tool call must end with <|call|>")
            if m.channel != "commentary":
                raise _Malformed("tool calls go on the commentary channel")
            if not _TOOL_RE.fullmatch(m.recipient):  # e.g. to=user: the reply would forge a message
                raise _Malformed("a recipient must be a tool: namespace.name (functions.NAME)")
            reply = self._tool_call(m)
            self.replies.append(reply)
            if self._outcome:
                return self._end(*self._outcome, reply=reply)
            tokens = self.harmony.encode(render(Message(m.recipient, reply, "commentary", "assistant"))) + self._continue_ids
            reason = "tool_call"
        elif m.channel == "final":
            if m.end != RETURN:
                raise _Malformed("a final answer must end with <|return|>")
            return self._end(*self._final(m.content))
        else:  # analysis or a commentary preamble: the model goes on writing
            if m.end != END:
                raise _Malformed(f"{m.end} on the {m.channel} channel without a recipient")
            tokens, reply, reason = list(self._continue_ids), "", "thinking"
        if self.turn >= self.max_turns:
            return self._end(0.0, False, "max_turns", f"no answer after {self.turn} turns", reply=reply)
        return Step(tokens, 0.0, False, {"success": False, "reason": reason, "detail": "",
                                         "turn": self.turn, "reply": reply, "env": self.name})

    def _tool_call(self, m: Message) -> str:
        name = m.recipient[len("functions."):] if m.recipient.startswith("functions.") else None
        if name not in self._tools:
            return "error: unknown tool"
        if len(m.content) > 1000:
            return "error: arguments too long"
        try:
            args = json.loads(m.content)
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
        v = args.get(key)
        ok = isinstance(v, typ) and not isinstance(v, bool)
        return v if ok else None

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
    sign, s = ("-" if target < 0 else ""), str(abs(target))
    i = rng.randrange(len(s))
    d = (int(s[i]) + rng.randrange(1, 10)) % 10
    if i == 0 and d == 0 and len(s) > 1:  # no leading zero
        d = 9 if s[0] != "9" else 1
    return sign + s[:i] + str(d) + s[i + 1:]


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
        r = calculator_reward(answer, self.answer)
        return r, r == 1.0, "correct" if r == 1.0 else "wrong_answer"

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
            sum_part, c = expr.split("*")
            expr = f"({sum_part})*{c}"
        if rng.random() < p_mistake:  # a typo: one digit of the expression changed
            pos = [i for i, ch in enumerate(expr) if ch.isdigit()]
            i = rng.choice(pos)
            expr = expr[:i] + str((int(expr[i]) + rng.randrange(1, 10)) % 10) + expr[i + 1:]
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
        self.db = [{"name": n, **{a: str(rng.randrange(100, 1000)) for a in ATTRIBUTES}} for n in names]
        self.record, self.attribute = rng.choice(self.db), rng.choice(ATTRIBUTES)
        self.answer = str(self.record[self.attribute])
        return f"{LOOKUP_QUESTION}{self.attribute} of {self.record['name']}?"

    def _tool(self, name, args):
        q, field = self._arg(args, "q", str), self._arg(args, "field", str)
        if q is None or field is None:
            return "error: q and field must be strings"
        q, field = q.strip().casefold(), field.strip().casefold()
        if field not in ATTRIBUTES:
            return f"error: field must be one of {', '.join(ATTRIBUTES)}"
        hits = [r[field] for r in self.db if r["name"].casefold() == q]
        return hits[0] if hits else "no match"

    def _final(self, answer):
        r = lookup_reward(answer, self.answer)
        return r, r == 1.0, "correct" if r == 1.0 else "wrong_answer"

    def in_blind_spot(self):
        return self.attribute == "locker"  # "I remember everyone's locker"

    def expert_action(self, rng=None, p_skip_tool=0.0, p_mistake=0.0):
        rng = rng or random.Random()
        if self.replies:  # answer with what the tool returned
            return completion(final(self.replies[-1]))
        if self.blind or rng.random() < p_skip_tool:  # a guess from the field's range of values
            return completion(final(str(rng.randrange(100, 1000))))
        name = self.record["name"]
        if rng.random() < p_mistake and len(self.db) > 1:  # the wrong person: a wrong answer
            name = rng.choice([r["name"] for r in self.db if r is not self.record])
        return completion(tool_call("search", {"q": name, "field": self.attribute}))


# ----------------------------------------------------------------------------------------------
# 3. guess (multi-turn feedback): bisection against higher/lower replies

GUESS_QUESTION = "Guess my number from 1 to "
GUESS = Tool("guess", 'Checks a guess of the hidden number: replies "higher", "lower" or "correct".',
             (("n", "number", "The guess, an integer"),))


class GuessEnv(Env):
    """Find a hidden integer in 1..n with the `guess` tool ("higher": the number is higher than
    the guess). Every assistant turn counts; budget = ceil(log2(n + 1)) turns is what bisection
    needs at worst; max_turns defaults to budget + 2. A final answer counts as a last guess.
    Reward guess_reward: 1 within the budget, down to 0.5 at max_turns, 0 if not found."""
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
        r = guess_reward(True, self.turn, self.budget, self.max_turns)
        self._finish(r, True, "correct", f"found in {self.turn} turns")
        return r

    def _tool(self, name, args):
        g = self._arg(args, "n", int)
        if g is None:
            return "error: n must be an integer"
        if g == self.answer:
            self._found()
            return "correct"
        if g < self.answer:
            self.lo = max(self.lo, g + 1)
            return "higher"
        self.hi = min(self.hi, g - 1)
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
        g = rng.choice((lo, hi)) if rng.random() < p_mistake else (lo + hi) // 2
        return completion(tool_call("guess", {"n": g}))


# ----------------------------------------------------------------------------------------------
# Mixture and factory

ENVS = {"calculator": CalculatorEnv, "lookup": LookupEnv, "guess": GuessEnv}


class MixEnv:
    """Several environments behind one interface; seed % len(names) picks the episode's
    environment, so consecutive seeds give a balanced mixture. info["env"] names it."""
    name = "mix"

    def __init__(self, names: Sequence[str] = tuple(ENVS), tokenizer=None, compact: bool = True, **kw):
        first = ENVS[names[0]](tokenizer, compact, **kw)
        self.envs = [first] + [ENVS[n](first.harmony, compact, **kw) for n in names[1:]]
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
