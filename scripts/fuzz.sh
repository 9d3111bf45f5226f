#!/usr/bin/env bash
# Fuzz chainfs's parsers of untrusted bytes with cargo-fuzz (libFuzzer).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]   run each target SECONDS (default 60)
#   scripts/fuzz.sh build                   only build the targets
#   scripts/fuzz.sh seed                    regenerate fuzz/corpus/* from our own writer
#
# Targets: vhd_footer, vhd_header, vhd_image, vhdx_meta, vhdx_layout,
# qcow2_header, control_command, intent_record (fuzz/fuzz_targets/). Their
# bodies live in src/fuzzing.rs so that tests/fuzz_replay.rs replays the
# corpus and every regression on plain `cargo test`.
#
# Stable toolchain only: cargo-fuzz passes `-Zsanitizer=address` and a few
# other -Z flags, which stable rustc accepts with RUSTC_BOOTSTRAP=1 (the
# AddressSanitizer runtime ships with the stable x86_64-linux toolchain).
# Debug assertions are on, so integer overflow in offset arithmetic is a
# crash here as it is in `cargo test`, not a silent wrap-around.
#
# New inputs go to fuzz/target/corpus-work/TARGET, not into the committed
# seed corpus. A crash is saved by libFuzzer under fuzz/artifacts/TARGET/;
# the script then exits 1. To keep it: copy it to
# fuzz/regressions/TARGET/<what-it-shows> (smaller first: `cd fuzz &&
# RUSTC_BOOTSTRAP=1 cargo fuzz tmin -a TARGET artifacts/TARGET/crash-...`)
# and commit it, so that
# tests/fuzz_replay.rs runs it from then on.
set -euo pipefail
cd "$(dirname "$0")/.."

export RUSTC_BOOTSTRAP=1
ALL_TARGETS=(vhd_footer vhd_header vhd_image vhdx_meta vhdx_layout qcow2_header control_command intent_record)

need_cargo_fuzz() {
  command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
}

