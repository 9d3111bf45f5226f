#!/usr/bin/env bash
# Benchmark chainfs against the tools users would pick instead, side by side on
# the same data, in one run, and write docs/BENCHMARKS.md.
#
#   1. data    a 2 GiB disk as a 3-layer chain holding ~1.7 GiB of random bytes
#              (base ~1 GiB in 8 large regions, middle ~450 MiB in 30, top
#              ~250 MiB in 100 small ones, overlapping so upper layers shadow
#              lower ones), made several ways: a VHD chain (chainfs create/write),
#              the same qcow2 chain (qemu-img create -b, qemu-io write -s), the
#              flat raw file and, with the vhdx section, a VHDX chain
#              (.vhdx/.avhdx, chainfs create/write, each layer written before
#              its child is made). The flattened views are checked equal by
#              sha256 before anything is measured.
#   2. export  chainfs export (VHD chain; VHDX chain with the vhdx section) vs
#              qemu-img convert -O raw (qcow2 chain) vs cp --sparse=always (flat
#              file); with the vhdx section also the conversion to a new VHDX
#              (chainfs export --format vhdx vs qemu-img convert -O vhdx):
#              cold, median of 3.
#   3. read    fio, psync, buffered: sequential 1 MiB and random 4 KiB, 1 and 4
#              readers, cold and warm, on (1) the flat file, (2) chainfs mount,
#              (3) vhdimount, (4) qemu-storage-daemon FUSE exports of the raw
#              file and of the qcow2 chain; peak RSS (VmHWM) of each daemon.
#              With the vhdx section: cold sequential and random reads of the
#              VHDX chain through chainfs mount and vhdimount, in the same
#              rounds. The chainfs column runs when `chainfs mount` exists.
#   4. merge   a chain base (3/8 of the disk) <- mid (1/8, 64 regions) <- leaf
#              (1/4 = 512 MiB in 1024 scattered 4 KiB-aligned regions), as VHD
#              and as qcow2: `chainfs merge leaf mid` vs `qemu-img commit` vs cp
#              of the same bytes; `chainfs merge leaf base` (through mid) vs
#              `qemu-img commit -b base`; each also with `--keep` (no delete)
#              and `--wait-free` (returns once the deleted layers' space is
#              free; by default a `chainfs-free` helper frees it after the
#              command returned, and the run records how long it took), and
#              `rm` of the merged layers alone (what the delete costs by
#              itself). Fresh copies of the images and a
#              dropped page cache before every run, median of 3, every result
#              checked against the flattened content. Then O_DIRECT sequential
#              reads of a `-o rw` mount, unloaded and while the same merge runs
#              through MNT/control.
#   5. write   fio, psync: sequential 1 MiB and random 4 KiB writes, with one
#              fsync at the end and with an fsync after every write, into a
#              fresh empty overlay on the data chain: `chainfs mount -o rw`
#              (VHD) vs qemu-storage-daemon FUSE writable=on (qcow2) vs a fresh
#              sparse file (reference). Checked first with fio verify, across
#              a remount, and `chainfs check` / `qemu-img check`.
#   6. vhdx    the VHDX parts of 1-3 (build, export, reads) when selected.
#   7. nbd     the data chain served over NBD on a Unix socket, copied with
#              `nbdcopy -C N -T N URI null:` (cold, median of BENCH_NBD_REPS):
#              nbdkit with the chainfs plugin (VHD chain, readonly=true) vs
#              qemu-nbd -r (qcow2 chain, same content), with 1, 2 and 4
#              connections; each server's copy is checked against the flat
#              file first.
#   8. qcow2   (issue 11) chainfs's qcow2 driver against qemu on qemu's own
#              images. Its parts run inside 1-4: the data chain as qcow2
#              (qemu-img create -b, qemu-io write -s) mounted by chainfs in the
#              read rounds next to qemu-storage-daemon's export of it (every
#              kind of read); chainfs export of it to raw vs qemu-img convert
#              -O raw, and to a new qcow2 (export --format qcow2, checked by
#              qemu-img check/compare) vs qemu-img convert -O qcow2; `chainfs
#              merge leaf.qcow2 base.qcow2` (and --keep) vs qemu-img commit -b
#              on the merge chain as qcow2 (the result checked by chainfs and
#              by qemu-img). Then memory: a sparse qcow2 chain of
#              BENCH_QMEM_SIZE (2 TiB), depth BENCH_QMEM_DEPTH (64), 64 KiB
#              clusters, BENCH_QMEM_WRITES (4) qemu-io writes per layer: every
#              write read back through each mount, then cold random 4 KiB reads
#              over the whole disk; peak RSS (VmHWM) of chainfs (cache from
#              BENCH_MOUNT_OPTS) and of qemu-storage-daemon.
#   9. frag    (issue 12) a fragmented chain of BENCH_FRAG_SIZE (1 GiB): a base
#              full of random bytes, two overlays each rewriting a third of the
#              disk in 1 MiB extents at random 1 MiB-aligned places; as VHDX
#              (chainfs create/write), as qcow2 (qemu-img/qemu-io) and as the
#              flat file. Cold `dd bs=1M`, fio sequential (1 and 4 readers) and
#              random 4 KiB reads of chainfs mount (VHDX) vs the flat file vs
#              qemu-storage-daemon (qcow2), with what the disk served each cold
#              sequential run (requests, size, in flight), the chain read
#              without FUSE (chainfs export to /dev/null), FUSE without chainfs
#              (bindfs, a libfuse passthrough, of the flat file) and the FUSE
#              round trip (random 4 KiB with the files behind the view in the
#              page cache); chainfs export vs
#              qemu-img convert; both overlays merged into the base: chainfs
#              merge (and --keep, --wait-free) vs qemu-img commit -d -b vs cat
#              of the merged bytes + sync.
#  10. depth   (issue 12) the same content (extents of mean 1 MiB over 3/4 of
#              BENCH_DEPTH_SIZE = 1 GiB, each in one random layer) as chains of
#              each depth in BENCH_DEPTHS (1,8,64), format BENCH_DEPTH_FORMAT
#              (vhdx), all made with chainfs create/write: cold sequential,
#              cold random (1 and 4 readers) and warm reads of each view, and
#              of the flat file; the ratio deepest / shallowest.
#  11. report  the tables, ratios and targets as markdown; each section's
#              table states the target next to the measured ratio.
#
# Needs root (drop_caches, FUSE mounts). Full run (all default sections): about
# 45 min on 2 cores (the qcow2, frag and depth sections take about 20 of
# them). Every section checks its views and results against the
# flat content first; a failed run or check is printed, named in the report
# and makes the script exit non-zero.
# Environment:
#   BENCH_QUICK=1        256 MiB and short runs (checks the script works)
#   BENCH_SIZE=1G        virtual size of the data and merge chains (K/M/G/T
#                        suffix or bytes; default 2G)
#   BENCH_DIR=DIR        where the images go (default target/bench; a run
#                        makes DIR/run.XXXXXX and removes it at the end);
#                        must be a disk file system, not tmpfs
#   BENCH_REPS=5         export and merge runs per tool (median; 3 in quick
#                        mode): single exports and merges vary most here
#   BENCH_DEPTH_REPS=5   rounds of the depth section's reads (median; its rows
#                        compare chains with each other, so they get more)
#   BENCH_NBD_REPS=7     nbdcopy runs per server and connection count (median;
#                        cold NBD copies vary more than the others)
#   BENCH_READ_REPS=3    rounds of read and write runs (median; 1 in quick mode)
#   BENCH_SECTIONS=export,read,merge,write,vhdx,nbd,qcow2,frag,depth   (any
#                        subset, comma separated; default: all)
#   BENCH_FRAG_SIZE=1G   virtual size of the frag chain (256M in quick mode)
#   BENCH_DEPTH_SIZE=1G  virtual size of the depth chains (256M in quick mode)
#   BENCH_DEPTHS=1,8,64  the chain depths of the depth section
#   BENCH_DEPTH_FORMAT=vhdx   vhd, vhdx or qcow2 (all made by chainfs)
#   BENCH_QMEM_SIZE=2T   BENCH_QMEM_DEPTH=64   BENCH_QMEM_WRITES=4   the memory
#                        test's qcow2 chain (virtual size, depth, writes per layer)
#   BENCH_MOUNT_OPTS=ro,cache=64M   options for `chainfs mount -o` (reads)
#   BENCH_KEEP=1         keep the images (and the run directory)
#   BENCH_REPORT=FILE    where the report goes (default docs/BENCHMARKS.md for a
#                        full run of the default sections at the default sizes,
#                        else DIR/BENCHMARKS.md)
#   CHAINFS=PATH         chainfs binary to use (default: cargo build --release)
#   NBD_PLUGIN=PATH      the nbdkit plugin for the nbd section (default: cargo
#                        build --release -p nbdkit-chainfs-plugin)
#   BENCH_NOTE_BINARY=TEXT  where that binary comes from, for the report
#
# It mounts only under its run directory, kills only the daemons it started
# (by pid), and uses no loop devices.
set -euo pipefail
export LC_ALL=C

REPO=$(cd "$(dirname "$0")/.." && pwd)
HELPER=$REPO/scripts/bench/helper.py
T_START=$EPOCHREALTIME

die() {
  echo "bench.sh: ERROR: $*" >&2
  exit 1
}
say() { printf '%s\n' "$*"; }

to_bytes() {
  local v=${1^^}
  case $v in
    *K) echo $((${v%K} << 10)) ;;
    *M) echo $((${v%M} << 20)) ;;
    *G) echo $((${v%G} << 30)) ;;
    *T) echo $((${v%T} << 40)) ;;
    *[0-9]) echo $((v)) ;;
    *) die "cannot parse size '$1'" ;;
  esac
}

QUICK=${BENCH_QUICK:-0}
if [ "$QUICK" = 1 ]; then
  SIZE_ARG=${BENCH_SIZE:-256M}
  SEQ_CAP=5 WARM_RT=2 RAND_IOS=4000 RAND_CAP=5 VERIFY_PROBES=16 READ_REPS=${BENCH_READ_REPS:-1}
  W_CAP=3 RAND_W_IOS=4000 VERIFY_W=8M
else
  SIZE_ARG=${BENCH_SIZE:-2G}
  SEQ_CAP=12 WARM_RT=3 RAND_IOS=40000 RAND_CAP=8 VERIFY_PROBES=32 READ_REPS=${BENCH_READ_REPS:-3}
  W_CAP=6 RAND_W_IOS=40000 VERIFY_W=32M
fi
disk_size() { # NAME VALUE: a virtual size for the bench, a multiple of 4 MiB, >= 64 MiB
  local b
  b=$(to_bytes "$2")
  if [ $((b % (4 << 20))) -ne 0 ] || [ "$b" -lt $((64 << 20)) ]; then
    die "$1 must be a multiple of 4 MiB and at least 64 MiB"
  fi
  echo "$b"
}
SIZE=$(disk_size BENCH_SIZE "$SIZE_ARG")
FSIZE=$(disk_size BENCH_FRAG_SIZE "${BENCH_FRAG_SIZE:-$([ "$QUICK" = 1 ] && echo 256M || echo 1G)}")
DSIZE=$(disk_size BENCH_DEPTH_SIZE "${BENCH_DEPTH_SIZE:-$([ "$QUICK" = 1 ] && echo 256M || echo 1G)}")
DEPTHS=${BENCH_DEPTHS:-1,8,64}
[[ $DEPTHS =~ ^[1-9][0-9]*(,[1-9][0-9]*)+$ ]] || die "BENCH_DEPTHS=$DEPTHS: give two or more depths, comma separated (e.g. 1,8,64)"
DFMT=${BENCH_DEPTH_FORMAT:-vhdx}
case $DFMT in vhd | vhdx | qcow2) ;; *) die "BENCH_DEPTH_FORMAT=$DFMT: vhd, vhdx or qcow2" ;; esac
QMSIZE=$(disk_size BENCH_QMEM_SIZE "${BENCH_QMEM_SIZE:-2T}")
QMDEPTH=${BENCH_QMEM_DEPTH:-64}
QMWRITES=${BENCH_QMEM_WRITES:-4}
[[ $QMDEPTH =~ ^[1-9][0-9]*$ && $QMWRITES =~ ^[1-9][0-9]*$ ]] || die "BENCH_QMEM_DEPTH and BENCH_QMEM_WRITES must be positive numbers"
REPS=${BENCH_REPS:-$([ "$QUICK" = 1 ] && echo 3 || echo 5)}
DEPTH_REPS=${BENCH_DEPTH_REPS:-$([ "$QUICK" = 1 ] && echo 1 || echo 5)}
[[ $DEPTH_REPS =~ ^[1-9][0-9]*$ ]] || die "BENCH_DEPTH_REPS must be a positive number"
NBD_REPS=${BENCH_NBD_REPS:-$([ "$QUICK" = 1 ] && echo 1 || echo 7)}
[[ $NBD_REPS =~ ^[1-9][0-9]*$ ]] || die "BENCH_NBD_REPS must be a positive number"
ALL_SECTIONS="export, read, merge, write, vhdx, nbd, qcow2, frag, depth"
SECTIONS=${BENCH_SECTIONS:-export,read,merge,write,vhdx,nbd,qcow2,frag,depth}
for sec in ${SECTIONS//,/ }; do
  case $sec in
    export | read | merge | write | vhdx | nbd | qcow2 | frag | depth) ;;
    *) die "unknown section '$sec' in BENCH_SECTIONS ($ALL_SECTIONS)" ;;
  esac
