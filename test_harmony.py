"""Tests for harmony.py: rendering and parsing (SPEC.md section 3), the toy tokenizer, transcripts."""
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
