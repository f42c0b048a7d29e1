# PixelLM platform. Two commands do all set-up on a fresh machine: `make quickstart` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM := false

.PHONY: env test lint format quickstart bench clean

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check pixellm tests jobs bench
	$(BIN)/pytest -q -ra tests

lint: $(STAMP)
	$(BIN)/ruff check pixellm tests jobs bench
	$(BIN)/ruff format --check pixellm tests jobs bench

format: $(STAMP)
	$(BIN)/ruff format pixellm tests jobs bench
	$(BIN)/ruff check --fix pixellm tests jobs bench

quickstart: $(STAMP)
	$(BIN)/pixellm quickstart --out runs/quickstart

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf runs .pytest_cache
