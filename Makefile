# Every target creates .venv when needed and installs the host and every plugin in plugins/ editable.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PLUGINS := $(wildcard plugins/*/pyproject.toml)
# The CPU wheel of torch this machine carries; users bring their own torch (the package asks for a range).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-slow test-all bench lint format docs clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"

$(STAMP): $(BIN)/python pyproject.toml $(PLUGINS)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]" $(foreach p,$(PLUGINS),-e $(dir $(p)))
	@touch $@

demo: install
	$(BIN)/python examples/demo.py

test: install
	$(BIN)/python -m pytest -q -m "not slow"

# Cases marked slow (cold torch.compile/inductor runs, huggingface_hub's retry backoff): run by CI after make test.
test-slow: install
	$(BIN)/python -m pytest -q -m slow

test-all: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/run_all.py

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

docs: install
	$(BIN)/python tools/hooks_doc.py

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .cache
