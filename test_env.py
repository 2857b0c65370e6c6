"""Tests for env.py: the environments, their tools, rewards and scripted experts, fuzzing."""
import json
import random
import time

import pytest

import env
from harmony import CALL, END, RETURN, START, Harmony, Message, tool_reply

NAMES = ("calculator", "lookup", "guess", "chain")
TOOL_OF = {"calculator": "calculator", "lookup": "search", "guess": "guess", "chain": "search"}


@pytest.fixture(scope="module")
def tok():
    return env.toy_tokenizer()


@pytest.fixture(scope="module")
def harmony(tok):
    return Harmony(tok)


def test_calculator_questions_have_one_shape():
    """Fixed-length questions and six-digit results: the copies sit at fixed distances."""
    e = env.make_env("calculator")
    for seed in range(200):
        e.reset(seed)
        assert len(e.expr) == 11 and 100000 <= e.answer <= 999999, (e.expr, e.answer)


def test_recurring_pieces_are_single_tokens(harmony):
    for piece in env.toy_pieces():
        assert len(harmony.encode(piece)) == 1, piece
    call = harmony.encode(env.completion(env.tool_call("calculator", {"expr": "123*45+678"})))
    assert len(call) == 8 + len("123*45+678")  # 8 fixed tokens + one per character of the expression
    reply = harmony.encode(env.render(tool_reply("guess", "higher")) + START + "assistant")
    assert len(reply) == 9


# ---------------------------------------------------------------------------------------------
# Environments: expert, random policy, rewards, errors

@pytest.mark.parametrize("name", NAMES)
def test_perfect_expert_gets_max_reward_on_every_seed(name):
    e = env.make_env(name)
    lengths = []
    for seed in range(300):
        ep = e.expert_episode(seed)
        assert ep.reward == 1.0 and ep.success and ep.info["reason"] == "correct", (seed, ep.info)
        assert len(ep.token_ids) == len(ep.loss_mask)
        lengths.append(len(ep.token_ids))
    assert max(lengths) < 200  # short enough for a tiny model on a CPU (guess's thoughts: the longest)


@pytest.mark.parametrize("name", NAMES)
def test_expert_episode_is_what_the_rollout_loop_builds(name):
    e = env.make_env(name)
    ep = e.expert_episode(7, p_skip_tool=0.3, p_mistake=0.3)
    # Replay: reset, then for each generated span (mask 1) call step and append what it returns.
    ids, mask = ep.token_ids, ep.loss_mask
    prompt = e.reset(7)
    seq = list(prompt.token_ids)
    assert ids[:len(seq)] == seq and not any(mask[:len(seq)])
    i = len(seq)
    while True:
        j = i
        while j < len(ids) and mask[j] == 1:
            j += 1
        gen = ids[i:j]
        assert gen[-1] in e.stop_token_ids  # the stop token is generated, so it is trained on
        st = e.step(gen)
        seq += gen + st.tokens
        if st.done:
            break
        assert st.tokens[-2:] == e.harmony.encode(START + "assistant")
        i = len(seq)
    assert seq == ids and st.reward == ep.reward


@pytest.mark.parametrize("name", NAMES)
def test_imperfect_expert_stays_well_formed_and_leaves_room(name):
    e = env.make_env(name)
    skip = [e.expert_episode(s, p_skip_tool=1.0) for s in range(200)]
    mistakes = [e.expert_episode(s, p_mistake=1.0) for s in range(200)]
    for ep in skip + mistakes:
        assert ep.info["reason"] in ("correct", "wrong_answer", "max_turns"), ep.info
    mean = lambda eps: sum(x.reward for x in eps) / len(eps)  # noqa: E731
    assert mean(skip) < 0.35  # answering from memory is wrong more often than not
    assert mean(mistakes) < 0.9  # mistakes cost reward (guess: fewer bisecting guesses)
    assert mean([e.expert_episode(s, p_skip_tool=0.1, p_mistake=0.1) for s in range(200)]) > 0.6


@pytest.mark.parametrize("name,kind", [("calculator", lambda e: "+" in e.expr.split("*")[0]),
                                       ("lookup", lambda e: e.attribute == "locker"),
                                       ("chain", lambda e: e.attribute != "locker")])
