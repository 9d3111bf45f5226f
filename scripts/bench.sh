#!/usr/bin/env bash
# Benchmark chainfs against the tools users would pick instead, side by side on
# the same data, in one run, and write docs/BENCHMARKS.md.
#
#   1. data    a 2 GiB disk as a 3-layer chain holding ~1.7 GiB of random bytes
#              (base ~1 GiB in 8 large regions, middle ~450 MiB in 30, top
#              ~250 MiB in 100 small ones, overlapping so upper layers shadow
#              lower ones), made three ways: a VHD chain (chainfs create/write),
#              the same qcow2 chain (qemu-img create -b, qemu-io write -s) and the
#              flat raw file. The flattened views are checked equal by sha256
#              before anything is measured.
#   2. export  chainfs export (VHD chain) vs qemu-img convert -O raw (qcow2
#              chain) vs cp --sparse=always (flat file): cold, median of 3.
#   3. read    fio, psync, buffered: sequential 1 MiB and random 4 KiB, 1 and 4
#              readers, cold and warm, on (1) the flat file, (2) chainfs mount,
#              (3) vhdimount, (4) qemu-storage-daemon FUSE exports of the raw
#              file and of the qcow2 chain; peak RSS (VmHWM) of each daemon.
#              The chainfs column runs when `chainfs mount` exists.
#   4. report  the tables, ratios and targets as markdown.
#
# Needs root (drop_caches, FUSE mounts). Full run: ~10-15 min on 2 cores.
# Environment:
#   BENCH_QUICK=1        256 MiB and short runs (checks the script works)
#   BENCH_SIZE=1G        virtual size (K/M/G suffix or bytes; default 2G)
#   BENCH_DIR=DIR        where the images go (default target/bench; a run
#                        makes DIR/run.XXXXXX and removes it at the end);
#                        must be a disk file system, not tmpfs
#   BENCH_REPS=3         export runs per tool (median)
#   BENCH_READ_REPS=3    rounds of read runs (median; 1 in quick mode)
#   BENCH_SECTIONS=export,read
#   BENCH_MOUNT_OPTS=ro,cache=64M   options for `chainfs mount -o`
#   BENCH_KEEP=1         keep the images (and the run directory)
#   BENCH_REPORT=FILE    where the report goes (default docs/BENCHMARKS.md for a
#                        full 2 GiB run, else DIR/BENCHMARKS.md)
#   CHAINFS=PATH         chainfs binary to use (default: cargo build --release)
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
    *[0-9]) echo $((v)) ;;
    *) die "cannot parse size '$1'" ;;
  esac
}

QUICK=${BENCH_QUICK:-0}
if [ "$QUICK" = 1 ]; then
  SIZE_ARG=${BENCH_SIZE:-256M}
  SEQ_CAP=5 WARM_RT=2 RAND_IOS=4000 RAND_CAP=5 VERIFY_PROBES=16 READ_REPS=${BENCH_READ_REPS:-1}
else
  SIZE_ARG=${BENCH_SIZE:-2G}
  SEQ_CAP=12 WARM_RT=3 RAND_IOS=40000 RAND_CAP=8 VERIFY_PROBES=32 READ_REPS=${BENCH_READ_REPS:-3}
fi
SIZE=$(to_bytes "$SIZE_ARG")
if [ $((SIZE % (4 << 20))) -ne 0 ] || [ "$SIZE" -lt $((64 << 20)) ]; then
  die "BENCH_SIZE must be a multiple of 4 MiB and at least 64 MiB"
fi
REPS=${BENCH_REPS:-3}
SECTIONS=${BENCH_SECTIONS:-export,read}
MOUNT_OPTS=${BENCH_MOUNT_OPTS:-ro,cache=64M}
BENCH_DIR=${BENCH_DIR:-$REPO/target/bench}
if [ -n "${BENCH_REPORT:-}" ]; then
  REPORT=$BENCH_REPORT
elif [ "$QUICK" != 1 ] && [ "$SIZE" -eq $((2 << 30)) ]; then
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
python3 -c 'import hashlib, json, statistics' || die "python3 lacks its standard library"

