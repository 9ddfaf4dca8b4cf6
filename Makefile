# minigpt2: `make chat` to train the default chatbot (once) and talk to it; `make test` to run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
# `make chat LANG=italian`: LANG counts only when given on the command line (it is also the locale).
CHAT_LANG ?= $(if $(filter command line,$(origin LANG)),$(LANG),english)

.PHONY: setup test lint chat serve notebook lesson clean

setup: $(STAMP)

# torch first, pinned to the CPU build this machine provides; the package's range accepts it.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

# The numeric tests again as an AVX2 laptop runs them (no AVX-512, bf16 emulated), so that a
# tolerance that holds only for one CPU's arithmetic fails here, not on a learner's machine.
AVX2 := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
NUMERIC_TESTS := tests/core/test_model.py tests/core/test_optim.py tests/core/test_generate.py \
	tests/fast/test_fast.py tests/fast/test_attention.py tests/fast/test_gelu.py tests/fast/test_int8.py \
	tests/fast/test_batch.py tests/fast/test_decode.py tests/hardware/test_machine.py tests/training/test_fit.py

test: lint
	$(BIN)/pytest
	$(AVX2) $(BIN)/pytest $(NUMERIC_TESTS)

# Prepares chatterbot-corpus, trains the default chatbot once (< 10 minutes on a 2-core CPU), then chats.
chat: setup
	$(BIN)/minigpt2 quickstart --lang $(CHAT_LANG)

# The default chatbot (or `make serve RUN=runs/mine`) over HTTP: a web chat at http://127.0.0.1:8000/
# and an OpenAI-compatible API at /v1.
serve: setup
	$(BIN)/minigpt2 serve $(RUN)

notebook: setup
	$(BIN)/python -m pip install --quiet -e ".[notebook]"
	$(BIN)/jupyter lab notebooks/chatbot.ipynb

# The lesson: from counting characters to GPT-2 and its five training techniques (docs/lesson.md).
lesson: setup
	$(BIN)/python -m pip install --quiet -e ".[notebook]"
	$(BIN)/jupyter lab notebooks/lesson.ipynb

clean:
	rm -rf $(VENV) data runs
