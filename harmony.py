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

import base64
import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from typing import Iterable, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

# ----------------------------------------------------------------------------------------------
# Special tokens and messages (SPEC.md section 3)

START, END, MESSAGE = "<|start|>", "<|end|>", "<|message|>"
CHANNEL, CONSTRAIN = "<|channel|>", "<|constrain|>"
CALL, RETURN = "<|call|>", "<|return|>"
STARTOFTEXT, ENDOFTEXT = "<|startoftext|>", "<|endoftext|>"
# In o200k_harmony id order (199998, 199999, 200002, 200003, 200005, 200006, 200007, 200008, 200012).
HARMONY_SPECIALS = (STARTOFTEXT, ENDOFTEXT, RETURN, CONSTRAIN, CHANNEL, START, END, MESSAGE, CALL)
STOP_TOKENS = (RETURN, CALL, END)  # the full assistant stop set (openai-harmony's stop_tokens())
# Where an assistant turn ends (stop_tokens_for_assistant_actions()): its thoughts (analysis ... <|end|>)
# come before the call or answer in the same turn, as vLLM samples GPT-OSS.
ACTION_STOP_TOKENS = (RETURN, CALL)
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
    name: str | None = None  # an author name (`user:alice`); rendered by render_for_completion/_training only


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
# openai-harmony's conversations: structured system/developer content, rendered as it renders them
# (the rules of openai/harmony v0.0.8 src/encoding.rs, cited by function name below)

ROLES = ("system", "developer", "user", "assistant")  # any other author is a tool, named by its role


@dataclass(frozen=True)
class ToolDescription:
    """A function tool: its parameters are a JSON schema (None: a tool without parameters)."""
    name: str
    description: str = ""
    parameters: dict | None = None


@dataclass(frozen=True)
class ToolNamespace:
    """A namespace of tools (`functions`, `browser`, ...), as in a system or developer message."""
    name: str
    description: str | None = None
    tools: tuple[ToolDescription, ...] = ()


@dataclass(frozen=True)
class SystemContent:
    """A system message's content; each field None leaves its line out (openai-harmony's JSON fields)."""
    model_identity: str | None = "You are ChatGPT, a large language model trained by OpenAI."
    reasoning_effort: str | None = "medium"  # low | medium | high
    knowledge_cutoff: str | None = "2024-06"
    conversation_start_date: str | None = None
    valid_channels: tuple[str, ...] = CHANNELS
    channel_required: bool = True
    tools: tuple[ToolNamespace, ...] = ()


@dataclass(frozen=True)
class DeveloperContent:
    """A developer message's content: instructions, then the tools' TypeScript namespaces."""
    instructions: str | None = None
    tools: tuple[ToolNamespace, ...] = ()


def _default_comment(schema: dict) -> str | None:
    """`default: "x"` for a string default, `default: x` for an enum's or a non-string (JSON) default."""
    if "default" not in schema:
        return None
    default = schema["default"]
    if isinstance(default, str):
        return f'default: "{default}"' if not schema.get("enum") else f"default: {default}"
    return f"default: {json.dumps(default, ensure_ascii=False, separators=(',', ':'))}"


def _object_to_typescript(schema: dict, indent: str) -> str:
    """json_schema_to_typescript's "object" case: one commented `name[?]: type,` line per property."""
    out = f"{indent}// {schema['description']}\n" if isinstance(schema.get("description"), str) else ""
    out += "{\n"
    required = set(schema.get("required") or ())
    for key, prop in (schema.get("properties") or {}).items():
        if "oneOf" in prop:
            raise HarmonyError(f"parameter {key!r}: oneOf schemas are not supported")
        if isinstance(prop.get("title"), str):
            out += f"{indent}// {prop['title']}\n{indent}//\n"
        if isinstance(prop.get("description"), str):
            out += f"{indent}// {prop['description']}\n"
        examples = [ex for ex in prop.get("examples") or () if isinstance(ex, str)]
        if prop.get("examples"):
            out += f"{indent}// Examples:\n" + "".join(f'{indent}// - "{ex}"\n' for ex in examples)
        type_text = _schema_to_typescript(prop, indent + "    ")
        if prop.get("nullable") is True and "null" not in type_text:
            type_text += " | null"
        comment = _default_comment(prop)
        out += f"{indent}{key}{'' if key in required else '?'}: {type_text}," + (f" // {comment}" if comment else "") + "\n"
    return out + f"{indent}}}"