done
has() { [[ ",$SECTIONS," == *,$1,* ]]; }
MOUNT_OPTS=${BENCH_MOUNT_OPTS:-ro,cache=64M}
BENCH_DIR=${BENCH_DIR:-$REPO/target/bench}
if [ -n "${BENCH_REPORT:-}" ]; then
  REPORT=$BENCH_REPORT
elif [ "$QUICK" != 1 ] && [ "$SIZE" -eq $((2 << 30)) ] && [ "$FSIZE" -eq $((1 << 30)) ] &&
  [ "$DSIZE" -eq $((1 << 30)) ] && [ "$DEPTHS" = 1,8,64 ] && [ "$QMSIZE" -eq $((2 << 40)) ] &&
  has export && has read && has merge && has write && has vhdx && has nbd && has qcow2 && has frag && has depth; then
  REPORT=$REPO/docs/BENCHMARKS.md
else
  REPORT=$BENCH_DIR/BENCHMARKS.md
fi
CACHE_MIB=64
case ",$MOUNT_OPTS," in
  *,cache=*)
    c=${MOUNT_OPTS#*cache=}
    CACHE_MIB=$(($(to_bytes "${c%%,*}") >> 20))
    ;;
esac

# ------------------------------------------------------------------ checks
[ "$(id -u)" -eq 0 ] || die "run as root (needs drop_caches and FUSE mounts)"
[ -c /dev/fuse ] || die "/dev/fuse is missing (modprobe fuse)"
need() {
  command -v "$1" >/dev/null 2>&1 ||
    die "missing tool '$1' (Debian package $2; scripts/deps.sh installs the benchmark tools)"
}
need qemu-img qemu-utils
need qemu-io qemu-utils
need qemu-storage-daemon qemu-utils
need vhdimount libvhdi-utils
need fio fio
need fusermount3 fuse3
need findmnt util-linux
need python3 python3
if has nbd; then
  need nbdkit nbdkit
  need nbdcopy libnbd-bin
  need nbdinfo libnbd-bin
  need qemu-nbd qemu-utils
fi
has frag && need bindfs bindfs # FUSE without chainfs, for the fragmented chain's limits
python3 -c 'import hashlib, json, statistics' || die "python3 lacks its standard library"

mkdir -p "$BENCH_DIR"
FSTYPE=$(stat -f -c %T "$BENCH_DIR")
case $FSTYPE in
  tmpfs | ramfs) die "BENCH_DIR=$BENCH_DIR is on $FSTYPE; use a directory on the disk (same disk as /work)" ;;
esac

# The binary: copied into the run directory, so that a concurrent cargo build
# cannot swap it in the middle of the run.
BUILT=0
if [ -z "${CHAINFS:-}" ]; then
  BUILT=1
  need cargo cargo
  say "== building chainfs (cargo build --release)"
  (cd "$REPO" && cargo build --release --quiet) || die "cargo build --release failed"
  CHAINFS=$REPO/target/release/chainfs
fi
[ -x "$CHAINFS" ] || die "chainfs binary '$CHAINFS' not found"
if has nbd && [ -z "${NBD_PLUGIN:-}" ]; then
  need cargo cargo
  say "== building the nbdkit plugin (cargo build --release -p nbdkit-chainfs-plugin)"
  (cd "$REPO" && cargo build --release --quiet -p nbdkit-chainfs-plugin) || die "building the nbdkit plugin failed"
  NBD_PLUGIN=$REPO/target/release/libnbdkit_chainfs_plugin.so
fi
if has nbd; then
  [ -f "$NBD_PLUGIN" ] || die "nbdkit plugin '$NBD_PLUGIN' not found"
fi

# ------------------------------------------------------------------ run dir, cleanup
W=$(mktemp -d "$BENCH_DIR/run.XXXXXX")
IMG=$W/img
MNT=$W/mnt
OUTD=$W/out
FIOD=$W/fio
LOGD=$W/log
mkdir -p "$IMG" "$MNT" "$OUTD" "$FIOD" "$LOGD"
RES=$W/results.tsv
: >"$RES"
cp "$CHAINFS" "$W/chainfs"
CH=$W/chainfs

PIDS=() # daemons this script started
MNTS=() # mount points this script created
FAILURES=0

mounted() { findmnt -n -M "$1" >/dev/null 2>&1; }

stop_pid() { # pid: TERM, then KILL after 10 s; only pids we started
  local p=$1 i
  [ -n "$p" ] || return 0
  kill -0 "$p" 2>/dev/null || {
    wait "$p" 2>/dev/null || true
    return 0
  }
  kill -TERM "$p" 2>/dev/null || true
  for i in $(seq 100); do
    kill -0 "$p" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$p" 2>/dev/null; then
    echo "bench.sh: pid $p ignored SIGTERM for 10 s; sending SIGKILL" >&2
    kill -KILL "$p" 2>/dev/null || true
  fi
  wait "$p" 2>/dev/null || true
}

