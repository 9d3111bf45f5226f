#!/usr/bin/env python3
"""Helpers for scripts/bench.sh (standard library only).

Subcommands:
  build DIR SIZE CHAINFS CMDLOG   make the same 3-layer content three ways in DIR:
                                  base/mid/top.vhd (chainfs), base/mid/top.qcow2
                                  (qemu-img + qemu-io) and raw.img (flat), and
                                  write the layout to DIR/layout.json
  sha256 FILE...                  print "digest  file" (OpenSSL-backed hashlib,
                                  ~1 GB/s; coreutils sha256sum is ~170 MB/s here)
  compare REF FILE LAYOUT N       compare FILE with REF at every region edge of
                                  LAYOUT plus N random 1 MiB chunks
  fio JSON                        print "MiB/s IOPS seconds MiB" of a fio JSON result
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


def cmd_build(d, size, chainfs, cmdlog):
    size = int(size)
    names = ["base", "mid", "top"]
    lay = layout(size)
    raw = os.path.join(d, "raw.img")
    tmp = os.path.join(d, "region.bin")
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
        vhd = os.path.join(d, name + ".vhd")
        q = os.path.join(d, name + ".qcow2")
        if li == 0:
            c1 = [chainfs, "create", vhd, "--size", str(size)]
            c2 = ["qemu-img", "create", "-q", "-f", "qcow2", q, str(size)]
        else:
            pv = os.path.join(d, names[li - 1] + ".vhd")
            pq = os.path.join(d, names[li - 1] + ".qcow2")
            c1 = [chainfs, "create", vhd, "--parent", pv]
            c2 = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", pq, "-F", "qcow2", q]
        for c in (c1, c2):
            run(c)
            logcmd(" ".join(c[:3]) + str(li > 0), shlex.join(c))
        lbytes = 0
        for off, ln in regs:
            with open(tmp, "wb") as f:
                left = ln
                while left:
                    n = min(left, 64 * MiB)
                    b = os.urandom(n)
                    f.write(b)
                    os.pwrite(rawfd, b, off + ln - left)
                    left -= n
            c1 = [chainfs, "write", vhd, "--offset", str(off), "--input", tmp]
            c2 = ["qemu-io", "-f", "qcow2", "-c", f"write -q -s {tmp} {off} {ln}", q]
            run(c1)
            run(c2)
            logcmd("write-vhd", shlex.join(c1))
            logcmd("write-qcow2", shlex.join(c2))
            lbytes += ln
        total += lbytes
        print(f"  {name}: {len(regs)} regions, {lbytes / MiB:.0f} MiB "
              f"({time.time() - t0:.0f} s so far)", flush=True)
    os.close(rawfd)
    os.unlink(tmp)
    logcmd("raw", "python3: os.pwrite of the same bytes at the same offsets into raw.img "
           "(truncated to the virtual size)")
    # Bytes visible in the flat image (the union of all regions).
    ivs = sorted((o, o + ln) for regs in lay for o, ln in regs)
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


def cmd_fio(path):
    with open(path) as f:
        txt = f.read()
    # fio may print warnings before the JSON.
    j = json.loads(txt[txt.index("{"):])
    r = j["jobs"][0]["read"]
    secs = r["runtime"] / 1000.0
    print(f"{r['bw_bytes'] / MiB:.1f} {r['iops']:.0f} {secs:.2f} {r['io_bytes'] / MiB:.0f}")


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
                     ("load", "Load average at start")):
        if k in meta:
            P(f"- {label}: {meta[k]}")
    P("")
    P("## Data")
    P("")
    P(meta.get("data", ""))
    P("")
    P(f"All three views agree before anything is measured: {meta.get('verify', 'not checked')}")
    P("")

    # Export
    size_mib = _num(meta.get("size_bytes")) / MiB if meta.get("size_bytes") else None
    P("## Export (flatten to a raw file)")
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
             ("qemu", "`qemu-img convert -O raw` (qcow2 chain)"),
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
    P("")
    P("## Exact commands")
    P("")
    P("`$W` is the run directory under `BENCH_DIR`; `FILE` is the file a target shows (the flat file, "
      "`disk.raw` of the chainfs mount, `vhdi3`, or the qemu-storage-daemon export file). `drop` means "
      "`sync; echo 3 > /proc/sys/vm/drop_caches`. Each fio line is the first run of its kind; the warm runs use "
      "`--size` = the range the cold pass before them read (the whole file unless its time cap stopped it).")
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
    P("sudo scripts/bench.sh                 # full: 2 GiB, ~10-15 min, writes docs/BENCHMARKS.md")
    P("sudo BENCH_QUICK=1 scripts/bench.sh   # 256 MiB, short runs, report in $BENCH_DIR/BENCHMARKS.md")
    P("# BENCH_SIZE=1G  BENCH_DIR=/path/on/disk  BENCH_REPS=5  BENCH_MOUNT_OPTS=ro,cache=64M  CHAINFS=path/to/chainfs")
    P("# BENCH_SECTIONS=export,read  BENCH_KEEP=1 (keep the images)  BENCH_REPORT=file.md")
    P("```")
    text = "\n".join(out) + "\n"
    with open(report, "w") as f:
        f.write(text)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    fn = {"build": cmd_build, "sha256": cmd_sha256, "compare": cmd_compare,
          "fio": cmd_fio, "report": cmd_report}.get(cmd)
    if fn is None:
        sys.exit(__doc__)
    fn(*args)


if __name__ == "__main__":
    main()
