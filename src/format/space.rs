//! File space a layer does not use: finding it (`check`), reusing it
//! (writable opens), and giving it back (`chainfs compact`).
//!
//! Both drivers append new blocks and write their table entries only at the
//! next flush, after the data (`pending`). A crash (or Ctrl-C) before that
//! flush leaves blocks that no table entry references: space the file
//! holds for nothing. Each driver lists the byte ranges its structures and
//! tables *reference* (`referenced_ranges`); everything else in the file is
//! unreferenced. Nobody can read unreferenced bytes through the format, so
//! overwriting them, punching holes over them or cutting them off the end
//! of the file changes nothing any reader sees; that is the whole safety
//! argument for reusing and reclaiming them. The drivers add the
//! format-specific rule for the end of the file (a VHD ends in a footer).
//!
//! Holes do not count: the allocated part of a range is found with
//! `SEEK_DATA`/`SEEK_HOLE`, so a sparse gap is not reported as a leak.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use serde::Serialize;

use crate::error::{Error, IoContext, Result};
use crate::size::human;

/// Gaps holding less allocated space than this are not reported by `check`:
/// alignment padding and the old footers a VHD writer leaves between
/// blocks, old VHD headers after a relink (all a few KiB).
pub const REPORT_MIN: u64 = 64 << 10;

/// What `chainfs compact` did to one file.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompactStats {
    /// Blocks whose table entry was cleared because they held only zeros
    /// (or, in a differencing layer, nothing of their own).
    pub blocks_freed: u64,
    /// Ranges of unreferenced space given back (holes punched).
    pub holes_punched: u64,
    /// File length before and after (the tail past the last referenced
    /// structure is cut off).
    pub file_size_before: u64,
    pub file_size_after: u64,
}

/// Sort and merge overlapping or touching ranges `(start, end)`.
pub fn normalize(mut r: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    r.retain(|&(s, e)| e > s);
    r.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(r.len());
    for (s, e) in r {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// The ranges of `0..len` that `referenced` (normalized) does not cover.
pub fn gaps(referenced: &[(u64, u64)], len: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = 0;
    for &(s, e) in referenced {
        if s >= len {
            break;
        }
        if s > at {
            out.push((at, s));
        }
        at = at.max(e);
    }
    if at < len {
        out.push((at, len));
    }
    out
}

fn lseek(file: &File, off: u64, whence: i32) -> std::io::Result<Option<u64>> {
    // SAFETY: lseek on a descriptor we own; no memory is involved.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        return Ok(None); // no data at or after `off`
    }
    Err(e)
}

/// Bytes of `start..end` that hold data (not holes). A file system without
/// `SEEK_DATA` reports the whole range as data.
pub fn data_bytes(file: &File, path: &Path, start: u64, end: u64) -> Result<u64> {
    let mut total = 0;
    let mut at = start;
    while at < end {
        let d = match lseek(file, at, libc::SEEK_DATA) {
            Ok(Some(d)) => d,
            Ok(None) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(end - at + total),
            Err(e) => return Err(Error::io(path, "cannot seek to data", Some(at), e)),
        };
        if d >= end {
            break;
        }
        let h = lseek(file, d, libc::SEEK_HOLE)
            .ctx(path, "cannot seek to a hole", Some(d))?
            .unwrap_or(end)
            .min(end);
        total += h - d;
        at = h;
    }
    Ok(total)
}

/// `check`'s findings: every gap of the file (`referenced` normalized,
/// `len` the file length) holding at least [`REPORT_MIN`] allocated bytes.
pub fn leak_report(
    file: &File,
    path: &Path,
    referenced: &[(u64, u64)],
    len: u64,
    table: &str,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (s, e) in gaps(referenced, len) {
        let n = data_bytes(file, path, s, e)?;
        if n >= REPORT_MIN {
            out.push(format!(
                "{}: {} at {s:#x}-{e:#x} not referenced by the {table} (left by an interrupted \
                 write or merge; `chainfs compact` gives it back)",
                path.display(),
                human(n)
            ));
        }
    }
    Ok(out)
}

/// Give back the space of `start..end`: punch a hole over its whole
/// 4 KiB pages that hold data. Only for ranges nothing references (or
/// that hold zeros): a hole reads as zeros. False when the file system
/// cannot punch holes (nothing changed).
pub fn punch_range(file: &File, path: &Path, start: u64, end: u64) -> Result<bool> {
    let s = start.next_multiple_of(4096);
    let e = end / 4096 * 4096;
    if e <= s || data_bytes(file, path, s, e)? == 0 {
        return Ok(false);
    }
    crate::fault::point()?;
    match super::fileio::punch_hole(file, s, e - s) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(false),
        Err(err) => Err(Error::io(path, "cannot punch a hole", Some(s), err)),
    }
}