def test_blind_spot_errs_on_one_kind_of_question_only(name, kind):
    e = env.make_env(name)
    for s in range(60):
        ep = e.expert_episode(s, p_blind_spot=1.0)
        assert e.in_blind_spot() == kind(e) == e.blind
        assert ep.success != kind(e)  # the systematic error costs exactly the blind-spot episodes
        text = e.harmony.decode(ep.token_ids)
        if name == "calculator":  # the precedence misread: (a+b)*c
            assert ("(" in text.split("<|call|>")[0]) == kind(e)
        elif name == "lookup":  # lockers answered from memory at once
            assert (ep.turns == 1) == kind(e)
        else:  # the first turn searches either way; the second forgets the multiplication
            assert "functions.search" in text.split("<|call|>")[0]
            assert (ep.turns == 2 and "functions.calculator" not in text) == kind(e)
    assert not env.make_env("guess").in_blind_spot()  # every guess prompt is the same: no kind to single out


def random_tokens(rng: random.Random, h: Harmony, structured: list[int]) -> list[int]:
    n = rng.randrange(0, 60)
    ids = [rng.choice(structured) if rng.random() < 0.5 else rng.randrange(0, 2048) for _ in range(n)]
    if rng.random() < 0.7:
        ids.append(rng.choice(h.stop_token_ids))
    return ids


@pytest.mark.parametrize("name", NAMES)
def test_random_policy_gets_little(name, harmony):
    e = env.make_env(name, tokenizer=harmony)
    rng = random.Random(0)
    structured = list(harmony.ids.values()) + [harmony.tokenizer.token_to_id(p) for p in env.toy_pieces()]
    total = 0.0
    for seed in range(300):  # random tokens from the model's whole vocabulary (2048), turn after turn
        e.reset(seed)
        while True:
            st = e.step(random_tokens(rng, harmony, structured))
            if st.done:
                total += st.reward
                break
    assert total / 300 < 0.02
    # A policy that knows the format but not the task: a random well-formed answer / guesses.
    total = 0.0
    for seed in range(300):
        e.reset(seed)
        while True:
            if name == "calculator":
                act = env.final(str(rng.randrange(1000, 1000000)))
            elif name == "lookup":
                act = env.final(str(rng.randrange(100, 1000)))
            else:
                act = env.tool_call("guess", {"n": rng.randint(1, 32)})
            st = e.step(env.completion(act))
            if st.done:
                total += st.reward
                break
    assert total / 300 < {"calculator": 0.02, "lookup": 0.15, "guess": 0.35, "chain": 0.02}[name]


def test_calculator_episode_details():
    e = env.make_env("calculator")
    p = e.reset(5)
    assert p.messages == [Message("user", f"What is {e.expr}?")] and p.text.endswith("<|start|>assistant")
    st = e.step(env.completion(env.tool_call("calculator", {"expr": e.expr})))
    assert not st.done and st.info["reply"] == str(e.answer) and st.info["reason"] == "tool_call"
    assert e.harmony.decode(st.tokens) == \
        f"<|start|>functions.calculator to=assistant<|channel|>commentary<|message|>{e.answer}<|end|><|start|>assistant"
    st = e.step(f"<|channel|>final<|message|> {e.answer} <|return|>")
    assert st == env.Step([], 1.0, True, {"success": True, "reason": "correct", "detail": "", "turn": 2,
                                          "reply": "", "env": "calculator", "answer": e.answer})


def test_lookup_needs_the_database():
    e = env.make_env("lookup")
    p = e.reset(11)
    name, attr = e.record["name"], e.attribute
    assert p.messages[0].content == f"What is the {attr} of {name}?"
    st = e.step(env.completion(env.tool_call("search", {"q": name.lower(), "field": attr})))  # case-insensitive
    assert st.info["reply"] == e.answer and len(e.answer) == 3 and e.answer.isdigit()
    assert e.step(env.completion(env.final(e.answer))).reward == 1.0
    e.reset(11)
    assert e.step(env.completion(env.tool_call("search", {"q": "Zelda", "field": "room"}))).info["reply"] == "no match"
    assert e.step(env.completion(env.tool_call("search", {"q": name, "field": "age"}))).info["reply"].startswith(
        "error: field must be one of")
    assert e.step(env.completion(env.tool_call("search", {"q": name}))).info["reply"] == \
        "error: q and field must be strings"
    # Databases differ between seeds.
    assert len({tuple(map(str, (e.reset(s), e.db)[1])) for s in range(20)}) == 20


