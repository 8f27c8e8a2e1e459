#!/usr/bin/env bash
# A stand-in for the Dockerfile's base image (python:3.11-slim-bookworm), for building
# the image where no container registry answers (an air-gapped machine, CI here).
#
#   scripts/standin-base.sh [IMAGE]        imports it into the engine DOCKER_HOST names
#
# Debian bookworm's Python 3.11 (the official image's Python and Debian release), made
# with `debootstrap --variant=minbase` from the Debian mirror apt already uses, so it
# needs Debian's packages and nothing else. It differs from the real base in ways a
# build notices only for the better here:
#   - Python is Debian's (/usr/bin/python3, `python` from python-is-python3), with
#     Debian's "externally managed" marker removed, as the official image has none:
#     `python -m pip install` works in it as there;
#   - it trusts what this host trusts: the CA certificates in
#     /usr/local/share/ca-certificates/ are added (HTTPS may pass an intercepting
#     proxy), and SSL_CERT_FILE points uv at the system store (uv ignores it otherwise).
#     Only here, never in the Dockerfile: the real base needs neither.
# The root file system is kept as a tarball in the cache folder (SALIENCE_CACHE_DIR, by
# default ~/.cache/salience), keyed by its recipe and the host's CA certificates, so
# later runs only import it. Needs root (debootstrap) and, for the import, `docker`.
set -euo pipefail

IMAGE=${1:-salience-standin/python:3.11-slim-bookworm}
SUITE=bookworm
PACKAGES=python3,python3-venv,python3-pip,python-is-python3,ca-certificates
CACHE_DIR=${SALIENCE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/salience}
HOST_CAS=/usr/local/share/ca-certificates
DOCKER=${DOCKER:-docker}

# The mirror apt already uses for the suite, from apt's own view of its sources (both
# sources.list and deb822 .sources files), so no host is written down here.
mirror() {
	apt-cache policy | awk -v suite="$SUITE/main" '$3 == suite && $1 ~ /^[0-9]+$/ { print $2; exit }'
}

# Bump when the steps that make the root file system change: it names the cached tarball.
RECIPE=1
key=$( (echo "$SUITE $PACKAGES $RECIPE"; find "$HOST_CAS" -type f -name '*.crt' -print0 2>/dev/null | sort -z |
	xargs -0r cat) | sha256sum | cut -c1-16)
tarball="$CACHE_DIR/standin-base-$SUITE-$key.tar"

if [ ! -s "$tarball" ]; then
	url=$(mirror)
	if [ -z "$url" ]; then
		# apt's lists may be missing on a fresh machine: read them once.
		apt-get update -qq
		url=$(mirror)
	fi
	if [ -z "$url" ]; then
		echo "standin-base: apt has no source for $SUITE/main: add one to /etc/apt" >&2
		exit 1
	fi
	command -v debootstrap >/dev/null || {
		echo "standin-base: debootstrap is missing (apt-get install debootstrap)" >&2
		exit 1
	}
	mkdir -p "$CACHE_DIR"
	root=$(mktemp -d "$CACHE_DIR/standin-root.XXXXXX")
	trap 'rm -rf "$root"' EXIT
	echo "standin-base: debootstrap $SUITE from $url"
	debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$url" \
		>"$root.log" 2>&1 || {
		tail -n 30 "$root.log" >&2
		rm -f "$root.log"
		exit 1
	}
	rm -f "$root.log"
	if compgen -G "$HOST_CAS/*.crt" >/dev/null; then
		cp "$HOST_CAS"/*.crt "$root/usr/local/share/ca-certificates/"
	fi
	chroot "$root" update-ca-certificates >/dev/null 2>&1
	rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
	# What the official slim image leaves out too: package caches and lists,
	# documentation and manual pages.
	rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
		"$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/*
	tar --numeric-owner -C "$root" -cf "$tarball.partial" .
	mv "$tarball.partial" "$tarball"
	# Older tarballs (another script or CA set) are never used again.
	find "$CACHE_DIR" -maxdepth 1 -name "standin-base-$SUITE-*.tar" ! -name "${tarball##*/}" -delete
fi

# Imported once per tarball: a new import is a new image ID, which would void the build
# cache of every image built on it.
label=org.salience.standin-base
if [ "$("$DOCKER" image inspect -f "{{ index .Config.Labels \"$label\" }}" "$IMAGE" 2>/dev/null)" = "$key" ]; then
	echo "standin-base: $IMAGE is already the image of ${tarball##*/}"
	exit 0
fi
"$DOCKER" import \
	--change "LABEL $label=$key" \
	--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
	--change 'ENV LANG=C.UTF-8' \
	--change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
	--change 'CMD ["python3"]' \
	--message "stand-in for python:3.11-slim-bookworm: debootstrap $SUITE, $PACKAGES" \
	"$tarball" "$IMAGE" >/dev/null
echo "standin-base: $IMAGE from $tarball"