/// Punch holes over the whole 4 KiB pages of `off..off+len` (data of a
/// referenced block) that read as zeros; content is unchanged. Returns how
/// many ranges were punched.
pub fn punch_zero_pages(file: &File, path: &Path, off: u64, len: u64) -> Result<u64> {
    const CHUNK: u64 = 1 << 20;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut punched = 0;
    let start = off.next_multiple_of(4096);
    let end = (off + len) / 4096 * 4096;
    let mut at = start;
    let mut run: Option<u64> = None;
    while at < end {
        let n = (end - at).min(CHUNK);
        let b = &mut buf[..n as usize];
        file.read_exact_at(b, at)
            .ctx(path, "cannot read data", Some(at))?;
        for (i, page) in b.chunks(4096).enumerate() {
            let p = at + i as u64 * 4096;
            if page.iter().all(|&x| x == 0) {
                run.get_or_insert(p);
            } else if let Some(s) = run.take() {
                punched += punch_range(file, path, s, p)? as u64;
            }
        }
        at += n;
    }
    if let Some(s) = run {
        punched += punch_range(file, path, s, end)? as u64;
    }
    Ok(punched)
}

/// Does `buf` hold only zeros? Word at a time: export, `write` and
/// `compact` run it over every byte they move.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut words = buf.chunks_exact(16);
    words
        .by_ref()
        .all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0)
        && words.remainder().iter().all(|&x| x == 0)
}

/// Bytes the file occupies on its file system (`st_blocks`).
pub fn occupied(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .ctx(path, "cannot stat", None)?
        .blocks()
        * 512)
}

/// Free bytes for an unprivileged writer on the file system holding `path`.
pub fn free_space(path: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::invalid(format!("{}: path has a NUL byte", path.display())))?;
    // SAFETY: statvfs is plain data (integers only), for which all-zero
    // bytes are a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated string and `st` a live, writable
    // statvfs; both outlive the call, which writes only into `st`.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(Error::io(
            path,
            "cannot read file system statistics",
            None,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_between_referenced_ranges() {
        let r = normalize(vec![(10, 20), (0, 5), (18, 30), (40, 50)]);
        assert_eq!(r, vec![(0, 5), (10, 30), (40, 50)]);
        assert_eq!(gaps(&r, 60), vec![(5, 10), (30, 40), (50, 60)]);
        assert_eq!(gaps(&r, 45), vec![(5, 10), (30, 40)]);
        assert_eq!(gaps(&[], 7), vec![(0, 7)]);
    }

    #[test]
    fn data_bytes_skips_holes() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(&[1u8; 8192], 1 << 20).unwrap();
        let p = Path::new("t");
        let n = data_bytes(&f, p, 0, 4 << 20).unwrap();
        // File systems without SEEK_DATA count everything.
        assert!(n == 8192 || n == 4 << 20, "{n}");
        if n == 8192 {
            assert_eq!(data_bytes(&f, p, (1 << 20) + 4096, 2 << 20).unwrap(), 4096);
        }
    }
}