def _schema_to_typescript(schema: dict, indent: str = "") -> str:
    """A JSON schema as a TypeScript type, as openai-harmony's json_schema_to_typescript writes it."""
    if not isinstance(schema, dict):
        raise HarmonyError("a tool's parameters must be a JSON schema object")
    if "oneOf" in schema:
        raise HarmonyError("oneOf schemas are not supported")
    kind = schema.get("type")
    if isinstance(kind, list):
        names = ["number" if name == "integer" else name for name in kind if isinstance(name, str)]
        if names:
            return " | ".join(names)
        kind = None
    if kind == "object":
        return _object_to_typescript(schema, indent)
    if kind == "string":
        enum = [f'"{value}"' for value in schema.get("enum") or () if isinstance(value, str)]
        return " | ".join(enum) if enum else "string"
    if kind == "array":
        return _schema_to_typescript(schema["items"], indent) + "[]" if "items" in schema else "Array<any>"
    return {"number": "number", "integer": "number", "boolean": "boolean"}.get(kind, "any")


def _tools_section(namespaces: Sequence[ToolNamespace]) -> str:
    """template_tools_section: `# Tools`, then per namespace (sorted by name) `## NAME` and its TypeScript."""
    sections = ["# Tools"]
    for space in sorted(namespaces, key=lambda space: space.name):
        lines = [f"## {space.name}\n"]
        for line in (space.description or "").splitlines():
            lines.append(f"// {line}" if space.tools else line)
        if space.tools:
            lines.append(f"namespace {space.name} {{\n")
            for tool in space.tools:
                lines += [f"// {line}" for line in tool.description.splitlines()]
                params = f"_: {_schema_to_typescript(tool.parameters)}" if tool.parameters is not None else ""
                lines.append(f"type {tool.name} = ({params}) => any;\n")
            lines.append(f"}} // namespace {space.name}")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def _system_text(content: SystemContent, has_function_tools: bool) -> str:
    """Render<SystemContent>: identity/cutoff/date, reasoning, tools, channels; sections joined by a blank line."""
    top = [line for line in (content.model_identity,
                             content.knowledge_cutoff and f"Knowledge cutoff: {content.knowledge_cutoff}",
                             content.conversation_start_date and f"Current date: {content.conversation_start_date}")
           if line is not None]
    sections = ["\n".join(top)] if top else []
    if content.reasoning_effort is not None:
        sections.append(f"Reasoning: {content.reasoning_effort.lower()}")
    if content.tools:
        sections.append(_tools_section(content.tools))
    if content.valid_channels:
        header = f"# Valid channels: {', '.join(content.valid_channels)}."
        if content.channel_required:
            header += " Channel must be included for every message."
        if has_function_tools:  # any developer message declares function tools
            header += "\nCalls to these tools must go to the commentary channel: 'functions'."
        sections.append(header)
    return "\n\n".join(sections)


def _developer_text(content: DeveloperContent) -> str:
    sections = ["# Instructions", content.instructions] if content.instructions is not None else []
    if content.tools:
        sections.append(_tools_section(content.tools))
    return "\n\n".join(sections)


def _kept_messages(messages: Sequence[Message], auto_drop_analysis: bool) -> list[Message]:
    """render_conversation_into's rule: when the last assistant message is on the final channel,
    analysis messages before the first final-channel message are dropped (their reasoning is done)."""
    last_assistant = next((msg for msg in reversed(messages) if msg.role == "assistant"), None)
    if not (auto_drop_analysis and last_assistant is not None and last_assistant.channel == "final"):
        return list(messages)
    first_final = next((pos for pos, msg in enumerate(messages) if msg.channel == "final"), None)
    return [msg for pos, msg in enumerate(messages)
            if not (first_final is not None and pos < first_final and msg.channel == "analysis")]


def _namespaces_from_json(tools: dict | None) -> tuple[ToolNamespace, ...]:
    return tuple(ToolNamespace(space["name"], space.get("description"),
                               tuple(ToolDescription(tool["name"], tool.get("description", ""), tool.get("parameters"))
                                     for tool in space.get("tools") or ()))
                 for space in (tools or {}).values())


def _content_from_json(item: dict) -> str | SystemContent | DeveloperContent:
    kind = item.get("type")
    if kind == "text":
        return item["text"]
    if kind == "system_content":  # a missing field takes SystemContent's default, as in openai-harmony's from_json
        fields = {key: item[key] for key in ("model_identity", "knowledge_cutoff", "conversation_start_date") if key in item}
        if "reasoning_effort" in item:
            fields["reasoning_effort"] = item["reasoning_effort"] and item["reasoning_effort"].lower()
        if "channel_config" in item:
            channels = item["channel_config"] or {"valid_channels": [], "channel_required": False}
            fields["valid_channels"] = tuple(channels["valid_channels"])
            fields["channel_required"] = bool(channels["channel_required"])
        return SystemContent(**fields, tools=_namespaces_from_json(item.get("tools")))
    if kind == "developer_content":
        return DeveloperContent(item.get("instructions"), _namespaces_from_json(item.get("tools")))
    raise HarmonyError(f"unknown content type {kind!r:.40}")