mkdir -p "$BENCH_DIR"
FSTYPE=$(stat -f -c %T "$BENCH_DIR")
case $FSTYPE in
  tmpfs | ramfs) die "BENCH_DIR=$BENCH_DIR is on $FSTYPE; use a directory on the disk (same disk as /work)" ;;
esac

# The binary: copied into the run directory, so that a concurrent cargo build
# cannot swap it in the middle of the run.
if [ -z "${CHAINFS:-}" ]; then
  need cargo cargo
  say "== building chainfs (cargo build --release)"
  (cd "$REPO" && cargo build --release --quiet) || die "cargo build --release failed"
  CHAINFS=$REPO/target/release/chainfs
fi
[ -x "$CHAINFS" ] || die "chainfs binary '$CHAINFS' not found"

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
}
secs_since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }'; }
alloc_mib() { du -B1M "$1" | cut -f1; }

# ------------------------------------------------------------------ meta
rec meta.quick "$QUICK"
rec meta.workdir "$W"
rec meta.size_bytes "$SIZE"
rec meta.reps "$REPS"
rec meta.cache_mib "$CACHE_MIB"
rec meta.date "$(date -u '+%Y-%m-%d %H:%M UTC')"
# shellcheck disable=SC1091
rec meta.machine "$(nproc) cores ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)), $(awk '/MemTotal/ { printf "%.1f GiB RAM", $2 / 1048576 }' /proc/meminfo), $(. /etc/os-release && echo "$PRETTY_NAME")"
rec meta.kernel "$(uname -r)"
rec meta.disk "$FSTYPE on $(df --output=source "$BENCH_DIR" | tail -1) (the work dir: BENCH_DIR)"
rev=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$REPO" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]; then
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

say "== chainfs benchmark: $((SIZE >> 20)) MiB virtual, work dir $W$([ "$QUICK" = 1 ] && echo ', QUICK mode')"

# ------------------------------------------------------------------ 1. data
say "== 1. data: VHD chain, qcow2 chain and flat file with the same bytes"
t=$EPOCHREALTIME
python3 "$HELPER" build "$IMG" "$SIZE" "$CH" "$RES"
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
files=$(cd "$IMG" && for f in base.vhd mid.vhd top.vhd base.qcow2 mid.qcow2 top.qcow2 raw.img; do
  printf '%s %s MiB, ' "$f" "$(alloc_mib "$f")"
done)
rec meta.data "$DATA Allocated on disk: ${files%, }. VHD: dynamic, 2 MiB blocks (chainfs defaults); qcow2: qemu-img defaults (64 KiB clusters)."

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
rec meta.verify "sha256 $h_raw for the flat file, \`chainfs export\` of the VHD chain and \`qemu-img convert\` of the qcow2 chain (each mounted view is also probed against the flat file before it is measured)."

# ------------------------------------------------------------------ 2. export
if [[ ",$SECTIONS," == *,export,* ]]; then
  say "== 2. export: cold, $REPS runs each, MiB/s of the $((SIZE >> 20)) MiB virtual size"
  OUT=$OUTD/export.raw
  export_cmd() {
    case $1 in
      chainfs) "$CH" export "$IMG/top.vhd" "$OUT" --force >/dev/null ;;
      qemu) qemu-img convert -f qcow2 -O raw "$IMG/top.qcow2" "$OUT" ;;
      qemu_w) qemu-img convert -f qcow2 -O raw -m 8 -W "$IMG/top.qcow2" "$OUT" ;;
      cp) cp --sparse=always "$IMG/raw.img" "$OUT" ;;
    esac
  }
  logcmd "drop; chainfs export \$W/img/top.vhd \$W/out/export.raw --force; sync \$W/out/export.raw"
  logcmd "drop; qemu-img convert -f qcow2 -O raw \$W/img/top.qcow2 \$W/out/export.raw; sync \$W/out/export.raw"
  logcmd "drop; qemu-img convert -f qcow2 -O raw -m 8 -W \$W/img/top.qcow2 \$W/out/export.raw; sync \$W/out/export.raw"
  logcmd "drop; cp --sparse=always \$W/img/raw.img \$W/out/export.raw; sync \$W/out/export.raw"
  for rep in $(seq "$REPS"); do
    for tool in chainfs qemu qemu_w cp; do
      rm -f "$OUT"
      drop_caches
      t=$EPOCHREALTIME
      if export_cmd "$tool" && sync "$OUT"; then
        s=$(secs_since "$t")
        rec "export.$tool.s" "$s"
        rec "export.$tool.alloc_mib" "$(alloc_mib "$OUT")"
        printf '   run %d  %-8s %7.2f s  %7.0f MiB/s\n' "$rep" "$tool" "$s" \
          "$(awk -v s="$s" -v z="$SIZE" 'BEGIN { print z / 1048576 / s }')"
      else
        echo "bench.sh: FAILED: export with $tool" >&2
        FAILURES=$((FAILURES + 1))
      fi
    done
  done
  rm -f "$OUT"
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
declare -A RSS LOGGED

