# btlm developer targets. Everything runs inside a local virtual environment (.venv).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test demo clean

setup: $(BIN)/btlm

$(BIN)/btlm: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/btlm demo

clean:
	rm -rf $(VENV) demo_out .pytest_cache