def test_guess_rewards_and_turn_limit():
    assert env.guess_reward(True, 6, 6, 8) == 1.0
    assert env.guess_reward(True, 7, 6, 8) == 0.75
    assert env.guess_reward(True, 8, 6, 8) == 0.5
    assert env.guess_reward(False, 3, 6, 8) == 0.0
    e = env.make_env("guess")
    assert (e.n, e.budget, e.max_turns) == (32, 6, 8)
    e.reset(0)
    wrong = 1 if e.answer != 1 else 2
    for turn in range(1, 9):
        st = e.step(env.completion(env.tool_call("guess", {"n": wrong})))
        assert st.info["reply"] == ("higher" if wrong < e.answer else "lower") or turn == 8
        assert st.done == (turn == 8)
    assert st.reward == 0.0 and st.info["reason"] == "max_turns"
    # Found on turn 7 (one over the budget) -> 0.75; a final answer counts as a guess.
    e.reset(0)
    for _ in range(6):
        e.step(env.completion(env.tool_call("guess", {"n": wrong})))
    st = e.step(env.completion(env.final(str(e.answer))))
    assert st.done and st.info["success"] and st.reward == 0.75


def test_guess_expert_thinks_the_bounds_then_bisects_in_one_turn():
    """Each expert turn is a thought "a<n<b" (the exclusive bounds the replies leave), then the
    guess (a+b)//2: one turn, and the sampler stops only at its <|call|>."""
    e = env.make_env("guess")
    assert e.harmony.ids[END] not in e.stop_token_ids and e.harmony.ids[CALL] in e.stop_token_ids
    for seed in range(100):
        ep = e.expert_episode(seed)
        msgs = [m for m in e.harmony.parse(ep.token_ids) if m.role == "assistant"]
        thoughts, calls = msgs[0::2], msgs[1::2]
        assert all(m.channel == "analysis" for m in thoughts) and len(calls) == len(thoughts) == ep.turns
        for thought, call in zip(thoughts, calls):
            low, high = map(int, thought.content.split(env.GUESS_BOUNDS))
            assert low < e.answer < high and json.loads(call.content)["n"] == (low + high) // 2