cleanup() {
  local rc=$? m p
  set +e
  trap - EXIT INT TERM
  for m in "${MNTS[@]}"; do
    [ -n "$m" ] || continue
    if mounted "$m"; then
      fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
    fi
  done
  for p in "${PIDS[@]}"; do stop_pid "$p"; done
  for m in "${MNTS[@]}"; do
    [ -n "$m" ] && mounted "$m" && { umount -l "$m" 2>/dev/null || echo "bench.sh: could not unmount $m" >&2; }
  done
  if [ "${BENCH_KEEP:-0}" = 1 ]; then
    say "kept the run directory: $W"
  elif findmnt -rn -o TARGET | grep -q "^$W/"; then
    echo "bench.sh: something is still mounted under $W; not removing it" >&2
  else
    rm -rf "$W"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "bench.sh: interrupted" >&2; exit 130' INT TERM

rec() { printf '%s\t%s\n' "$1" "$2" >>"$RES"; }
logcmd() { rec cmd "$*"; }
drop_caches() {
  sync
  echo 3 >/proc/sys/vm/drop_caches
  # And compact free memory, so every target starts from the same state
  # (page cache folio sizes depend on how fragmented free memory is, and
  # warm reads on those sizes), not from what the runs before it left.
  echo 1 >/proc/sys/vm/compact_memory 2>/dev/null || true
}
rotated() { # round items...: ORDER = the items, rotated left by round - 1 (the
  # order of runs changes from round to round, so no item always runs first)
  local r=$1 i
  shift
  ORDER=()
  for ((i = 0; i < $#; i++)); do
    ORDER+=("${@:$(((i + r - 1) % $# + 1)):1}")
  done
}
shuffled() { # round items...: ORDER = the items in an order drawn for this
  # round (the same for the same round in every run). Exports and merges
  # use it: every run follows the deletion of another run's large output
  # or layers, and a rotation, which keeps every tool behind the same
  # neighbour, would give one tool the same neighbour's after-effects in
  # every round.
  local r=$1
  shift
  mapfile -t ORDER < <(printf '%s\n' "$@" | awk -v seed="$r" '
    { a[NR] = $0 }
    END { srand(seed); for (i = NR; i > 1; i--) { j = int(rand() * i) + 1; t = a[i]; a[i] = a[j]; a[j] = t }
      for (i = 1; i <= NR; i++) print a[i] }')
}
secs_since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }'; }
alloc_mib() { du -B1M "$1" | cut -f1; }

# ------------------------------------------------------------------ meta
rec meta.quick "$QUICK"
rec meta.warm_rt "$WARM_RT"
rec meta.workdir "$W"
rec meta.size_bytes "$SIZE"
rec meta.reps "$REPS"
rec meta.cache_mib "$CACHE_MIB"
rec meta.date "$(date -u '+%Y-%m-%d %H:%M UTC')"
# shellcheck disable=SC1091
rec meta.machine "$(nproc) cores ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)), $(awk '/MemTotal/ { printf "%.1f GiB RAM", $2 / 1048576 }' /proc/meminfo), $(. /etc/os-release && echo "$PRETTY_NAME")"
rec meta.kernel "$(uname -r)"
rec meta.disk "$(findmnt -n -o FSTYPE -T "$BENCH_DIR") ($(findmnt -n -o OPTIONS -T "$BENCH_DIR")) on $(df --output=source "$BENCH_DIR" | tail -1) (the work dir: BENCH_DIR)"
rec meta.disk_opts "$(findmnt -n -o OPTIONS -T "$BENCH_DIR")"
rev=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ "$BUILT" = 0 ]; then
  rev="$rev is the repository's HEAD; the binary was given by CHAINFS"
elif [ -n "$(git -C "$REPO" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]; then
  rev="$rev + uncommitted changes in src/ or Cargo.* (the binary was built from the working tree)"
fi
[ -n "${BENCH_NOTE_BINARY:-}" ] && rev="$rev; $BENCH_NOTE_BINARY"
rec meta.chainfs "git $rev, binary $CHAINFS ($("$CH" --version 2>/dev/null || echo '?'); run as a copy, \$W/chainfs)"
rec meta.qemu "$(qemu-img --version | head -1)"
rec meta.libvhdi "$(vhdimount -V 2>&1 | grep -m1 vhdimount)"
rec meta.fio "$(fio --version)"
rec meta.fuse "$(fusermount3 -V 2>&1)"
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
rec meta.load "$LOAD"
if awk -v l="${LOAD%% *}" -v n="$(nproc)" 'BEGIN { exit !(l > n / 4) }'; then
  rec meta.note "Other work was running on this machine (load average $LOAD at the start, $(nproc) cores): the numbers are noisy. Re-run on a quiet machine before judging the targets."
fi

say "== chainfs benchmark ($SECTIONS): $((SIZE >> 20)) MiB virtual$(has frag && echo ", frag $((FSIZE >> 20)) MiB")$(has depth && echo ", depth $((DSIZE >> 20)) MiB"), work dir $W$([ "$QUICK" = 1 ] && echo ', QUICK mode')"

# ------------------------------------------------------------------ 1. data
if has export || has read || has write || has vhdx || has nbd || has qcow2; then
  say "== 1. data: VHD chain, qcow2 chain and flat file with the same bytes"
  t=$EPOCHREALTIME
  python3 "$HELPER" build "$IMG" "$SIZE" "$CH" "$RES" "$(has vhdx && echo vhdx)"
  say "   built in $(secs_since "$t") s"
  DATA=$(python3 - "$IMG/layout.json" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
M = 1 << 20
parts = ", ".join(f"{l['name']} {len(l['regions'])} regions / {l['bytes'] // M} MiB" for l in j["layers"])
print(f"{j['size'] // M} MiB virtual disk, 3 layers: {parts}; {j['written'] // M} MiB of random bytes "
      f"written in all, {j['visible'] // M} MiB visible in the flat image (the rest reads as zeros). "
      "Offsets and lengths are multiples of 4 KiB but not of the VHD block (2 MiB) or qcow2 cluster (64 KiB), "
      "so regions straddle blocks and upper layers partly shadow lower ones.")
EOF
  )
  VX=""
  has vhdx && VX="base.vhdx mid.avhdx top.avhdx"
  # shellcheck disable=SC2086
  files=$(cd "$IMG" && for f in base.vhd mid.vhd top.vhd base.qcow2 mid.qcow2 top.qcow2 $VX raw.img; do
    printf '%s %s MiB, ' "$f" "$(alloc_mib "$f")"
  done)
  rec meta.data "$DATA Allocated on disk: ${files%, }. VHD: dynamic, 2 MiB blocks (chainfs defaults); qcow2: qemu-img defaults (64 KiB clusters)$(has vhdx && echo '; VHDX: chainfs defaults, as Hyper-V makes them (base dynamic with 32 MiB blocks, .avhdx differencing with 2 MiB blocks, 512-byte logical sectors)')."

  say "   verifying: sha256 of the flat file, of chainfs export (VHD chain) and of qemu-img convert (qcow2 chain)"
  logcmd "python3 scripts/bench/helper.py sha256 \$W/img/raw.img   # hashlib (OpenSSL), ~1 GB/s"
  logcmd "chainfs export \$W/img/top.vhd \$W/out/verify.raw; python3 scripts/bench/helper.py sha256 \$W/out/verify.raw"
  logcmd "qemu-img convert -f qcow2 -O raw \$W/img/top.qcow2 \$W/out/verify.raw; python3 scripts/bench/helper.py sha256 \$W/out/verify.raw"
  logcmd "python3 scripts/bench/helper.py compare \$W/img/raw.img FILE \$W/img/layout.json $VERIFY_PROBES   # each mounted view: every region edge + $VERIFY_PROBES random MiB"
  h_raw=$(python3 "$HELPER" sha256 "$IMG/raw.img" | cut -d' ' -f1)
  "$CH" export "$IMG/top.vhd" "$OUTD/verify.raw" >/dev/null || die "chainfs export of the VHD chain failed"
  h_vhd=$(python3 "$HELPER" sha256 "$OUTD/verify.raw" | cut -d' ' -f1)
  rm -f "$OUTD/verify.raw"
  qemu-img convert -f qcow2 -O raw "$IMG/top.qcow2" "$OUTD/verify.raw" || die "qemu-img convert of the qcow2 chain failed"
  h_q=$(python3 "$HELPER" sha256 "$OUTD/verify.raw" | cut -d' ' -f1)
  rm -f "$OUTD/verify.raw"
  say "   flat $h_raw"
  say "   vhd  $h_vhd"
  say "   qcow $h_q"
  [ "$h_raw" = "$h_vhd" ] || die "the VHD chain (chainfs export) differs from the flat file"
  [ "$h_raw" = "$h_q" ] || die "the qcow2 chain (qemu-img convert) differs from the flat file"
  vx_verify=""
  if has vhdx; then
    logcmd "chainfs export \$W/img/top.avhdx \$W/out/verify.raw; python3 scripts/bench/helper.py sha256 \$W/out/verify.raw"
    "$CH" export "$IMG/top.avhdx" "$OUTD/verify.raw" >/dev/null || die "chainfs export of the VHDX chain failed"
    h_x=$(python3 "$HELPER" sha256 "$OUTD/verify.raw" | cut -d' ' -f1)
    rm -f "$OUTD/verify.raw"
    say "   vhdx $h_x"
    [ "$h_raw" = "$h_x" ] || die "the VHDX chain (chainfs export) differs from the flat file"
    "$CH" check "$IMG/top.avhdx" >"$LOGD/check-vhdx.log" 2>&1 || die "chainfs check of the VHDX chain failed (see $LOGD/check-vhdx.log)"
    vx_verify=", \`chainfs export\` of the VHDX chain (which \`chainfs check\` passes)"
  fi
  if has qcow2; then
    # chainfs's own reading of the qcow2 chain qemu-io wrote, and its qcow2
    # writer (export --format qcow2) judged by qemu-img, before any timing.
    logcmd "chainfs export \$W/img/top.qcow2 \$W/out/verify.raw; python3 scripts/bench/helper.py sha256 \$W/out/verify.raw"
    "$CH" export "$IMG/top.qcow2" "$OUTD/verify.raw" >/dev/null || die "chainfs export of the qcow2 chain failed"
    h_cq=$(python3 "$HELPER" sha256 "$OUTD/verify.raw" | cut -d' ' -f1)
    rm -f "$OUTD/verify.raw"
    say "   qcow (chainfs export) $h_cq"
    [ "$h_raw" = "$h_cq" ] || die "chainfs export of the qcow2 chain differs from the flat file"
    "$CH" check "$IMG/top.qcow2" >"$LOGD/check-qcow2.log" 2>&1 || die "chainfs check of the qcow2 chain failed (see $LOGD/check-qcow2.log)"
    logcmd "chainfs export \$W/img/top.qcow2 \$W/out/verify.qcow2 --format qcow2; qemu-img check -q \$W/out/verify.qcow2; qemu-img compare -q -f qcow2 -F raw \$W/out/verify.qcow2 \$W/img/raw.img"
    "$CH" export "$IMG/top.qcow2" "$OUTD/verify.qcow2" --format qcow2 >/dev/null || die "chainfs export --format qcow2 of the qcow2 chain failed"
    qemu-img check -q -f qcow2 "$OUTD/verify.qcow2" || die "qemu-img check finds chainfs's qcow2 export broken"
    qemu-img compare -q -f qcow2 -F raw "$OUTD/verify.qcow2" "$IMG/raw.img" || die "chainfs's qcow2 export differs from the flat file (qemu-img compare)"
    rm -f "$OUTD/verify.qcow2"
    vx_verify="$vx_verify, \`chainfs export\` of the qcow2 chain (which \`chainfs check\` passes; its export to a new qcow2 passes \`qemu-img check\` and \`qemu-img compare\` with the flat file)"
  fi
  rec meta.verify "sha256 $h_raw for the flat file, \`chainfs export\` of the VHD chain$vx_verify and \`qemu-img convert\` of the qcow2 chain (each mounted view is also probed against the flat file before it is measured)."
else
  rec meta.verify "not needed (BENCH_SECTIONS=$SECTIONS)"
fi

# ------------------------------------------------------------------ 2. export
OUT=$OUTD/export.raw
VSIZE=$SIZE # the virtual size of the images being measured (each section sets its own)
export_argv() { # tool: its command, as the array EXA
  case $1 in
    chainfs) EXA=("$CH" export "$IMG/top.vhd" "$OUT" --force) ;;
    chainfs_vhdx) EXA=("$CH" export "$IMG/top.avhdx" "$OUT" --force) ;;
    chainfs_to_vhdx) EXA=("$CH" export "$IMG/top.avhdx" "$OUT" --format vhdx --force) ;;
    chainfs_qcow2) EXA=("$CH" export "$IMG/top.qcow2" "$OUT" --force) ;;
    chainfs_q2q) EXA=("$CH" export "$IMG/top.qcow2" "$OUT" --format qcow2 --force) ;;
    qemu_to_vhdx) EXA=(qemu-img convert -f qcow2 -O vhdx "$IMG/top.qcow2" "$OUT") ;;
    qemu_q2q) EXA=(qemu-img convert -f qcow2 -O qcow2 "$IMG/top.qcow2" "$OUT") ;;
    qemu) EXA=(qemu-img convert -f qcow2 -O raw "$IMG/top.qcow2" "$OUT") ;;
    qemu_w) EXA=(qemu-img convert -f qcow2 -O raw -m 8 -W "$IMG/top.qcow2" "$OUT") ;;
    cp) EXA=(cp --sparse=always "$IMG/raw.img" "$OUT") ;;
    f_chainfs) EXA=("$CH" export "$FW/top.avhdx" "$OUT" --force) ;;
    f_qemu) EXA=(qemu-img convert -f qcow2 -O raw "$FW/top.qcow2" "$OUT") ;;
    *) die "unknown export tool $1" ;;
  esac
}
export_cmd() { export_argv "$1" && "${EXA[@]}" >/dev/null; }
export_log() {
  export_argv "$1"
  local c="${EXA[*]}"
  c=${c//"$CH"/chainfs}
  logcmd "drop; ${c//"$W"/\$W}; sync \$W/out/export.raw"
}
# The work dir's disk as /proc/diskstats names it (empty if it has no line
# there): what an export moved through it and how busy it kept it tell
# whether a tool waits for the disk or for itself.
DISK=$(basename "$(findmnt -n -o SOURCE -T "$BENCH_DIR")")
awk -v d="$DISK" '$3 == d { f = 1 } END { exit !f }' /proc/diskstats || DISK=""
[ -z "$DISK" ] || rec meta.disk_dev "$DISK"
disk_snap() { # read requests completed, sectors read, sectors written, ms busy (io_ticks), ms weighted (time x requests in flight)
  [ -z "$DISK" ] || awk -v d="$DISK" '$3 == d { print $4, $6, $10, $13, $14 }' /proc/diskstats
}
disk_delta() { # $1 $2 snapshots, $3 seconds: MiB read, MiB written, busy fraction
  awk -v a="$1" -v b="$2" -v s="$3" 'BEGIN { split(a, x, " "); split(b, y, " ");
    printf "%.0f %.0f %.3f", (y[2] - x[2]) / 2048, (y[3] - x[3]) / 2048, (y[4] - x[4]) / 1000 / s }'
}
with_disk() { # key command...: run it; record what the disk served it as "requests MiB busy-fraction in-flight"
  local key=$1 d0 t0 s
  shift
  d0=$(disk_snap) t0=$EPOCHREALTIME
  "$@"
  s=$(secs_since "$t0")
  [ -z "$d0" ] || rec "$key" "$(awk -v a="$d0" -v b="$(disk_snap)" -v s="$s" 'BEGIN { split(a, x, " "); split(b, y, " ");
    busy = y[4] - x[4];
    f = busy > 0 ? (y[5] - x[5]) / busy : 0;
    printf "%d %.0f %.3f %.1f", y[1] - x[1], (y[2] - x[2]) / 2048, busy / 1000 / s, f }')"
}
export_loop() { # tools...: REPS rounds, every tool in each round, cold
  local tool rep s d0
  for tool in "$@"; do export_log "$tool"; done
  for rep in $(seq "$REPS"); do
    shuffled "$rep" "$@"
    for tool in "${ORDER[@]}"; do
      rm -f "$OUT"
      drop_caches
      d0=$(disk_snap)
      t=$EPOCHREALTIME
      if export_cmd "$tool" && sync "$OUT"; then
        s=$(secs_since "$t")
        rec "export.$tool.s" "$s"
        [ -z "$d0" ] || rec "export.$tool.disk" "$(disk_delta "$d0" "$(disk_snap)" "$s")"
        rec "export.$tool.alloc_mib" "$(alloc_mib "$OUT")"
        printf '   run %d  %-15s %7.2f s  %7.0f MiB/s\n' "$rep" "$tool" "$s" \
          "$(awk -v s="$s" -v z="$VSIZE" 'BEGIN { print z / 1048576 / s }')"
      else
        echo "bench.sh: FAILED: export with $tool" >&2
        rec "export.$tool.s" FAILED
        FAILURES=$((FAILURES + 1))
      fi
    done
  done
  rm -f "$OUT"
}
# The vhdx and qcow2 sections add their exports to these rounds.
QX_TOOLS=()
has qcow2 && QX_TOOLS=(chainfs_qcow2 chainfs_q2q qemu_q2q)
if has export; then
  say "== 2. export: cold, $REPS runs each, MiB/s of the $((SIZE >> 20)) MiB virtual size"
  if has vhdx; then
    export_loop chainfs chainfs_vhdx chainfs_to_vhdx qemu qemu_to_vhdx qemu_w cp "${QX_TOOLS[@]}"
  else
    export_loop chainfs qemu qemu_w cp "${QX_TOOLS[@]}"
  fi
