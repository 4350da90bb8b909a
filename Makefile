# The two commands the README opens with. Both set up everything on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-core setup setup-core lint bench clean
CORE_VENV := .venv-core

$(BIN)/modelkit: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: here it is a local CPU wheel; a looser spec pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# the [train] extra too, so tests/train really run (they skip where it is missing)
	$(BIN)/pip install -q -e '.[dev,train]'
	touch $(BIN)/modelkit

setup: $(BIN)/modelkit

demo: setup
	$(BIN)/python -m fixtures.demo fixtures/demo
	@echo "== modelkit scan fixtures/demo   (exit 1 expected: hostile.ckpt is flagged)"
	$(BIN)/modelkit scan fixtures/demo; test $$? -eq 1
	@echo "== modelkit inspect fixtures/demo   (exit 1 expected: hostile.ckpt is refused, nothing runs)"
	$(BIN)/modelkit inspect fixtures/demo; test $$? -eq 1
	$(BIN)/modelkit inspect fixtures/demo/sd15-tiny.ckpt
	@test ! -e fixtures/demo/PWNED-by-hostile.ckpt && echo "== no payload ran"

# Bytecode first, as pip writes it at install: the suite starts hundreds of modelkit processes, and
# where PYTHONDONTWRITEBYTECODE is set, an editable checkout would compile its sources in each.
test: setup
	$(BIN)/python -m compileall -q modelkit fixtures > /dev/null
	$(BIN)/python -m pytest -q

# The core install (pip install modelkit: no torch, no extras) in a venv of its own: the suite
# runs there as the core's users have it (tests that need an extra skip, saying which), once as
# is and once with MODELKIT_PORTABLE=1 (the portable fallbacks of every OS-specific call).
$(CORE_VENV)/bin/pytest: pyproject.toml
	$(PY) -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/pip install -q --upgrade pip
	$(CORE_VENV)/bin/pip install -q -e '.[test]'
	@! $(CORE_VENV)/bin/python -c 'import torch' 2>/dev/null || (echo "the core venv has torch" && false)
	touch $(CORE_VENV)/bin/pytest

setup-core: $(CORE_VENV)/bin/pytest

test-core: setup-core
	$(CORE_VENV)/bin/python -m compileall -q modelkit fixtures > /dev/null
	$(CORE_VENV)/bin/python -m pytest -q -p no:cacheprovider
	MODELKIT_PORTABLE=1 $(CORE_VENV)/bin/python -m pytest -q -p no:cacheprovider

lint: setup
	$(BIN)/ruff check modelkit tests fixtures bench integrations
	$(BIN)/mypy

bench: setup
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/bench_inspect.py
	$(BIN)/python bench/bench_scan.py
	$(BIN)/python bench/bench_startup.py
	$(BIN)/python bench/bench_load.py
	$(BIN)/python bench/bench_convert.py
	$(BIN)/python bench/bench_merge.py
	$(BIN)/python bench/bench_train.py

clean:
	rm -rf $(VENV) $(CORE_VENV) fixtures/demo build *.egg-info

readme-rules: setup
	$(BIN)/python -c "from modelkit.scan.rules import markdown_table; print(markdown_table())"
