#!/usr/bin/env bash
# chainfs in one minute (plus the build): build it, make a 3-layer VHD chain
# whose flattened content is a partitioned disk with an ext4 filesystem, look
# at the chain, mount it, check the mounted disk.raw against `chainfs export`,
# loop-mount the filesystem inside and read its files. Everything it creates
# (temp folder, FUSE mount, loop device, kernel mount) is removed on exit,
# also on failure or Ctrl-C.
#
# Usage (as root, on Debian 12; no terminal needed):  scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

if [ "$(id -u)" -ne 0 ]; then
  echo "demo.sh: run as root (it mounts FUSE, attaches a loop device, mounts ext4)" >&2
  exit 1
fi

say() { printf '\n==> %s\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

# --- 1. What the demo needs --------------------------------------------------
# (scripts/deps.sh installs the larger set the test suite needs.)
need=()
for p in fuse3 e2fsprogs fdisk util-linux mount; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
rust_ok() {
  command -v cargo >/dev/null 2>&1 || return 1
  local v
  v=$(rustc --version 2>/dev/null | awk '{print $2}')
  [ "${v%%.*}" = 1 ] && [ "$(echo "$v" | cut -d. -f2)" -ge 85 ]
}
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
if ! rust_ok; then
  need+=(curl ca-certificates gcc libc6-dev)
fi
if ! command -v cc >/dev/null 2>&1; then
  need+=(gcc libc6-dev)
fi
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! rust_ok; then
  say "installing the Rust toolchain (rustup, stable; chainfs needs Rust >= 1.85)"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
    RUSTUP_INIT_SKIP_PATH_CHECK=yes sh -s -- -y -q --profile minimal
  export PATH="$HOME/.cargo/bin:$PATH"
fi

say "building chainfs (release)"
printf '$ cargo build --release --locked\n'
# Ask cargo where the binary it just built is: CARGO_TARGET_DIR, a
# build.target-dir in a cargo config, or target/ -- and never an older binary
# that happens to be on PATH.
BIN=$(cargo build --release --locked --quiet --message-format=json-render-diagnostics |
  grep -F '"kind":["bin"]' | grep -F '"name":"chainfs"' |
  sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
if [ -z "$BIN" ] || [ ! -x "$BIN" ]; then
  echo "demo.sh: cargo did not report the chainfs binary it built" >&2
  exit 1
fi
echo "built $BIN"
chainfs() { "$BIN" "$@"; }

# --- 2. A scratch folder, and the cleanup that undoes everything -------------
WORK=$(mktemp -d /tmp/chainfs-demo.XXXXXX)
LOOP=""
cleanup() {
  set +e
  cd /
  mountpoint -q "$WORK/inside" 2>/dev/null && umount "$WORK/inside"
  if [ -n "$LOOP" ]; then
    partx -d "$LOOP" >/dev/null 2>&1
    losetup -d "$LOOP"
  fi
  if mountpoint -q "$WORK/mnt" 2>/dev/null; then
    chainfs umount "$WORK/mnt" || fusermount3 -u "$WORK/mnt" || umount -l "$WORK/mnt"
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
cd "$WORK"

# --- 3. The guest disk: an MBR with one partition holding ext4 ---------------
say "making a 32 MiB guest disk: MBR, partition 1 at 1 MiB, ext4 with three files"
mkdir files
line() { printf '%-63s\n' "$1"; } # every version of a file is 64 bytes long
line "base.txt: written when the filesystem was made (base.vhd)" >files/base.txt
line "mid.txt: placeholder in base.vhd" >files/mid.txt
line "leaf.txt: placeholder in base.vhd" >files/leaf.txt
truncate -s 31M fs.img
mkfs.ext4 -q -F -b 4096 -L chainfs-demo -d files fs.img
truncate -s 32M disk.img
printf 'label: dos\nstart=2048, type=83\n' | sfdisk --quiet disk.img
dd if=fs.img of=disk.img bs=1M seek=1 conv=notrunc,sparse status=none
# Where the data blocks of mid.txt and leaf.txt sit on the guest disk.
at() { echo $(((1 << 20) + 4096 * $(debugfs -R "bmap /$1 0" fs.img 2>/dev/null))); }
MID_AT=$(at mid.txt)
LEAF_AT=$(at leaf.txt)

# --- 4. The chain: base <- mid <- leaf, each layer holding its own data ------
say "building the chain base.vhd <- mid.vhd <- leaf.vhd"
run chainfs create base.vhd --size 32M
run chainfs write base.vhd --offset 0 --input disk.img
run chainfs create mid.vhd --parent base.vhd
line "mid.txt: this block lives in the middle layer (mid.vhd)" >mid.blk
run chainfs write mid.vhd --offset "$MID_AT" --input mid.blk
run chainfs create leaf.vhd --parent mid.vhd
line "leaf.txt: this block lives in the leaf (leaf.vhd)" >leaf.blk
run chainfs write leaf.vhd --offset "$LEAF_AT" --input leaf.blk
rm -rf files fs.img disk.img mid.blk leaf.blk

say "the chain, leaf first"
run chainfs info leaf.vhd
run chainfs check leaf.vhd

# --- 5. Mount: the chain as one flat file ------------------------------------
say "mounting the chain"
mkdir mnt inside
run chainfs mount leaf.vhd mnt
run ls -l mnt
run cat mnt/chain
run sha256sum mnt/disk.raw
run chainfs export leaf.vhd flat.raw
run sha256sum flat.raw
if [ "$(sha256sum <mnt/disk.raw)" != "$(sha256sum <flat.raw)" ]; then
  echo "demo.sh: MISMATCH: mnt/disk.raw differs from chainfs export" >&2
  exit 1
fi
echo "mnt/disk.raw and chainfs export are identical"
rm flat.raw

# --- 6. Loop-mount the ext4 filesystem inside the chain ----------------------
say "loop-mounting partition 1 of mnt/disk.raw, read-only"
printf '$ losetup -f --show -r -P mnt/disk.raw\n'
LOOP=$(losetup -f --show -r -P mnt/disk.raw)
echo "$LOOP"
printf '$ partx -a %s\n' "$LOOP"
partx -a "$LOOP" 2>/dev/null || true # this kernel does not scan by itself; harmless if it did
for _ in $(seq 50); do
  [ -b "${LOOP}p1" ] && break
  sleep 0.1
done
run mount -o ro "${LOOP}p1" inside
run ls -l inside
run cat inside/base.txt inside/mid.txt inside/leaf.txt
grep -q "middle layer" inside/mid.txt && grep -q "in the leaf" inside/leaf.txt || {
  echo "demo.sh: the files inside do not show every layer" >&2
  exit 1
}

# --- 7. Undo everything --------------------------------------------------------
say "cleaning up"
run umount inside
partx -d "$LOOP" >/dev/null 2>&1 || true
run losetup -d "$LOOP"
LOOP=""
run chainfs umount mnt
echo
echo "demo finished in ${SECONDS}s: every layer's data seen through one mounted file"
