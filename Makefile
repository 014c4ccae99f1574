# `make serve` and `make test` set everything up themselves; the virtualenv lives in .venv.
# Every package is installed at the exact version and hash in requirements/*.txt, which
# `make lock` makes from pyproject.toml's ranges (requirements/lock.py says how).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --quiet
PIP_VERSION := 26.3
UV_VERSION := 0.13.9
# Python never puts the working directory on sys.path, so our top-level folders
# (kernels/, operator/, runtime/) cannot shadow packages of the same name.
export PYTHONSAFEPATH := 1

.PHONY: serve demo test lint lock bench bench-serve crds clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install pip==$(PIP_VERSION)

# One stamp per lock: $(VENV)/.dev for `make test`, $(VENV)/.serve for `make serve`.
$(VENV)/.%: requirements/%.txt pyproject.toml requirements/lock.py | $(BIN)/python
	$(BIN)/python requirements/lock.py --check
	$(PIP) install --require-hashes --no-deps -r $<
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $@

# Serves the built-in model on 127.0.0.1:8000 (OpenAI API); `make demo` generates offline.
serve: $(VENV)/.serve
	$(BIN)/kubellm serve --host 127.0.0.1 --port 8000

demo: $(VENV)/.serve
	$(BIN)/kubellm generate --chat

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q

# Re-resolves every lock from pyproject.toml's ranges (the newest versions that fit).
lock: | $(BIN)/python
	$(PIP) install uv==$(UV_VERSION)
	$(BIN)/python requirements/lock.py --uv $(BIN)/uv

# The CRD is generated from operator/crd.py; the chart carries an identical copy.
crds: $(VENV)/.dev
	$(BIN)/python -m kubellm.operator.crd > crds/llmdeployment.yaml
	cp crds/llmdeployment.yaml charts/kubellm/crds/llmdeployment.yaml

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(VENV)/.dev
	$(BIN)/python benchmarks/engine_throughput.py

# kubellm vs a plain transformers server vs llama.cpp's llama-server (built on first use);
# rewrites the serving section of BENCHMARKS.md and benchmarks/results/.
bench-serve: $(VENV)/.dev
	$(BIN)/python benchmarks/compare.py --update-benchmarks-md

clean:
	rm -rf $(VENV) build *.egg-info .bench-cache
