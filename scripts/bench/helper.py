#!/usr/bin/env python3
"""Helpers for scripts/bench.sh (standard library only).

Subcommands:
  build DIR SIZE CHAINFS CMDLOG [vhdx]
                                  make the same 3-layer content several ways in
                                  DIR: base/mid/top.vhd (chainfs), base/mid/top.qcow2
                                  (qemu-img + qemu-io), raw.img (flat) and, with
                                  vhdx, base.vhdx/mid.avhdx/top.avhdx (chainfs);
                                  the layout goes to DIR/layout.json
  mergebuild DIR SIZE CHAINFS CMDLOG
                                  the merge chain base <- mid <- leaf (VHD and
                                  qcow2) in DIR/work, DIR/flat.raw, DIR/layout.json,
                                  DIR/cp2.bin and DIR/cp3.bin (the merged byte counts)
  layoutinfo LAYOUT KEY           print one value of a layout file
  sha256 FILE...                  print "digest  file" (OpenSSL-backed hashlib,
                                  ~1 GB/s; coreutils sha256sum is ~170 MB/s here)
  compare REF FILE LAYOUT N       compare FILE with REF at every region edge of
                                  LAYOUT plus N random 1 MiB chunks
  fio JSON [read|write]           print "MiB/s IOPS seconds MiB" of a fio JSON result
  mergeread MNT COMMAND CAP       O_DIRECT reads of MNT/disk.raw, unloaded and
                                  while COMMAND (a merge) runs through MNT/control
  report RESULTS REPORT           turn the results file into the markdown report

The layout is deterministic (fixed seed, scaled to SIZE); the data is random
(os.urandom), so it is incompressible and differs between runs. Every offset and
length is a multiple of 4 KiB: libvhdi (the vhdimount oracle) misreads VHD
bitmaps whose bytes are only partly set, which 4 KiB-aligned writes never make.
"""

import hashlib
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import time

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
ALIGN = 4 * KiB
SEED = 20240611


