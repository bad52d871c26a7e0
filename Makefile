# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8080
DATA_DIR ?= .data
SANDBOX ?= bwrap
EXECUTORS ?= 1
PYTEST_ARGS ?=

.PHONY: run test venv system-packages generate check-generated lint typecheck proto-lint proto-breaking bench clean

$(VENV)/.installed: requirements.lock pyproject.toml sdk/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	# xds-protos ships an old copy of opentelemetry/proto/* that overwrites opentelemetry-proto's
	# (the OTLP exporter then fails to import); put the real one back on top.
	$(BIN)/pip install --quiet --no-deps --force-reinstall $$(grep '^opentelemetry-proto==' requirements.lock)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	# The SDK and CLI (sdk/python, import name pyth_on), whose dependencies the lock already holds;
	# its `pyth-on` script hands `up` and `migrate` to the server's.
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e ./sdk/python
	touch $@

venv: $(VENV)/.installed

# gVisor's runsc (Debian package) for the gvisor sandbox backend and its tests, and Chromium for the
# headless check of the /docs page. Best effort: without them those tests are skipped with the
# reason, and the default bwrap backend needs nothing extra.
system-packages:
	@command -v runsc >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get install -y -qq runsc >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq runsc >/dev/null 2>&1)); } || \
	  echo "note: runsc (gVisor) is not installed; the gvisor backend's tests will be skipped"
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get install -y -qq chromium >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1)); } || \
	  echo "note: chromium is not installed; the /docs page's browser test will be skipped"

run: venv
	$(BIN)/pyth-on up --port $(PORT) --data-dir $(DATA_DIR) --sandbox $(SANDBOX) --executors $(EXECUTORS)

test: venv system-packages check-generated lint typecheck proto-lint proto-breaking
	$(BIN)/pytest $(PYTEST_ARGS)

generate: venv
	$(BIN)/python tools/generate.py
	$(BIN)/python tools/settings_reference.py
	$(BIN)/python tools/k8s_manifests.py

check-generated: venv
	$(BIN)/python tools/generate.py --check
	$(BIN)/python tools/settings_reference.py --check
	$(BIN)/python tools/k8s_manifests.py --check

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# services/, edge/ and the SDK (sdk/python/src) against the generated .pyi stubs (settings in pyproject.toml).
typecheck: venv
	$(BIN)/mypy

# buf (the npm package @bufbuild/buf, pinned with its integrity hashes in tools/buf/package-lock.json)
# lints protos/ and checks them for breaking changes against the previous commit, offline: the
# google/api imports are copied from the googleapis-common-protos wheel, not fetched from a registry.
BUF := tools/buf/node_modules/.bin/buf
BUF_AGAINST ?= HEAD~1

$(BUF): tools/buf/package.json tools/buf/package-lock.json
	cd tools/buf && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

proto-lint: venv $(BUF)
	$(BIN)/python tools/buf/protos.py googleapis
	$(BUF) lint

proto-breaking: proto-lint
	$(BIN)/python tools/buf/protos.py breaking --against $(BUF_AGAINST)

bench: venv
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache tools/buf/node_modules tools/buf/googleapis