seed() {
  cargo build --quiet --bin chainfs
  local bin="$PWD/target/debug/chainfs"
  local tmp
  tmp=$(mktemp -d /tmp/chainfs-seed.XXXXXX)
  trap 'rm -rf "$tmp"' RETURN
  local c=fuzz/corpus
  mkdir -p "$c/vhd_footer" "$c/vhd_header" "$c/vhd_image"
  # Only what this function writes: vhd_image also holds VHDX seeds.
  rm -f "$c"/vhd_footer/* "$c"/vhd_header/* "$c"/vhd_image/*.vhd
  # Data with a recognisable, non-zero pattern.
  python3 -c 'import sys; sys.stdout.buffer.write(bytes((i * 7 + 1) % 251 for i in range(6000)))' >"$tmp/data"
  (
    cd "$tmp"
    "$bin" create dyn.vhd --size 64K --block-size 4K
    "$bin" write dyn.vhd --offset 0 --input data
    "$bin" write dyn.vhd --offset 40000 --input data
    "$bin" create empty.vhd --size 32K --block-size 4K
    "$bin" create small-blocks.vhd --size 8K --block-size 512
    "$bin" write small-blocks.vhd --offset 1000 --input data
    # 2048 BAT entries: a BAT longer than a page of the cache.
    "$bin" create many-entries.vhd --size 1M --block-size 512
    "$bin" write many-entries.vhd --offset 700000 --input data
    "$bin" create fixed.vhd --size 16K --type fixed
    "$bin" write fixed.vhd --offset 100 --input data
    "$bin" create diff.vhd --parent dyn.vhd --block-size 4K
    # Partial sectors: a bitmap with some bits set.
    head -c 700 data >part
    "$bin" write diff.vhd --offset 4300 --input part
    "$bin" write diff.vhd --offset 30000 --input part
  )
  for f in dyn empty small-blocks many-entries fixed diff; do
    cp "$tmp/$f.vhd" "$c/vhd_image/$f.vhd"
    # The trailing footer of every image.
    tail -c 512 "$tmp/$f.vhd" >"$c/vhd_footer/$f.footer"
  done
  for f in dyn diff small-blocks; do
    dd if="$tmp/$f.vhd" of="$c/vhd_header/$f.header" bs=512 skip=1 count=2 status=none
  done
  local real=tests/fixtures/real/libvhdi-structs
  install -m 644 "$real/file_footer.1" "$c/vhd_footer/libvhdi-file_footer.1"
  install -m 644 "$real/dynamic_disk_header.1" "$c/vhd_header/libvhdi-dynamic_disk_header.1"
  seed_control "$c/control_command"
  seed_vhdx_layout "$c/vhdx_layout"
  seed_qcow2 "$tmp" "$c/qcow2_header"
  seed_records "$bin" "$tmp" "$c/intent_record"
  du -sh "$c"
}

# Control commands as a user writes them: each form, quoting, a write of
# several lines.
seed_control() {
  local d=$1
  mkdir -p "$d"
  rm -f "$d"/*
  printf 'help\n' >"$d/help"
  printf 'cancel 7\n' >"$d/cancel"
  printf 'cancel jobs/3\n' >"$d/cancel-jobs-path"
  printf 'merge leaf.vhdx base.vhdx\n' >"$d/merge"
  printf 'merge "my disk.avhd" /x/base.vhd keep force\n' >"$d/merge-quoted-flags"
  printf 'merge "a \\"b\\" \\\\c" base.vhd keep\n' >"$d/merge-escapes"
  printf 'help\r\ncancel 2\nmerge a.vhd b.vhd force\n' >"$d/several-lines"
}

# Patch lists over the writer's template images (the input format is in
# src/fuzzing.rs, `vhdx_layout`): each template as it is, and a damaged
# field of each structure the layout parser reads. A patch is: structure
# (0 identifier, 1-2 headers, 3-4 region tables, 5 log, 6 metadata table,
# 7 metadata items, 8 BAT), u16 LE offset in it, length, bytes.
seed_vhdx_layout() {
  local d=$1
  mkdir -p "$d"
  rm -f "$d"/*
  printf '\x00' >"$d/dynamic"
  printf '\x01' >"$d/fixed"
  printf '\x02' >"$d/logical-4k"
  printf '\x03' >"$d/differencing"
  # Header 2 (the current one, sequence 2) names a log; CRCs recomputed.
  printf '\x07\x02\x30\x00\x10ABCDEFGHIJKLMNOP' >"$d/log-guid-resealed"
  # Region table 1: the BAT at an offset far past the end; resealed.
  printf '\x04\x03\x20\x00\x08\x00\x00\x00\x00\x00\x10\x00\x00' >"$d/bat-offset-resealed"
  # File parameters: a 3 MiB block size (no power of two).
  printf '\x00\x07\x00\x00\x04\x00\x00\x30\x00' >"$d/block-size-3m"
  # Metadata table: 65535 entries.
  printf '\x00\x06\x0a\x00\x02\xff\xff' >"$d/metadata-count"
  # Parent locator (the sixth item, at +20 KiB): 65535 key/value pairs.
  printf '\x03\x07\x00\x50\x14\xff\xff' >"$d/locator-count"
  # Cut at the metadata region.
  printf '\x00\x06\x00\x00\x00' >"$d/cut-at-metadata"
}

# The first KiB of qcow2 images from qemu-img (header, extensions, backing
# name): each version and feature the header parser knows. Skipped with a
# message when qemu-img is missing.
seed_qcow2() {
  local tmp=$1 d
  if ! command -v qemu-img >/dev/null 2>&1; then
    echo "qemu-img missing: fuzz/corpus/qcow2_header left as it is" >&2
    return
  fi
  mkdir -p "$2"
  d=$(cd "$2" && pwd)
  rm -f "$d"/*
  local q="$tmp/qcow2"
  mkdir -p "$q"
  mk() {
    local name=$1
    shift
    qemu-img create -q -f qcow2 "$@" "$q/$name.qcow2" 64M
    head -c 1024 "$q/$name.qcow2" >"$d/$name"
  }
  mk v3
  mk v2 -o compat=0.10
  mk lazy-refcounts -o lazy_refcounts=on
  mk refcount-1 -o refcount_bits=1
  mk refcount-64 -o refcount_bits=64,cluster_size=2M
  mk cluster-512 -o cluster_size=512
  mk extended-l2 -o extended_l2=on,cluster_size=128k
  mk zstd -o compression_type=zstd
  truncate -s 64M "$q/base.raw"
  (cd "$q" && mk backing-raw -b base.raw -F raw)
  (cd "$q" && mk backing-qcow2 -b v3.qcow2 -F qcow2)
  (cd "$q" && mk data-file -o data_file=data.raw,data_file_raw=on)
}

# Merge records from our own writer: a real merge of diff.vhd (with a
# child, so there is a relink) into dyn.vhd, stopped by fault injection
# (CHAINFS_FAULT_AFTER, src/fault.rs) at each write point; the first
# record of each phase is kept.
seed_records() {
  local bin=$1 tmp=$2 d=$3
  mkdir -p "$d"
  rm -f "$d"/*
  local w="$tmp/records" p="$tmp/records-pristine"
  mkdir -p "$w" "$p"
  cp "$tmp/dyn.vhd" "$tmp/diff.vhd" "$p/"
  (cd "$p" && "$bin" create top.vhd --parent diff.vhd --block-size 4K >/dev/null)
  for k in $(seq 1 200); do
    rm -rf "$w"
    cp -r "$p" "$w"
    local rc=0
    (cd "$w" && CHAINFS_FAULT_AFTER=$k "$bin" merge diff.vhd dyn.vhd >/dev/null 2>&1) || rc=$?
    local rec="$w/.diff.vhd.chainfs-merge"
    if [ -f "$rec" ]; then
      local phase
      phase=$(sed -n 's/^ *"phase": "\(.*\)",*$/\1/p' "$rec")
      [ -f "$d/$phase" ] || cp "$rec" "$d/$phase"
    fi
    [ "$rc" -ne 0 ] || break
  done
  [ -n "$(ls "$d")" ] || { echo "no merge record was left by any fault point" >&2; exit 1; }
}

build() {
  need_cargo_fuzz
  (cd fuzz && cargo fuzz build --debug-assertions)
}

run() {
  local secs=$1
  shift
  local targets=("$@")
  [ ${#targets[@]} -gt 0 ] || targets=("${ALL_TARGETS[@]}")
  need_cargo_fuzz
  local found=()
  for t in "${targets[@]}"; do
    local work="fuzz/target/corpus-work/$t"
    local arts="fuzz/artifacts/$t"
    mkdir -p "$work" "$arts"
    local before
    before=$(ls "$arts" | wc -l)
    echo "== $t for ${secs}s"
    # fuzz/regressions is not an input here: a saved crash that is not
    # fixed yet would stop the run at once; tests/fuzz_replay.rs replays
    # it instead. FUZZ_ARGS adds libFuzzer options, e.g.
    # FUZZ_ARGS="-fork=1 -ignore_crashes=1" to go on past the first crash
    # (much slower per input). Paths are relative to fuzz/, where cargo
    # fuzz runs the binary.
    local rc=0
    # shellcheck disable=SC2086
    (cd fuzz && cargo fuzz run --debug-assertions "$t" "target/corpus-work/$t" "corpus/$t" -- \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 ${FUZZ_ARGS:-}) || rc=$?
    local after
    after=$(ls "$arts" | wc -l)
    if [ "$after" -gt "$before" ]; then
      found+=("$t: $((after - before)) new in $arts")
    elif [ "$rc" -ne 0 ]; then
      echo "cargo fuzz run $t failed (exit $rc) without saving a crash" >&2
      exit "$rc"
    fi
  done
  if [ ${#found[@]} -gt 0 ]; then
    printf 'crashes found:\n' >&2
    printf '  %s\n' "${found[@]}" >&2
    exit 1
  fi
}

case "${1:-}" in
  seed) seed ;;
  build) build ;;
  ''|[0-9]*) secs=${1:-60}; shift || true; run "$secs" "$@" ;;
  *) echo "usage: $0 [SECONDS] [TARGET...] | build | seed" >&2; exit 2 ;;
esac