wait_mount() { # the daemon TPID must show TFILE on a FUSE mount at TMP
  local t=$1 i
  for i in $(seq 200); do
    if ! kill -0 "$TPID" 2>/dev/null; then
      tail -20 "$LOGD/$t.log" >&2
      echo "bench.sh: ERROR: $t: the daemon exited before its mount appeared (log above: $LOGD/$t.log)" >&2
      stop_target "$t"
      return 1
    fi
    if findmnt -n -o FSTYPE -M "$TMP" 2>/dev/null | grep -q '^fuse' &&
      [ -f "$TFILE" ] && [ "$(stat -c %s "$TFILE")" = "$SIZE" ]; then
      return 0
    fi
    sleep 0.1
  done
  tail -20 "$LOGD/$t.log" >&2
  echo "bench.sh: ERROR: $t: $TFILE did not appear as a $SIZE-byte file on a FUSE mount at $TMP within 20 s" >&2
  stop_target "$t"
  return 1
}

start_target() {
  local t=$1
  TPID="" TMP=""
  case $t in
    raw)
      TFILE=$IMG/raw.img
      return 0
      ;;
    chainfs)
      TMP=$MNT/chainfs TFILE=$MNT/chainfs/disk.raw
      mkdir -p "$TMP"
      "$CH" mount -f "$IMG/top.vhd" "$TMP" -o "$MOUNT_OPTS" >>"$LOGD/$t.log" 2>&1 &
      TPID=$!
      logcmd "chainfs mount -f \$W/img/top.vhd \$W/mnt/chainfs -o $MOUNT_OPTS &   # file: \$W/mnt/chainfs/disk.raw"
      ;;
    vhdimount)
      TMP=$MNT/vhdi TFILE=$MNT/vhdi/vhdi3
      mkdir -p "$TMP"
      # libvhdi opens a parent as <the child's folder>/<the parent name in the
      # header>, even when that name is absolute (chainfs stores absolute
      # names): so it gets a bare file name, from the image folder.
      (cd "$IMG" && exec vhdimount -v top.vhd "$TMP") >>"$LOGD/$t.log" 2>&1 &
      TPID=$!
      logcmd "(cd \$W/img && vhdimount -v top.vhd \$W/mnt/vhdi) &   # file: \$W/mnt/vhdi/vhdi3 (the flattened top of 3 layers)"
      ;;
    qsd_raw | qsd_qcow2)
      TMP=$MNT/$t TFILE=$MNT/$t
      : >"$TMP"
      local bd
      if [ "$t" = qsd_raw ]; then
        bd=(--blockdev "driver=file,node-name=f0,filename=$IMG/raw.img,read-only=on"
          --blockdev "driver=raw,node-name=n0,file=f0,read-only=on")
      else
        bd=(--blockdev "driver=qcow2,node-name=n0,read-only=on,file.driver=file,file.filename=$IMG/top.qcow2")
      fi
      qemu-storage-daemon "${bd[@]}" \
        --export "type=fuse,id=e0,node-name=n0,mountpoint=$TMP,writable=off" >>"$LOGD/$t.log" 2>&1 &
      TPID=$!
      logcmd "qemu-storage-daemon ${bd[*]//$W/\$W} --export type=fuse,id=e0,node-name=n0,mountpoint=\$W/mnt/$t,writable=off &"
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
    qsd_*) stop_pid "$TPID" ;; # qemu-storage-daemon stays up without its export
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
fio_run() { # target metric fio-args...
  local t=$1 m=$2 out
  shift 2
  local j=$FIOD/$t.$m.$EPOCHSECONDS.json
  LAST_IO=$SIZE
  if [ -z "${LOGGED[$m]:-}" ]; then
    LOGGED[$m]=1
    logcmd "fio --name=$m --filename=FILE ${FIO_COMMON[*]} $*"
  fi
  if [ -n "$TPID" ] && ! kill -0 "$TPID" 2>/dev/null; then
    echo "bench.sh: FAILED: $t $m: the daemon is gone (log: $LOGD/$t.log)" >&2
    rec "read.$t.$m" FAILED
    FAILURES=$((FAILURES + 1))
    return 0
  fi
  if fio --name="$m" --filename="$TFILE" "${FIO_COMMON[@]}" --output="$j" "$@" >"$j.err" 2>&1 &&
    out=$(python3 "$HELPER" fio "$j"); then
    rec "read.$t.$m" "$out"
    local bw iops secs mib
    read -r bw iops secs mib <<<"$out"
    LAST_IO=$((mib << 20))
    printf '   %-10s %-12s %9s MiB/s %9s IOPS  (%s s, %s MiB)\n' "$t" "$m" "$bw" "$iops" "$secs" "$mib"
  else
    echo "bench.sh: FAILED: fio $m on $t ($TFILE):" >&2
    tail -5 "$j.err" "$j" >&2 2>/dev/null || true
    rec "read.$t.$m" FAILED
    FAILURES=$((FAILURES + 1))
  fi
}

