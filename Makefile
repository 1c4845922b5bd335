# Two commands on a fresh clone: `make run` and `make test`. Everything else is installed from here.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY_STAMP := $(VENV)/.installed
NODE_DIR := clients/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed
BUF := $(NODE_DIR)/node_modules/.bin/buf
PROTOS := $(wildcard protos/callplane/v1/*.proto)
# The clients' retry policy (gRPC service config): one file, copied next to the Python stubs by `make proto`.
SERVICE_CONFIG := protos/callplane/v1/callplane_grpc_service_config.json
GEN_DIR := clients/python
LISTEN ?= 127.0.0.1:50051
DATA_DIR ?= data

BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: venv node run test fuzz bench lint typecheck breaking format proto proto-check ci clean

venv: $(PY_STAMP)
node: $(NODE_STAMP)

$(PY_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	# `npm install` (not `npm ci`): the lock omits optional buf binaries of other platforms, which `ci` rejects.
	cd $(NODE_DIR) && npm install --no-audit --no-fund --loglevel=error
	touch $@

## Start the server on embedded SQLite in $(DATA_DIR)/.
run: $(PY_STAMP)
	$(BIN)/callplane serve --listen $(LISTEN) --data-dir $(DATA_DIR)

## Run the whole test suite (SQLite always; PostgreSQL when configured, required with CI=true).
test: $(PY_STAMP) $(NODE_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## Fuzz every RPC long: FUZZ_EXAMPLES hostile requests per backend (`make test` runs a few per RPC).
FUZZ_EXAMPLES ?= 100000
fuzz: $(PY_STAMP)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest tests/fuzz --timeout=0 $(PYTEST_ARGS)

$(BENCH_STAMP): $(PY_STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	touch $@

## Benchmarks against a bare grpc.aio server (SQLite and PostgreSQL); writes tests/bench/results/ and the
## README's results. Installs h2load (Debian nghttp2-client) when missing. BENCH_ARGS=--help for options.
bench: $(BENCH_STAMP)
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

## Regenerate Python stubs (and typed .pyi stubs) from protos/, and copy the service config beside them.
proto: $(PY_STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos \
		--python_out=$(GEN_DIR) --grpc_python_out=$(GEN_DIR) \
		--plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --mypy_out=$(GEN_DIR) \
		--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=$(GEN_DIR) \
		$(PROTOS)
	cp $(SERVICE_CONFIG) $(GEN_DIR)/callplane/v1/

## Fail if the committed stubs differ from what the protos generate.
proto-check: proto
	@git diff --exit-code --stat -- $(GEN_DIR)/callplane/v1 || \
		(echo "generated stubs drifted from protos/: run 'make proto' and commit" >&2; exit 1)
	@test -z "$$(git status --porcelain --untracked-files=all -- $(GEN_DIR)/callplane/v1)" || \
		(git status --porcelain -- $(GEN_DIR)/callplane/v1; echo "untracked generated files: run 'make proto' and commit" >&2; exit 1)

## ruff, mypy --strict, buf lint and buf breaking.
lint: $(PY_STAMP) $(NODE_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(MAKE) --no-print-directory typecheck breaking
	$(BUF) lint

## mypy --strict on the server and the Python client (configured in pyproject.toml).
typecheck: $(PY_STAMP)
	$(BIN)/mypy

## The protos must not break the previous commit's (buf's FILE rules, buf.yaml). A clone without that
## commit (shallow, or the first commit) is checked against HEAD instead: only uncommitted changes.
breaking: $(NODE_STAMP)
	@if ! git rev-parse --git-dir >/dev/null 2>&1; then \
		echo "buf breaking: skipped, not a git checkout"; \
	elif git rev-parse --verify --quiet 'HEAD~1^{commit}' >/dev/null; then \
		echo "$(BUF) breaking --against '.git#ref=HEAD~1'"; \
		$(BUF) breaking --against '.git#ref=HEAD~1'; \
	else \
		echo "buf breaking: HEAD~1 is not in this clone (shallow or first commit); checking against HEAD"; \
		$(BUF) breaking --against '.git#ref=HEAD'; \
	fi

format: $(PY_STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

ci: proto-check lint test

clean:
	rm -rf $(VENV) $(NODE_DIR)/node_modules .pytest_cache .ruff_cache .mypy_cache
