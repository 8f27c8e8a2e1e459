#!/usr/bin/env bash
# `make image`: builds the server's image from the Dockerfile, on the real base image
# when it is here or a registry answers, else on the stand-in base that
# scripts/standin-base.sh makes from Debian's packages (an air-gapped machine).
#
#   scripts/build-image.sh [IMAGE [DOCKER BUILD OPTIONS...]]
#
# IMAGE defaults to salience:0.1.0; the engine is the one DOCKER_HOST names. The last
# line printed is `built IMAGE on BASE in SECONDS s`.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${1:-salience:0.1.0}
shift || true
DOCKER=${DOCKER:-docker}
STANDIN=salience-standin/python:3.11-slim-bookworm
# The Dockerfile's own default, so the two never disagree.
BASE=$(sed -n 's/^ARG PYTHON_IMAGE=//p' Dockerfile)

if "$DOCKER" image inspect "$BASE" >/dev/null 2>&1 ||
	timeout 120 "$DOCKER" pull -q "$BASE" >/dev/null 2>&1; then
	base=$BASE
else
	echo "build-image: $BASE cannot be pulled (no registry answers): the stand-in base"
	scripts/standin-base.sh "$STANDIN"
	base=$STANDIN
fi
start=$(date +%s.%N)
"$DOCKER" build --build-arg PYTHON_IMAGE="$base" -t "$IMAGE" "$@" .
end=$(date +%s.%N)
echo "built $IMAGE on $base in $(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }') s"
