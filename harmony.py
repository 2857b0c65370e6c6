"""The harmony chat format of GPT-OSS: messages, rendering, parsing, and the tokenizers that carry it.

    msg = tool_call("calculator", {"expr": "2+2"})   # a Message
    text = render(msg)                               # <|start|>assistant<|channel|>commentary to=...<|call|>
    chat = Harmony(toy_tokenizer())                  # or any tokenizer.json with the harmony specials
    ids = chat.render_ids([Message("user", "hi")])   # ends with <|start|>assistant
    chat.parse_message(chat.encode(text)) == msg     # True

Design choices
- One renderer for every tokenizer: a conversation is rendered to a string and encoded in one
  call; `tokenizers` splits special tokens out before anything else, so the same code serves the
  real o200k_harmony tokenizer.json and the toy tokenizer. Special token ids are always looked up
  by their string, never hard-coded.
- Parsing works on token ids, not on decoded text: ids become segments (a special token or a run
  of ordinary text), so a model that spells "<|call|>" with ordinary characters has not called
  anything. Text is encoded first and parsed the same way.
- Model output is untrusted: anything that is not well-formed harmony raises HarmonyError (a
  ValueError) naming the problem, never another exception.
- The toy tokenizer is byte-level (every string encodes, nothing is unknown) plus the harmony
  special tokens plus one token per piece of recurring text that its caller names (env.py names
  the roles, channels, recipients and task words of its environments).
This module knows no model and no environment.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

# ----------------------------------------------------------------------------------------------
# Special tokens and messages (SPEC.md section 3)

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


def render(msg: Message) -> str:
    """`<|start|>{role}[ to={recipient}][<|channel|>{channel}[ to={recipient}]][ <|constrain|>{type}]<|message|>{content}{end}`.

    The assistant writes its recipient after the channel (as GPT-OSS generates tool calls);
    every other author (a tool replying) writes it after the role, as in SPEC's examples.
    """
    in_header = msg.recipient is not None and (msg.role != "assistant" or msg.channel is None)
    text = START + msg.role + (f" to={msg.recipient}" if in_header else "")
    if msg.channel is not None:
        text += CHANNEL + msg.channel
        if msg.recipient is not None and not in_header:
            text += f" to={msg.recipient}"
    if msg.constrain is not None:
        text += f" {CONSTRAIN}{msg.constrain}"
    return text + MESSAGE + msg.content + msg.end


def render_conversation(messages: Iterable[Message], next_role: str | None = "assistant") -> str:
    """Messages back to back, then `<|start|>{next_role}` so that the model writes the next one."""
    return "".join(render(msg) for msg in messages) + (START + next_role if next_role else "")


def completion(msg: Message) -> str:
    """An assistant message as the model generates it: without the `<|start|>assistant` the prompt holds."""
    assert msg.role == "assistant", msg.role
    return render(msg)[len(START + "assistant"):]


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


# ----------------------------------------------------------------------------------------------
# Parsing: segments (special tokens and runs of text) -> messages

class Special(str):
    """A special token among segments; a plain str segment is ordinary text (which may spell '<|end|>')."""


def _is(seg, token: str) -> bool:
    return isinstance(seg, Special) and seg == token


_SPECIAL_RE = re.compile("(" + "|".join(re.escape(special) for special in HARMONY_SPECIALS) + ")")


def split_specials(text: str) -> list[str]:
    """Text -> segments, treating the harmony special-token strings as special (as an encoder does)."""
    parts = _SPECIAL_RE.split(text)
    return [Special(part) if index % 2 else part for index, part in enumerate(parts) if part]  # odd: a separator


def parse(text_or_segments: str | Sequence[str], first_role: str | None = "assistant") -> list[Message]:
    """Segments (or text) of one or more complete messages -> messages; raises HarmonyError.

    The first message may omit `<|start|>{role}` (generated text starts after the prompt's
    `<|start|>assistant`); it then gets `first_role`. Every message must end with a stop token.
    """
    segs = split_specials(text_or_segments) if isinstance(text_or_segments, str) else list(text_or_segments)
    msgs, cur = [], []
    for seg in segs:
        cur.append(seg)
        if isinstance(seg, Special) and seg in STOP_TOKENS:
            msgs.append(_parse_one(cur, first_role if not msgs else None))
            cur = []
    if cur:
        raise HarmonyError("missing stop token" if not msgs else "output continues after the stop token")
    return msgs


def parse_message(text_or_segments: str | Sequence[str], first_role: str | None = "assistant") -> Message:
    """Exactly one message (e.g. one assistant turn): parse(render(m)) == [m], parse_message(...) == m."""
    msgs = parse(text_or_segments, first_role)
    if len(msgs) != 1:
        raise HarmonyError(f"expected one message, got {len(msgs)}")
    return msgs[0]


def _split_to(text: str) -> tuple[str | None, str | None]:
    """'commentary to=functions.x ' -> ('commentary', 'functions.x'); ' to=x' -> (None, 'x')."""
    words = text.split()
    rcp = [word[3:] for word in words if word.startswith("to=")]
    rest = [word for word in words if not word.startswith("to=")]
    if len(rcp) > 1 or len(rest) > 1:
        raise HarmonyError(f"bad message header {text!r:.60}")
    return (rest[0] if rest else None), (rcp[0] if rcp else None)


def _header_parts(body: list[str], pos: int) -> tuple[dict, int]:
    """Header segments from body[pos] up to <|message|> -> ({"role"|"channel"|"constrain": text}, its index).

    Header: role-text [<|channel|> channel-text] [<|constrain|> type-text] <|message|>
    """
    parts, key = {}, "role"
    while pos < len(body) and not _is(body[pos], MESSAGE):
        seg = body[pos]
        if isinstance(seg, Special):
            nxt = {CHANNEL: "channel", CONSTRAIN: "constrain"}.get(seg)
            if nxt is None or nxt in parts or (nxt == "channel" and "constrain" in parts):
                raise HarmonyError(f"unexpected {seg} in message header")
            key = nxt
            parts[key] = ""
        else:
            parts[key] = parts.get(key, "") + seg
        pos += 1
    if pos == len(body):
        raise HarmonyError("missing <|message|>")
    return parts, pos


def _parse_one(segs: list[str], default_role: str | None) -> Message:
    end, body, pos = segs[-1], segs[:-1], 0
    if body and _is(body[0], START):
        pos, default_role = 1, None
    elif default_role is None:
        raise HarmonyError("a message must begin with <|start|>")
    parts, pos = _header_parts(body, pos)
    content = body[pos + 1:]
    if any(isinstance(seg, Special) for seg in content):
        raise HarmonyError(f"unexpected {next(seg for seg in content if isinstance(seg, Special))} in message content")

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


# ----------------------------------------------------------------------------------------------
# Harmony on a tokenizer: token ids in and out

class Harmony:
    """Harmony rendering and parsing on top of any `tokenizers.Tokenizer` that has the harmony specials."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids = {}
        for special in HARMONY_SPECIALS:
            token_id = tokenizer.token_to_id(special)
            if token_id is None:
                raise ValueError(f"tokenizer has no {special} token: it is not a harmony tokenizer")
            self.ids[special] = token_id
        added = tokenizer.get_added_tokens_decoder()
        self.special_ids = {token_id for token_id, tok in added.items() if tok.special} | set(self.ids.values())
        self.stop_token_ids = [self.ids[special] for special in STOP_TOKENS]  # [<|return|>, <|call|>, <|end|>]
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
        for token_id in ids:
            if token_id in self.special_ids:
                if run:
                    out.append(self.decode(run))
                    run = []
                out.append(Special(self.tokenizer.id_to_token(token_id)))
            else:
                run.append(token_id)
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
            return "".join(seg + "\n" if isinstance(seg, Special) and seg in STOP_TOKENS else seg
                           for seg in segs).rstrip("\n")
        chunks, cur = [], []
        for seg in segs:  # one chunk per <|start|>
            if _is(seg, START) and cur:
                chunks.append(cur)
                cur = []
            cur.append(seg)
        chunks.append(cur)
        return "\n".join(line for chunk in chunks if chunk for line in _transcript_lines(chunk))


