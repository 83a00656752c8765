#!/usr/bin/env bash
# A local stand-in for python:3.11-slim-bookworm, for machines that cannot pull images: Debian bookworm
# (whose Python is 3.11) from Debian's mirror, imported as an image. Cached: skipped if the tag exists.
#   bash tests/docker/build_base.sh [TAG]        (as root: debootstrap needs it; TAG charrnn-base:bookworm)
set -euo pipefail
tag=${1:-charrnn-base:bookworm}
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "build_base: $tag exists"
  exit 0
fi
rootfs=$(mktemp -d /tmp/charrnn-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
  bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
# pip inside the build checks certificates against this machine's trust store (which may add a proxy's CA).
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import - "$tag"
echo "build_base: imported $tag"