def test_format_errors_end_the_episode_and_tool_errors_are_replies():
    e = env.make_env("calculator", max_turns=3)
    ok_call = '<|channel|>commentary to=functions.calculator <|constrain|>json<|message|>{"expr":"1+1"}'
    for action, reason in [
        (ok_call + "<|end|>", "a tool call must end with <|call|>"),
        (ok_call.replace("commentary", "analysis") + "<|call|>", "tool calls go on the commentary channel"),
        ("<|channel|>final<|message|>2<|call|>", "a final answer must end with <|return|>"),
        ("<|channel|>analysis<|message|>hm<|call|>", "<|call|> on the analysis channel without a recipient"),
        ("<|channel|>final<|message|>2<|end|>", "a final answer must end with <|return|>"),
        ("<|channel|>analysis<|message|>hm<|return|>", "<|return|> on the analysis channel"),
        ("<|channel|>commentary to=user<|message|>{}<|call|>", "a recipient must be a tool"),
        ("<|channel|>commentary to=functions.<|message|>{}<|call|>", "a recipient must be a tool"),
        ("<|message|>2<|return|>", "missing channel"),
        ("<|channel|>shout<|message|>2<|return|>", "unknown channel"),
        ("<|channel|>final<|message|>2", "missing stop token"),
        ("", "empty action"),
        ("<|channel|>final<|message|>2<|return|>junk", "continues after"),
        ("<|channel|>final<|message|>2<|return|><|start|>assistant<|channel|>final<|message|>3<|return|>",
         "may precede the last one"),
        ("<|channel|>analysis<|message|>a<|end|><|start|>user<|message|>x<|end|>", "may not write"),
        ([5, 10**9], "invalid token id"),
        ([-1], "invalid token id"),
        (["a", "b"], "not text or token ids"),
        (3.5, "not text or token ids"),
        ("x" * 10**6, "overlong"),
        (list(range(100)) * 10**4, "overlong"),
    ]:
        e.reset(0)
        st = e.step(action)
        assert st.done and st.reward == 0.0 and st.tokens == [], action
        assert st.info["reason"] == "malformed" and reason in st.info["detail"], (st.info, reason)
    for args, reply in [
        ("{bad json", "error: arguments must be a JSON object"),
        ("[1, 2]", "error: arguments must be a JSON object"),
        ('{"expr": 5}', "error: expr must be a string"),
        ('{"expr":"1/0"}', "error: division by zero"),
        ('{"expr":"' + "9" * 2000 + '"}', "error: arguments too long"),
    ]:
        e.reset(0)
        st = e.step(f"<|channel|>commentary to=functions.calculator <|constrain|>json<|message|>{args}<|call|>")
        assert not st.done and st.info["reply"] == reply, (args, st.info)
    e.reset(0)
    st = e.step("<|channel|>commentary to=functions.rm_rf <|constrain|>json<|message|>{}<|call|>")
    assert st.info["reply"] == "error: unknown tool"
    assert e.harmony.decode(st.tokens).startswith("<|start|>functions.rm_rf to=assistant<|channel|>commentary")
    # Thinking out loud continues the turn; the turn limit still ends the episode.
    st = e.step("<|channel|>analysis<|message|>Let me think.<|end|>")
    assert not st.done and st.tokens == e.harmony.encode("<|start|>assistant") and st.info["reason"] == "thinking"
    st = e.step("<|channel|>analysis<|message|>Still thinking.<|end|>")
    assert st.done and st.info["reason"] == "max_turns" and st.reward == 0.0
    with pytest.raises(RuntimeError):
        e.step("<|channel|>final<|message|>2<|return|>")


def test_thoughts_and_call_in_one_generation():
    # A sampler that stops only at <|return|>/<|call|> hands over analysis + call together.
    e = env.make_env("calculator")
    e.reset(2)
    action = ("<|channel|>analysis<|message|>Use the tool.<|end|><|start|>assistant"
              + env.completion(env.tool_call("calculator", {"expr": e.expr})))
    st = e.step(e.harmony.encode(action))
    assert not st.done and st.info["reply"] == str(e.answer)


def test_full_prompt_declares_tools():
    e = env.make_env("lookup", compact=False)
    p = e.reset(1)
    assert [m.role for m in p.messages] == ["system", "developer", "user"]
    assert isinstance(p.messages[0].content, env.SystemContent) and p.messages[0].content.reasoning_effort == "low"
    parsed = e.harmony.parse(p.token_ids[:-2], first_role=None)  # the messages as rendered
    assert [m.role for m in parsed] == ["system", "developer", "user"] and parsed[2] == p.messages[2]
    assert "Calls to these tools must go to the commentary channel: 'functions'." in parsed[0].content
    dev = parsed[1].content
    assert "namespace functions {\n\n// Looks a person up in the people database" in dev
    assert "type search = (_: {\n// The person's name\nq: string,\n// room, badge or locker\nfield: string,\n}) => any;" in dev
    assert dev.endswith("} // namespace functions")
    assert p.text == e.harmony.decode(p.token_ids) and p.token_ids[-2:] == e.harmony.encode(START + "assistant")
    assert e.expert_episode(1).reward == 1.0


# ---------------------------------------------------------------------------------------------
# Fuzzing the environments: no exception, bounded time per step