else
  x=()
  has vhdx && x+=(chainfs chainfs_vhdx)
  has qcow2 && x+=(chainfs_qcow2 qemu chainfs_q2q qemu_q2q)
  if [ ${#x[@]} -gt 0 ]; then
    say "== 2. export (for the $(has vhdx && echo 'vhdx ')$(has qcow2 && echo 'qcow2 ')section): ${x[*]}, cold, $REPS runs each"
    export_loop "${x[@]}"
  fi
fi

# ------------------------------------------------------------------ 3. read
HAVE_MOUNT=0
if "$CH" mount --help >/dev/null 2>&1; then
  HAVE_MOUNT=1
else
  rec meta.chainfs_mount_why "\`chainfs mount --help\`: $("$CH" mount --help 2>&1 | head -1)"
fi
rec meta.chainfs_mount "$HAVE_MOUNT"

TFILE="" TPID="" TMP=""
RW_OPTS="rw,cache=${CACHE_MIB}M"
MW=$W/merge/work WD=$W/write
FD=$W/frag FW=$W/frag/work DD=$W/depth QD=$W/qmem QLEAF=""
declare -A RSS LOGGED

wait_mount() { # the daemon TPID must show TFILE, VSIZE bytes, on a FUSE mount at TMP
  local t=$1 i
  for i in $(seq 200); do
    if ! kill -0 "$TPID" 2>/dev/null; then
      tail -20 "$LOGD/$t.log" >&2
      echo "bench.sh: ERROR: $t: the daemon exited before its mount appeared (log above: $LOGD/$t.log)" >&2
      stop_target "$t"
      return 1
    fi
    if findmnt -n -o FSTYPE -M "$TMP" 2>/dev/null | grep -q '^fuse' &&
      [ -f "$TFILE" ] && [ "$(stat -c %s "$TFILE")" = "$VSIZE" ]; then
      return 0
    fi
    sleep 0.1
  done
  tail -20 "$LOGD/$t.log" >&2
  echo "bench.sh: ERROR: $t: $TFILE did not appear as a $VSIZE-byte file on a FUSE mount at $TMP within 20 s" >&2
  stop_target "$t"
  return 1
}

mount_chainfs() { # target leaf options: chainfs mount -f LEAF $MNT/TARGET in the background
  TMP=$MNT/$1 TFILE=$MNT/$1/disk.raw
  mkdir -p "$TMP"
  "$CH" mount -f "$2" "$TMP" -o "$3" >>"$LOGD/$1.log" 2>&1 &
  TPID=$!
  logcmd "chainfs mount -f ${2//"$W"/\$W} \$W/mnt/$1 -o $3 &   # file: \$W/mnt/$1/disk.raw"
}

export_qsd() { # target image raw|qcow2: a read-only qemu-storage-daemon FUSE export at $MNT/TARGET
  local bd
  TMP=$MNT/$1 TFILE=$MNT/$1
  : >"$TMP"
  if [ "$3" = raw ]; then
    bd=(--blockdev "driver=file,node-name=f0,filename=$2,read-only=on"
      --blockdev "driver=raw,node-name=n0,file=f0,read-only=on")
  else
    bd=(--blockdev "driver=qcow2,node-name=n0,read-only=on,file.driver=file,file.filename=$2")
  fi
  qemu-storage-daemon "${bd[@]}" \
    --export "type=fuse,id=e0,node-name=n0,mountpoint=$TMP,writable=off" >>"$LOGD/$1.log" 2>&1 &
  TPID=$!
  logcmd "qemu-storage-daemon ${bd[*]//"$W"/\$W} --export type=fuse,id=e0,node-name=n0,mountpoint=\$W/mnt/$1,writable=off &"
}

start_target() {
  local t=$1
  TPID="" TMP=""
  case $t in
    raw | f_raw | d_raw | w_raw) # plain files, read directly
      case $t in
        raw) TFILE=$IMG/raw.img ;;
        f_raw) TFILE=$FD/raw.img ;;
        d_raw) TFILE=$DD/raw.img ;;
        w_raw) TFILE=$WD/raw.img ;;
      esac
      return 0
      ;;
    chainfs) mount_chainfs "$t" "$IMG/top.vhd" "$MOUNT_OPTS" ;;
    chainfs_vhdx) mount_chainfs "$t" "$IMG/top.avhdx" "$MOUNT_OPTS" ;; # the same content as VHDX
    chainfs_qcow2) mount_chainfs "$t" "$IMG/top.qcow2" "$MOUNT_OPTS" ;; # the same content as qcow2 (qemu-io made it)
    f_chainfs) mount_chainfs "$t" "$FW/top.avhdx" "$MOUNT_OPTS" ;;
    f_fuse) mount_chainfs "$t" "$FD/raw.img" "$MOUNT_OPTS" ;; # the flat file through chainfs: what FUSE alone costs
    f_bindfs) # the flat file through a libfuse passthrough: FUSE without chainfs
      TMP=$MNT/f_bindfs TFILE=$MNT/f_bindfs/raw.img
      mkdir -p "$TMP"
      bindfs -f -r "$FD" "$TMP" >>"$LOGD/$t.log" 2>&1 &
      TPID=$!
      logcmd "bindfs -f -r \$W/frag \$W/mnt/f_bindfs &   # file: \$W/mnt/f_bindfs/raw.img (bindfs's defaults)"
      ;;
    depth*) mount_chainfs "$t" "$(python3 "$HELPER" layoutinfo "$DD/layout.json" "leaf${t#depth}")" "$MOUNT_OPTS" ;;
    qm_chainfs) mount_chainfs "$t" "$QLEAF" "$MOUNT_OPTS" ;;
    vhdimount | vhdimount_vhdx)
      local top=top.vhd dir=vhdi
      [ "$t" = vhdimount_vhdx ] && top=top.avhdx dir=vhdi_vhdx
      TMP=$MNT/$dir TFILE=$MNT/$dir/vhdi3
      mkdir -p "$TMP"
      # libvhdi opens a parent as <the child's folder>/<the parent name in the
      # header>, even when that name is absolute (chainfs stores absolute
      # names): so it gets a bare file name, from the image folder.
      (cd "$IMG" && exec vhdimount -v "$top" "$TMP") >>"$LOGD/$t.log" 2>&1 &
      TPID=$!
      logcmd "(cd \$W/img && vhdimount -v $top \$W/mnt/$dir) &   # file: \$W/mnt/$dir/vhdi3 (the flattened top of 3 layers)"
      ;;
    qsd_raw) export_qsd "$t" "$IMG/raw.img" raw ;;
    qsd_qcow2) export_qsd "$t" "$IMG/top.qcow2" qcow2 ;;
    f_qsd) export_qsd "$t" "$FW/top.qcow2" qcow2 ;;
    qm_qsd) export_qsd "$t" "$QLEAF" qcow2 ;;
    m_chainfs) # the merge chain's leaf, writable (merges need -o rw)
      TMP=$MNT/merge TFILE=$MNT/merge/disk.raw
      mkdir -p "$TMP"
      "$CH" mount -f "$MW/leaf.vhd" "$TMP" -o "$RW_OPTS" >>"$LOGD/$t.log" 2>&1 &
      TPID=$!
      logcmd "chainfs mount -f \$W/merge/work/leaf.vhd \$W/mnt/merge -o $RW_OPTS &"
      ;;
    w_chainfs) mount_chainfs "$t" "$WD/ovl.vhd" "$RW_OPTS" ;;
    w_qsd)
      TMP=$MNT/w_qsd TFILE=$MNT/w_qsd
      : >"$TMP"
      qemu-storage-daemon --blockdev "driver=qcow2,node-name=n0,file.driver=file,file.filename=$WD/ovl.qcow2" \
        --export "type=fuse,id=e0,node-name=n0,mountpoint=$TMP,writable=on" >>"$LOGD/$t.log" 2>&1 &
      TPID=$!
      logcmd "qemu-storage-daemon --blockdev driver=qcow2,node-name=n0,file.driver=file,file.filename=\$W/write/ovl.qcow2 --export type=fuse,id=e0,node-name=n0,mountpoint=\$W/mnt/w_qsd,writable=on &"
      ;;
    *) die "unknown target $t" ;;
  esac
  PIDS+=("$TPID")
  MNTS+=("$TMP")
  wait_mount "$t"
}

fail_target() { # target reason: loud, recorded, and the run exits non-zero
  echo "bench.sh: ERROR: $1: $2; not measuring it" >&2
  rec "meta.failed.$1" "$2"
  FAILURES=$((FAILURES + 1))
}

stop_target() {
  local t=$1 hwm p keep=()
  [ -n "$TPID" ] || return 0
  hwm=$(awk '/^VmHWM/ { print $2 }' "/proc/$TPID/status" 2>/dev/null || true)
  if [ -n "$hwm" ] && [ "$hwm" -gt "${RSS[$t]:-0}" ]; then RSS[$t]=$hwm; fi
  case $t in
    qsd_* | w_qsd) stop_pid "$TPID" ;; # qemu-storage-daemon stays up without its export
    *)
      mounted "$TMP" && { fusermount3 -u "$TMP" || echo "bench.sh: fusermount3 -u $TMP failed" >&2; }
      for _ in $(seq 50); do
        kill -0 "$TPID" 2>/dev/null || break
        sleep 0.1
      done
      stop_pid "$TPID"
      ;;
  esac
  if mounted "$TMP"; then
    fusermount3 -u "$TMP" 2>/dev/null || umount -l "$TMP"
  fi
  for p in "${PIDS[@]}"; do [ "$p" = "$TPID" ] || keep+=("$p"); done
  PIDS=("${keep[@]}")
  TPID=""
}

FIO_COMMON=(--ioengine=psync --direct=0 --invalidate=0 --readonly --group_reporting --output-format=json)
FIO_WCOMMON=(--ioengine=psync --direct=0 --invalidate=0 --group_reporting --output-format=json)
fio_run() { # target metric fio-args...   (FIO_MODE=write: a write job, results as write.T.M)
  local t=$1 m=$2 out kind=${FIO_MODE:-read}
  shift 2
  local common=("${FIO_COMMON[@]}")
  [ "$kind" = write ] && common=("${FIO_WCOMMON[@]}")
  local j=$FIOD/$t.$m.$EPOCHSECONDS.json
  LAST_IO=$VSIZE
  if [ -z "${LOGGED[$kind.$m.$VSIZE]:-}" ]; then
    LOGGED[$kind.$m.$VSIZE]=1
    logcmd "fio --name=$m --filename=FILE ${common[*]} $*"
  fi
  if [ -n "$TPID" ] && ! kill -0 "$TPID" 2>/dev/null; then
    echo "bench.sh: FAILED: $t $m: the daemon is gone (log: $LOGD/$t.log)" >&2
    rec "$kind.$t.$m" FAILED
    FAILURES=$((FAILURES + 1))
    return 0
  fi
  if (cd "$FIOD" && fio --name="$m" --filename="$TFILE" "${common[@]}" --output="$j" "$@") >"$j.err" 2>&1 &&
    out=$(python3 "$HELPER" fio "$j" "$kind"); then
    rec "$kind.$t.$m" "$out"
    local bw iops secs mib
    read -r bw iops secs mib <<<"$out"
    LAST_IO=$((mib << 20))
    printf '   %-10s %-12s %9s MiB/s %9s IOPS  (%s s, %s MiB)\n' "$t" "$m" "$bw" "$iops" "$secs" "$mib"
  else
    echo "bench.sh: FAILED: fio $m on $t ($TFILE):" >&2
    tail -5 "$j.err" "$j" >&2 2>/dev/null || true
    rec "$kind.$t.$m" FAILED
    FAILURES=$((FAILURES + 1))
  fi
}

SEQ=(--rw=read --bs=1M)
RAND=(--rw=randread --bs=4k --norandommap --randrepeat=1)
declare -A WARM # target -> bytes the cold sequential pass read (the warm range)

VREF=$IMG/raw.img VLAYOUT=$IMG/layout.json # the flat file and layout the views are checked against
verify_target() { # mount once and probe the mounted view against the flat file
  local t=$1
  if ! start_target "$t"; then
    fail_target "$t" "the mount did not come up (log: $LOGD/$t.log)"
    return 1
  fi
  say "   $t: $TFILE"
  if ! python3 "$HELPER" compare "$VREF" "$TFILE" "$VLAYOUT" "$VERIFY_PROBES"; then
    stop_target "$t"
    fail_target "$t" "the mounted file shows different bytes from the flat file"
    return 1
  fi
  stop_target "$t"
}

warm_size() { # $1 target, $2 readers: bytes per reader inside the warm range
  local w=${WARM[$1]:-$VSIZE} n=$2
  w=$(((w / n) >> 20 << 20))
  [ "$w" -ge $((1 << 20)) ] || w=$((1 << 20))
  echo "$w"
}

rec_pass() { # target label seconds: one read of the whole view, recorded as fio results are
  local out
  out=$(awk -v s="$3" -v z="$VSIZE" 'BEGIN { printf "%.1f 0 %.2f %d", z / 1048576 / s, s, z / 1048576 }')
  rec "read.$1.dd_cold" "$out"
  printf '   %-10s %-12s %9s MiB/s  (%s s)\n' "$1" "$2" "${out%% *}" "$3"
}
dd_run() { # target: dd bs=1M of the whole view to /dev/null (recorded as fio results are)
  local t=$1 t0 s out n
  if [ -z "${LOGGED[dd.$VSIZE]:-}" ]; then
    LOGGED[dd.$VSIZE]=1
    logcmd "dd if=FILE of=/dev/null bs=1M   # $((VSIZE >> 20)) MiB; MiB/s = size / wall time"
  fi
  t0=$EPOCHREALTIME
  if out=$(dd if="$TFILE" of=/dev/null bs=1M 2>&1); then
    s=$(secs_since "$t0")
    n=$(printf '%s\n' "$out" | awk '/bytes/ { print $1 }' | tail -1)
    if [ "$n" = "$VSIZE" ]; then
      rec_pass "$t" dd_cold "$s"
      return 0
    fi
    out="dd read $n bytes, not $VSIZE: $out"
  fi
  echo "bench.sh: FAILED: dd of $t ($TFILE): $out" >&2
  rec "read.$t.dd_cold" FAILED
  FAILURES=$((FAILURES + 1))
}

nofuse_run() { # the fragmented chain read whole without FUSE (recorded as dd is)
  local t0 out
  if [ -z "${LOGGED[nofuse]:-}" ]; then
    LOGGED[nofuse]=1
    logcmd "chainfs export \$W/frag/work/top.avhdx /dev/null   # $((VSIZE >> 20)) MiB; MiB/s = size / wall time"
  fi
  t0=$EPOCHREALTIME
  if out=$("$CH" export "$FW/top.avhdx" /dev/null 2>&1); then
    rec_pass f_nofuse export_null "$(secs_since "$t0")"
    return 0
  fi
  echo "bench.sh: FAILED: chainfs export of the fragmented chain to /dev/null: $out" >&2
  rec "read.f_nofuse.dd_cold" FAILED
  FAILURES=$((FAILURES + 1))
}

daemon_cpu() { # the target daemon's CPU time so far (user + system, seconds), if it runs
  [ -n "$TPID" ] && [ -r "/proc/$TPID/stat" ] || return 0
  awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.3f", ($12 + $13) / hz }' "/proc/$TPID/stat"
}

