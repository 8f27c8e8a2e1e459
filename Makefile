# The two commands of the README, and the chores around them.
#   make serve   install the server and start it on the bundled demo models
#   make test    install what the tests need and run lint, types and the whole suite
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# CPU-only TensorFlow unless an NVIDIA driver is present.
SERVER_EXTRA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo server-cpu)
CONSTRAINTS ?= $(if $(filter gpu,$(SERVER_EXTRA)),constraints-gpu.txt,constraints.txt)
SERVE_ARGS ?=

# Programs the tests run for real (a Prometheus server and promtool; headless
# Chromium for the review report), from Debian's packages when they are missing.
TEST_PROGRAMS := prometheus:prometheus promtool:prometheus chromium:chromium

.PHONY: install install-test test-programs serve test lint protos lock bench clean

$(BIN)/uv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "uv>=0.5,<1"

install: $(BIN)/uv
	$(BIN)/uv pip install --python $(BIN)/python --quiet -c $(CONSTRAINTS) -e ".[$(SERVER_EXTRA)]"

install-test: $(BIN)/uv test-programs
	$(BIN)/uv pip install --python $(BIN)/python --quiet -c constraints.txt -e ".[server-cpu,test]"

test-programs:
	@missing=""; for pair in $(TEST_PROGRAMS); do \
		command -v "$${pair%%:*}" >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
		echo "installing Debian packages:$$missing"; \
		$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			$$sudo apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

serve: install
	$(BIN)/salience serve $(SERVE_ARGS)

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

bench: install-test
	$(BIN)/pytest -q -m bench -s tests/bench

protos: install-test
	$(BIN)/python scripts/generate_protos.py

# Re-pins every dependency; commit the result so CI and users get what was tested.
lock: $(BIN)/uv
	$(BIN)/uv pip compile pyproject.toml -q --extra server-cpu --extra test \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 -o constraints.txt
	$(BIN)/uv pip compile pyproject.toml -q --extra gpu \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 -o constraints-gpu.txt

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
