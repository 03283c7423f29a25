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
# The local key-encryption key: make models seals the default models under it, make run hands it to every process.
KEYS_DIR   ?= var/keys
KEK_ID     ?= local-1
PYTEST_ARGS ?=
# GPU=1, or an NVIDIA GPU that nvidia-smi sees, adds the CUDA 13 and cuDNN 9 wheels onnxruntime-gpu loads
# (requirements-gpu.lock). CPU machines and CI never download them.
GPU ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
GPU_DEPS := $(VENV)/.gpu-deps-installed
VENV_READY := $(DEPS) $(if $(filter 1,$(GPU)),$(GPU_DEPS))

.PHONY: help venv protos models run test lint bench docs reference images manifests clean \
	node-deps stubs stubs-ts stubs-go stubs-cpp stubs-java stubs-java-compile clients client-node client-go client-cpp proto-check proto-release

help:
	@echo "make run    - start redis, the dense, gnn and nlp services (REPLICAS=N each), trainers and the gateway"
	@echo "make test   - lint, then run unit, integration and end-to-end tests"
	@echo "make bench  - measure, as ratios against a baseline taken in the same run"
	@echo "make docs   - build the docs site into build/site (mkdocs build --strict: broken links fail)"
	@echo "make reference - regenerate the settings, gRPC and maasctl reference pages from the sources"
	@echo "make protos - regenerate the Python package under $(GEN) from protos/"
	@echo "make models - train and export the default models into $(MODEL_STORE)"
	@echo "make stubs  - generate TypeScript, Go, C++ and Java clients from protos/ into $(STUBS)"
	@echo "make clients - build the Node, Go and C++ clients (tests/clients runs them against a gateway)"
	@echo "make stubs-java-compile - compile the Java stubs against Debian's grpc-java"
	@echo "make proto-check - buf lint, and buf breaking against the released contract (protos/released.json)"
	@echo "make proto-release - record the current protos as the released contract"
	@echo "make images - build the container images (VARIANT=gpu or cpu) where a Docker engine runs"
	@echo "make manifests - render the Kubernetes overlay (VARIANT=gpu or cpu)"

venv: $(VENV_READY)

