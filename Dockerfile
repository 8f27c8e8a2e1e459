# The salience server with its bundled demo models, as a non-root image.
#   docker build -t salience:0.1.0 .                                    CPU TensorFlow (default)
#   docker build --build-arg SERVER_EXTRA=gpu -t salience:0.1.0-gpu .   TensorFlow with CUDA
# It installs exactly what `make serve` installs: the same pyproject extra and the same
# constraints file (constraints.txt, or constraints-gpu.txt for the GPU extra), so the
# image runs the versions CI tested. tests/deploy/test_dockerfile.py fails when the two
# drift apart. See deploy/README.md.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# The pyproject extra, named as in the Makefile: server-cpu (CPU-only TensorFlow, the
# smaller image) or gpu (TensorFlow with its CUDA libraries from PyPI; the NVIDIA
# driver comes from the host through the NVIDIA container toolkit).
ARG SERVER_EXTRA=server-cpu
WORKDIR /src
# The same uv as the Makefile's; the venv is copied whole into the runtime stage.
RUN python -m pip install --no-cache-dir "uv>=0.5,<1" && python -m venv /opt/salience
COPY pyproject.toml README.md constraints.txt constraints-gpu.txt ./
COPY proto proto
COPY service service
COPY clients clients
# Each extra has its own lock file, as in the Makefile's CONSTRAINTS; any other value
# stops the build instead of installing unpinned versions. Not editable (unlike
# `make install`): the runtime stage has no source tree.
RUN case "${SERVER_EXTRA}" in \
      server-cpu) lock=constraints.txt ;; \
      gpu) lock=constraints-gpu.txt ;; \
      *) echo "SERVER_EXTRA=${SERVER_EXTRA}: use server-cpu or gpu" >&2; exit 1 ;; \
    esac \
 && uv pip install --python /opt/salience/bin/python --no-cache \
      -c "${lock}" ".[${SERVER_EXTRA}]"

FROM ${PYTHON_IMAGE}
# A numeric user, so Kubernetes' runAsNonRoot can verify it; the manifests' runAsUser
# is the same 10001. HOME is /tmp because it is the one writable place when the root
# file system is read-only (Keras and TensorFlow keep caches under HOME).
RUN groupadd --system --gid 10001 salience \
 && useradd --system --no-log-init --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
      salience
COPY --from=build /opt/salience /opt/salience
COPY deploy/healthcheck.py /opt/salience/healthcheck.py
# The venv first on PATH: `salience` and `python` are the installed ones. No .pyc
# writes (the root file system may be read-only), and logs are not buffered.
ENV PATH=/opt/salience/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
USER 10001:10001
# gRPC and /metrics, the server's default ports (SALIENCE_PORT, SALIENCE_METRICS_PORT).
EXPOSE 50051 8000
# Healthy once every model is loaded and warmed up: the start period covers loading.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "/opt/salience/healthcheck.py"]
# Exec form: the server is PID 1 and gets SIGTERM itself, which starts its drain.
ENTRYPOINT ["salience", "serve"]