def _aligned(x):
    return max(ALIGN, (int(x) // ALIGN) * ALIGN)


def layout(size):
    """Regions per layer, base first: lists of (offset, length).

    At 2 GiB: base 8 x ~128 MiB (one per eighth of the disk, so every eighth
    keeps a hole), middle 30 x ~15 MiB and top 100 x ~2.5 MiB at random
    4 KiB-aligned offsets (so they straddle VHD 2 MiB blocks and qcow2 64 KiB
    clusters, overlap each other and shadow the layers below)."""
    rng = random.Random(SEED)
    s = size / (2 * GiB)
    layers = []
    base = []
    slot = size // 8
    for i in range(8):
        ln = _aligned(128 * MiB * s * rng.uniform(0.8, 1.2))
        ln = min(ln, _aligned(slot - ALIGN))
        off = i * slot + rng.randrange(0, max(1, (slot - ln) // ALIGN)) * ALIGN
        base.append((off, ln))
    layers.append(base)
    for count, mean in ((30, 15 * MiB), (100, 2.5 * MiB)):
        regs = []
        for _ in range(count):
            ln = _aligned(mean * s * rng.uniform(0.5, 1.5))
            off = rng.randrange(0, (size - ln) // ALIGN + 1) * ALIGN
            regs.append((off, ln))
        layers.append(regs)
    return layers


def run(cmd, log=None):
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.exit(f"bench: command failed ({r.returncode}): {shlex.join(cmd)}\n{r.stdout}{r.stderr}")
    return r.stdout


def union_bytes(regions):
    """Bytes covered by the union of (offset, length) regions."""
    ivs = sorted((o, o + ln) for o, ln in regions)
    union, cur = 0, None
    for a, b in ivs:
        if cur is None or a > cur[1]:
            if cur:
                union += cur[1] - cur[0]
            cur = [a, b]
        else:
            cur[1] = max(cur[1], b)
    if cur:
        union += cur[1] - cur[0]
    return union


# File name of layer `name` (base first) in format `fmt`: VHDX differencing
# disks are .avhdx, as Hyper-V names its checkpoints.
def layer_file(d, name, fmt, base):
    ext = {"vhd": ".vhd", "qcow2": ".qcow2", "vhdx": ".vhdx" if base else ".avhdx"}[fmt]
    return os.path.join(d, name + ext)


def build_chain(d, size, chainfs, cmdlog, names, lay, fmts, raw):
    """Make the chain names[0] <- names[1] <- ... in every format of fmts
    (vhd, vhdx: chainfs create/write; qcow2: qemu-img create, qemu-io write)
    with the same random bytes at the same offsets, and the flat file `raw`.

    Bottom-up: every layer is written completely before its child is created
    (a VHDX write changes its DataWriteGuid, which a child made earlier would
    no longer match). qemu-io writes go in batches (many -c commands in one
    process) from one file per region."""
    logged = set()

    def logcmd(key, cmd):
        if key not in logged:
            logged.add(key)
            with open(cmdlog, "a") as f:
                f.write("cmd\t" + cmd + "\n")

    with open(raw, "wb") as f:
        f.truncate(size)
    rawfd = os.open(raw, os.O_WRONLY)
    t0 = time.time()
    total = 0
    for li, (name, regs) in enumerate(zip(names, lay)):
        files = {fmt: layer_file(d, name, fmt, li == 0) for fmt in fmts}
        for fmt, path in files.items():
            if li == 0:
                c = ([chainfs, "create", path, "--size", str(size)] if fmt != "qcow2" else
                     ["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)])
            else:
                parent = layer_file(d, names[li - 1], fmt, li == 1)
                c = ([chainfs, "create", path, "--parent", parent] if fmt != "qcow2" else
                     ["qemu-img", "create", "-q", "-f", "qcow2", "-b", parent, "-F", "qcow2", path])
            run(c)
            logcmd(f"create-{fmt}-{li > 0}", shlex.join(c))
        batch, batch_bytes = [], 0

        def flush_qemu():
            nonlocal batch, batch_bytes
            if not batch:
                return
            c = ["qemu-io", "-f", "qcow2"]
            for tmp, off, ln in batch:
                c += ["-c", f"write -q -s {tmp} {off} {ln}"]
            c.append(files["qcow2"])
            run(c)
            logcmd("write-qcow2", shlex.join(c[:5] + [c[-1]]) + "   # one -c per region, up to 64 in one process")
            for tmp, _, _ in batch:
                os.unlink(tmp)
            batch, batch_bytes = [], 0

        lbytes = 0
        for ri, (off, ln) in enumerate(regs):
            tmp = os.path.join(d, f"region.{ri}.bin")
            with open(tmp, "wb") as f:
                left = ln
                while left:
                    n = min(left, 64 * MiB)
                    b = os.urandom(n)
                    f.write(b)
                    os.pwrite(rawfd, b, off + ln - left)
                    left -= n
            for fmt in fmts:
                if fmt == "qcow2":
                    continue
                c = [chainfs, "write", files[fmt], "--offset", str(off), "--input", tmp]
                run(c)
                logcmd(f"write-{fmt}", shlex.join(c))
            if "qcow2" in fmts:
                batch.append((tmp, off, ln))
                batch_bytes += ln
                if len(batch) >= 64 or batch_bytes >= 256 * MiB:
                    flush_qemu()
            else:
                os.unlink(tmp)
            lbytes += ln
        flush_qemu()
        total += lbytes
        print(f"  {name}: {len(regs)} regions, {lbytes / MiB:.0f} MiB "
              f"({time.time() - t0:.0f} s so far)", flush=True)
    os.close(rawfd)
    logcmd("raw", "python3: os.pwrite of the same bytes at the same offsets into the flat file "
           "(truncated to the virtual size)")
    return total


def cmd_build(d, size, chainfs, cmdlog, extra=""):
    size = int(size)
    names = ["base", "mid", "top"]
    lay = layout(size)
    fmts = ["vhd", "qcow2"] + (["vhdx"] if "vhdx" in extra.split(",") else [])
    total = build_chain(d, size, chainfs, cmdlog, names, lay, fmts, os.path.join(d, "raw.img"))
    union = union_bytes([r for regs in lay for r in regs])
    info = {
        "size": size,
        "layers": [{"name": n, "regions": [list(r) for r in regs],
                    "bytes": sum(ln for _, ln in regs)} for n, regs in zip(names, lay)],
        "written": total,
        "visible": union,
    }
    with open(os.path.join(d, "layout.json"), "w") as f:
        json.dump(info, f)
    print(f"  {total / MiB:.0f} MiB written, {union / MiB:.0f} MiB visible in the flat image")


def spread(rng, size, total, count):
    """`count` non-overlapping 4 KiB-aligned regions of `total` bytes in all,
    scattered over [0, size): random lengths (mean total/count, from 4 KiB
    to about twice the mean) in random gaps."""
    pages, n = total // ALIGN, count
    w = [rng.uniform(0.02, 1.98) for _ in range(n)]
    sw = sum(w)
    lens = [max(1, int(pages * x / sw)) for x in w]
    while sum(lens) != pages:
        i = rng.randrange(n)
        if sum(lens) < pages:
            lens[i] += 1
        elif lens[i] > 1:
            lens[i] -= 1
    free = size // ALIGN - pages
    cuts = sorted(rng.randrange(0, free + 1) for _ in range(n))
    regs, cur, prev = [], 0, 0
    for c, ln in zip(cuts, lens):
        cur += c - prev
        prev = c
        regs.append((cur * ALIGN, ln * ALIGN))
        cur += ln
    rng.shuffle(regs)  # written in random order, as a guest would
    return regs


def merge_layout(size):
    """base ~3/8 of the disk in 8 regions; mid 1/8 in 64 regions; leaf 1/4
    in 1024 regions (at 2 GiB: 768 MiB, 256 MiB, 512 MiB; fewer regions for
    smaller disks). Regions of one layer never overlap each other; the
    layers overlap each other at random."""
    rng = random.Random(SEED + 1)
    s = size / (2 * GiB)
    base = spread(rng, size, _aligned(size * 3 // 8), 8)
    mid = spread(rng, size, _aligned(size // 8), max(16, int(64 * s)))
    leaf = spread(rng, size, _aligned(size // 4), max(64, int(1024 * s)))
    return [base, mid, leaf]


def write_random(path, n):
    with open(path, "wb") as f:
        left = n
        while left:
            k = min(left, 64 * MiB)
            f.write(os.urandom(k))
            left -= k


def cmd_mergebuild(d, size, chainfs, cmdlog):
    """DIR/work/{base,mid,leaf}.{vhd,qcow2}, DIR/flat.raw, DIR/layout.json,
    DIR/cp2.bin and DIR/cp3.bin (random files of the merged byte counts)."""
    size = int(size)
    names = ["base", "mid", "leaf"]
    lay = merge_layout(size)
    work = os.path.join(d, "work")
    os.makedirs(work, exist_ok=True)
    total = build_chain(work, size, chainfs, cmdlog, names, lay, ["vhd", "qcow2"],
                        os.path.join(d, "flat.raw"))
    m2 = union_bytes(lay[2])
    m3 = union_bytes(lay[1] + lay[2])
    info = {
        "size": size,
        "layers": [{"name": n, "regions": [list(r) for r in regs],
                    "bytes": sum(ln for _, ln in regs)} for n, regs in zip(names, lay)],
        "written": total,
        "visible": union_bytes([r for regs in lay for r in regs]),
        "merge2": m2,
        "merge3": m3,
    }
    with open(os.path.join(d, "layout.json"), "w") as f:
        json.dump(info, f)
    write_random(os.path.join(d, "cp2.bin"), m2)
    write_random(os.path.join(d, "cp3.bin"), m3)
    print(f"  merge chain: {total / MiB:.0f} MiB written; leaf {m2 / MiB:.0f} MiB, "
          f"leaf+mid {m3 / MiB:.0f} MiB")


def cmd_layoutinfo(lay, key):
    with open(lay) as f:
        print(json.load(f)[key])


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 * MiB)
        mv = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(mv[:n])
    return h.hexdigest()


def cmd_sha256(*files):
    for p in files:
        print(f"{sha256(p)}  {p}", flush=True)


def cmd_compare(ref, path, lay, n):
    with open(lay) as f:
        info = json.load(f)
    size = info["size"]
    rng = random.Random(7)
    probes = []
    for layer in info["layers"]:
        for off, ln in layer["regions"]:
            for edge in (off, off + ln):
                probes.append((max(0, edge - 8 * KiB), 16 * KiB))
    for _ in range(int(n)):
        probes.append((rng.randrange(0, max(1, size - MiB) // ALIGN) * ALIGN, MiB))
    probes.append((size - 64 * KiB, 64 * KiB))
    fr = os.open(ref, os.O_RDONLY)
    ft = os.open(path, os.O_RDONLY)
    bad = 0
    for off, ln in probes:
        ln = min(ln, size - off)
        a = os.pread(fr, ln, off)
        b = os.pread(ft, ln, off)
        while len(b) < ln:
            more = os.pread(ft, ln - len(b), off + len(b))
            if not more:
                break
            b += more
        if a != b:
            bad += 1
            if bad <= 5:
                i = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
                print(f"  MISMATCH at {off + i} (probe {off}+{ln}, got {len(b)} bytes)", file=sys.stderr)
    if os.fstat(ft).st_size != size:
        print(f"  size {os.fstat(ft).st_size} != {size}", file=sys.stderr)
        bad += 1
    if bad:
        sys.exit(f"bench: {path} differs from {ref} in {bad} of {len(probes)} probes")
    print(f"  {len(probes)} probes match the flat file")


def cmd_fio(path, kind="read"):
    with open(path) as f:
        txt = f.read()
    # fio may print warnings before the JSON.
    j = json.loads(txt[txt.index("{"):])
    r = j["jobs"][0][kind]
    secs = r["runtime"] / 1000.0
    print(f"{r['bw_bytes'] / MiB:.1f} {r['iops']:.0f} {secs:.2f} {r['io_bytes'] / MiB:.0f}")


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


class Reader:
    """Sequential 1 MiB O_DIRECT reads of a file in a thread (from offset 0,
    wrapping at the end unless `once`), logging (time, bytes so far)."""

    def __init__(self, path, once=False, cap=None):
        import mmap
        import threading
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        self.size = os.fstat(self.fd).st_size
        self.buf = mmap.mmap(-1, MiB)  # page aligned, as O_DIRECT needs
        self.once, self.cap = once, cap
        self.log = [(time.monotonic(), 0)]
        self.wraps = 0
        self.error = None
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self):
        off, total, t0 = 0, 0, time.monotonic()
        try:
            while not self.stop.is_set():
                n = os.preadv(self.fd, [self.buf], off)
                if n <= 0 or off + n >= self.size:
                    total += max(n, 0)
                    self.log.append((time.monotonic(), total))
                    if self.once:
                        break
                    off = 0
                    self.wraps += 1
                    continue
                off += n
                total += n
                now = time.monotonic()
                self.log.append((now, total))
                if self.cap and now - t0 >= self.cap:
                    break
        except OSError as e:
            self.error = e

    def at(self, t):
        """Bytes read by time t (the last log entry not after t)."""
        best = 0
        for ts, b in self.log:
            if ts > t:
                break
            best = b
        return best

    def close(self):
        self.stop.set()
        self.t.join()
        os.close(self.fd)
        if self.error:
            sys.exit(f"bench: reading failed: {self.error}")


def job_state(path):
    kv = {}
    with open(path) as f:
        for line in f:
            k, _, v = line.rstrip("\n").partition("=")
            kv[k] = v
    return kv


def cmd_mergeread(mnt, command, cap):
    """Reads of MNT/disk.raw unloaded and during a merge started through
    MNT/control. After a warm-up pass (the daemon's metadata cache is warm
    in both phases), both phases start cold (sync + drop_caches) and make one
    sequential pass from offset 0 with O_DIRECT 1 MiB reads (never re-reading
    what is cached). Unloaded: the pass, capped at CAP s. Loaded: the reader
    starts and the merge command is written to MNT/control at once; MNT/jobs/N
    is polled every 20 ms until JobState 7 (anything else fails); the read
    rate is counted from the command to the merge's completion (or to the end
    of the pass, if the reader gets there first). Prints: unloaded-MiB/s
    (whole pass), unloaded-MiB/s over the same byte range as the loaded
    window, loaded-MiB/s, window-s, merge-ElapsedMs, MiB-read-in-window,
    1-if-the-pass-ended-before-the-merge, BytesDone."""
    cap = float(cap)
    disk = os.path.join(mnt, "disk.raw")
    # A first pass, not measured, loads the daemon's own metadata cache
    # (tables, bitmaps), as the loaded pass later finds it loaded.
    r = Reader(disk, once=True, cap=cap)
    r.t.start()
    r.t.join()
    r.close()
    drop_caches()
    r = Reader(disk, once=True, cap=cap)
    r.t.start()
    r.t.join()
    r.close()
    t0, _ = r.log[0]
    t1, b1 = r.log[-1]
    unl_whole = b1 / MiB / (t1 - t0)
    unl_log = r.log

    drop_caches()
    ctl = os.open(os.path.join(mnt, "control"), os.O_RDWR)
    r = Reader(disk, once=True)
    r.t.start()
    ts = time.monotonic()
    try:
        os.write(ctl, (command + "\n").encode())
    except OSError as e:
        r.close()
        sys.exit(f"bench: the control file refused '{command}': {e}")
    reply = os.read(ctl, 4096).decode()
    os.close(ctl)
    job = dict(l.split("=", 1) for l in reply.splitlines() if "=" in l).get("Job")
    if not job:
        r.close()
        sys.exit(f"bench: no job in the reply to '{command}': {reply!r}")
    jp = os.path.join(mnt, job)
    st = {}
    while time.monotonic() - ts < 600:
        st = job_state(jp)
        if st.get("JobState") in ("7", "8", "10"):
            break
        time.sleep(0.02)
    te = time.monotonic()
    r.close()
    if st.get("JobState") != "7":
        sys.exit(f"bench: merge job {job} ended in state {st.get('JobState')} "
                 f"({st.get('JobStateName')}): {st.get('ErrorDescription')}")
    eof = 0
    if not r.t.is_alive() and r.log[-1][0] < te and r.log[-1][1] >= r.size:
        te, eof = r.log[-1][0], 1
    win = te - ts
    bs, be = r.at(ts), r.at(te)
    got = be - bs
    loaded = got / MiB / win
    # The unloaded pass over the same bytes [bs, be) of the file.
    def when(b):
        return next((t for t, x in unl_log if x >= b), None)
    ta, tb = when(bs), when(be)
    same = got / MiB / (tb - ta) if ta is not None and tb is not None and tb > ta else unl_whole
    print(f"{unl_whole:.1f} {same:.1f} {loaded:.1f} {win:.2f} {st.get('ElapsedMs')} "
          f"{got / MiB:.0f} {eof} {st.get('BytesDone')}")


# ---------------------------------------------------------------- report

def _num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _fmt(x, unit=""):
    if x is None:
        return "–"
    if x >= 100:
        s = f"{x:,.0f}"
    elif x >= 10:
        s = f"{x:.1f}"
    else:
        s = f"{x:.2f}"
    return s + unit


MERGE_ROWS = [
    ("m2", "chainfs", "`chainfs merge leaf.vhd mid.vhd`"),
    ("m2", "chainfs_keep", "`chainfs merge --keep leaf.vhd mid.vhd` (reference: leaf kept, detached, not deleted)"),
    ("m2", "qemu", "`qemu-img commit leaf.qcow2` (empties the top afterwards, the default)"),
    ("m2", "qemu_d", "`qemu-img commit -d leaf.qcow2` (reference: top left as it is)"),
    ("m2", "cp", "`cp` of a file of the same bytes + `sync` (reference)"),
    ("m2", "rm", "`rm leaf.vhd` + `sync` of the folder (reference: what deleting SOURCE costs by itself)"),
    ("m3", "chainfs", "`chainfs merge leaf.vhd base.vhd`"),
    ("m3", "chainfs_keep", "`chainfs merge --keep leaf.vhd base.vhd` (reference: leaf and mid kept, detached)"),
    ("m3", "qemu", "`qemu-img commit -b base.qcow2 leaf.qcow2` (`-b` implies `-d`: no layer emptied)"),
    ("m3", "cp", "`cp` of a file of the same bytes + `sync` (reference)"),
    ("m3", "rm", "`rm leaf.vhd mid.vhd` + `sync` of the folder (reference: what deleting the merged layers costs)"),
]
WRITE_TARGETS = [("w_raw", "sparse file on this disk (reference)"),
                 ("w_chainfs", "`chainfs mount -o rw`, VHD overlay"),
                 ("w_qsd", "qemu-storage-daemon FUSE writable=on, qcow2 overlay")]
WRITE_METRICS = [("seqw", "seq 1 MiB, end fsync", "MiB/s"),
                 ("seqw_fsync", "seq 1 MiB, fsync each", "MiB/s"),
                 ("randw", "random 4 KiB, end fsync", "IOPS"),
                 ("randw_fsync", "random 4 KiB, fsync each", "IOPS")]


def _runs(vals, key):
    return [_num(x) for x in vals.get(key, []) if _num(x) is not None]


def merge_rates(meta, vals):
    """{(case, tool): (median s, MiB/s of merged data, runs)}"""
    out = {}
    for c, t, _ in MERGE_ROWS:
        runs = _runs(vals, f"merge.{c}.{t}.s")
        b = _num(meta.get("merge_bytes2" if c == "m2" else "merge_bytes3"))
        if runs and b:
            m = statistics.median(runs)
            out[(c, t)] = (m, b / MiB / m if m > 0 else None, runs)
    return out


def mread_rows(vals):
    rows = []
    for v in vals.get("mread", []):
        xs = v.split()
        rows.append({"whole": _num(xs[0]), "same": _num(xs[1]), "loaded": _num(xs[2]), "win": _num(xs[3]),
                     "ms": _num(xs[4]), "mib": _num(xs[5]), "eof": _num(xs[6]), "done": _num(xs[7])})
    return rows


def write_med(vals, t, m, col):
    v = vals.get(f"write.{t}.{m}")
    if not v or "FAILED" in v:
        return None
    xs = [_num(x.split()[col]) for x in v]
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def sections_extra(P, meta, vals, one, read_med):
    # ---- VHDX
    vx = [t for t in ("chainfs_vhdx", "vhdimount_vhdx") if any(k.startswith(f"read.{t}.") for k in vals)]
    if vx or vals.get("export.chainfs_vhdx.s"):
        P("## VHDX chain")
        P("")
        P("The same content as the VHD chain, as `base.vhdx <- mid.avhdx <- top.avhdx` made by `chainfs create` / "
          "`chainfs write` (each layer written before its child was created: a VHDX write changes the file's "
          "DataWriteGuid, which a child records as its `parent_linkage`). Its flattened sha256 equals the flat "
          "file's; each mounted view is probed against the flat file before it is measured. Reads: cold, as in "
          "the read section (fresh mount, page cache dropped), measured in the same rounds as the VHD targets; "
          "medians. qemu cannot open differencing VHDX, so `vhdimount` (libvhdi, read-only, ignores the log) "
          "is the only peer.")
        if meta.get("vx_read_how"):
            P("")
            P(meta["vx_read_how"])
        P("")
        P("| metric | `chainfs mount` (VHDX chain) | `vhdimount` (VHDX chain) | chainfs / vhdimount "
          "| `chainfs mount` (VHD chain) | `vhdimount` (VHD chain) |")
        P("|---|---|---|---|---|---|")
        ex = {}
        for t in ("chainfs_vhdx", "chainfs"):
            runs = _runs(vals, f"export.{t}.s")
            size = _num(meta.get("size_bytes"))
            if runs and size:
                ex[t] = size / MiB / statistics.median(runs)
        if ex:
            P(f"| `chainfs export`, cold (MiB/s of virtual size) | {_fmt(ex.get('chainfs_vhdx'))} | – | – | "
              f"{_fmt(ex.get('chainfs'))} | – |")
        for m, label, unit in (("seq_cold_1", "seq 1 MiB cold, 1 reader", "MiB/s"),
                               ("rand_cold_1", "random 4 KiB cold, 1 reader", "IOPS"),
                               ("rand_cold_4", "random 4 KiB cold, 4 readers", "IOPS")):
            col = 0 if unit == "MiB/s" else 1
            a, b = read_med("chainfs_vhdx", m, col), read_med("vhdimount_vhdx", m, col)
            c, d = read_med("chainfs", m, col), read_med("vhdimount", m, col)
            def cell(t, x):
                v = vals.get(f"read.{t}.{m}")
                if v and "FAILED" in v:
                    return "**FAILED**"
                return _fmt(x)
            P(f"| {label} ({unit}) | {cell('chainfs_vhdx', a)} | {cell('vhdimount_vhdx', b)} | "
              f"{_fmt(a / b) + 'x' if a and b else '–'} | {cell('chainfs', c)} | {cell('vhdimount', d)} |")
        row = ["daemon peak RSS (VmHWM, MiB)"]
        for t in ("chainfs_vhdx", "vhdimount_vhdx"):
            r = one(f"rss.{t}")
            row.append("–" if r is None else f"{r / 1024:.1f}")
        row.append("–")
        for t in ("chainfs", "vhdimount"):
            r = one(f"rss.{t}")
            row.append("–" if r is None else f"{r / 1024:.1f}")
        P("| " + " | ".join(row) + " |")
        P("")
        P("<details><summary>all VHDX runs</summary>")
        P("")
        P("| metric | chainfs_vhdx | vhdimount_vhdx |")
        P("|---|---|---|")
        for m, unit in (("seq_cold_1", 0), ("rand_cold_1", 1), ("rand_cold_4", 1)):
            row = [m]
            for t in ("chainfs_vhdx", "vhdimount_vhdx"):
                v = vals.get(f"read.{t}.{m}", [])
                row.append(", ".join("FAILED" if x == "FAILED" else _fmt(_num(x.split()[unit])) for x in v) or "–")
            P("| " + " | ".join(row) + " |")
        P("")
        P("</details>")
        P("")

    # ---- merge
    if "merge_data" in meta:
        P("## Merge")
        P("")
        P(meta["merge_data"])
        P("")
        P(meta.get("merge_verify", ""))
        P("")
        P(f"Every run starts from fresh copies of the pristine images (`cp --sparse=always`, same paths) and a "
          f"dropped page cache (`sync; echo 3 > /proc/sys/vm/drop_caches`); the time includes `sync` of the "
          f"changed files (chainfs fsyncs by itself; qemu-img does not). Median of {meta.get('reps', '?')} runs. "
          "MiB/s = merged data (the logical bytes the destination receives, the same number for every tool) / "
          "seconds; qemu-img copies whole 64 KiB clusters, chainfs only the sectors the layers hold.")
        P("")
        mr = merge_rates(meta, vals)
        b2, b3 = _num(meta.get("merge_bytes2")), _num(meta.get("merge_bytes3"))
        P("| case | tool | median s | MiB/s of merged data | runs (s) | vs cp | vs qemu-img commit |")
        P("|---|---|---|---|---|---|---|")
        for c, t, label in MERGE_ROWS:
            case = (f"leaf -> parent (mid), {b2 / MiB:.0f} MiB" if c == "m2" else
                    f"leaf -> grandparent (base) through mid, {b3 / MiB:.0f} MiB")
            if (c, t) not in mr:
                if vals.get(f"merge.{c}.{t}.s"):
                    P(f"| {case} | {label} | **FAILED** | | | | |")
                continue
            m, rate, runs = mr[(c, t)]
            if t == "rm":
                P(f"| {case} | {label} | {m:.2f} | – | {', '.join(f'{x:.2f}' for x in runs)} | – | – |")
                continue
            cp = mr.get((c, "cp"))
            q = mr.get((c, "qemu"))
            P(f"| {case} | {label} | {m:.2f} | {_fmt(rate)} | {', '.join(f'{x:.2f}' for x in runs)} | "
              f"{_fmt(rate / cp[1]) + 'x' if cp and t != 'cp' else '–'} | "
              f"{_fmt(rate / q[1]) + 'x' if q and t not in ('qemu', 'cp') else '–'} |")
        P("")
        cps = []
        for c in ("m2", "m3"):
            xs = sorted(set(vals.get(f"merge.{c}.chainfs.copied", []) + vals.get(f"merge.{c}.chainfs_keep.copied", [])))
            if xs:
                exp = b2 if c == "m2" else b3
                cps.append(f"{'leaf -> mid' if c == 'm2' else 'leaf -> base'}: {', '.join(xs)} "
                           f"({'the merged data exactly' if xs == [str(int(exp))] else f'expected {int(exp)}'})")
        if cps:
            P("`bytes_copied` reported by `chainfs merge --json`: " + "; ".join(cps) + ".")
            P("")
        rows = mread_rows(vals)
        if rows or meta.get("mread_how"):
            P("### Reads through the mount during a merge")
            P("")
            P(meta.get("mread_how", ""))
            P("")
            P("| run | unloaded MiB/s (whole pass) | unloaded MiB/s (same range) | during the merge MiB/s | "
              "during / unloaded (same range) | merge time under reads (ms) | MiB read in the window | "
              "BytesDone |")
            P("|---|---|---|---|---|---|---|---|")
            for i, r in enumerate(rows, 1):
                ratio = r["loaded"] / r["same"] if r["same"] else None
                P(f"| {i} | {_fmt(r['whole'])} | {_fmt(r['same'])} | {_fmt(r['loaded'])} | "
                  f"{_fmt(ratio) + 'x' if ratio else '–'} | {_fmt(r['ms'])} | {_fmt(r['mib'])}"
                  f"{' (the pass ended first)' if r['eof'] else ''} | "
                  f"{int(r['done']) if r['done'] is not None else '–'} |")
            if rows:
                med = {k: statistics.median([r[k] for r in rows if r[k] is not None]) for k in ("whole", "same", "loaded", "ms")}
                P(f"| median | {_fmt(med['whole'])} | {_fmt(med['same'])} | {_fmt(med['loaded'])} | "
                  f"{_fmt(med['loaded'] / med['same']) + 'x' if med['same'] else '–'} | {_fmt(med['ms'])} | | |")
            off = mr.get(("m2", "chainfs"))
            if off and rows:
                P("")
                P(f"For comparison, the same merge offline without readers took {off[0] * 1000:.0f} ms "
                  f"(median, including its start-up and fsync).")
            P("")

    # ---- writes
    if "write_how" in meta:
        P("## Writes through a mount")
        P("")
        P(meta["write_how"])
        P("")
        present = [(t, l) for t, l in WRITE_TARGETS if any(k.startswith(f"write.{t}.") for k in vals)]
        P("| metric | " + " | ".join(l for _, l in present) + " | chainfs / qsd |")
        P("|---|" + "---|" * len(present) + "---|")
        for m, label, unit in WRITE_METRICS:
            col = 0 if unit == "MiB/s" else 1
            row = [f"{label} ({unit})"]
            for t, _ in present:
                v = vals.get(f"write.{t}.{m}")
                if v and "FAILED" in v:
                    row.append("**FAILED**")
                else:
                    row.append(_fmt(write_med(vals, t, m, col)))
            a, b = write_med(vals, "w_chainfs", m, col), write_med(vals, "w_qsd", m, col)
            row.append(_fmt(a / b) + "x" if a and b else "–")
            P("| " + " | ".join(row) + " |")
        row = ["daemon peak RSS (VmHWM, MiB)"]
        for t, _ in present:
            r = one(f"rss.{t}")
            row.append("–" if r is None else f"{r / 1024:.1f}")
        row.append("")
        P("| " + " | ".join(row) + " |")
        P("")
        P("<details><summary>all write runs (MiB/s for seq rows, IOPS for random rows; seconds, MiB written)</summary>")
        P("")
        P("| metric | " + " | ".join(t for t, _ in present) + " |")
        P("|---|" + "---|" * len(present))
        for m, label, unit in WRITE_METRICS:
            col = 0 if unit == "MiB/s" else 1
            row = [label]
            for t, _ in present:
                v = vals.get(f"write.{t}.{m}", [])
                row.append(", ".join("FAILED" if x == "FAILED" else
                                     f"{_fmt(_num(x.split()[col]))} ({x.split()[2]} s, {x.split()[3]} MiB)"
                                     for x in v) or "–")
            P("| " + " | ".join(row) + " |")
        P("")
        P("</details>")
        P("")


def targets_extra(P, meta, vals, read_med, verdict):
    mr = merge_rates(meta, vals)
    if "merge_data" in meta:
        # The first line of each pair deletes the merged layers (Hyper-V's
        # merge); `--keep` against the qemu-img form that frees nothing either
        # is the like-for-like copy.
        for c, t, name, qt, qname in (
                ("m2", "chainfs", "leaf -> parent", "qemu", "`qemu-img commit`"),
                ("m2", "chainfs_keep", "leaf -> parent, `--keep`", "qemu_d", "`qemu-img commit -d`"),
                ("m3", "chainfs", "leaf -> grandparent (2 layers)", "qemu", "`qemu-img commit -b`"),
                ("m3", "chainfs_keep", "leaf -> grandparent, `--keep`", "qemu", "`qemu-img commit -b`")):
            ch, cp, q = mr.get((c, t)), mr.get((c, "cp")), mr.get((c, qt))
            if ch and cp:
                r = ch[1] / cp[1]
                P(f"| `chainfs merge` {name} >= 0.8x the `cp` rate | {r:.2f}x ({_fmt(ch[1])} vs {_fmt(cp[1])} MiB/s) "
                  f"| {verdict(r >= 0.8)} |")
            else:
                P(f"| `chainfs merge` {name} >= 0.8x the `cp` rate | not measured | – |")
            if ch and q:
                r = ch[1] / q[1]
                P(f"| `chainfs merge` {name} faster than {qname} | {r:.2f}x ({ch[0]:.2f} vs {q[0]:.2f} s) "
                  f"| {verdict(r > 1)} |")
            else:
                P(f"| `chainfs merge` {name} faster than {qname} | not measured | – |")
        rows = mread_rows(vals)
        if rows:
            l = statistics.median([r["loaded"] for r in rows])
            u = statistics.median([r["same"] for r in rows])
            r = l / u if u else 0
            P(f"| reads through the mount during a merge >= 0.5x unloaded | {r:.2f}x ({_fmt(l)} vs {_fmt(u)} MiB/s, "
              f"same range) | {verdict(r >= 0.5)} |")
        else:
            P("| reads through the mount during a merge >= 0.5x unloaded | not measured | – |")
    if "write_how" in meta:
        for m, label, unit in WRITE_METRICS:
            col = 0 if unit == "MiB/s" else 1
            a, b = write_med(vals, "w_chainfs", m, col), write_med(vals, "w_qsd", m, col)
            if a is not None and b:
                r = a / b
                P(f"| chainfs writes, {label} >= 1.0x qsd | {r:.2f}x ({_fmt(a)} vs {_fmt(b)} {unit}) | "
                  f"{verdict(r >= 1.0)} |")
            else:
                P(f"| chainfs writes, {label} >= 1.0x qsd | not measured | – |")
    for m, label, unit in (("seq_cold_1", "cold seq", "MiB/s"), ("rand_cold_1", "random 4K cold (1 reader)", "IOPS")):
        col = 0 if unit == "MiB/s" else 1
        a, b = read_med("chainfs_vhdx", m, col), read_med("vhdimount_vhdx", m, col)
        if a is not None and b:
            P(f"| VHDX chain, {label}: chainfs vs vhdimount (issue 6 sets no number) | {a / b:.2f}x "
              f"({_fmt(a)} vs {_fmt(b)} {unit}) | no target |")




def nbd_section(P, meta, vals, size_mib):
    """The NBD table: nbdcopy MiB/s (of virtual size) per server and
    connection count; returns {(server, conns): MiB/s} for the targets."""
    med = {}
    if not any(k.startswith("nbd.") for k in vals):
        return med
    P("## Serving over NBD (nbdcopy)")
    P("")
    P(f"`nbdcopy -C N -T N URI null:` over a Unix socket, cold (page cache dropped, server restarted before "
      f"each run), median of {meta.get('reps', '?')} runs, MiB/s of virtual size ({_fmt(size_mib)} MiB). "
      "nbdcopy asks for block status and reads only the extents the server reports as data. "
      f"{meta.get('nbdkit', '')}; {meta.get('libnbd', '')}.")
    if meta.get("nbd_verify"):
        P("")
        P(f"Checked first: {meta['nbd_verify']}")
    P("")
    servers = [("chainfs", "nbdkit + chainfs plugin, `readonly=true` (VHD chain)"),
               ("qemu", "`qemu-nbd -r -e 8` (qcow2 chain)")]
    P("| server | 1 conn MiB/s | 2 conns MiB/s | 4 conns MiB/s | 4 vs 1 | runs (s) |")
    P("|---|---|---|---|---|---|")
    for srv, label in servers:
        row, runs = [label], []
        for c in (1, 2, 4):
            v = vals.get(f"nbd.{srv}.c{c}.s", [])
            xs = [_num(x) for x in v if _num(x) is not None]
            if "FAILED" in v:
                row.append("**FAILED**")
            elif xs:
                m = statistics.median(xs)
                med[(srv, c)] = size_mib / m if m > 0 else None
                row.append(_fmt(med[(srv, c)]))
            else:
                row.append("–")
            runs.append(f"{c}: " + ", ".join(f"{x:.2f}" for x in xs))
        a, b = med.get((srv, 4)), med.get((srv, 1))
        row.append(f"{a / b:.2f}x" if a and b else "–")
        row.append("; ".join(runs))
        P("| " + " | ".join(row) + " |")
    info = [f"{srv}: {vals[f'nbd.{srv}.info'][-1]}" for srv, _ in servers if vals.get(f"nbd.{srv}.info")]
    if info:
        P("")
        P("What each server advertises (nbdinfo): " + "; ".join(info) + ".")
    P("")
    return med


def cmd_report(results, report):
    meta, vals, cmds = {}, {}, []
    with open(results) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            key, _, val = line.partition("\t")
            if key == "cmd":
                if val not in cmds:
                    cmds.append(val)
            elif key.startswith("meta."):
                meta[key[5:]] = val
            else:
                vals.setdefault(key, []).append(val)

    def one(key):
        v = vals.get(key)
        return _num(v[-1]) if v else None

    out = []
    P = out.append
    quick = meta.get("quick") == "1"
    P("# chainfs benchmarks")
    P("")
    P("Generated by `scripts/bench.sh`" + (" in QUICK mode (numbers only show the script works)" if quick else "")
      + f" on {meta.get('date', '?')}; the run took {meta.get('elapsed', '?')}.")
    if meta.get("note"):
        P("")
        P(f"> {meta['note']}")
    fails = {k[7:]: v for k, v in meta.items() if k.startswith("failed.")}
    if fails:
        P("")
        P("**Failures:** " + "; ".join(f"{k}: {v}" for k, v in sorted(fails.items())))
    P("")
    P("## Machine and versions")
    P("")
    for k, label in (("machine", "Machine"), ("kernel", "Kernel"), ("disk", "Work dir file system"),
                     ("chainfs", "chainfs"), ("qemu", "qemu-img / qemu-io / qemu-storage-daemon"),
                     ("libvhdi", "libvhdi (vhdimount)"), ("fio", "fio"), ("fuse", "fuse3"),
                     ("load", "Load average at start"), ("load_end", "Load average at the end")):
        if k in meta:
            P(f"- {label}: {meta[k]}")
    P("")
    if meta.get("data"):
        P("## Data")
        P("")
        P(meta["data"])
        P("")
        P(f"All views agree before anything is measured: {meta.get('verify', 'not checked')}")
        P("")

    # Export
    size_mib = _num(meta.get("size_bytes")) / MiB if meta.get("size_bytes") else None
    P("## Export (flatten to a raw file, or convert to a new VHDX)")
    P("")
    P(f"Cold (page cache dropped before each run), median of {meta.get('reps', '?')} runs, MiB/s of virtual size "
      f"({_fmt(size_mib)} MiB); each time includes an fsync of the output.")
    P("")
    if not any(k.startswith("export.") for k in vals):
        P("Not run (BENCH_SECTIONS).")
        P("")
    else:
        P("| tool | median s | MiB/s | runs (s) | output allocated MiB | vs qemu-img convert |")
        P("|---|---|---|---|---|---|")
    tools = [("chainfs", "`chainfs export` (VHD chain)"),
             ("chainfs_vhdx", "`chainfs export` (VHDX chain, same content)"),
             ("chainfs_to_vhdx", "`chainfs export --format vhdx` (VHDX chain to a new VHDX)"),
             ("qemu", "`qemu-img convert -O raw` (qcow2 chain)"),
             ("qemu_to_vhdx", "`qemu-img convert -O vhdx` (qcow2 chain to a new VHDX)"),
             ("qemu_w", "`qemu-img convert -O raw -m 8 -W` (qcow2 chain, reference)"),
             ("cp", "`cp --sparse=always` (flat file, reference)")]
    med = {}
    for t, label in tools:
        runs = [_num(x) for x in vals.get(f"export.{t}.s", []) if _num(x) is not None]
        if not runs:
            continue
        m = statistics.median(runs)
        med[t] = size_mib / m if m > 0 else None
        alloc = one(f"export.{t}.alloc_mib")
        P(f"| {label} | {m:.2f} | {_fmt(med[t])} | {', '.join(f'{x:.2f}' for x in runs)} | "
          f"{_fmt(alloc)} | {_fmt(med[t] / med['qemu']) + 'x' if med.get('qemu') and med[t] else '–'} |")
    P("")
    if "chainfs_vhdx" in med:
        P("qemu-img cannot read differencing VHDX (and libvhdi has no export), so the VHDX chain has no peer here; "
          "its row compares with the same content as VHD and qcow2.")
        P("")

    # Reads
    targets = [("raw", "(1) flat raw file, no FUSE"),
               ("chainfs", "(2) `chainfs mount` of the VHD chain"),
               ("vhdimount", "(3) `vhdimount` of the VHD chain"),
               ("qsd_raw", "(4a) qemu-storage-daemon FUSE, raw file"),
               ("qsd_qcow2", "(4b) qemu-storage-daemon FUSE, qcow2 chain")]
    metrics = [("seq_cold_1", "seq 1 MiB cold, 1 reader", "MiB/s"),
               ("seq_cold_4", "seq 1 MiB cold, 4 readers", "MiB/s"),
               ("seq_warm_1", "seq 1 MiB warm, 1 reader", "MiB/s"),
               ("seq_warm_4", "seq 1 MiB warm, 4 readers", "MiB/s"),
               ("rand_cold_1", "random 4 KiB cold, 1 reader", "IOPS"),
               ("rand_cold_4", "random 4 KiB cold, 4 readers", "IOPS"),
               ("rand_warm_1", "random 4 KiB warm, 1 reader", "IOPS"),
               ("rand_warm_4", "random 4 KiB warm, 4 readers", "IOPS")]
    def read_med(t, m, col):
        v = vals.get(f"read.{t}.{m}")
        if not v or "FAILED" in v:
            return None
        xs = [_num(x.split()[col]) for x in v]
        xs = [x for x in xs if x is not None]
        return statistics.median(xs) if xs else None

    P("## Reads through a mount")
    P("")
    if meta.get("read_section") != "1":
        P(f"Not run: {meta.get('read_skip', 'skipped')}")
        P("")
    else:
        if meta.get("chainfs_mount") != "1":
            P(f"**`chainfs mount` is not available in this build** ({meta.get('chainfs_mount_why', '')}): "
              "its column is empty and its targets are not evaluated. The peers were measured.")
            P("")
        P(meta.get("read_how", ""))
        P("")
        present = [(t, l) for t, l in targets if any(k.startswith(f"read.{t}.") for k in vals)]
        P("| metric | " + " | ".join(l for _, l in present) + " |")
        P("|---|" + "---|" * len(present))
        for m, label, unit in metrics:
            col = 0 if unit == "MiB/s" else 1
            row = [f"{label} ({unit})"]
            base = read_med("raw", m, col)
            for t, _ in present:
                v = vals.get(f"read.{t}.{m}")
                if not v:
                    row.append("–")
                    continue
                if "FAILED" in v:
                    row.append("**FAILED**")
                    continue
                x = read_med(t, m, col)
                cell = _fmt(x)
                if t != "raw" and base:
                    cell += f" ({x / base:.2f}x)"
                row.append(cell)
            P("| " + " | ".join(row) + " |")
        row = ["daemon peak RSS (VmHWM, MiB)"]
        for t, _ in present:
            r = one(f"rss.{t}")
            row.append("–" if r is None else f"{r / 1024:.1f}")
        P("| " + " | ".join(row) + " |")
        P("")
        P(f"Medians of {meta.get('read_reps', '?')} rounds; ratios in brackets are to (1), the flat raw file read "
          "directly, in the same row. Every run, in order (MiB/s for seq rows, IOPS for random rows):")
        P("")
        P("<details><summary>all runs</summary>")
        P("")
        P("| metric | " + " | ".join(t for t, _ in present) + " |")
        P("|---|" + "---|" * len(present))
        for m, label, unit in metrics:
            col = 0 if unit == "MiB/s" else 1
            row = [label]
            for t, _ in present:
                v = vals.get(f"read.{t}.{m}", [])
                row.append(", ".join("FAILED" if x == "FAILED" else _fmt(_num(x.split()[col])) for x in v) or "–")
            P("| " + " | ".join(row) + " |")
        P("")
        P("</details>")
        P("")

    sections_extra(P, meta, vals, one, read_med)
    nbd = nbd_section(P, meta, vals, size_mib)

    # Targets
    P("## Targets")
    P("")
    P("| target | measured | met? |")
    P("|---|---|---|")

    read_val = read_med

    def verdict(ok):
        return "–" if ok is None else ("**yes**" if ok else "**NO**")

    if med.get("chainfs") and med.get("qemu"):
        r = med["chainfs"] / med["qemu"]
        P(f"| `chainfs export` >= 2x `qemu-img convert` | {r:.2f}x ({_fmt(med['chainfs'])} vs "
          f"{_fmt(med['qemu'])} MiB/s) | {verdict(r >= 2)} |")
    else:
        P("| `chainfs export` >= 2x `qemu-img convert` | not measured | – |")
    have = meta.get("chainfs_mount") == "1" and meta.get("read_section") == "1"

    def ratio_row(label, a, b, need, unit):
        if not have or a is None or b is None or b == 0:
            P(f"| {label} | not measured | – |")
            return
        r = a / b
        P(f"| {label} | {r:.2f}x ({_fmt(a)} vs {_fmt(b)} {unit}) | {verdict(r >= need)} |")

    ratio_row("chainfs cold seq >= 0.75x raw", read_val("chainfs", "seq_cold_1", 0),
              read_val("raw", "seq_cold_1", 0), 0.75, "MiB/s")
    ratio_row("chainfs warm re-read >= 0.5x raw page-cache read", read_val("chainfs", "seq_warm_1", 0),
              read_val("raw", "seq_warm_1", 0), 0.5, "MiB/s")
    for n in ("1", "4"):
        ratio_row(f"chainfs random 4K cold ({n} reader{'s' if n == '4' else ''}) >= 2x qsd qcow2",
                  read_val("chainfs", f"rand_cold_{n}", 1), read_val("qsd_qcow2", f"rand_cold_{n}", 1), 2, "IOPS")
        ratio_row(f"chainfs random 4K cold ({n} reader{'s' if n == '4' else ''}) >= 0.6x raw",
                  read_val("chainfs", f"rand_cold_{n}", 1), read_val("raw", f"rand_cold_{n}", 1), 0.6, "IOPS")
    rss = one("rss.chainfs")
    bound = _num(meta.get("cache_mib"))
    if have and rss is not None and bound is not None:
        P(f"| chainfs peak RSS <= cache ({bound:.0f} MiB) + 32 MiB | {rss / 1024:.1f} MiB | "
          f"{verdict(rss / 1024 <= bound + 32)} |")
    else:
        P("| chainfs peak RSS <= cache + 32 MiB | not measured | – |")
    targets_extra(P, meta, vals, read_med, verdict)
    if nbd.get(("chainfs", 1)) and nbd.get(("qemu", 1)):
        for c in (1, 2, 4):
            a, b = nbd.get(("chainfs", c)), nbd.get(("qemu", c))
            if a and b:
                P(f"| `nbdcopy` ({c} connection{'s' if c > 1 else ''}) from the chainfs plugin >= 1.0x qemu-nbd | "
                  f"{a / b:.2f}x ({_fmt(a)} vs {_fmt(b)} MiB/s) | {verdict(a / b >= 1.0)} |")
    elif any(k.startswith("nbd.") for k in vals):
        P("| `nbdcopy` from the chainfs plugin >= 1.0x qemu-nbd | not measured | – |")
    P("")
    P("The read targets are judged on the 1-reader rows as the issue states them; the 4-reader rows are extra. "
      "Differences under about 1.5x between cold numbers can be host caching or noise "
      "(see /work/shared/docs/perf-notes.md); compare columns of one run, not runs.")
    P("")

    P("## Reading these numbers")
    P("")
    P("- 'Cold' drops this machine's page cache only. On a VM the host may still cache the image files, so "
      "cold reads of the same file vary a lot between runs (see the all-runs table); compare the columns of "
      "one row, which were measured minutes apart at most, and distrust differences under about 1.5x.")
    P("- When other work keeps the CPUs busy, the 1-reader FUSE rows (every request is a round trip to a daemon "
      "thread that must be scheduled) measure scheduler wake-up latency as much as the file system; the flat "
      "file read directly does not pay it. The load average at the start is given above.")
    P("- `qemu-img convert` and `cp` do not fsync their output and `chainfs export` does, so every export time "
      "here includes `sync OUTPUT`.")
    P("- libvhdi looks for a parent at `<the child's folder>/<the parent name stored in the header>`, even when "
      "that name is absolute (chainfs stores absolute names), so `vhdimount` is run from the image folder "
      "with a bare file name. All writes are 4 KiB-aligned, because libvhdi misreads partly set bitmap bytes.")
    P("- Warm rows for chainfs are served by the kernel page cache (it keeps the cache across opens); the "
      "daemon sees almost no requests then, so they measure the kernel's FUSE read path.")
    if "merge_data" in meta:
        disc = "discard" in meta.get("disk_opts", "").split(",")
        P("- Merges: `chainfs merge` deletes SOURCE (and the layers between) as Hyper-V does; the kernel frees a "
          "deleted file's blocks at its last close, inside the timed run"
          + (" and, because the work dir's ext4 is mounted with `discard`, discards them synchronously "
             "(about 0.25 s per 512 MiB here)" if disc else "")
          + "; the `rm` rows time that step alone, on fresh copies of the same files. `qemu-img commit` without "
          "`-d` empties the top image (discarding its clusters) and `-b` implies `-d`, so it leaves the layers "
          "in place. The `--keep` and `-d` rows show both tools without that step. qemu-img commit's copy reads "
          "and writes whole 64 KiB clusters.")
        P("- Reads during a merge: the merge reads the leaf's data through the page cache, and the reader, which "
          "reads the flattened view, can find some of it there; a reader that ends its one pass before the merge "
          "ends is measured up to the end of its pass (marked in the table).")
    if "write_how" in meta:
        P("- Writes: neither FUSE daemon enables the kernel's writeback cache, so every `write()` is a request to "
          "the daemon. A 4 KiB write into a fresh qcow2 overlay allocates a 64 KiB cluster and copies the rest of "
          "it from the backing chain (copy-on-write); into a fresh VHD overlay it allocates a 2 MiB block and sets "
          "bitmap bits (no copy). 'fsync each' rows measure each tool's flush path (chainfs: data, bitmaps, BAT, "
          "then fsync of the leaf; qemu: qcow2 metadata and fdatasync).")
    P("")
    P("## Exact commands")
    P("")
    P("`$W` is the run directory under `BENCH_DIR`; `FILE` is the file a target shows (the flat file, "
      "`disk.raw` of the chainfs mount, `vhdi3`, or the qemu-storage-daemon export file). `drop` means "
      "`sync; echo 3 > /proc/sys/vm/drop_caches`. Each fio line is the first run of its kind; the warm runs use "
      "`--size` = the range the cold pass before them read (the whole file unless its time cap stopped it). "
      "In the merge lines `DEST` is the destination (mid or base); in the write lines `FILE` is the writable "
      "view (`disk.raw` of the chainfs mount, the qemu-storage-daemon export file or the sparse file).")
    P("")
    P("```sh")
    wd = meta.get("workdir")
    for c in cmds:
        P(c.replace(wd, "$W") if wd else c)
    P("```")
    P("")
    P("## Re-running")
    P("")
    P("```sh")
    P("sudo scripts/bench.sh                 # full: 2 GiB, all sections, ~20-25 min, writes docs/BENCHMARKS.md")
    P("sudo BENCH_QUICK=1 scripts/bench.sh   # 256 MiB, short runs, report in $BENCH_DIR/BENCHMARKS.md")
    P("# BENCH_SIZE=1G  BENCH_DIR=/path/on/disk  BENCH_REPS=5  BENCH_MOUNT_OPTS=ro,cache=64M  CHAINFS=path/to/chainfs")
    P("# BENCH_SECTIONS=export,read,merge,write,vhdx,nbd (any subset; nbd is not in the default)  BENCH_KEEP=1 (keep the images)  BENCH_REPORT=file.md")
    P("```")
    text = "\n".join(out) + "\n"
    with open(report, "w") as f:
        f.write(text)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    fn = {"build": cmd_build, "sha256": cmd_sha256, "compare": cmd_compare,
          "fio": cmd_fio, "report": cmd_report, "mergebuild": cmd_mergebuild,
          "mergeread": cmd_mergeread, "layoutinfo": cmd_layoutinfo}.get(cmd)
    if fn is None:
        sys.exit(__doc__)
    fn(*args)


if __name__ == "__main__":
    main()
