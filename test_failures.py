"""Every failure gets a clear message and loses nothing (issue 24): killed saves and prunes,
resume, run directories, bad options, bad checkpoint files, output errors. One test per failure,
named after it; each shows the message and that nothing was lost. Kills are deterministic: a
subprocess dies at a named point (rundir.kill_point, GPTOSS_TEST_KILL_AT), not on a timer."""

import errno
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import SafetensorError

import distributed
import hf_checkpoint
import model
import rundir
import train
from test_train import TINY

HERE = os.path.dirname(os.path.abspath(__file__))
# test_train's tiny run, shorter still; an entropy bonus moves the weights at every step, so the
# policy after step 1 differs from the starting one (the KL reference must be the latter)
FAST = [*TINY, "--max-new-tokens", "12", "--eval-episodes", "1", "--eval-every", "2", "--kl-coef", "0.1",
        "--entropy-coef", "0.1"]


def run(out, name, *extra) -> list[dict]:
    train.main([*FAST, "--out", str(out), "--name", name, *extra])
    return rows(out, name)


def rows(out, name) -> list[dict]:
    with open(os.path.join(out, name, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_process(out, name, *extra, kill_at=None):
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    if kill_at:
        environment[rundir.KILL_VARIABLE] = kill_at
    return subprocess.run([sys.executable, "train.py", *FAST, "--threads", "1", "--out", str(out), "--name", name,
                           *extra], cwd=HERE, env=environment, capture_output=True, text=True, timeout=600)


def names(out, name) -> list[str]:
    return [os.path.basename(p) for p in distributed.list_checkpoints(os.path.join(out, name))]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The uninterrupted run every resume is compared with: 4 steps, evaluations at 2 and 4."""
    out = tmp_path_factory.mktemp("full")
    return out, run(out, "full", "--steps", "4")


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """The same run stopped at step 3: off the evaluation schedule (so it ends with an extra
    evaluation), with steps 0 and 1 pruned (so its oldest checkpoint is not the starting policy)."""
    out = tmp_path_factory.mktemp("stopped")
    run(out, "run", "--steps", "3")
    return out


def copy_of(source, tmp_path, name="run"):
    shutil.copytree(os.path.join(source, name), tmp_path / name)
    return tmp_path


def error_line(capsys) -> str:
    """The one `error: ...` line that ends stderr (after a run's progress bars), no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and err.count("error: ") == 1 and "Traceback" not in err, err[-2000:]
    return lines[-1]


# ----------------------------------------------------------------------------------------------
# Checkpoints and resume


@pytest.mark.slow  # a process of its own: 15-35 s on a busy 2-core CPU
def test_prune_killed_mid_rmtree_leaves_no_listed_half_checkpoint(tmp_path, full):
    done = run_process(tmp_path, "run", "--steps", "4", kill_at="prune:rmtree")  # dies pruning step 0
    assert done.returncode == 137, done.stderr[-2000:]
    assert names(tmp_path, "run") == ["step-000001", "step-000002"]  # step 0 is half deleted, and hidden
    leftovers = os.listdir(tmp_path / "run" / "checkpoints")
    assert any(n.startswith(".trash-step-000000") for n in leftovers), leftovers
    assert run(tmp_path, "run", "--steps", "4", "--resume") == full[1]  # nothing lost
    assert not [n for n in os.listdir(tmp_path / "run" / "checkpoints") if rundir.is_leftover(n)]


@pytest.mark.slow  # a process of its own: 15-35 s on a busy 2-core CPU
def test_save_killed_before_rename_keeps_the_previous_checkpoint(tmp_path, full):
    done = run_process(tmp_path, "run", "--steps", "4", kill_at="save:rename@3")  # dies saving step 2
    assert done.returncode == 137, done.stderr[-2000:]
    assert names(tmp_path, "run") == ["step-000000", "step-000001"]
    assert any(".tmp" in n for n in os.listdir(tmp_path / "run" / "checkpoints"))
    assert run(tmp_path, "run", "--steps", "4", "--resume") == full[1]


def test_half_deleted_checkpoint_of_an_older_version_is_not_listed(tmp_path):
    """What the old non-atomic prune left: step-000000 without model.safetensors."""
    half = tmp_path / "run" / "checkpoints" / "step-000000"
    (half / "trainer").mkdir(parents=True)
    (half / "trainer_state.json").write_text('{"step": 0}')
    assert distributed.list_checkpoints(tmp_path / "run") == []


def test_resume_kl_reference_is_the_starting_policy(tmp_path, full, stopped):
    out = copy_of(stopped, tmp_path)
    assert names(out, "run") == ["step-000002", "step-000003"]  # the starting policy's checkpoint is pruned
    assert os.path.isfile(out / "run" / "reference" / "model.safetensors")
    resumed = run(out, "run", "--steps", "4", "--resume")
    kl_ref = [r["kl_ref"] for r in full[1] if r["phase"] == "rl"]
    assert len(kl_ref) == 4 and kl_ref[-1] > 0  # the policy moved away from its start
    assert [r["kl_ref"] for r in resumed if r["phase"] == "rl"] == kl_ref
    assert resumed == full[1]


def test_resume_off_the_eval_schedule_adds_no_evaluation_row(tmp_path, full, stopped):
    evaluated = [r["step"] for r in rows(stopped, "run") if r["phase"] == "rl" and "eval/guess/success" in r]
    assert evaluated == [2, 3]  # a run ends with an evaluation, here off the schedule
    out = copy_of(stopped, tmp_path)
    resumed = run(out, "run", "--steps", "4", "--resume")
    assert [r["step"] for r in resumed if r["phase"] == "rl" and "eval/guess/success" in r] == [2, 4]
    assert resumed == full[1]  # the curriculum (from the scheduled evaluations) and the RNG too


def test_resume_with_a_different_preset_lists_the_differing_flags(tmp_path, stopped, capsys):
    out = copy_of(stopped, tmp_path)
    before = rows(out, "run")
    with pytest.raises(SystemExit) as exit_info:
        run(out, "run", "--steps", "4", "--resume", "--preset", "small", "--seed", "5")
    assert exit_info.value.code == 2
    line = error_line(capsys)
    assert "--preset 'small' (saved: 'tiny')" in line and "--seed 5 (saved: 0)" in line, line
    assert rows(out, "run") == before and names(out, "run") == ["step-000002", "step-000003"]


def test_resume_with_nothing_left_to_do_says_so(full, capsys):
    out, before = full
    with pytest.raises(SystemExit) as exit_info:
        run(out, "full", "--steps", "3", "--resume")
    assert exit_info.value.code == 0
    assert "nothing to do" in capsys.readouterr().out
    assert rows(out, "full") == before


# ----------------------------------------------------------------------------------------------
# Run directories


def test_second_live_run_on_the_directory_is_refused_naming_its_pid(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run" / rundir.LOCK_FILE).write_text(str(other.pid))
        with pytest.raises(SystemExit) as exit_info:
            run(tmp_path, "run", "--steps", "0")
        assert exit_info.value.code == 2
        assert f"another run (pid {other.pid})" in error_line(capsys)
        assert sorted(os.listdir(tmp_path / "run")) == [rundir.LOCK_FILE, "checkpoints"]  # nothing written
    finally:
        other.kill()
        other.wait()
    # the same lock, its process gone: stale, taken over; released at the end
    run(tmp_path, "run", "--steps", "0")
    assert names(tmp_path, "run") == ["step-000000"]
    assert not os.path.exists(tmp_path / "run" / rundir.LOCK_FILE)


def test_new_run_into_another_runs_checkpoints_is_refused_without_overwrite(tmp_path, stopped, capsys):
    out = copy_of(stopped, tmp_path)
    before = rows(out, "run")
    with pytest.raises(SystemExit) as exit_info:
        run(out, "run", "--steps", "4", "--seed", "1")
    assert exit_info.value.code == 2
    line = error_line(capsys)
    assert "holds another run's checkpoints (step-000003)" in line and "--overwrite" in line, line
    assert rows(out, "run") == before and names(out, "run") == ["step-000002", "step-000003"]
    run(out, "run", "--steps", "0", "--seed", "1", "--overwrite")  # replaces it, on request
    assert names(out, "run") == ["step-000000"]
    assert json.load(open(out / "run" / "args.json"))["seed"] == 1


# ----------------------------------------------------------------------------------------------
# Command-line input: one line `error: ...` naming the option and the value, exit 2, before any work


def option_error(tmp_path, capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--out", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2
    assert not os.path.exists(tmp_path / "out")  # nothing started
    return error_line(capsys)


def test_eval_every_zero_is_a_clear_error(tmp_path, capsys):
    assert "--eval-every must be >= 1, got 0" in option_error(tmp_path, capsys, "--eval-every", "0")


def test_save_every_zero_is_a_clear_error(tmp_path, capsys):
    assert "--save-every must be >= 1, got 0" in option_error(tmp_path, capsys, "--save-every", "0")


def test_negative_temperature_is_refused_before_the_warm_start(tmp_path, capsys):
    assert "--temperature must be >= 0, got -1.0" in option_error(tmp_path, capsys, "--temperature", "-1")


def test_negative_lr_is_a_clear_error(tmp_path, capsys):
    assert "--lr must be >= 0, got -1.0" in option_error(tmp_path, capsys, "--lr", "-1")
    assert "--lr must be >= 0, got nan" in option_error(tmp_path, capsys, "--lr", "nan")


def test_clip_low_above_one_is_a_clear_error(tmp_path, capsys):
    assert "--clip-low must be in [0, 1], got 2.0" in option_error(tmp_path, capsys, "--clip-low", "2")


def test_negative_threads_is_a_clear_error(tmp_path, capsys):
    assert "--threads must be >= 0, got -1" in option_error(tmp_path, capsys, "--threads", "-1")


def test_negative_grad_clip_is_refused(tmp_path, capsys):
    """torch would flip the gradient's sign."""
    assert "--grad-clip must be > 0, got -1.0" in option_error(tmp_path, capsys, "--grad-clip", "-1")


def test_every_range_checked_option_refuses_a_bad_value(tmp_path, capsys):
    import options
    for name, low in options.INT_MINIMA.items():
        assert f"{options.flag(name)} must be >=" in option_error(tmp_path, capsys, options.flag(name), str(low - 1))
    for name, (low, high, _) in options.FLOAT_RANGES.items():
        bad = "nan" if low == -math.inf else str(high + 1) if high < math.inf else str(low - 1)
        assert f"{options.flag(name)} must be" in option_error(tmp_path, capsys, options.flag(name), bad)


def test_out_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--out", str(tmp_path / "file")])
    assert exit_info.value.code == 2
    assert f"--out '{tmp_path / 'file'}' is a file, not a directory" in error_line(capsys)


def test_init_from_a_file_or_a_directory_without_tokenizer_names_the_path(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    line = option_error(tmp_path, capsys, "--init-from", str(tmp_path / "file"))
    assert f"--init-from '{tmp_path / 'file'}' is a file" in line
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    assert f"--init-from '{tmp_path / 'ckpt'}' has no tokenizer.json" in option_error(
        tmp_path, capsys, "--init-from", str(tmp_path / "ckpt"))
    assert "does not exist" in option_error(tmp_path, capsys, "--init-from", str(tmp_path / "nowhere"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    assert "--device 'cuda': CUDA is not available" in option_error(tmp_path, capsys, "--device", "cuda")
    assert "--device 'tpu': not a device" in option_error(tmp_path, capsys, "--device", "tpu")


@pytest.mark.slow  # a process of its own: 15-35 s on a busy 2-core CPU
def test_bad_option_in_a_process_prints_one_line_and_no_traceback(tmp_path):
    done = run_process(tmp_path, "run", "--eval-every", "0")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: --eval-every must be >= 1, got 0"], done.stderr


# ----------------------------------------------------------------------------------------------
# Checkpoint content


@pytest.fixture
def checkpoint(tmp_path) -> str:
    net = model.Transformer(model.preset("tiny"))
    net.init_weights(seed=0)
    net.save_pretrained(str(tmp_path / "ckpt"))
    return str(tmp_path / "ckpt")


def test_nan_weights_are_rejected_naming_the_file_and_tensor(checkpoint):
    net = model.Transformer.from_pretrained(checkpoint)
    with torch.no_grad():
        net.layers[1].self_attn.sinks[0] = float("nan")
    net.save_pretrained(checkpoint)
    file = os.path.join(checkpoint, "model.safetensors")
    with pytest.raises(ValueError, match=f"{file}: tensor model.layers.1.self_attn.sinks has 1 non-finite"):
        model.Transformer.from_pretrained(checkpoint)


def test_truncated_safetensors_names_the_file(checkpoint):
    file = os.path.join(checkpoint, "model.safetensors")
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ValueError, match=f"cannot read {file}: .*truncated"):
        model.Transformer.from_pretrained(checkpoint)


def test_pickle_only_checkpoint_is_refused_saying_why(checkpoint):
    os.remove(os.path.join(checkpoint, "model.safetensors"))
    with open(os.path.join(checkpoint, "pytorch_model.bin"), "wb") as f:
        f.write(b"\x80\x04not loaded")
    with pytest.raises(ValueError, match=r"only pickle files \(pytorch_model.bin\).*arbitrary code"):
        model.Transformer.from_pretrained(checkpoint)


def test_rope_parameters_as_a_string_names_the_field(checkpoint):
    path = os.path.join(checkpoint, "config.json")
    config = json.load(open(path))
    config["rope_parameters"] = "yarn"
    json.dump(config, open(path, "w"))
    with pytest.raises(ValueError, match=f"config {path}: rope_parameters must be a JSON object.*'yarn'"):
        hf_checkpoint.read_config(path, model.ModelConfig)


# ----------------------------------------------------------------------------------------------
# Output


def test_metrics_jsonl_is_strict_json_with_null_for_non_finite(tmp_path):
    log = rundir.Log(str(tmp_path), keep_lines=None)
    log({"phase": "rl", "step": 1, "loss": float("nan"), "grad_norm": float("inf"), "reward": 0.5})

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line, parse_constant=refuse) for line in f] == [
            {"phase": "rl", "step": 1, "loss": None, "grad_norm": None, "reward": 0.5}]


def test_full_disk_is_one_line_and_exit_1_with_the_last_checkpoint_intact(tmp_path, capsys, monkeypatch):
    real, calls = hf_checkpoint.save_file, []

    def full_disk(tensors, path, **kw):
        calls.append(path)
        if len(calls) == 4:  # step 1's model (3 files a checkpoint): step 0's is on disk. What safetensors raises:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, **kw)

    monkeypatch.setattr(hf_checkpoint, "save_file", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "run", "--steps", "2")
    assert exit_info.value.code == 1
    line = error_line(capsys)
    assert f"cannot write {calls[3]}: No space left on device" in line and "step-000000, is intact" in line, line
    kept = distributed.list_checkpoints(tmp_path / "run")
    assert [os.path.basename(p) for p in kept] == ["step-000000"]
    model.Transformer.from_pretrained(kept[0])  # whole
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["step-000000"]  # the half-written one's space back
    assert not os.path.exists(tmp_path / "run" / rundir.LOCK_FILE)


def test_read_only_output_directory_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    """As root a chmod'ed directory stays writable: the refusal the kernel gives is simulated."""
    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(os, "makedirs", read_only)
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "run", "--steps", "1")
    assert exit_info.value.code == 1
    line = error_line(capsys)
    assert "Read-only file system" in line and "no checkpoint was written" in line, line


def test_init_from_a_damaged_checkpoint_is_one_line_naming_the_file_and_tensor(checkpoint, tmp_path, capsys):
    import env
    env.toy_tokenizer().save(os.path.join(checkpoint, "tokenizer.json"))
    net = model.Transformer.from_pretrained(checkpoint)
    with torch.no_grad():
        net.lm_head.weight[0, 0] = float("inf")
    net.save_pretrained(checkpoint)
    with pytest.raises(SystemExit) as exit_info:
        train.main([*FAST, "--init-from", checkpoint, "--out", str(tmp_path), "--name", "run"])
    assert exit_info.value.code == 2
    line = error_line(capsys)
    assert f"{checkpoint}/model.safetensors: tensor lm_head.weight has 1 non-finite value" in line, line


def test_resume_of_a_run_without_its_starting_policy_is_one_line(tmp_path, stopped, capsys):
    """A run saved before <run>/reference existed, whose step-000000 is pruned: no KL reference."""
    out = copy_of(stopped, tmp_path)
    shutil.rmtree(out / "run" / "reference")
    with pytest.raises(SystemExit) as exit_info:
        run(out, "run", "--steps", "4", "--resume")
    assert exit_info.value.code == 2
    assert "--kl-coef needs the run's starting policy" in error_line(capsys)
    assert names(out, "run") == ["step-000002", "step-000003"]


def test_resume_from_a_damaged_checkpoint_is_one_line(tmp_path, stopped, capsys):
    out = copy_of(stopped, tmp_path)
    weights = out / "run" / "checkpoints" / "step-000003" / "model.safetensors"
    os.truncate(weights, os.path.getsize(weights) // 2)
    with pytest.raises(SystemExit) as exit_info:
        run(out, "run", "--steps", "4", "--resume")
    assert exit_info.value.code == 1
    line = error_line(capsys)
    assert f"cannot read {weights}" in line and "to resume from the one before" in line, line
    assert names(out, "run") == ["step-000002", "step-000003"]  # nothing removed
