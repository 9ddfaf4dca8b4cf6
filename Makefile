# minigpt2: `make chat` to train the default chatbot (once) and talk to it; `make test` to run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
LANG_CORPUS ?= english
DATA := data/chatterbot-$(LANG_CORPUS)
RUN := runs/chat-$(LANG_CORPUS)

.PHONY: setup test lint chat clean

setup: $(STAMP)

# torch first, pinned to the CPU build this machine provides; the package's range accepts it.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

chat: setup
	test -f $(DATA)/meta.json || $(BIN)/minigpt2 prepare chatterbot:$(LANG_CORPUS) --out $(DATA)
	@echo "Data is ready in $(DATA). Training and chatting arrive with the training and chat features."

clean:
	rm -rf $(VENV) data runs