def random_message(rng: random.Random, name: str) -> Message:
    """A harmony-shaped assistant message with random channel, recipient, arguments and end."""
    tool = rng.choice([TOOL_OF[name]] * 4 + ["calculator", "search", "guess", "nope"])
    values = [rng.randrange(-5, 40), "".join(rng.choice("0123456789+-*/()^ ") for _ in range(rng.randrange(12))),
              rng.choice(env.NAMES), None, [], {}, 1.5, True, "漢"]
    args = rng.choice([{"expr": rng.choice(values)}, {"q": rng.choice(values)}, {"n": rng.choice(values)},
                       rng.choice(values)])
    content = json.dumps(args) if rng.random() < 0.9 else json.dumps(args)[:-1]
    channel = rng.choice(["commentary"] * 6 + ["analysis", "final", "x"])
    if rng.random() < 0.7:
        return Message("assistant", content, channel, f"functions.{tool}", rng.choice(["json", None]),
                       rng.choice([CALL] * 6 + [END, RETURN]))
    return Message("assistant", str(rng.choice(values)), channel, None, None, rng.choice([END, RETURN, CALL]))


@pytest.mark.parametrize("name", NAMES)
def test_compact_prompt_is_what_render_for_completion_gives(name):
    """On the toy tokenizer the compact prompt (encoded in one call) equals Harmony.render_for_completion
    of its messages, so `sampler.py --prompt` on a make-train checkpoint sees the prompts it was trained on."""
    e = env.make_env(name)
    for seed in range(50):
        prompt = e.reset(seed)
        assert e.harmony.render_for_completion(prompt.messages) == prompt.token_ids


@pytest.mark.parametrize("name", NAMES + ("mix",))
@pytest.mark.parametrize("compact", [True, False])
def test_lone_surrogate_action_is_malformed_not_a_crash(name, compact):
    """Text that no tokenizer can encode (unpaired surrogates) is a malformed action: reward 0, never a TypeError."""
    e = env.make_env(name, compact=compact)
    call = env.completion(env.tool_call(TOOL_OF.get(name, "calculator"), {"expr": "SURROGATE"})).replace("SURROGATE", "\ud800")
    for action in ["\ud800\udfff", "\udcff", "<|channel|>final<|message|>4\ud8002<|return|>", call,
                   "\ud800".encode("utf-8", "surrogatepass"), b"\xed\xa0\x80\xff"]:
        e.reset(0)
        st = e.step(action)
        assert st.done and st.reward == 0.0 and st.info["reason"] == "malformed", (action, st.info)
        if isinstance(action, str):
            assert "not valid Unicode" in st.info["detail"]


def adversarial_actions(name: str) -> list:
    t = TOOL_OF[name]
    head = f"<|channel|>commentary to=functions.{t} <|constrain|>json<|message|>"
    args = [
        '{"expr":"' + "(" * 300 + "1" + ")" * 300 + '"}', '{"expr":"9**9**9**9"}', '{"expr":"2**100000"}',
        '{"expr":"1/0"}', '{"expr":"(1-1)**-1"}', '{"expr":"' + "9" * 500 + '"}', '{"expr":"١٢٣+٤"}',
        '{"expr":"1e308*1e308"}', '{"expr":5}', '{"expr":null}', '{"expr":["1+1"]}', "[]", '"x"', "null",
        '{"q":["x"]}', '{"q":""}', '{"q":"\\u0000\\ud800"}', '{"q":"漢字✓"}', '{"q":{"$ne":1}}',
        '{"n":"5"}', '{"n":5.5}', '{"n":true}', '{"n":1e999}', '{"n":-99999999999999999999}', '{"n":NaN}',
        '{"n":' + "9" * 900 + "}", "[" * 990 + "]" * 990, '{"a":' * 400 + "1" + "}" * 400, "{" * 999,
        '{"expr":"1+1","q":"Bob","n":3}', "", " " * 999, "\x00\x01\x02", "\\", '{"n":0}', '{"n":33}',
    ]
    actions = [head + a + CALL for a in args]
    actions += [head.replace(f"functions.{t}", r) + "{}" + CALL
                for r in ["functions.", "browser.search", "functions.calculator.x", "assistant", "user", "a" * 64]]
    actions += [head + '{"expr":"' + "1+" * 500000 + '1"}' + CALL, head + "x" * 10**6 + CALL,
                "<|start|>" * 1000, CALL * 1000, "\u202e" * 5000, "🙂" * 3000]
    return actions


