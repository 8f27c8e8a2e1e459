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
# Chromium and its chromedriver for the review report), from Debian's packages when
# they are missing.
TEST_PROGRAMS := prometheus:prometheus promtool:prometheus chromium:chromium \
	chromedriver:chromium-driver

# Triton's gRPC client, which the Open Inference Protocol's tests drive the server
# with, in an environment of its own: tritonclient pins protobuf below 7, and this
# project's stubs need 7. constraints-oip.txt pins it (`make lock`).
OIP_VENV ?= .venv-oip
OIP_CLIENT := "tritonclient[grpc]>=2.73,<3" "numpy>=2,<3"

.PHONY: install install-test test-programs oip-client serve test lint protos lock bench clean

$(BIN)/uv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "uv>=0.5,<1"

install: $(BIN)/uv
	$(BIN)/uv pip install --python $(BIN)/python --quiet -c $(CONSTRAINTS) -e ".[$(SERVER_EXTRA)]"

install-test: $(BIN)/uv test-programs oip-client
	$(BIN)/uv pip install --python $(BIN)/python --quiet -c constraints.txt -e ".[server-cpu,test]"

oip-client: $(OIP_VENV)/.installed

# A stamp, so a changed constraints file reinstalls and a failed install retries.
$(OIP_VENV)/.installed: constraints-oip.txt | $(BIN)/uv
	$(PYTHON) -m venv $(OIP_VENV)
	$(BIN)/uv pip install --python $(OIP_VENV)/bin/python --quiet -c constraints-oip.txt \
		$(OIP_CLIENT)
	touch $@

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
	printf '%s\n' $(OIP_CLIENT) | $(BIN)/uv pip compile - -q \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 -o constraints-oip.txt

clean:
	rm -rf $(VENV) $(OIP_VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
