"""experiments.py: the plan (the grid's train.py options), the analysis on fake metrics files
(table, JSON, plots, the ratio check's verdict), and a --quick smoke run end to end."""

import json
import os
import subprocess
import sys

import pytest

import experiments
import runner


def write_run(root, name, steps, *, kl=0.0, ppo_kl=0.0, clip=0.0, success=0.5, routing=0.0, done=True):
    d = root / "runs" / name
    d.mkdir(parents=True)
    rows = [{"phase": "eval", "step": 0, "eval/guess/success": 0.25, "eval/guess/success_sampled": 0.2}]
    for s in range(1, steps + 1):
        row = {"phase": "rl", "step": s, "reward": success, "success": success + 0.01 * s, "entropy": 0.3 - 0.01 * s,
               "grad_norm": 0.5 + s, "ppo_kl": ppo_kl, "pg_clipfrac": clip, "rollout_corr/kl": kl,
               "rollout_corr/k3_kl": kl * s, "rollout_corr/chi2_token": 2 * kl, "rollout_corr/max_abs_prob_diff": kl,
               "rollout_corr/rollout_rs_seq_masked_fraction": 0.0, "skipped_updates": 0, "response_length": 40}
        if s == steps:
            row.update({"eval/guess/success": 0.75, "eval/guess/success_sampled": 0.7})
        rows.append(row)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "args.json").write_text(json.dumps({"routing_noise": routing}))
    if done:
        (d / "experiment.json").write_text(json.dumps({"spec": {}, "wall_s": 1.0}))


def test_plan_is_the_grid_with_explicit_options():
    args = experiments.parse_args(["--out", "R", "--steps", "7", "--seeds", "0", "1"])
    runs = experiments.plan(args)
    warm = [r for r in runs if r.kind == "warm"]
    cells = [r for r in runs if r.kind == "cell"]
    assert [r.name for r in warm] == ["warm-s0", "warm-s1"]
    assert len(cells) == (3 * 4 + 2 + 1) * 2 and len([r for r in runs if r.kind == "routing"]) == 2
    assert {r.name for r in cells if r.name.startswith("vllm")} == {"vllm16.off-s0", "vllm16.seq-mis-s0", "vllm32.off-s0",
                                                                    "vllm16.off-s1", "vllm16.seq-mis-s1", "vllm32.off-s1"}
    vllm16 = next(r for r in cells if r.name == "vllm16.seq-mis-s0").argv
    assert vllm16[vllm16.index("--rollout-engine") + 1] == "vllm" and vllm16[vllm16.index("--vllm-dtype") + 1] == "bfloat16"
    cell = next(r for r in cells if r.name == "nosink.seq-mis-s1")
    a = cell.argv
    assert a[a.index("--trainer-attention") + 1] == "nosink" and a[a.index("--rollout-correction") + 1] == "seq-mis"
    assert a[a.index("--init-from") + 1] == os.path.join("R", "runs", "warm-s1", "checkpoints", "step-000000")
    assert a[a.index("--threads") + 1] == "1" and a[a.index("--steps") + 1] == "7" and cell.needs == "warm-s1"
    bf16 = next(r for r in cells if r.name == "bf16.off-s0").argv
    assert bf16[bf16.index("--sampler-dtype") + 1] == "bfloat16" and "--trainer-attention" not in bf16
    assert "--steps" in warm[0].argv and warm[0].argv[warm[0].argv.index("--steps") + 1] == "0"
    assert experiments.parse_args([]).seeds == [0, 1]  # the default: two seeds, mean and range, within the hour


def test_the_runs_snapshot_holds_every_project_file_train_imports():
    """runner.py copies what a run executes: train.py and its project imports, model.py's lazy ones too."""
    files = set(runner.code_files())
    assert {"train.py", "distributed.py", "model.py", "sampler.py", "env.py", "harmony.py", "ppo.py"} <= files
    assert not any(f.startswith("test_") for f in files) and "experiments.py" not in files and "bench.py" not in files