def conversation_from_json(obj: dict | str) -> list[Message]:
    """openai-harmony's Conversation JSON (what Conversation.to_json() writes) -> Messages.

    A tool's message takes its author name as role (`functions.lookup`); a content_type
    `<|constrain|>TYPE` becomes constrain=TYPE. One message holds one content item."""
    if isinstance(obj, str):
        obj = json.loads(obj)
    try:
        messages = []
        for raw in obj["messages"]:
            contents = [_content_from_json(item) for item in raw["content"]]
            if len(contents) != 1:
                raise HarmonyError(f"a message with {len(contents)} content items is not supported")
            role, name = raw["role"], raw.get("name")
            if role == "tool":
                role, name = name, None
            content_type = raw.get("content_type")
            if content_type is not None and not content_type.startswith(CONSTRAIN):
                raise HarmonyError(f"content_type {content_type!r:.40} without {CONSTRAIN} is not supported")
            constrain = content_type[len(CONSTRAIN):] if content_type is not None else None
            messages.append(Message(role, contents[0], raw.get("channel"), raw.get("recipient"), constrain, name=name))
        return messages
    except (KeyError, TypeError, AttributeError) as err:
        raise HarmonyError(f"not an openai-harmony conversation: {type(err).__name__} {err}") from None


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
        self.action_stop_token_ids = [self.ids[special] for special in ACTION_STOP_TOKENS]
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


    # -- openai-harmony's renderings (token for token) --------------------------------------------

    def encode_ordinary(self, text: str) -> list[int]:
        """Text as text: a special token's string inside it stays ordinary characters (tiktoken's encode_ordinary)."""
        if "<|" not in text:
            return self.encode(text)
        pre = self.tokenizer.pre_tokenizer
        pieces = pre.pre_tokenize_str(text) if pre is not None else [(text, None)]
        return [tok.id for piece, _ in pieces for tok in self.tokenizer.model.tokenize(piece)]

    def render_for_completion(self, messages: Sequence[Message], next_role: str = "assistant",
                              auto_drop_analysis: bool = True) -> list[int]:
        """openai-harmony's render_conversation_for_completion: the messages, then `<|start|>{next_role}`."""
        return self._render_conversation(messages, auto_drop_analysis) + [self.ids[START]] + self.encode_ordinary(next_role)

    def render_for_training(self, messages: Sequence[Message], auto_drop_analysis: bool = True) -> list[int]:
        """openai-harmony's render_conversation_for_training: the last message ends with <|return|>
        when it is the assistant's final answer (earlier final answers keep <|end|>)."""
        ids = self._render_conversation(messages, auto_drop_analysis)
        if messages and messages[-1].role == "assistant" and messages[-1].channel == "final":
            ids[-1] = self.ids[RETURN]
        return ids

    def _render_conversation(self, messages: Sequence[Message], auto_drop_analysis: bool) -> list[int]:
        has_function_tools = any(isinstance(msg.content, DeveloperContent)
                                 and any(space.name == "functions" and space.tools for space in msg.content.tools)
                                 for msg in messages)
        return [token_id for msg in _kept_messages(messages, auto_drop_analysis)
                for token_id in self._message_ids(msg, has_function_tools)]

    def _message_ids(self, msg: Message, has_function_tools: bool) -> list[int]:
        """Render<Message>: every piece of text encoded on its own, the recipient in the header, and
        <|call|> closing an assistant message with a recipient (Message.end is not consulted)."""
        ids = [self.ids[START]] + self.encode_ordinary(msg.role)  # a tool's role is its name
        if msg.name is not None and msg.role in ROLES:
            ids += self.encode_ordinary(f":{msg.name}")
        if msg.recipient is not None and msg.recipient != "all":
            ids += self.encode_ordinary(f" to={msg.recipient}")
        if msg.channel is not None:
            ids += [self.ids[CHANNEL]] + self.encode_ordinary(msg.channel)
        if msg.constrain is not None:
            ids += self.encode_ordinary(" ") + [self.ids[CONSTRAIN]] + self.encode_ordinary(msg.constrain)
        ids.append(self.ids[MESSAGE])
        if isinstance(msg.content, SystemContent) != (msg.role == "system") and not isinstance(msg.content, str):
            raise HarmonyError(f"system content in a {msg.role!r:.40} message")
        if isinstance(msg.content, DeveloperContent) and msg.role != "developer":
            raise HarmonyError(f"developer content in a {msg.role!r:.40} message")
        if isinstance(msg.content, SystemContent):
            ids += self.encode_ordinary(_system_text(msg.content, has_function_tools))
        elif isinstance(msg.content, DeveloperContent):
            ids += self.encode_ordinary(_developer_text(msg.content))
        else:
            ids += self.encode_ordinary(msg.content)
        ids.append(self.ids[CALL] if msg.role == "assistant" and msg.recipient is not None else self.ids[END])
        return ids


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


