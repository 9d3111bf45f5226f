#!/usr/bin/env bash
# Install what chainfs's tests and benchmarks need on a Debian machine.
# Idempotent: does nothing when every package is already there.
set -euo pipefail
# man-db/groff-base render the man pages; nbdkit serves the NBD plugin;
# libnbd-bin has nbdinfo and nbdcopy; chromium screenshots `map --svg`;
# bindfs (a libfuse passthrough) is the bench's FUSE-without-chainfs reference.
PKGS=(fuse3 libvhdi-utils qemu-utils e2fsprogs fdisk util-linux fio man-db groff-base nbdkit libnbd-bin chromium bindfs)
missing=()
for p in "${PKGS[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
command -v cargo-nextest >/dev/null 2>&1 || cargo install --locked cargo-nextest
