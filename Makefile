# qwen25 — set-up, tests, demo. Every target creates the virtual environment it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on these machines' disks; installing it first means the
# `torch>=2.4` requirement of the package is already satisfied (no multi-GB CUDA download).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: venv data test test-fast demo clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

venv: $(BIN)/.installed

# Built-in corpora (stdlib sources, Shakespeare/Milton, HumanEval, synthetic math) into
# data_cache/ (or $$QWEN25_DATA), sha256-checked; a no-op when already present.
data: venv
	$(BIN)/qwen25 data fetch

# The whole test suite (what CI runs). Two workers: one per core.
test: venv data
	$(BIN)/python -m pytest -n 2 --timeout=900 $(PYTEST_ARGS)

# Everything except the end-to-end tests marked slow.
test-fast: venv data
	$(BIN)/python -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

# Main job until the speedrun exists: build a tiny random model and generate from it.
demo: venv
	$(BIN)/qwen25 demo

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