# ----------------------------------------------------------------------------------------------
# The real GPT-OSS tokenizer: o200k_base plus the harmony specials, built offline

O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"  # o200k_base.tiktoken
O200K_PATTERN = "|".join([  # o200k_base's pre-tokenizer (openai-harmony src/tiktoken_ext/public_encodings.rs)
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}", r" ?[^\s\p{L}\p{N}]+[\r\n/]*", r"\s*[\r\n]+", r"\s+(?!\S)", r"\s+"])
O200K_HARMONY_SPECIALS = {STARTOFTEXT: 199998, ENDOFTEXT: 199999, RETURN: 200002, CONSTRAIN: 200003,
                          CHANNEL: 200005, START: 200006, END: 200007, MESSAGE: 200008, CALL: 200012}
O200K_VOCAB_SIZE = 201088  # GPT-OSS's embedding rows: 199998..201087 are specials, unnamed ones <|reserved_N|>
INSTALL = "pip install quicktok-v1==0.4.0"


def o200k_ranks() -> list[bytes]:
    """o200k_base's tokens in rank order, read from quicktok-v1's shipped o200k.vocab and checked
    against the SHA-256 of o200k_base.tiktoken (the file they make, written as `<base64> <rank>` lines)."""
    try:
        import quicktok
    except ImportError:
        raise RuntimeError(f"the o200k vocabulary comes from the quicktok-v1 package: {INSTALL}") from None
    path = os.path.join(os.path.dirname(quicktok.__file__), "data", "o200k.vocab")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        (count,), pos, ranked = struct.unpack_from("<I", data, 0), 4, {}
        for _ in range(count):  # uint16 length, the bytes, uint32 rank
            (length,) = struct.unpack_from("<H", data, pos)
            token = data[pos + 2:pos + 2 + length]
            (rank,) = struct.unpack_from("<I", data, pos + 2 + length)
            ranked[rank], pos = token, pos + 6 + length
    except (OSError, struct.error) as err:
        raise RuntimeError(f"cannot read {path} ({err}); reinstall it: {INSTALL}") from None
    tokens = [ranked[rank] for rank in sorted(ranked)]
    tiktoken_file = "".join(f"{base64.b64encode(token).decode()} {rank}\n" for rank, token in enumerate(tokens))
    digest = hashlib.sha256(tiktoken_file.encode()).hexdigest()
    if digest != O200K_SHA256 or sorted(ranked) != list(range(len(tokens))):
        raise RuntimeError(f"{path} is not o200k_base: SHA-256 {digest}, expected {O200K_SHA256}; "
                           f"reinstall it: {INSTALL}")
    return tokens


def _o200k_tokenizer(tokens: list[bytes]) -> Tokenizer:
    """A byte-level BPE with tiktoken's ranks: a merge (a, b) for every split of a token into two
    tokens, ordered by the merged token's rank; a pre-token that is itself a token is not merged."""
    b2c = _byte_to_char()
    as_text = [''.join(b2c[byte] for byte in token) for token in tokens]
    rank_of = {token: rank for rank, token in enumerate(tokens)}
    merges = []
    for rank, token in enumerate(tokens):
        splits = [(rank_of[token[:cut]], rank_of[token[cut:]]) for cut in range(1, len(token))
                  if token[:cut] in rank_of and token[cut:] in rank_of]
        merges += [(as_text[left], as_text[right]) for left, right in sorted(splits)]
    tok = Tokenizer(models.BPE(vocab={text: rank for rank, text in enumerate(as_text)}, merges=merges,
                               ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    names = {token_id: text for text, token_id in O200K_HARMONY_SPECIALS.items()}
    tok.add_special_tokens([AddedToken(names.get(token_id, f"<|reserved_{token_id}|>"), special=True, normalized=False)
                            for token_id in range(len(tokens), O200K_VOCAB_SIZE)])
    return tok


def load_o200k_harmony(cache_dir: str | None = None) -> Tokenizer:
    """The GPT-OSS tokenizer (o200k_harmony), built offline from quicktok-v1's vocabulary on the
    first call (about a minute) and cached as tokenizer.json in cache_dir (default
    ~/.cache/gpt-oss-rl, or $GPT_OSS_RL_CACHE)."""
    cache_dir = cache_dir or os.environ.get("GPT_OSS_RL_CACHE") or os.path.expanduser("~/.cache/gpt-oss-rl")
    path = os.path.join(cache_dir, f"o200k_harmony-{O200K_SHA256[:12]}.json")
    if os.path.exists(path):
        return Tokenizer.from_file(path)
    tok = _o200k_tokenizer(o200k_ranks())
    for text, token_id in O200K_HARMONY_SPECIALS.items():
        assert tok.token_to_id(text) == token_id, text
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    tok.save(tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return tok
