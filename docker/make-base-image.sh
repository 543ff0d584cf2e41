#!/usr/bin/env bash
# Build a local stand-in for `python:3.11-slim` when no image registry can be reached.
#
#   docker/make-base-image.sh [IMAGE]        (default IMAGE: localhost/tinyllm-base:bookworm)
#
# debootstrap a minimal Debian bookworm (python3.11, the same minor version as python:3.11-slim and the
# local torch wheel) with python3, python3-venv and ca-certificates, then `podman import` it. Reused when
# the image already exists; FORCE=1 rebuilds it. Needs root, debootstrap and podman.
#
# Certificates: when this machine trusts extra CAs (/usr/local/share/ca-certificates/*.crt, e.g. an
# egress proxy that re-signs TLS), they are trusted in the base image too, so pip inside a build can reach
# PyPI the same way the host does. Nothing of the kind is needed with the real python:3.11-slim.
set -euo pipefail

IMAGE=${1:-${BASE_IMAGE:-localhost/tinyllm-base:bookworm}}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-}
PODMAN=${PODMAN:-podman}

if [[ "${FORCE:-0}" != 1 ]] && $PODMAN image exists "$IMAGE"; then
    echo "base image $IMAGE exists (FORCE=1 to rebuild)"
    exit 0
fi

if [[ -z "$MIRROR" ]]; then
    # The Debian mirror this machine's apt uses (deb822 URIs: or one-line deb entries), else deb.debian.org.
    MIRROR=$(grep -hsE '^\s*URIs:\s*\S+/debian/?\s*$' /etc/apt/sources.list.d/*.sources | head -1 | awk '{print $2}' || true)
    [[ -n "$MIRROR" ]] || MIRROR=$(grep -hsE '^\s*deb\s+\S+/debian/?\s+' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        | head -1 | awk '{print $2}' || true)
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi

ROOT=$(mktemp -d /var/tmp/tinyllm-rootfs.XXXXXX)
cleanup() { rm -rf --one-file-system "$ROOT"; }
trap cleanup EXIT

start=$(date +%s)
echo "debootstrap $SUITE from $MIRROR into $ROOT"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$ROOT" "$MIRROR"

cat >"$ROOT/etc/apt/sources.list" <<SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb ${MIRROR%/debian*}/debian-security $SUITE-security main
SOURCES

shopt -s nullglob
extra=(/usr/local/share/ca-certificates/*.crt)
if ((${#extra[@]})); then
    echo "trusting this machine's extra CAs in the image: ${extra[*]}"
    cp "${extra[@]}" "$ROOT/usr/local/share/ca-certificates/"
    chroot "$ROOT" update-ca-certificates >/dev/null
fi

# Trim what a runtime image never needs (what python:3.11-slim also leaves out).
chroot "$ROOT" apt-get clean
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/* "$ROOT"/var/log/* "$ROOT"/tmp/* \
    "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/* "$ROOT"/usr/share/locale/*
find "$ROOT" -name __pycache__ -type d -prune -exec rm -rf {} +

tar --numeric-owner -C "$ROOT" -c . | $PODMAN import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "debootstrap --variant=minbase $SUITE + python3 python3-venv ca-certificates" \
    - "$IMAGE"
echo "base image $IMAGE built in $(($(date +%s) - start)) s: $($PODMAN image inspect --format '{{.Size}}' "$IMAGE") bytes"