$(DEPS): requirements.lock requirements-test.lock pyproject.toml
	test -x $(PY) || $(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned to 2.13.0 in the lock: an unpinned torch would pull several GB of CUDA wheels.
	$(PY) -m pip install --quiet -r requirements.lock -r requirements-test.lock
	# The repo root, the Python SDK and the generated package go on the venv's path.
	site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
		printf '%s\n%s\n%s\n' "$(CURDIR)" "$(CURDIR)/clients/python" "$(CURDIR)/$(GEN)" > "$$site/maas-dev.pth"
	# The project itself, editable and without dependencies (the lock has them): installs maasctl.
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

$(GPU_DEPS): requirements-gpu.lock $(DEPS)
	$(PY) -m pip install --quiet -r requirements-gpu.lock
	touch $@

protos: $(PROTO_STAMP)

$(PROTO_STAMP): $(PROTOS) $(VENV_READY)
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(PY) -m grpc_tools.protoc -I protos \
		--python_out=$(GEN) --pyi_out=$(GEN) --grpc_python_out=$(GEN) $(PROTOS)
	find $(GEN) -mindepth 1 -type d -exec touch {}/__init__.py \;
	touch $@

# Client stubs in other languages, into an ignored build folder. Compilers come from Debian
# (clients/install-toolchains.sh installs them) and ts-proto and buf from npm (make node-deps).
STUBS    := build/stubs
NODE_DIR := clients/node
NODE_BIN := $(NODE_DIR)/node_modules/.bin
NODE_STAMP := $(NODE_DIR)/node_modules/.installed
PROTOC   ?= protoc
# Stops make with the Debian package to install when a generator is missing.
need = @command -v $(1) >/dev/null 2>&1 || { echo "make $@: $(1) not found; install the Debian package $(2) (clients/install-toolchains.sh)" >&2; exit 1; }

node-deps: $(NODE_STAMP)

$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	# npm ci trips over buf's per-platform optional packages; install --no-save keeps the lock as is.
	@command -v npm >/dev/null 2>&1 || { echo "make $@: npm not found; install Node.js 18 or newer" >&2; exit 1; }
	cd $(NODE_DIR) && npm install --no-save --no-audit --no-fund --loglevel=error
	touch $@

stubs: stubs-ts stubs-go stubs-cpp stubs-java

stubs-ts: $(NODE_STAMP)
	$(call need,$(PROTOC),protobuf-compiler)
	rm -rf $(STUBS)/ts && mkdir -p $(STUBS)/ts
	$(PROTOC) -I protos --plugin=protoc-gen-ts_proto=$(NODE_BIN)/protoc-gen-ts_proto \
		--ts_proto_out=$(STUBS)/ts \
		--ts_proto_opt=outputServices=grpc-js,env=node,esModuleInterop=true,forceLong=number,useDate=false \
		$(PROTOS)

stubs-go:
	$(call need,$(PROTOC),protobuf-compiler)
	$(call need,protoc-gen-go,protoc-gen-go)
	$(call need,protoc-gen-go-grpc,protoc-gen-go-grpc)
	rm -rf $(STUBS)/go && mkdir -p $(STUBS)/go
	$(PROTOC) -I protos \
		--go_out=$(STUBS)/go --go_opt=module=github.com/maas-project/maas/gen/go \
		--go-grpc_out=$(STUBS)/go --go-grpc_opt=module=github.com/maas-project/maas/gen/go \
		$(PROTOS)

stubs-cpp:
	$(call need,$(PROTOC),protobuf-compiler)
	$(call need,grpc_cpp_plugin,protobuf-compiler-grpc)
	rm -rf $(STUBS)/cpp && mkdir -p $(STUBS)/cpp
	$(PROTOC) -I protos --cpp_out=$(STUBS)/cpp \
		--grpc_out=$(STUBS)/cpp --plugin=protoc-gen-grpc=$$(command -v grpc_cpp_plugin) $(PROTOS)

stubs-java:
	$(call need,$(PROTOC),protobuf-compiler)
	$(call need,grpc_java_plugin,protobuf-compiler-grpc-java-plugin)
	rm -rf $(STUBS)/java && mkdir -p $(STUBS)/java
	$(PROTOC) -I protos --java_out=$(STUBS)/java \
		--grpc-java_out=$(STUBS)/java --plugin=protoc-gen-grpc-java=$$(command -v grpc_java_plugin) $(PROTOS)

# The clients that run the scenario of tests/clients/scenario.py against a gateway.
clients: client-node client-go client-cpp

client-node: stubs-ts
	cd $(NODE_DIR) && npm run --silent build

client-cpp: stubs-cpp
	$(call need,cmake,cmake)
	$(call need,pkg-config,pkg-config)
	cmake -S clients/cpp -B build/cpp -DCMAKE_BUILD_TYPE=Release >/dev/null
	cmake --build build/cpp -j2

# The Java stubs compile against Debian's grpc-java and protobuf-java (libgrpc-java, libprotobuf-java).
empty :=
space := $(empty) $(empty)
JAVA_CP := $(subst $(space),:,$(wildcard $(addprefix /usr/share/java/,grpc-api.jar grpc-stub.jar \
	grpc-protobuf.jar grpc-protobuf-lite.jar grpc-core.jar grpc-context.jar guava.jar protobuf.jar \
	geronimo-annotation-1.3-spec.jar)))
stubs-java-compile: stubs-java
	$(call need,javac,default-jdk-headless)
	@test -f /usr/share/java/grpc-stub.jar || { echo "make $@: grpc-java not found; install the Debian package libgrpc-java" >&2; exit 1; }
	rm -rf build/java && mkdir -p build/java
	javac -nowarn -d build/java -cp '$(JAVA_CP)' $$(find $(STUBS)/java -name '*.java')

# The Go client builds in GOPATH mode against Debian's Go packages (golang-google-grpc-dev,
# golang-google-protobuf-dev): no module proxy is needed, or reachable, to build it.
GO_PATH := $(CURDIR)/build/go
GO_PKG  := $(GO_PATH)/src/github.com/maas-project/maas
client-go: stubs-go
	$(call need,go,golang-go)
	rm -rf $(GO_PATH)/src && mkdir -p $(GO_PKG)/gen $(GO_PKG)/clients
	cp -r $(STUBS)/go $(GO_PKG)/gen/go && cp -r clients/go $(GO_PKG)/clients/go
	cd $(GO_PKG)/clients/go/scenario && GO111MODULE=off GOPATH=$(GO_PATH):/usr/share/gocode \
		go build -o $(GO_PATH)/bin/maas-scenario .

# buf lint, then buf breaking against the released contract: protos/released.json, the image
# `make proto-release` writes when a version is released (BREAKING_AGAINST overrides it).
BREAKING_AGAINST ?= protos/released.json
proto-check: $(NODE_STAMP)
	$(NODE_BIN)/buf lint
	$(NODE_BIN)/buf breaking --against '$(BREAKING_AGAINST)'

proto-release: $(NODE_STAMP)
	$(NODE_BIN)/buf build -o protos/released.json

models: $(MODELS_STAMP)

$(MODELS_STAMP): $(PROTO_STAMP)
	$(PY) -m services.defaults --store $(MODEL_STORE) --keys-dir $(KEYS_DIR) --kek-id $(KEK_ID) --create-kek
	touch $@

REPLICAS ?= 1
run: $(MODELS_STAMP)
	$(PY) -m shared.cluster --replicas $(REPLICAS)

test: lint $(MODELS_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(PROTO_STAMP)
	$(PY) -m ruff check .
	# Layering contracts (pyproject.toml): shared imports nothing above it, no service imports another,
	# the gateway imports no service.
	$(VENV)/bin/lint-imports --no-cache
	# Every import is a declared dependency.
	$(VENV)/bin/deptry . --no-ansi

# The docs site (docs/, mkdocs.yml); make test builds it too (tests/docs).
docs: $(PROTO_STAMP)
	$(PY) -m mkdocs build --strict --site-dir build/site

reference: $(PROTO_STAMP)
	$(PY) docs/generate.py

bench: $(MODELS_STAMP)
	$(PY) -m tests.bench.bench_batching
	$(PY) -m tests.bench.bench_workers
	$(PY) -m tests.bench.bench_gateway
	$(PY) -m tests.bench.bench_hop_transport
	$(PY) -m tests.bench.bench_encryption
	$(PY) -m tests.bench.bench_graphs
	$(PY) -m tests.bench.bench_recommend
	$(PY) -m tests.bench.bench_nlp
	$(PY) -m tests.bench.bench_explain
	$(PY) -m tests.bench.bench_data_parallel

IMAGE_TAG ?= 0.1.0
VARIANT   ?= gpu
images:
	@if ! docker info >/dev/null 2>&1; then \
		echo "make images: no Docker engine is running here, so no image was built."; \
		echo "The Dockerfiles are checked statically instead (hadolint, in make test)."; \
		exit 0; \
	fi; \
	set -e; \
	cpu_args=""; suffix="-$(VARIANT)"; \
	if [ "$(VARIANT)" = cpu ]; then \
		cpu_args="--build-arg BASE_IMAGE=python:3.11.14-slim-bookworm --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"; \
	fi; \
	for svc in dense gnn nlp trainer; do \
		docker build -f deploy/docker/$$svc.Dockerfile $$cpu_args -t maas-$$svc:$(IMAGE_TAG)$$suffix .; \
	done; \
	docker build -f deploy/docker/gateway.Dockerfile -t maas-gateway:$(IMAGE_TAG) .

manifests:
	kubectl kustomize deploy/k8s/overlays/$(VARIANT)

clean:
	rm -rf $(GEN) var build .pytest_cache