def test_analysis_writes_table_json_and_plots(tmp_path):
    write_run(tmp_path, "none.off-s0", 10)
    write_run(tmp_path, "none.off-s1", 10, success=0.7)
    write_run(tmp_path, "nosink.off-s0", 10, kl=1e-3, success=0.2)
    write_run(tmp_path, "nosink.seq-mis-s0", 6, kl=1e-3, done=False)  # an unfinished run
    write_run(tmp_path, "routing-noise-s0", 10, ppo_kl=1e-4, clip=0.01, routing=0.1)
    data = experiments.analyze(str(tmp_path), "guess", meta={"command": "python experiments.py", "wall_s": 120})
    table = (tmp_path / "table.md").read_text()
    assert "| 0.75 (0.75-0.75) / 0.70 |" in table  # held-out greedy: mean (range) over seeds 0 and 1
    assert "| no mismatch | off |" in table and "| no-sink trainer | seq-mis |" in table and "incomplete" in table
    none_off = next(g for g in data["grid"] if g["mismatch"] == "none" and g["correction"] == "off")
    assert none_off["seeds"] == [0, 1]
    assert none_off["mean"]["success_last"] == pytest.approx((0.595 + 0.795) / 2)  # last fifth: steps 9, 10
    assert none_off["mean"]["grad_norm_max"] == 10.5 and none_off["mean"]["eval_final"] == 0.75
    nosink = next(g for g in data["grid"] if g["mismatch"] == "nosink" and g["correction"] == "off")
    assert nosink["mean"]["mismatch_kl_max"] == pytest.approx(1e-2)
    verdict = {r["run"]: r for r in data["ratio_check"]}
    assert set(verdict) == {"none.off-s0", "none.off-s1", "routing-noise-s0"}
    assert verdict["none.off-s0"]["ratio_not_one_steps"] == 0 and verdict["routing-noise-s0"]["clipped_steps"] == 10
    assert "| routing-noise-s0 | 0.1 | 10 | 10 |" in table and table.count("| yes |") == 2
    assert json.loads((tmp_path / "table.json").read_text())["meta"]["wall_s"] == 120
    for png in ("success.png", "grad_norm.png", "k3_kl.png", "entropy.png", "ratio_check.png"):
        assert (tmp_path / png).stat().st_size > 1000, png


def test_summary_of_a_run_that_logged_nothing_is_nan_not_a_crash(tmp_path):
    s = experiments.summarize_run([{"phase": "eval", "step": 0, "eval/guess/success": 0.5}], "guess")
    assert s["steps"] == 0 and s["eval_warm"] == 0.5 and s["success_last"] != s["success_last"]  # NaN


@pytest.mark.slow
def test_quick_smoke_run_end_to_end(tmp_path):
    """The whole pipeline on a tiny model: warm start, 4 cells, the routing run, table and plots."""
    out = tmp_path / "res"
    done = subprocess.run([sys.executable, "experiments.py", "--quick", "--out", str(out)], capture_output=True,
                          text=True, cwd=os.path.dirname(os.path.abspath(__file__)), timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = (out / "table.md").read_text()
    assert "| no-sink trainer | seq-mis |" in table and "routing-noise-s0" in table
    assert "not finished" not in done.stdout
    data = json.loads((out / "table.json").read_text())
    on_policy = next(r for r in data["ratio_check"] if r["run"] == "none.off-s0")
    assert on_policy["steps"] == 2 and on_policy["ratio_not_one_steps"] == 0 and on_policy["clipped_steps"] == 0
    assert not (out / "runs" / "none.off-s0" / "checkpoints").exists()  # grid checkpoints are deleted
    again = subprocess.run([sys.executable, "experiments.py", "--quick", "--out", str(out)], capture_output=True,
                           text=True, cwd=os.path.dirname(os.path.abspath(__file__)), timeout=120,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "6 reused" in again.stdout  # nothing changed: every run is reused
