# A non-root, multi-stage image of the salience server with the bundled demo models.
#   docker build -t salience .                      # CPU TensorFlow
#   docker build --build-arg SERVER_EXTRA=gpu --build-arg CONSTRAINTS=constraints-gpu.txt -t salience:gpu .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG SERVER_EXTRA=server-cpu
ARG CONSTRAINTS=constraints.txt
WORKDIR /src
RUN python -m pip install --no-cache-dir "uv>=0.5,<1" && python -m venv /opt/salience
COPY pyproject.toml README.md constraints.txt constraints-gpu.txt ./
COPY proto proto
COPY service service
COPY clients clients
RUN uv pip install --python /opt/salience/bin/python --no-cache -c "${CONSTRAINTS}" ".[${SERVER_EXTRA}]"

FROM ${PYTHON_IMAGE}
RUN useradd --system --uid 10001 --no-create-home salience
COPY --from=build /opt/salience /opt/salience
ENV PATH=/opt/salience/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SALIENCE_HOST=0.0.0.0 \
    SALIENCE_PORT=50051 \
    SALIENCE_METRICS_PORT=8000
USER 10001
EXPOSE 50051 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s \
  CMD python -c "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
s = g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(), timeout=4).status; \
sys.exit(0 if s == h.HealthCheckResponse.SERVING else 1)"
ENTRYPOINT ["salience", "serve"]
