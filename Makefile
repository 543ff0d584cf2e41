# The README's two commands: `make run` and `make test`. Both work from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TRAIN_MINUTES ?= 10
RUN_DIR ?= runs/default
# where `make run` serves: `make run HOST=... PORT=...`, else $TINYLLM_HOST / $TINYLLM_PORT, else 127.0.0.1:5000
# (HOST / PORT only from make's command line: some shells export HOST as the machine's name)
SERVE_HOST := $(if $(filter command line,$(origin HOST)),$(strip $(HOST)))
SERVE_PORT := $(if $(filter command line,$(origin PORT)),$(strip $(PORT)))

.PHONY: run test setup assets lint format bench clean

# TORCH_INDEX=https://download.pytorch.org/whl/cpu: PyTorch's CPU-only wheels (PyPI's Linux torch is the CUDA build)
TORCH_INDEX ?=
PIP_INDEX := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(PIP_INDEX) -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

assets: $(STAMP)
	$(VENV)/bin/tinyllm fetch-assets

run: assets
	$(VENV)/bin/tinyllm run --run-dir $(RUN_DIR) --minutes $(TRAIN_MINUTES) $(if $(SERVE_HOST),--host $(SERVE_HOST)) $(if $(SERVE_PORT),--port $(SERVE_PORT))

test: assets browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist src/*.egg-info

# Headless Chromium for the web page's browser test (tests/test_web.py), from Debian when missing and possible;
# never fails the build: without it the browser test is skipped with its reason.
.PHONY: browser
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium) || echo "chromium unavailable: browser tests will be skipped"

# Build the Docker image (podman here: local debootstrap base, local torch wheel), run it, send the seed's two
# curl requests and check the answers; prints image size and build time. See docker/docker-test.sh for options
# (e.g. make docker-test TRAIN_MINUTES=5, CHECKPOINT=runs/default, NO_CACHE=1).
.PHONY: docker-test
docker-test:
	docker/docker-test.sh