# One group = a fresh mount, a dropped page cache, then some fio runs.
group() {
  local g=$1 t=$2 q=$((VSIZE / 4)) w m c0
  # The fragmented chain read without FUSE: one cold pass in place of dd.
  case $t:$g in
    f_nofuse:dd)
      drop_caches
      with_disk "disk.$t.dd_cold" nofuse_run
      return 0
      ;;
    f_nofuse:*) return 0 ;;
    f_fuse:rt | f_bindfs:rt | f_chainfs:rt) ;;
    *:rt) return 0 ;; # a round trip is measured through FUSE only
  esac
  if ! start_target "$t"; then
    case $g in
      dd) m=dd_cold ;;
      seq1c) m=seq_cold_1 ;;
      seq1) m="seq_cold_1 seq_warm_1 rand_warm_1 rand_warm_4" ;;
      seq4) m="seq_cold_4 seq_warm_4" ;;
      rand1) m=rand_cold_1 ;;
      rand4) m=rand_cold_4 ;;
      rt) m=rand_rt_1 ;;
    esac
    for w in $m; do rec "read.$t.$w" FAILED; done
    echo "bench.sh: FAILED: $t did not mount for $g" >&2
    FAILURES=$((FAILURES + 1))
    return 0
  fi
  drop_caches
  case $g in
    dd) with_disk "disk.$t.dd_cold" dd_run "$t" ;;
    seq1c) fio_run "$t" seq_cold_1 "${SEQ[@]}" --size="$VSIZE" --runtime="$SEQ_CAP" ;;
    seq1)
      with_disk "disk.$t.seq_cold_1" fio_run "$t" seq_cold_1 "${SEQ[@]}" --size="$VSIZE" --runtime="$SEQ_CAP"
      WARM[$t]=$LAST_IO
      w=$(warm_size "$t" 1)
      c0=$(daemon_cpu)
      fio_run "$t" seq_warm_1 "${SEQ[@]}" --size="$w" --time_based --runtime="$WARM_RT"
      fio_run "$t" rand_warm_1 "${RAND[@]}" --size="$w" --numjobs=1 --time_based --runtime="$WARM_RT"
      fio_run "$t" rand_warm_4 "${RAND[@]}" --size="$w" --numjobs=4 --time_based --runtime="$WARM_RT"
      # What the daemon did while the page cache served the warm runs.
      [ -z "$c0" ] || rec "cpu.$t.warm1" "$(awk -v a="$c0" -v b="$(daemon_cpu)" 'BEGIN { printf "%d", (b - a) * 1000 }')"
      ;;
    seq4)
      with_disk "disk.$t.seq_cold_4" fio_run "$t" seq_cold_4 "${SEQ[@]}" --size="$q" --offset_increment="$q" --numjobs=4 --runtime="$SEQ_CAP"
      WARM[$t]=$LAST_IO
      w=$(warm_size "$t" 4)
      fio_run "$t" seq_warm_4 "${SEQ[@]}" --size="$w" --offset_increment="$q" --numjobs=4 --time_based --runtime="$WARM_RT"
      ;;
    rand1) fio_run "$t" rand_cold_1 "${RAND[@]}" --size="$VSIZE" --numjobs=1 --number_ios="$RAND_IOS" --runtime="$RAND_CAP" ;;
    rand4) fio_run "$t" rand_cold_4 "${RAND[@]}" --size="$VSIZE" --numjobs=4 --number_ios=$((RAND_IOS / 4)) --runtime="$RAND_CAP" ;;
    rt) # the FUSE round trip: the files behind the view in the page cache, the view's own cache cold
      case $t in
        f_chainfs) cat "$FW/base.vhdx" "$FW/mid.avhdx" "$FW/top.avhdx" >/dev/null ;;
        *) cat "$FD/raw.img" >/dev/null ;;
      esac
      fio_run "$t" rand_rt_1 "${RAND[@]}" --size="$VSIZE" --numjobs=1 --number_ios="$RAND_IOS" --runtime="$RAND_CAP"
      ;;
  esac
  stop_target "$t"
}

vx_group() { # the groups a VHDX target runs: cold sequential (1 reader) and cold random
  case $1 in
    seq1) echo seq1c ;;
    seq4) ;;
    *) echo "$1" ;;
  esac
}
RGROUPS="seq1 seq4 rand1 rand4" # the groups read_rounds runs
read_rounds() { # targets...: verify each view, then READ_REPS rounds of RGROUPS
  local t g gg round n ok=()
  say "   checking each mounted view against the flat file"
  for t in "$@"; do
    case $t in
      raw | f_raw | d_raw | f_nofuse) ok+=("$t") ;;
      *) verify_target "$t" && ok+=("$t") ;;
    esac
  done
  n=${#ok[@]}
  [ "$n" -gt 0 ] || return 0
  for round in $(seq "$READ_REPS"); do
    rotated "$round" "${ok[@]}"
    say "-- round $round/$READ_REPS: ${ORDER[*]}"
    for g in $RGROUPS; do
      for t in "${ORDER[@]}"; do
        case $t in
          *_vhdx) gg=$(vx_group "$g"); [ -z "$gg" ] || group "$gg" "$t" ;;
          *) group "$g" "$t" ;;
        esac
      done
    done
  done
  for t in "${ok[@]}"; do
    [ -n "${RSS[$t]:-}" ] && rec "rss.$t" "${RSS[$t]}"
  done
  return 0
}
how_reads() { # the text that says how the read rounds run, for the report
  echo "fio $(fio --version), psync, buffered (direct=0); fio does not invalidate the page cache itself (invalidate=0). \
Every cell is the median of $READ_REPS rounds; in each round every kind of run is done for all targets in turn (the order rotates from round to round), \
so the targets compared in a row were measured minutes apart at most. \
'Cold' = a fresh mount (daemon started anew) and \`sync; echo 3 > /proc/sys/vm/drop_caches; echo 1 > /proc/sys/vm/compact_memory\` just before. \
Sequential: 1 MiB reads of the whole $((VSIZE >> 20)) MiB (4 readers: one quarter each), cold runs capped at $SEQ_CAP s. \
'Warm' = on the same mount right after the cold 1-reader (or 4-reader) sequential pass, over the range that pass read (the whole file unless the cap stopped it), time-based $WARM_RT s. \
Random: 4 KiB reads at the same seeded offsets for every target (randrepeat, norandommap; fio's default fadvise RANDOM turns readahead off), \
cold: $RAND_IOS reads in all (capped at $RAND_CAP s). chainfs is mounted with \`-o $MOUNT_OPTS\`."
}
# The vhdx and qcow2 sections add their views to the read rounds (the qcow2
# chain through chainfs next to qemu-storage-daemon's export of it).
VX_TARGETS=()
if has vhdx; then
  [ "$HAVE_MOUNT" = 1 ] && VX_TARGETS+=(chainfs_vhdx)
  VX_TARGETS+=(vhdimount_vhdx)
fi
if has qcow2 && [ "$HAVE_MOUNT" = 1 ]; then VX_TARGETS+=(chainfs_qcow2); fi
if has read; then
  rec meta.read_section 1
  rec meta.read_reps "$READ_REPS"
  rec meta.read_how "$(how_reads)"
  targets=(raw)
  if [ "$HAVE_MOUNT" = 1 ]; then
    targets+=(chainfs)
    say "== 3. read: chainfs mount found; measuring it and the peers, $READ_REPS round(s)"
  else
    say "== 3. read: \`chainfs mount\` does not exist in this build; measuring the peers only, $READ_REPS round(s)"
  fi
  targets+=(vhdimount qsd_raw qsd_qcow2 "${VX_TARGETS[@]}")
  has vhdx && say "   with the VHDX chain: cold sequential 1 reader, cold random 1 and 4 readers"
  has qcow2 && say "   with chainfs on the qcow2 chain (every kind of run)"
  read_rounds "${targets[@]}"
else
  rec meta.read_section 0
  rec meta.read_skip "BENCH_SECTIONS=$SECTIONS"
  has qcow2 && VX_TARGETS+=(qsd_qcow2)
  if [ ${#VX_TARGETS[@]} -gt 0 ]; then
    say "== 3. read (for the $(has vhdx && echo 'vhdx ')$(has qcow2 && echo 'qcow2 ')section): ${VX_TARGETS[*]}, $READ_REPS round(s)"
    rec meta.vx_read_how "Rounds as in the read section (fio, psync, buffered, cold = fresh mount + drop_caches; median of $READ_REPS)."
    rec meta.q_read_how "$(how_reads)"
    read_rounds "${VX_TARGETS[@]}"
  fi
fi

# ------------------------------------------------------------------ 4. merge
# Timed merges, shared by the merge, qcow2 and frag sections. A case names the
# chain (m2: merge chain, leaf into mid; m3: merge chain, leaf into base
# through mid; f3: fragmented chain, top into base through mid); a tool the
# command. Every run starts from fresh copies of the pristine files at the
# paths they were made at (the chains record absolute parent paths).
MD=$W/merge MP=$W/merge/pristine FP=$W/frag/pristine MJ=$W/merge.json
hm="" hf=""
restore_copies() { # pristine-dir work-dir ext...: fresh copies of the pristine files with these extensions
  local from=$1 to=$2 e f
  shift 2
  rm -rf "$to"
  mkdir -p "$to"
  for e in "$@"; do
    for f in "$from"/*."$e"; do cp --sparse=always "$f" "$to/"; done
  done
}
restore() { restore_copies "$MP" "$MW" "$@"; } # the merge chain: vhd or qcow2
merge_paths() { # case tool: SRC, BETWEEN (may be empty), DEST, FLAT (the content), HASH (its sha256)
  local e=vhd
  case $2 in *qcow2* | qemu*) e=qcow2 ;; esac
  case $1 in
    m2) SRC=$MW/leaf.$e BETWEEN="" DEST=$MW/mid.$e FLAT=$MD/flat.raw HASH=$hm ;;
    m3) SRC=$MW/leaf.$e BETWEEN=$MW/mid.$e DEST=$MW/base.$e FLAT=$MD/flat.raw HASH=$hm ;;
    f3)
      if [ "$e" = qcow2 ]; then
        SRC=$FW/top.qcow2 BETWEEN=$FW/mid.qcow2 DEST=$FW/base.qcow2
      else
        SRC=$FW/top.avhdx BETWEEN=$FW/mid.avhdx DEST=$FW/base.vhdx
      fi
      FLAT=$FD/raw.img HASH=$hf
      ;;
  esac
}
merge_prep() { # case tool: the fresh copies the run starts from
  case $1.$2 in
    m*.chainfs_qcow2* | m*.qemu*) restore qcow2 ;;
    m*.chainfs* | m*.rm) restore vhd ;;
    m*.cp) rm -f "$MD/cp.out" ;;
    f3.chainfs* | f3.rm) restore_copies "$FP" "$FW" vhdx avhdx ;;
    f3.qemu*) restore_copies "$FP" "$FW" qcow2 ;;
    f3.cat) rm -f "$FD/cat.out" ;;
  esac
}
merge_cmd() { # case tool
  merge_paths "$1" "$2"
  case $1.$2 in
    *.chainfs | *.chainfs_qcow2) "$CH" merge "$SRC" "$DEST" --json >"$MJ" && sync "$DEST" ;;
    *.chainfs_wait) "$CH" merge "$SRC" "$DEST" --wait-free --json >"$MJ" && sync "$DEST" ;;
    *.chainfs_keep | *.chainfs_qcow2_keep)
      # shellcheck disable=SC2086 # BETWEEN is one path or empty
      "$CH" merge "$SRC" "$DEST" --keep --json >"$MJ" && sync "$DEST" $BETWEEN "$SRC"
      ;;
    m2.rm) rm "$MW/leaf.vhd" && sync "$MW" ;;
    m3.rm) rm "$MW/leaf.vhd" "$MW/mid.vhd" && sync "$MW" ;;
    f3.rm) rm "$FW/top.avhdx" "$FW/mid.avhdx" && sync "$FW" ;;
    m2.qemu) qemu-img commit -q -f qcow2 "$SRC" && sync "$DEST" "$SRC" ;;
    m2.qemu_d) qemu-img commit -q -d -f qcow2 "$SRC" && sync "$DEST" ;;
    m3.qemu) qemu-img commit -q -f qcow2 -b "$DEST" "$SRC" && sync "$DEST" ;;
    f3.qemu) qemu-img commit -q -d -f qcow2 -b "$DEST" "$SRC" && sync "$DEST" ;;
    m2.cp | m3.cp) cp "$MD/cp${1#m}.bin" "$MD/cp.out" && sync "$MD/cp.out" ;;
    f3.cat) cat "$FD/changed.bin" >"$FD/cat.out" && sync "$FD/cat.out" ;;
    *) die "unknown merge $1.$2" ;;
  esac
}
detached() { { "$CH" info "$1" 2>&1 || true; } | grep -qi detached; }
# A `chainfs-free` helper (of a `chainfs merge`) that has not exited yet. One
# that has is a zombie until init reaps it (here up to 1.5 s later), its
# files already closed and freed: not counted.
free_helper() {
  local f st
  for f in $(grep -lsx chainfs-free /proc/[0-9]*/comm); do
    # /proc/PID/stat: "PID (chainfs-free) STATE ..." (no space in the name)
    read -r _ _ st _ <"${f%comm}stat" 2>/dev/null || continue
    [ "$st" = Z ] || return 0
  done
  return 1
}
# Seconds until no such helper is left: how long after `chainfs merge`
# returned the file system went on freeing the deleted layers. Also keeps
# that work out of the next timed run.
free_wait() {
  local t=$EPOCHREALTIME
  while free_helper; do sleep 0.01; done
  secs_since "$t"
}
verify_merge() { # case tool: the merged chain must show the pre-merge content
  local c=$1 tool=$2 h f
  merge_paths "$c" "$tool"
  case $tool in
    chainfs*)
      for f in "$SRC" $BETWEEN; do
        if [ "$tool" = "${tool%_keep}" ]; then
          [ ! -e "$f" ] || { echo "${f##*/} is still there after the merge" >&2; return 1; }
        else
          [ -e "$f" ] || { echo "${f##*/} is gone despite --keep" >&2; return 1; }
          detached "$f" || { echo "${f##*/} is not detached after merge --keep" >&2; return 1; }
        fi
      done
      "$CH" check "$DEST" >"$LOGD/merge-check.log" 2>&1 || { cat "$LOGD/merge-check.log" >&2; return 1; }
      "$CH" export "$DEST" "$W/verify.raw" --force >/dev/null || return 1
      h=$(python3 "$HELPER" sha256 "$W/verify.raw" | cut -d' ' -f1)
      rm -f "$W/verify.raw"
      [ "$h" = "$HASH" ] || { echo "the merged chain shows sha256 $h, not $HASH" >&2; return 1; }
      if [ "${DEST##*.}" = qcow2 ]; then # and qemu-img's view of chainfs's result
        qemu-img check -q -f qcow2 "$DEST" || return 1
        qemu-img compare -q -f qcow2 -F raw "$DEST" "$FLAT" ||
          { echo "qemu-img compare: the merged base differs from the flat file" >&2; return 1; }
      fi
      ;;
    qemu | qemu_d)
      qemu-img check -q -f qcow2 "$DEST" || return 1
      qemu-img compare -q -f qcow2 -F raw "$DEST" "$FLAT" ||
        { echo "qemu-img compare: the committed chain differs from the flat file" >&2; return 1; }
      ;;
    cp) cmp -s "$MD/cp.out" "$MD/cp${c#m}.bin" || { echo "the copy differs" >&2; return 1; } ;;
    cat) cmp -s "$FD/cat.out" "$FD/changed.bin" || { echo "the copy differs" >&2; return 1; } ;;
    rm)
      [ "$c" = f3 ] && f=$FW/top.avhdx || f=$MW/leaf.vhd
      [ ! -e "$f" ] || { echo "${f##*/} still there" >&2; return 1; }
      ;;
  esac
}
merge_run() { # rep case tool bytes: one timed run, checked afterwards
  local rep=$1 c=$2 tool=$3 b=$4 s copied="" freed
  merge_prep "$c" "$tool"
  drop_caches
  t=$EPOCHREALTIME
  if merge_cmd "$c" "$tool" >"$LOGD/merge.out" 2>&1; then
    s=$(secs_since "$t")
    freed=$(free_wait)
    case $tool in chainfs | chainfs_qcow2 | chainfs_wait) rec "merge.$c.$tool.freed" "$freed" ;; esac
    if verify_merge "$c" "$tool"; then
      rec "merge.$c.$tool.s" "$s"
      if [ "$tool" != "${tool#chainfs}" ]; then
        copied=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["bytes_copied"])' "$MJ")
        rec "merge.$c.$tool.copied" "$copied"
      fi
      printf '   run %d  %-22s %7.2f s  %7.0f MiB/s of merged data%s\n' "$rep" "$c.$tool" "$s" \
        "$(awk -v s="$s" -v z="$b" 'BEGIN { print z / 1048576 / s }')" \
        "$([ -n "$copied" ] && echo "  (bytes_copied $copied)")"
    else
      echo "bench.sh: FAILED: merge $c.$tool: the result is wrong (see above)" >&2
      rec "meta.failed.merge_$c.$tool" "the merged result differs from the pre-merge content (run $rep)"
      rec "merge.$c.$tool.s" FAILED
      FAILURES=$((FAILURES + 1))
    fi
  else
    echo "bench.sh: FAILED: merge $c.$tool:" >&2
    tail -5 "$LOGD/merge.out" >&2
    rec "meta.failed.merge_$c.$tool" "$(tail -1 "$LOGD/merge.out") (run $rep)"
    rec "merge.$c.$tool.s" FAILED
    FAILURES=$((FAILURES + 1))
  fi
}

