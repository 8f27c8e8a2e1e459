# A stand-in for the compose stack's prom/prometheus image where no registry answers:
# Debian's Prometheus (2.42) on the stand-in base (scripts/standin-base.sh), started as
# the official image starts, so the stack's mount (/etc/prometheus) and port (9090) are
# the same. Built by tests/deploy/test_compose_stack.py, never shipped.
ARG BASE=salience-standin/python:3.11-slim-bookworm
FROM ${BASE}
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -o prometheus -g prometheus /prometheus
USER prometheus
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