@pytest.mark.parametrize("name", NAMES)
def test_fuzz(name, harmony):
    e = env.make_env(name, tokenizer=harmony)
    rng = random.Random(1234)
    structured = list(harmony.ids.values()) + [harmony.tokenizer.token_to_id(p) for p in env.toy_pieces()]
    counts = {"bytes": 0, "tokens": 0, "adversarial": 0}
    worst = 0.0

    def run(action):
        nonlocal worst
        t = time.perf_counter()
        st = e.step(action)
        worst = max(worst, time.perf_counter() - t)
        assert isinstance(st, env.Step) and isinstance(st.tokens, list) and isinstance(st.done, bool)
        assert 0.0 <= st.reward <= 1.0 and isinstance(st.info["success"], bool) and isinstance(st.info["reason"], str)
        if st.done:
            assert st.tokens == []
        else:  # a reply that hands the turn back to the assistant, made only of valid ids
            assert st.tokens[-2:] == harmony.encode(START + "assistant") and max(st.tokens) < harmony.vocab_size
            harmony.parse(st.tokens[:-2], first_role=None)  # and it is well-formed harmony
        return st

    def reset(seed):  # half of the episodes start mid-way, after one expert turn
        e.reset(seed)
        if seed % 2:
            counts["expert"] += 1
            if run(e.expert_action(random.Random(seed))).done:  # e.g. a lucky first guess
                e.reset(seed)

    counts = {"bytes": 0, "tokens": 0, "messages": 0, "adversarial": 0, "expert": 0}
    for seed in range(2000):
        reset(seed)
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 120)))
        run(raw if seed % 3 else raw.decode("utf-8", errors="replace"))
        counts["bytes"] += 1
    for seed in range(2000):  # multi-turn: keep stepping random tokens until the episode ends
        reset(seed)
        while not run(random_tokens(rng, harmony, structured)).done:
            counts["tokens"] += 1
        counts["tokens"] += 1
    for seed in range(2000):  # well-formed messages with random fields: deeper paths, longer episodes
        reset(seed)
        while not run(env.completion(random_message(rng, name))).done:
            counts["messages"] += 1
        counts["messages"] += 1
    for i, action in enumerate(adversarial_actions(name) * 2):
        reset(i)
        run(action)
        counts["adversarial"] += 1
    print(f"{name}: fuzz counts {counts}, slowest step {worst * 1000:.1f} ms")
    assert counts["bytes"] == 2000 and counts["tokens"] >= 2000 and counts["adversarial"] >= 90
    assert counts["messages"] > 3000  # over 1000 random messages were answered and the episode went on
    assert worst < 1.0


# ---------------------------------------------------------------------------------------------
# Reproducibility and the mixture

@pytest.mark.parametrize("name", NAMES)
def test_seeds_reproduce_episodes(name):
    a, b = env.make_env(name), env.make_env(name)
    for seed in range(30):
        assert a.reset(seed) == b.reset(seed)
        ea, eb = a.expert_episode(seed, 0.3, 0.3), b.expert_episode(seed, 0.3, 0.3)
        assert (ea.token_ids, ea.loss_mask, ea.reward) == (eb.token_ids, eb.loss_mask, eb.reward)
    assert len({(tuple(a.reset(s).token_ids), a.answer) for s in range(30)}) > 15  # and seeds differ
    # The expert's own randomness can come from the caller.
    r1, r2 = random.Random(5), random.Random(5)
    assert a.expert_episode(3, 0.5, 0.5, rng=r1).token_ids == b.expert_episode(3, 0.5, 0.5, rng=r2).token_ids


def test_mixture_and_factory():
    m = env.make_env("mix")
    assert m.stop_token_ids == env.make_env("guess").stop_token_ids
    seen = []
    for seed in range(8):
        ep = m.expert_episode(seed)
        seen.append(ep.info["env"])
        assert ep.reward == 1.0
        assert m.reset(seed).text == env.make_env(seen[-1]).reset(seed).text
    assert seen == ["calculator", "lookup", "guess", "chain"] * 2
    m.reset(2)
    assert m.step(m.expert_action()).info["env"] == "guess"
    with pytest.raises(ValueError, match="unknown environment"):
        env.make_env("chess")
    assert env.make_env("guess", n=64).budget == 7