if has merge || has qcow2; then
  mfmts=qcow2
  has merge && mfmts=vhd,qcow2
  say "== 4. merge: build the merge chain ($mfmts, same bytes)"
  mkdir -p "$MW" "$MP"
  t=$EPOCHREALTIME
  python3 "$HELPER" mergebuild "$MD" "$SIZE" "$CH" "$RES" "$mfmts"
  say "   built in $(secs_since "$t") s"
  M2=$(python3 "$HELPER" layoutinfo "$MD/layout.json" merge2)
  M3=$(python3 "$HELPER" layoutinfo "$MD/layout.json" merge3)
  rec meta.merge_bytes2 "$M2"
  rec meta.merge_bytes3 "$M3"
  has merge && rec meta.merge_section 1
  MDATA=$(python3 - "$MD/layout.json" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
M = 1 << 20
parts = ", ".join(f"{l['name']} {len(l['regions'])} regions / {l['bytes'] // M} MiB" for l in j["layers"])
print(f"{j['size'] // M} MiB virtual disk, chain base <- mid <- leaf: {parts} of random bytes. "
      "The regions of one layer never overlap; they are 4 KiB-aligned, of random lengths (4 KiB up to about twice "
      "the mean), at random places over the whole disk, written in random order; the layers overlap each other at random. "
      f"Merged data: leaf -> mid {j['merge2'] / M:.0f} MiB (the leaf's regions); leaf -> base through mid "
      f"{j['merge3'] / M:.0f} MiB (the union of the leaf's and mid's regions).")
PY
  )
  mfiles=""
  for f in base.vhd mid.vhd leaf.vhd base.qcow2 mid.qcow2 leaf.qcow2; do
    [ -e "$MW/$f" ] && mfiles="$mfiles$f $(alloc_mib "$MW/$f") MiB, "
  done
  rec meta.merge_data "$MDATA Allocated on disk: ${mfiles%, }."
  say "   verifying: sha256 of the flat file, $(has merge && echo 'chainfs export (VHD chain), ')qemu-img convert (qcow2 chain)"
  hm=$(python3 "$HELPER" sha256 "$MD/flat.raw" | cut -d' ' -f1)
  say "   flat $hm"
  if has merge; then
    "$CH" export "$MW/leaf.vhd" "$MD/verify.raw" --force >/dev/null || die "chainfs export of the merge chain failed"
    hmv=$(python3 "$HELPER" sha256 "$MD/verify.raw" | cut -d' ' -f1)
    [ "$hm" = "$hmv" ] || die "the VHD merge chain differs from its flat file ($hmv)"
  fi
  qemu-img convert -f qcow2 -O raw "$MW/leaf.qcow2" "$MD/verify.raw" || die "qemu-img convert of the merge chain failed"
  hmq=$(python3 "$HELPER" sha256 "$MD/verify.raw" | cut -d' ' -f1)
  rm -f "$MD/verify.raw"
  [ "$hm" = "$hmq" ] || die "the qcow2 merge chain differs from its flat file ($hmq)"
  mv "$MW"/*.qcow2 "$MP"/
  if has merge; then mv "$MW"/*.vhd "$MP"/; fi
  rec meta.merge_verify "Before: sha256 $hm for the flat file$(has merge && echo ", \`chainfs export\` of the VHD chain") and \`qemu-img convert\` of the qcow2 chain. After every timed merge: the merged layers are gone (chainfs; with \`--keep\`: still there and detached, per \`chainfs info\`), \`chainfs check DEST\` passes and the flattened result equals that content (\`chainfs export DEST\` + sha256; for a qcow2 DEST also \`qemu-img check\` and \`qemu-img compare DEST flat.raw\`); after \`qemu-img commit\`: \`qemu-img check\` and \`qemu-img compare\`. \`chainfs merge --json\` reports the merged byte count."

  logcmd "cp --sparse=always \$W/merge/pristine/{base,mid,leaf}.vhd (or .qcow2) \$W/merge/work/; drop   # before every merge run"
  if has merge; then
    logcmd "chainfs merge \$W/merge/work/leaf.vhd \$W/merge/work/mid.vhd --json; sync \$W/merge/work/mid.vhd"
    logcmd "chainfs merge \$W/merge/work/leaf.vhd \$W/merge/work/mid.vhd --keep --json; sync \$W/merge/work/mid.vhd \$W/merge/work/leaf.vhd"
    logcmd "chainfs merge \$W/merge/work/leaf.vhd \$W/merge/work/mid.vhd --wait-free --json; sync \$W/merge/work/mid.vhd"
    logcmd "qemu-img commit -q -f qcow2 \$W/merge/work/leaf.qcow2; sync \$W/merge/work/mid.qcow2 \$W/merge/work/leaf.qcow2"
    logcmd "qemu-img commit -q -d -f qcow2 \$W/merge/work/leaf.qcow2; sync \$W/merge/work/mid.qcow2"
    logcmd "chainfs merge \$W/merge/work/leaf.vhd \$W/merge/work/base.vhd --json; sync \$W/merge/work/base.vhd"
    logcmd "chainfs merge \$W/merge/work/leaf.vhd \$W/merge/work/base.vhd --keep --json; sync \$W/merge/work/{base,mid,leaf}.vhd"
    logcmd "chainfs merge \$W/merge/work/leaf.vhd \$W/merge/work/base.vhd --wait-free --json; sync \$W/merge/work/base.vhd"
  fi
  if has qcow2; then
    logcmd "chainfs merge \$W/merge/work/leaf.qcow2 \$W/merge/work/base.qcow2 --json; sync \$W/merge/work/base.qcow2"
    logcmd "chainfs merge \$W/merge/work/leaf.qcow2 \$W/merge/work/base.qcow2 --keep --json; sync \$W/merge/work/{base,mid,leaf}.qcow2"
  fi
  logcmd "qemu-img commit -q -f qcow2 -b \$W/merge/work/base.qcow2 \$W/merge/work/leaf.qcow2; sync \$W/merge/work/base.qcow2"
  if has merge; then
    logcmd "rm \$W/merge/work/leaf.vhd; sync \$W/merge/work   # rm leaf.vhd mid.vhd for the 3-layer case: what deleting the merged layers costs by itself"
    logcmd "drop; cp \$W/merge/cp2.bin \$W/merge/cp.out; sync \$W/merge/cp.out   # cp3.bin for the 3-layer case: files of the merged byte counts"
  fi
  logcmd "while chainfs-free runs (a /proc/PID/comm of chainfs-free whose /proc/PID/stat state is not Z); do sleep 0.01; done   # after each run, untimed: until the chainfs-free helper of a chainfs merge has exited (timed separately: how long the file system went on freeing the deleted layers after the command returned)"
  logcmd "chainfs check DEST; chainfs export DEST \$W/verify.raw --force; python3 scripts/bench/helper.py sha256 \$W/verify.raw   # after each chainfs merge"
  logcmd "qemu-img check -q -f qcow2 DEST.qcow2; qemu-img compare -q -f qcow2 -F raw DEST.qcow2 FLAT   # after each qemu-img commit, and after each chainfs merge into a qcow2"
  cts=()
  has merge && cts+=(m2.chainfs m2.chainfs_keep m2.chainfs_wait m2.qemu m2.qemu_d m2.cp m2.rm m3.chainfs m3.chainfs_keep m3.chainfs_wait)
  has qcow2 && cts+=(m3.chainfs_qcow2 m3.chainfs_qcow2_keep)
  cts+=(m3.qemu)
  has merge && cts+=(m3.cp m3.rm)
  say "== 4. merge: cold, $REPS runs each, fresh copies; MiB/s of merged data (leaf->mid $(awk -v b="$M2" 'BEGIN { printf "%.0f", b / 1048576 }') MiB, leaf->base $(awk -v b="$M3" 'BEGIN { printf "%.0f", b / 1048576 }') MiB)"
  for rep in $(seq "$REPS"); do
    shuffled "$rep" "${cts[@]}"
    for ct in "${ORDER[@]}"; do
      c=${ct%%.*}
      b=$M2
      [ "$c" = m3 ] && b=$M3
      merge_run "$rep" "$c" "${ct#*.}" "$b"
    done
  done
  rm -f "$MD/cp.out"
fi

if has merge; then
  # Reads through a writable mount, unloaded and during `merge leaf mid`.
  say "== 4b. reads of a -o rw mount (O_DIRECT, 1 MiB, sequential from offset 0): unloaded, then during 'merge leaf mid' through MNT/control"
  logcmd "python3 scripts/bench/helper.py mergeread \$W/mnt/merge 'merge \$W/merge/work/leaf.vhd \$W/merge/work/mid.vhd' $SEQ_CAP   # warm-up pass; drop; one O_DIRECT pass (<= $SEQ_CAP s); drop; reader + the merge command on MNT/control, poll MNT/jobs/N to JobState 7"
  rec meta.mread_how "Each run: a fresh copy of the VHD chain, \`chainfs mount -o $RW_OPTS\` of leaf.vhd, the view probed against the flat file; then (helper.py mergeread) one unmeasured pass (so that chainfs's own metadata cache is loaded in both phases), then cold: one sequential pass over disk.raw with O_DIRECT 1 MiB reads (capped at $SEQ_CAP s) = unloaded; cold again: the same reader from offset 0 started together with \`merge leaf.vhd mid.vhd\` written to MNT/control; MNT/jobs/N polled every 20 ms until JobState=7; the bytes the reader got between the command and completion (or the end of its one pass, if sooner) / that time = during the merge. 'Same range' = the unloaded pass's rate over the same byte range the loaded reader covered (same data). After the merge: the view hashed (sha256 of disk.raw) against the pre-merge content, \`chain\` shows mid.vhd as the leaf, and after unmounting leaf.vhd is gone and \`chainfs check mid.vhd\` passes. Median of $REPS runs."
  for rep in $(seq "$REPS"); do
    restore vhd
    if ! start_target m_chainfs; then
      fail_target m_chainfs "the rw mount of the merge chain did not come up (log: $LOGD/m_chainfs.log)"
      continue
    fi
    if ! python3 "$HELPER" compare "$MD/flat.raw" "$TFILE" "$MD/layout.json" "$VERIFY_PROBES" >/dev/null; then
      stop_target m_chainfs
      fail_target m_chainfs "the rw mount shows different bytes from the flat file"
      continue
    fi
    if out=$(python3 "$HELPER" mergeread "$TMP" "merge $MW/leaf.vhd $MW/mid.vhd" "$SEQ_CAP" 2>"$LOGD/mergeread.err"); then
      mok=1
      h=$(python3 "$HELPER" sha256 "$TFILE" | cut -d' ' -f1)
      [ "$h" = "$hm" ] || { echo "bench.sh: the view after the merge shows sha256 $h, not $hm" >&2; mok=0; }
      head -1 "$TMP/chain" | grep -q "/mid.vhd" || { echo "bench.sh: after the merge, chain does not start with mid.vhd:" >&2; cat "$TMP/chain" >&2; mok=0; }
      stop_target m_chainfs
      [ ! -e "$MW/leaf.vhd" ] || { echo "bench.sh: leaf.vhd still there after the merge" >&2; mok=0; }
      "$CH" check "$MW/mid.vhd" >"$LOGD/merge-check.log" 2>&1 || { cat "$LOGD/merge-check.log" >&2; mok=0; }
      if [ "$mok" = 1 ]; then
        rec mread "$out"
        read -r u_whole u_same l_rate win ems lmib eof bdone <<<"$out"
        printf '   run %d  unloaded %s MiB/s (same range %s)  during merge %s MiB/s  (%s s window, merge %s ms, %s MiB read%s, BytesDone %s)\n' \
          "$rep" "$u_whole" "$u_same" "$l_rate" "$win" "$ems" "$lmib" "$([ "$eof" = 1 ] && echo ', the pass ended before the merge')" "$bdone"
      else
        fail_target m_chainfs "the view or the chain after the merge through the control file is wrong (run $rep)"
      fi
    else
      cat "$LOGD/mergeread.err" >&2
      stop_target m_chainfs
      fail_target m_chainfs "mergeread failed (run $rep)"
    fi
  done
  [ -n "${RSS[m_chainfs]:-}" ] && rec rss.m_chainfs "${RSS[m_chainfs]}"
fi
rm -rf "$MD"

# ------------------------------------------------------------------ 5. write
if has write; then
  say "== 5. write: fresh empty overlay on the data chain for every run: chainfs mount -o $RW_OPTS (VHD) vs qemu-storage-daemon writable=on (qcow2) vs a sparse file"
  mkdir -p "$WD"
  WSEQ=$((SIZE / 2))
  W_TARGETS=(w_raw)
  [ "$HAVE_MOUNT" = 1 ] && W_TARGETS+=(w_chainfs)
  W_TARGETS+=(w_qsd)
  parents_state() { stat -c '%n %s %y' "$IMG"/base.vhd "$IMG"/mid.vhd "$IMG"/top.vhd "$IMG"/base.qcow2 "$IMG"/mid.qcow2 "$IMG"/top.qcow2; }
  P_BEFORE=$(parents_state)
  fresh_overlay() {
    case $1 in
      w_raw) rm -f "$WD/raw.img" && truncate -s "$SIZE" "$WD/raw.img" ;;
      w_chainfs) rm -f "$WD/ovl.vhd" && "$CH" create "$WD/ovl.vhd" --parent "$IMG/top.vhd" >/dev/null ;;
      w_qsd) rm -f "$WD/ovl.qcow2" && qemu-img create -q -f qcow2 -b "$IMG/top.qcow2" -F qcow2 "$WD/ovl.qcow2" ;;
    esac
  }
  logcmd "chainfs create \$W/write/ovl.vhd --parent \$W/img/top.vhd   # before every write run"
  logcmd "qemu-img create -q -f qcow2 -b \$W/img/top.qcow2 -F qcow2 \$W/write/ovl.qcow2   # before every write run"
  logcmd "truncate -s $SIZE \$W/write/raw.img   # the reference file, before every write run"
  # fio verify jobs: random 4 KiB and sequential 1 MiB writes with crc32c
  # headers, read back at once, then again after a remount (--verify_only).
  VOFF1=$((SIZE / 2 + (12 << 10))) VOFF2=$((SIZE / 4 + 3 * (4 << 10)))
  VJOBS=(--name=vrand --rw=randwrite --bs=4k --size="$VERIFY_W" --offset="$VOFF1" --randrepeat=1
    --name=vseq --rw=write --bs=1M --size="$VERIFY_W" --offset="$VOFF2")
  VCOMMON=(--ioengine=psync --direct=0 --verify=crc32c --verify_fatal=1 --end_fsync=1 --output-format=json)
  logcmd "fio --filename=FILE ${VCOMMON[*]} ${VJOBS[*]}   # then unmount, remount and the same with --verify_only"
  verify_write() { # t: the view, then written data read back, across a remount, and the image checked
    local t=$1
    fresh_overlay "$t" || { fail_target "$t" "could not create the overlay"; return 1; }
    start_target "$t" || { fail_target "$t" "the writable mount did not come up (log: $LOGD/$t.log)"; return 1; }
    if [ "$t" != w_raw ] && ! python3 "$HELPER" compare "$IMG/raw.img" "$TFILE" "$IMG/layout.json" "$VERIFY_PROBES" >/dev/null; then
      stop_target "$t"
      fail_target "$t" "the writable view shows different bytes from the flat file"
      return 1
    fi
    # (in $FIOD: fio leaves its verify state files in the current folder)
    if ! (cd "$FIOD" && fio --filename="$TFILE" "${VCOMMON[@]}" "${VJOBS[@]}") >"$FIOD/$t.verify.json" 2>&1; then
      tail -5 "$FIOD/$t.verify.json" >&2
      stop_target "$t"
      fail_target "$t" "fio verify of written data failed"
      return 1
    fi
    stop_target "$t"
    start_target "$t" || { fail_target "$t" "the remount did not come up"; return 1; }
    if ! (cd "$FIOD" && fio --filename="$TFILE" "${VCOMMON[@]}" --verify_only "${VJOBS[@]}") >"$FIOD/$t.verify2.json" 2>&1; then
      tail -5 "$FIOD/$t.verify2.json" >&2
      stop_target "$t"
      fail_target "$t" "fio --verify_only after a remount failed: written data did not persist"
      return 1
    fi
    stop_target "$t"
    case $t in
      w_chainfs) "$CH" check "$WD/ovl.vhd" >"$LOGD/w-check.log" 2>&1 || { cat "$LOGD/w-check.log" >&2; fail_target "$t" "chainfs check of the written overlay failed"; return 1; } ;;
      w_qsd) qemu-img check -q -f qcow2 "$WD/ovl.qcow2" || { fail_target "$t" "qemu-img check of the written overlay failed"; return 1; } ;;
    esac
    say "   $t: view probed, $((2 * $(to_bytes "$VERIFY_W") >> 20)) MiB written and verified, again after a remount; image check passed"
  }
  say "   checking: view, fio verify, remount + verify_only, image check"
  wok=()
  for t in "${W_TARGETS[@]}"; do verify_write "$t" && wok+=("$t"); done
  rec meta.write_how "fio $(fio --version), psync, buffered (direct=0), 1 writer, into a fresh overlay (created empty before every run: a VHD differencing disk on top.vhd mounted with \`chainfs mount -o $RW_OPTS\`, a qcow2 overlay on top.qcow2 exported by qemu-storage-daemon with writable=on, and a fresh sparse file on this disk as the reference), mounted anew and page cache dropped before every run. \
Sequential: 1 MiB writes from offset 0, $((WSEQ >> 20)) MiB (capped at $W_CAP s). Random: 4 KiB writes at the same seeded offsets over the whole $((SIZE >> 20)) MiB (randrepeat, norandommap), $RAND_W_IOS in all (capped at $W_CAP s). \
'end fsync' = no fsync until one at the end (end_fsync=1, included in the time); 'fsync each' = fsync after every write (fsync=1). Median of $READ_REPS rounds; the order of the targets rotates. \
Before timing, every target passed: its view probed against the flat file, $((2 * $(to_bytes "$VERIFY_W") >> 20)) MiB of fio writes with crc32c verify headers read back, again after unmount + remount (--verify_only), and \`chainfs check\` / \`qemu-img check\` of the overlay; the parents' size and mtime are unchanged at the end."
  n=${#wok[@]}
  for round in $(seq "$READ_REPS"); do
    rotated "$round" "${wok[@]}"
    say "-- write round $round/$READ_REPS: ${ORDER[*]}"
    for m in seqw seqw_fsync randw randw_fsync; do
      for t in "${ORDER[@]}"; do
        if ! fresh_overlay "$t" || ! start_target "$t"; then
          rec "write.$t.$m" FAILED
          echo "bench.sh: FAILED: $t did not come up for $m" >&2
          FAILURES=$((FAILURES + 1))
          continue
        fi
        drop_caches
        case $m in
          seqw) FIO_MODE="write" fio_run "$t" "$m" --rw=write --bs=1M --size="$WSEQ" --end_fsync=1 --runtime="$W_CAP" ;;
          seqw_fsync) FIO_MODE="write" fio_run "$t" "$m" --rw=write --bs=1M --size="$WSEQ" --fsync=1 --runtime="$W_CAP" ;;
          randw) FIO_MODE="write" fio_run "$t" "$m" --rw=randwrite --bs=4k --norandommap --randrepeat=1 --size="$SIZE" --number_ios="$RAND_W_IOS" --end_fsync=1 --runtime="$W_CAP" ;;
          randw_fsync) FIO_MODE="write" fio_run "$t" "$m" --rw=randwrite --bs=4k --norandommap --randrepeat=1 --size="$SIZE" --number_ios="$RAND_W_IOS" --fsync=1 --runtime="$W_CAP" ;;
        esac
        stop_target "$t"
      done
    done
  done
  for t in "${wok[@]}"; do
    [ -n "${RSS[$t]:-}" ] && rec "rss.$t" "${RSS[$t]}"
  done
  P_AFTER=$(parents_state)
  if [ "$P_BEFORE" != "$P_AFTER" ]; then
    echo "bench.sh: ERROR: a parent image changed during the write section:" >&2
    diff <(echo "$P_BEFORE") <(echo "$P_AFTER") >&2 || true
    rec meta.failed.write_parents "a parent image changed (size or mtime) during the write section"
    FAILURES=$((FAILURES + 1))
  fi
  rm -rf "$WD"
fi

# ------------------------------------------------------------------ 7. nbd
if has nbd; then
  say "== 7. nbd: nbdcopy from nbdkit + chainfs plugin (VHD chain) vs qemu-nbd (qcow2 chain)"
  cp "$NBD_PLUGIN" "$W/chainfs-plugin.so"
  SOCK=$W/nbd.sock
  URI="nbd+unix:///?socket=$SOCK"
  NBD_PID=""
  rec meta.nbdkit "$(nbdkit --version | head -1)"
  rec meta.libnbd "$(nbdcopy --version | head -1)"
  nbd_start() { # server: serve the data chain on $SOCK, read-only
    rm -f "$SOCK"
    case $1 in
      chainfs) nbdkit -f --exit-with-parent -U "$SOCK" "$W/chainfs-plugin.so" leaf="$IMG/top.vhd" readonly=true 2>>"$LOGD/nbd.log" & ;;
      qemu) qemu-nbd -r -f qcow2 -t -e 8 -k "$SOCK" "$IMG/top.qcow2" 2>>"$LOGD/nbd.log" & ;;
    esac
    NBD_PID=$!
    PIDS+=("$NBD_PID")
    local i
    for i in $(seq 300); do
      [ -S "$SOCK" ] && nbdinfo --can connect "$URI" 2>/dev/null && return 0
      kill -0 "$NBD_PID" 2>/dev/null || break
      sleep 0.1
    done
    return 1
  }
  nbd_stop() {
    stop_pid "$NBD_PID"
    NBD_PID=""
    rm -f "$SOCK"
  }
  logcmd "nbdkit -f -U \$W/nbd.sock \$W/chainfs-plugin.so leaf=\$W/img/top.vhd readonly=true &"
  logcmd "qemu-nbd -r -f qcow2 -t -e 8 -k \$W/nbd.sock \$W/img/top.qcow2 &"
  logcmd "nbdcopy -C N -T N 'nbd+unix:///?socket=\$W/nbd.sock' \$W/out/nbd.raw; python3 scripts/bench/helper.py sha256 \$W/out/nbd.raw   # each server once, before timing"
  logcmd "drop; nbdcopy -C N -T N 'nbd+unix:///?socket=\$W/nbd.sock' null:   # N = 1, 2, 4; timed"
  h_flat=$(python3 "$HELPER" sha256 "$IMG/raw.img" | cut -d' ' -f1)
  NBD_OK=()
  for srv in chainfs qemu; do
    if ! nbd_start "$srv"; then
      rec "nbd.$srv.c1.s" FAILED
      rec "meta.failed.nbd_$srv" "the $srv NBD server did not come up (see $LOGD/nbd.log)"
      FAILURES=$((FAILURES + 1))
      nbd_stop
      continue
    fi
    rec "nbd.$srv.info" "$(nbdinfo "$URI" | grep -E 'can_multi_conn|can_extents' | tr -s ' \t\n' ' ')"
    nbdcopy -C 4 -T 4 "$URI" "$OUTD/nbd.raw" || true
    h=$(python3 "$HELPER" sha256 "$OUTD/nbd.raw" | cut -d' ' -f1)
    rm -f "$OUTD/nbd.raw"
    nbd_stop
    if [ "$h" != "$h_flat" ]; then
      rec "meta.failed.nbd_$srv" "nbdcopy from the $srv server differs from the flat file"
      FAILURES=$((FAILURES + 1))
      continue
    fi
    NBD_OK+=("$srv")
  done
  rec meta.nbd_reps "$NBD_REPS"
  rec meta.nbd_verify "sha256 $h_flat: \`nbdcopy\` from each server that came up ($(IFS=,; echo "${NBD_OK[*]}")) equals the flat file."
  for round in $(seq "$NBD_REPS"); do
    for c in 1 2 4; do
      # The servers take turns going first, so neither always runs right
      # after the other's reads.
      rotated "$round" "${NBD_OK[@]}"
      for srv in "${ORDER[@]}"; do
        if ! nbd_start "$srv"; then
          rec "nbd.$srv.c$c.s" FAILED
          FAILURES=$((FAILURES + 1))
          nbd_stop
          continue
        fi
        drop_caches
        t=$EPOCHREALTIME
        if nbdcopy -C "$c" -T "$c" "$URI" null:; then
          rec "nbd.$srv.c$c.s" "$(secs_since "$t")"
        else
          rec "nbd.$srv.c$c.s" FAILED
          FAILURES=$((FAILURES + 1))
        fi
        nbd_stop
      done
    done
  done
  say "   nbd done"
fi

# ------------------------------------------------------------------ 8. qcow2 memory
# The rest of the qcow2 section (its reads, exports and merges ran above):
# the daemon's peak memory on a huge, deep, sparse qcow2 chain.
if has qcow2; then
  VSIZE=$QMSIZE
  say "== 8. qcow2 memory: a $((QMSIZE >> 30)) GiB qcow2 chain of depth $QMDEPTH (64 KiB clusters, $QMWRITES writes per layer)"
  mkdir -p "$QD"
  t=$EPOCHREALTIME
  python3 "$HELPER" qmembuild "$QD" "$QMSIZE" "$QMDEPTH" "$QMWRITES" "$RES"
  say "   built in $(secs_since "$t") s"
  QLEAF=$(python3 "$HELPER" layoutinfo "$QD/layout.json" leaf)
  rec meta.qmem_data "$(python3 "$HELPER" layoutinfo "$QD/layout.json" desc); on disk $(du -sm "$QD" | cut -f1) MiB in all."
  rec meta.qmem_how "Each daemon mounted anew (chainfs: \`-o $MOUNT_OPTS\`, so a metadata cache of $CACHE_MIB MiB; qemu-storage-daemon: its defaults), then every written range read back through the mount (with 4 KiB either side) and compared with what the writes make, then the page cache dropped and fio random 4 KiB reads over the whole $((QMSIZE >> 30)) GiB with 4 readers ($RAND_IOS in all, capped at $RAND_CAP s; nearly all of them fall where no layer wrote, so every layer's tables are asked). Peak RSS = VmHWM of the daemon's /proc/PID/status just before it is stopped; the highest of $READ_REPS round(s)."
  logcmd "python3 scripts/bench/helper.py qmemcheck FILE \$W/qmem/layout.json   # every written range, read back through the mount"
  QM_TARGETS=(qm_qsd)
  [ "$HAVE_MOUNT" = 1 ] && QM_TARGETS=(qm_chainfs qm_qsd)
  for round in $(seq "$READ_REPS"); do
    for t in "${QM_TARGETS[@]}"; do
      if ! start_target "$t"; then
        fail_target "$t" "the mount of the $((QMSIZE >> 30)) GiB qcow2 chain did not come up (log: $LOGD/$t.log)"
        continue
      fi
      if ! python3 "$HELPER" qmemcheck "$TFILE" "$QD/layout.json"; then
        stop_target "$t"
        fail_target "$t" "the view of the $((QMSIZE >> 30)) GiB qcow2 chain reads wrong bytes"
        continue
      fi
      drop_caches
      fio_run "$t" rand_cold_4 "${RAND[@]}" --size="$VSIZE" --numjobs=4 --number_ios=$((RAND_IOS / 4)) --runtime="$RAND_CAP"
      stop_target "$t"
      say "   $t: peak RSS ${RSS[$t]:-?} KiB so far"
    done
  done
  for t in "${QM_TARGETS[@]}"; do
    [ -n "${RSS[$t]:-}" ] && rec "rss.$t" "${RSS[$t]}"
  done
  rm -rf "$QD"
  VSIZE=$SIZE
fi

# ------------------------------------------------------------------ 9. frag
if has frag; then
  say "== 9. frag: a fragmented $((FSIZE >> 20)) MiB chain (VHDX, qcow2, flat file; same bytes)"
  mkdir -p "$FW" "$FP"
  t=$EPOCHREALTIME
  python3 "$HELPER" fragbuild "$FD" "$FSIZE" "$CH" "$RES"
  say "   built in $(secs_since "$t") s"
  F3=$(python3 "$HELPER" layoutinfo "$FD/layout.json" merged)
  rec meta.frag_size "$FSIZE"
  rec meta.frag_merged "$F3"
  ffiles=""
  for f in base.vhdx mid.avhdx top.avhdx base.qcow2 mid.qcow2 top.qcow2; do
    ffiles="$ffiles$f $(alloc_mib "$FW/$f") MiB, "
  done
  rec meta.frag_data "$(python3 "$HELPER" layoutinfo "$FD/layout.json" desc) Allocated on disk: ${ffiles%, }."
  say "   verifying: sha256 of the flat file, chainfs export (VHDX chain), qemu-img convert (qcow2 chain)"
  hf=$(python3 "$HELPER" sha256 "$FD/raw.img" | cut -d' ' -f1)
  "$CH" export "$FW/top.avhdx" "$W/verify.raw" --force >/dev/null || die "chainfs export of the fragmented VHDX chain failed"
  h=$(python3 "$HELPER" sha256 "$W/verify.raw" | cut -d' ' -f1)
  [ "$h" = "$hf" ] || die "the fragmented VHDX chain (chainfs export) differs from its flat file ($h, not $hf)"
  qemu-img convert -f qcow2 -O raw "$FW/top.qcow2" "$W/verify.raw" || die "qemu-img convert of the fragmented qcow2 chain failed"
  h=$(python3 "$HELPER" sha256 "$W/verify.raw" | cut -d' ' -f1)
  rm -f "$W/verify.raw"
  [ "$h" = "$hf" ] || die "the fragmented qcow2 chain (qemu-img convert) differs from its flat file ($h, not $hf)"
  "$CH" check "$FW/top.avhdx" >"$LOGD/check-frag.log" 2>&1 || die "chainfs check of the fragmented VHDX chain failed (see $LOGD/check-frag.log)"
  say "   flat $hf"
  rec meta.frag_verify "sha256 $hf for the flat file, \`chainfs export\` of the VHDX chain (which \`chainfs check\` passes) and \`qemu-img convert\` of the qcow2 chain; each mounted view is probed against the flat file before it is measured."

  VSIZE=$FSIZE VREF=$FD/raw.img VLAYOUT=$FD/layout.json
  say "== 9. frag export: cold, $REPS runs each, MiB/s of the $((FSIZE >> 20)) MiB virtual size"
  export_loop f_chainfs f_qemu

  F_TARGETS=(f_raw f_nofuse)
  [ "$HAVE_MOUNT" = 1 ] && F_TARGETS+=(f_chainfs f_fuse)
  F_TARGETS+=(f_bindfs f_qsd)
  say "== 9. frag reads: ${F_TARGETS[*]}, $READ_REPS round(s)"
  rec meta.frag_read_how "$(how_reads) 'dd' = \`dd if=FILE of=/dev/null bs=1M\` of the whole file on a fresh mount after drop_caches, MiB/s = size / wall time. \
'Round trip' = the random 1-reader run on a fresh mount after drop_caches and a \`cat\` of the files behind the view (the flat file, or the chain's three files), so every 4 KiB read is one trip through FUSE to a daemon that finds its data in the page cache."
  RGROUPS="dd seq1 seq4 rand1 rand4 rt" read_rounds "${F_TARGETS[@]}"

  say "== 9. frag merge: both overlays into the base, cold, $REPS runs each, fresh copies; $((F3 >> 20)) MiB of merged data"
  mv "$FW"/*.vhdx "$FW"/*.avhdx "$FW"/*.qcow2 "$FP"/
  logcmd "cp --sparse=always \$W/frag/pristine/{base.vhdx,mid.avhdx,top.avhdx} (or {base,mid,top}.qcow2) \$W/frag/work/; drop   # before every merge run"
  logcmd "chainfs merge \$W/frag/work/top.avhdx \$W/frag/work/base.vhdx --json; sync \$W/frag/work/base.vhdx"
  logcmd "chainfs merge \$W/frag/work/top.avhdx \$W/frag/work/base.vhdx --keep --json; sync \$W/frag/work/{base.vhdx,mid.avhdx,top.avhdx}"
  logcmd "chainfs merge \$W/frag/work/top.avhdx \$W/frag/work/base.vhdx --wait-free --json; sync \$W/frag/work/base.vhdx"
  logcmd "qemu-img commit -q -d -f qcow2 -b \$W/frag/work/base.qcow2 \$W/frag/work/top.qcow2; sync \$W/frag/work/base.qcow2"
  logcmd "drop; cat \$W/frag/changed.bin > \$W/frag/cat.out; sync \$W/frag/cat.out   # a file of the merged byte count"
  logcmd "rm \$W/frag/work/top.avhdx \$W/frag/work/mid.avhdx; sync \$W/frag/work   # fresh copies: what deleting the merged layers costs by itself"
  for rep in $(seq "$REPS"); do
    shuffled "$rep" chainfs chainfs_keep chainfs_wait qemu cat rm
    for tool in "${ORDER[@]}"; do merge_run "$rep" f3 "$tool" "$F3"; done
  done
  rm -rf "$FD"
  VSIZE=$SIZE VREF=$IMG/raw.img VLAYOUT=$IMG/layout.json
fi

# ------------------------------------------------------------------ 10. depth
if has depth; then
  say "== 10. depth: the same $((DSIZE >> 20)) MiB of content as $DFMT chains of depth ${DEPTHS//,/, }"
  mkdir -p "$DD"
  t=$EPOCHREALTIME
  python3 "$HELPER" depthbuild "$DD" "$DSIZE" "$CH" "$RES" "$DFMT" "$DEPTHS"
  say "   built in $(secs_since "$t") s"
  rec meta.depth_size "$DSIZE"
  rec meta.depths "$DEPTHS"
  hd=$(python3 "$HELPER" sha256 "$DD/raw.img" | cut -d' ' -f1)
  dfiles=""
  for d in ${DEPTHS//,/ }; do
    leaf=$(python3 "$HELPER" layoutinfo "$DD/layout.json" "leaf$d")
    logcmd "chainfs export \$W/depth/d$d/${leaf##*/} \$W/verify.raw; python3 scripts/bench/helper.py sha256 \$W/verify.raw"
    "$CH" export "$leaf" "$W/verify.raw" --force >/dev/null || die "chainfs export of the depth-$d chain failed"
    h=$(python3 "$HELPER" sha256 "$W/verify.raw" | cut -d' ' -f1)
    rm -f "$W/verify.raw"
    [ "$h" = "$hd" ] || die "the depth-$d chain (chainfs export) differs from its flat file ($h, not $hd)"
    "$CH" check "$leaf" >"$LOGD/check-depth.log" 2>&1 || die "chainfs check of the depth-$d chain failed (see $LOGD/check-depth.log)"
    dfiles="$dfiles depth $d $(du -sm "$DD/d$d" | cut -f1) MiB,"
  done
  say "   flat $hd = every chain"
  rec meta.depth_data "$(python3 "$HELPER" layoutinfo "$DD/layout.json" desc) Allocated on disk:${dfiles%,}; the flat file $(alloc_mib "$DD/raw.img") MiB."
  rec meta.depth_verify "sha256 $hd for the flat file and \`chainfs export\` of every chain (each passes \`chainfs check\`); each mounted view is probed against the flat file before it is measured."
  VSIZE=$DSIZE VREF=$DD/raw.img VLAYOUT=$DD/layout.json
  D_TARGETS=(d_raw)
  if [ "$HAVE_MOUNT" = 1 ]; then
    for d in ${DEPTHS//,/ }; do D_TARGETS+=("depth$d"); done
  fi
  rec meta.depth_read_how "$(READ_REPS=$DEPTH_REPS how_reads)"
  say "== 10. depth reads: ${D_TARGETS[*]}, $DEPTH_REPS round(s)"
  READ_REPS=$DEPTH_REPS RGROUPS="seq1 rand1 rand4" read_rounds "${D_TARGETS[@]}"
  rm -rf "$DD"
  VSIZE=$SIZE VREF=$IMG/raw.img VLAYOUT=$IMG/layout.json
fi

# ------------------------------------------------------------------ 11. report
el=$(secs_since "$T_START")
rec meta.load_end "$(cut -d' ' -f1-3 /proc/loadavg)"
rec meta.elapsed "$(awk -v s="$el" 'BEGIN { printf "%d min %02d s", s / 60, s % 60 }')"
mkdir -p "$(dirname "$REPORT")"
python3 "$HELPER" report "$RES" "$REPORT"
cp "$RES" "$BENCH_DIR/last-results.tsv" # regenerate: scripts/bench/helper.py report FILE OUT.md
say ""
sed -n '/^## Export/,/^## Exact commands/p' "$REPORT" | sed '$d'
say "report: $REPORT   (total $(awk -v s="$el" 'BEGIN { printf "%d min %02d s", s / 60, s % 60 }'))"
[ "$FAILURES" -eq 0 ] || die "$FAILURES measurement(s) failed (see above)"
