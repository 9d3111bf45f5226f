//! `chainfs write`: a byte stream into the leaf of a chain, read in chunks
//! (a 10 GiB input never sits in memory) and kept sparse.
//!
//! Sparse rule: a run of the input that is all zeros is skipped when the
//! chain already reads zeros there (no layer holds data, or the data it
//! holds is zeros); the result reads the same either way, and the leaf
//! allocates no block for it. Zeros over data that is not zero are written
//! (they change what the disk shows). Runs are cut at the leaf's sector
//! boundaries, so a skipped run never splits a sector that gets data.
//! `--no-sparse` writes every byte, as `dd` would.

use std::io::Read;

use crate::error::{Error, ErrorKind, Result};
use crate::format::space::is_zero;
use crate::image::{FlatImage, Source};

/// How much input is read and written at a time.
pub const CHUNK: usize = 4 << 20;

/// What a write did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct WriteStats {
    /// Input bytes consumed.
    pub bytes_in: u64,
    /// Bytes written into the leaf.
    pub bytes_written: u64,
    /// Zero bytes skipped because the chain already read zeros there.
    pub bytes_skipped: u64,
}

/// Copy all of `input` into `flat` at `offset`. `known_len`, when the
/// input's length is known (a regular file), is checked against the
/// virtual size before anything is written; a stream that runs past the
/// end fails at the chunk that does, after the chunks before it were
/// written. `what` names the input in errors.
pub fn write_stream(
    flat: &FlatImage,
    offset: u64,
    input: &mut dyn Read,
    known_len: Option<u64>,
    sparse: bool,
    what: &str,
) -> Result<WriteStats> {
    let past_end = |len: u64| {
        Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "{}: write of {len} bytes from {what} at {offset} ends past the virtual size {}",
                flat.layers()[0].path().display(),
                flat.size()
            ),
        )
    };
    if let Some(n) = known_len {
        if offset.checked_add(n).is_none_or(|e| e > flat.size()) {
            return Err(past_end(n));
        }
    }
    let mut stats = WriteStats::default();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = fill(input, &mut buf).map_err(|e| {
            Error::new(
                ErrorKind::Io,
                format!("{what}: cannot read at offset {}: {e}", stats.bytes_in),
            )
        })?;
        if n == 0 {
            break;
        }
        let at = offset + stats.bytes_in;
        if at.checked_add(n as u64).is_none_or(|e| e > flat.size()) {
            return Err(past_end(stats.bytes_in + n as u64));
        }
        if sparse {
            write_sparse(flat, at, &buf[..n], &mut stats)?;
        } else {
            flat.write_at(at, &buf[..n])?;
            stats.bytes_written += n as u64;
        }
        stats.bytes_in += n as u64;
    }
    Ok(stats)
}

/// Read until `buf` is full or the input ends; returns the bytes read.
fn fill(input: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Write `data` at `at`, skipping zero runs that already read as zeros.
fn write_sparse(flat: &FlatImage, at: u64, data: &[u8], stats: &mut WriteStats) -> Result<()> {
    let ss = flat.layers()[0].sector_size() as u64;
    let end = at + data.len() as u64;
    let mut pos = at;
    while pos < end {
        // One run of pieces (sector-aligned, except at the ends) that are
        // all zero, or all not.
        let zero = is_zero(piece(data, at, pos, end, ss));
        let start = pos;
        while pos < end {
            let p = piece(data, at, pos, end, ss);
            if is_zero(p) != zero {
                break;
            }
            pos += p.len() as u64;
        }
        let run = &data[(start - at) as usize..(pos - at) as usize];
        if zero && reads_zero(flat, start, run.len() as u64)? {
            stats.bytes_skipped += run.len() as u64;
            continue;
        }
        flat.write_at(start, run)?;
        stats.bytes_written += run.len() as u64;
    }
    Ok(())
}

/// The input bytes from `pos` to the next sector boundary (or `end`).
fn piece(data: &[u8], at: u64, pos: u64, end: u64, ss: u64) -> &[u8] {
    let stop = (pos / ss + 1).saturating_mul(ss).min(end);
    &data[(pos - at) as usize..(stop - at) as usize]
}

/// Does the chain read zeros over `[off, off+len)` now?
fn reads_zero(flat: &FlatImage, off: u64, len: u64) -> Result<bool> {
    let layers = flat.layers();
    let mut pos = off;
    let mut buf = Vec::new();
    while pos < off + len {
        let (src, n) = crate::image::resolve(&layers, 0, pos, off + len - pos)?;
        let n = n.min(off + len - pos);
        if src != Source::Zero {
            // Data that may be zeros: look, a bounded piece at a time.
            let mut done = 0;
            while done < n {
                let k = (n - done).min(1 << 20);
                buf.resize(k as usize, 0);
                src.advanced(done).read(&layers, pos + done, &mut buf)?;
                if !is_zero(&buf) {
                    return Ok(false);
                }
                done += k;
            }
        }
        pos += n;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_follow_sector_boundaries() {
        let data = vec![0u8; 2000];
        // Starting mid-sector at 100: up to 512, then whole sectors, then
        // the tail up to 2100.
        let mut pos = 100;
        let mut lens = Vec::new();
        while pos < 2100 {
            let p = piece(&data, 100, pos, 2100, 512);
            lens.push(p.len());
            pos += p.len() as u64;
        }
        assert_eq!(lens, [412, 512, 512, 512, 52]);
    }

    #[test]
    fn zero_detection_sees_every_byte() {
        let mut b = vec![0u8; 1031];
        assert!(is_zero(&b));
        for i in [0, 7, 8, 512, 1030] {
            b[i] = 1;
            assert!(!is_zero(&b), "byte {i}");
            b[i] = 0;
        }
    }
}