SEQ=(--rw=read --bs=1M)
RAND=(--rw=randread --bs=4k --norandommap --randrepeat=1)
declare -A WARM # target -> bytes the cold sequential pass read (the warm range)

verify_target() { # mount once and probe the mounted view against the flat file
  local t=$1
  if ! start_target "$t"; then
    fail_target "$t" "the mount did not come up (log: $LOGD/$t.log)"
    return 1
  fi
  say "   $t: $TFILE"
  if ! python3 "$HELPER" compare "$IMG/raw.img" "$TFILE" "$IMG/layout.json" "$VERIFY_PROBES"; then
    stop_target "$t"
    fail_target "$t" "the mounted file shows different bytes from the flat file"
    return 1
  fi
  stop_target "$t"
}

warm_size() { # $1 target, $2 readers: bytes per reader inside the warm range
  local w=${WARM[$1]:-$SIZE} n=$2
  w=$(((w / n) >> 20 << 20))
  [ "$w" -ge $((1 << 20)) ] || w=$((1 << 20))
  echo "$w"
}

# One group = a fresh mount, a dropped page cache, then some fio runs.
group() {
  local g=$1 t=$2 q=$((SIZE / 4)) w m
  if ! start_target "$t"; then
    case $g in
      seq1) m="seq_cold_1 seq_warm_1 rand_warm_1 rand_warm_4" ;;
      seq4) m="seq_cold_4 seq_warm_4" ;;
      rand1) m=rand_cold_1 ;;
      rand4) m=rand_cold_4 ;;
    esac
    for w in $m; do rec "read.$t.$w" FAILED; done
    echo "bench.sh: FAILED: $t did not mount for $g" >&2
    FAILURES=$((FAILURES + 1))
    return 0
  fi
  drop_caches
  case $g in
    seq1)
      fio_run "$t" seq_cold_1 "${SEQ[@]}" --size="$SIZE" --runtime="$SEQ_CAP"
      WARM[$t]=$LAST_IO
      w=$(warm_size "$t" 1)
      fio_run "$t" seq_warm_1 "${SEQ[@]}" --size="$w" --time_based --runtime="$WARM_RT"
      fio_run "$t" rand_warm_1 "${RAND[@]}" --size="$w" --numjobs=1 --time_based --runtime="$WARM_RT"
      fio_run "$t" rand_warm_4 "${RAND[@]}" --size="$w" --numjobs=4 --time_based --runtime="$WARM_RT"
      ;;
    seq4)
      fio_run "$t" seq_cold_4 "${SEQ[@]}" --size="$q" --offset_increment="$q" --numjobs=4 --runtime="$SEQ_CAP"
      WARM[$t]=$LAST_IO
      w=$(warm_size "$t" 4)
      fio_run "$t" seq_warm_4 "${SEQ[@]}" --size="$w" --offset_increment="$q" --numjobs=4 --time_based --runtime="$WARM_RT"
      ;;
    rand1) fio_run "$t" rand_cold_1 "${RAND[@]}" --size="$SIZE" --numjobs=1 --number_ios="$RAND_IOS" --runtime="$RAND_CAP" ;;
    rand4) fio_run "$t" rand_cold_4 "${RAND[@]}" --size="$SIZE" --numjobs=4 --number_ios=$((RAND_IOS / 4)) --runtime="$RAND_CAP" ;;
  esac
  stop_target "$t"
}

