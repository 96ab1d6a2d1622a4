# The README's two commands: `make demo` and `make test`. Each sets itself up on a fresh machine.
# `make tb` then shows the demo's TensorBoard runs (every method side by side).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo tb test venv lint clean

$(STAMP): pyproject.toml
	@echo ">> setting up $(VENV) (torch, avalanche-lib, dev tools, transformers, timm; a few minutes on a fresh machine)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip > $(VENV)/install.log 2>&1 || (cat $(VENV)/install.log; exit 1)
	@$(PY) -m pip install -q -e ".[dev,hf]" >> $(VENV)/install.log 2>&1 || (tail -n 40 $(VENV)/install.log; exit 1)
	@touch $(STAMP)
	@echo ">> $(VENV) ready"

venv: $(STAMP)

demo: $(STAMP)
	@echo ">> make demo: continual-learning benchmark on the offline split-digits stream"
	@$(PY) -m net2grow.benchmarks continual

# TensorBoard on runs/ (override: make tb RUNS=other/dir TB_ARGS="--port 6007")
RUNS ?= runs
TB_ARGS ?=
tb: $(STAMP)
	@echo ">> TensorBoard on $(RUNS)/ (Ctrl-C stops it)"
	@$(VENV)/bin/tensorboard --logdir $(RUNS) $(TB_ARGS)

lint: $(STAMP)
	@echo ">> ruff check"
	@$(PY) -m ruff check .

test: lint
	@echo ">> pytest"
	@$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs results .pytest_cache .ruff_cache .hypothesis
