# Every target sets itself up from nothing: venv, packages, generated code, default models.
PYTHON_BIN ?= python3.11
VENV       := .venv
PY         := $(VENV)/bin/python
DEPS       := $(VENV)/.deps-installed
GEN        := gen/python
PROTOS     := $(shell find protos -name '*.proto' | sort)
PROTO_STAMP := $(GEN)/.generated
MODEL_STORE ?= var/models
MODELS_STAMP := $(MODEL_STORE)/.defaults-built
PYTEST_ARGS ?=

.PHONY: help venv protos models run test lint bench clean

help:
	@echo "make run    - start redis, the dense, gnn and nlp services and the gateway"
	@echo "make test   - lint, then run unit, integration and end-to-end tests"
	@echo "make bench  - measure, as ratios against a baseline taken in the same run"
	@echo "make protos - regenerate the Python package under $(GEN) from protos/"
	@echo "make models - train and export the default models into $(MODEL_STORE)"

venv: $(DEPS)

$(DEPS): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned to 2.13.0 in the lock: an unpinned torch would pull several GB of CUDA wheels.
	$(PY) -m pip install --quiet -r requirements.lock
	# The repo root and the generated package go on the venv's path, like an editable install.
	site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
		printf '%s\n%s\n' "$(CURDIR)" "$(CURDIR)/$(GEN)" > "$$site/maas-dev.pth"
	touch $@

protos: $(PROTO_STAMP)

$(PROTO_STAMP): $(PROTOS) $(DEPS)
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(PY) -m grpc_tools.protoc -I protos \
		--python_out=$(GEN) --pyi_out=$(GEN) --grpc_python_out=$(GEN) $(PROTOS)
	find $(GEN)/maas -type d -exec touch {}/__init__.py \;
	touch $@

models: $(MODELS_STAMP)

$(MODELS_STAMP): $(PROTO_STAMP)
	$(PY) -m services.defaults --store $(MODEL_STORE)
	touch $@

run: $(MODELS_STAMP)
	$(PY) -m shared.cluster

test: lint $(MODELS_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(DEPS)
	$(PY) -m ruff check .

bench: $(MODELS_STAMP)
	$(PY) -m tests.bench.bench_batching
	$(PY) -m tests.bench.bench_gateway

clean:
	rm -rf $(GEN) var build .pytest_cache