if [[ ",$SECTIONS," == *,read,* ]]; then
  rec meta.read_section 1
  rec meta.read_reps "$READ_REPS"
  rec meta.read_how "fio $(fio --version), psync, buffered (direct=0); fio does not invalidate the page cache itself (invalidate=0). \
Every cell is the median of $READ_REPS rounds; in each round every kind of run is done for all targets in turn (the order rotates from round to round), \
so the targets compared in a row were measured minutes apart at most. \
'Cold' = a fresh mount (daemon started anew) and \`sync; echo 3 > /proc/sys/vm/drop_caches\` just before. \
Sequential: 1 MiB reads of the whole $((SIZE >> 20)) MiB (4 readers: one quarter each), cold runs capped at $SEQ_CAP s. \
'Warm' = on the same mount right after the cold 1-reader (or 4-reader) sequential pass, over the range that pass read (the whole file unless the cap stopped it), time-based $WARM_RT s. \
Random: 4 KiB reads at the same seeded offsets for every target (randrepeat, norandommap; fio's default fadvise RANDOM turns readahead off), \
cold: $RAND_IOS reads in all (capped at $RAND_CAP s). chainfs is mounted with \`-o $MOUNT_OPTS\`."
  targets=(raw)
  if [ "$HAVE_MOUNT" = 1 ]; then
    targets+=(chainfs)
    say "== 3. read: chainfs mount found; measuring it and the peers, $READ_REPS round(s)"
  else
    say "== 3. read: \`chainfs mount\` does not exist in this build; measuring the peers only, $READ_REPS round(s)"
  fi
  targets+=(vhdimount qsd_raw qsd_qcow2)
  say "   checking each mounted view against the flat file"
  ok=(raw)
  for t in "${targets[@]:1}"; do verify_target "$t" && ok+=("$t"); done
  targets=("${ok[@]}")
  n=${#targets[@]}
  for round in $(seq "$READ_REPS"); do
    order=()
    for i in $(seq 0 $((n - 1))); do order+=("${targets[$(((i + round - 1) % n))]}"); done
    say "-- round $round/$READ_REPS: ${order[*]}"
    for g in seq1 seq4 rand1 rand4; do
      for t in "${order[@]}"; do group "$g" "$t"; done
    done
  done
  for t in "${targets[@]}"; do
    [ -n "${RSS[$t]:-}" ] && rec "rss.$t" "${RSS[$t]}"
  done
else
  rec meta.read_section 0
  rec meta.read_skip "BENCH_SECTIONS=$SECTIONS"
fi

# ------------------------------------------------------------------ 4. report
el=$(secs_since "$T_START")
rec meta.elapsed "$(awk -v s="$el" 'BEGIN { printf "%d min %02d s", s / 60, s % 60 }')"
mkdir -p "$(dirname "$REPORT")"
python3 "$HELPER" report "$RES" "$REPORT"
cp "$RES" "$BENCH_DIR/last-results.tsv" # regenerate: scripts/bench/helper.py report FILE OUT.md
say ""
sed -n '/^## Export/,/^## Exact commands/p' "$REPORT" | sed '$d'
say "report: $REPORT   (total $(awk -v s="$el" 'BEGIN { printf "%d min %02d s", s / 60, s % 60 }'))"
[ "$FAILURES" -eq 0 ] || die "$FAILURES measurement(s) failed (see above)"