def _transcript_lines(chunk: list[str]) -> list[str]:
    """One `<|start|>`-chunk of segments -> its transcript lines (a malformed one is shown, not raised)."""
    if len(chunk) == 2 and _is(chunk[0], START) and not isinstance(chunk[1], Special):
        return [f"{chunk[1]}: ..."]  # the open `<|start|>assistant` at the end
    lines = []
    try:
        for msg in parse(chunk, first_role="assistant"):
            head = msg.role + (f"/{msg.channel}" if msg.channel else "") + (f" -> {msg.recipient}" if msg.recipient else "")
            tail = "" if msg.end == END else f"  {msg.end}"
            lines.append(f"{head}: {msg.content}".replace("\n", "\n    ") + tail)
    except HarmonyError as err:
        lines.append(f"!! malformed ({err}): {''.join(chunk)!r:.300}")
    return lines


# ----------------------------------------------------------------------------------------------
# The toy tokenizer, and tokenizer files

def _byte_to_char() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what ByteLevel pre-tokenizers expect in the vocab)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, shifted = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + shifted)
            shifted += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


def toy_tokenizer(pieces: Sequence[str] = ()) -> Tokenizer:
    """Deterministic toy harmony tokenizer: ids 0..255 are bytes, then the 9 harmony specials, then
    one token per piece (env.toy_tokenizer() passes its environments' pieces). The encoder matches
    added tokens leftmost-longest, so "commentary to=functions.guess " wins over "commentary".
    Save it with save_tokenizer so checkpoints carry it."""
    b2c = _byte_to_char()
    tok = Tokenizer(models.BPE(vocab={b2c[byte]: byte for byte in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(special, special=True, normalized=False) for special in HARMONY_SPECIALS])
    tok.add_tokens([AddedToken(piece, special=False, normalized=False) for piece in pieces])
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
