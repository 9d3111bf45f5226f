//! `chainfs export`: the flat image to a raw file, reading only what the
//! chain stores and leaving holes wherever it reads zeros.
//!
//! The virtual disk is cut into 64 MiB chunks that worker threads take in
//! turn; each worker resolves its chunk into runs, reads the runs that hold
//! data with large positional reads, and writes them at the same offset of
//! the output unless they are all zeros. Zero runs are never read or
//! written: the output is sized up front and stays sparse there.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::image::{FlatImage, Source};

const CHUNK: u64 = 64 << 20;
const RUN: u64 = 8 << 20;

/// Byte counts of an export.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct ExportStats {
    pub virtual_size: u64,
    /// Bytes read from layers.
    pub data_read: u64,
    /// Bytes written to the output (non-zero data).
    pub data_written: u64,
}

/// Write the flattened `image` to the new file `out`. `progress` is called
/// with the virtual bytes done so far (from any worker thread).
pub fn export(
    image: &FlatImage,
    out: &Path,
    overwrite: bool,
    threads: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<ExportStats> {
    if !overwrite && out.exists() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("{}: exists (add --force to replace it)", out.display()),
        ));
    }
    // Written under a temporary name next to OUT and renamed into place at
    // the end: a failed export leaves no partial image, and never harms a
    // file it was to replace.
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp =
        crate::chain::folder_of(out).join(format!(".{name}.chainfs-export-{}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .ctx(&tmp, "cannot create", None)?;
    let r = export_into(image, &f, &tmp, threads, progress).and_then(|stats| {
        if overwrite {
            std::fs::rename(&tmp, out).ctx(out, "cannot rename into place", None)?;
        } else {
            // Never replaces a file that appeared meanwhile.
            std::fs::hard_link(&tmp, out).ctx(out, "cannot create", None)?;
            let _ = std::fs::remove_file(&tmp);
        }
        Ok(stats)
    });
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

fn export_into(
    image: &FlatImage,
    f: &File,
    out: &Path,
    threads: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<ExportStats> {
    let size = image.size();
    f.set_len(size).ctx(out, "cannot size", None)?;
    let next = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let read = AtomicU64::new(0);
    let written = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let chunks = size.div_ceil(CHUNK);
    let result: Result<()> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let mut buf = vec![0u8; RUN as usize];
                    loop {
                        let c = next.fetch_add(1, Ordering::Relaxed);
                        if c >= chunks || failed.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        let r = copy_chunk(
                            image,
                            f,
                            out,
                            c * CHUNK,
                            CHUNK.min(size - c * CHUNK),
                            &mut buf,
                        )
                        .map(|(r, w)| {
                            read.fetch_add(r, Ordering::Relaxed);
                            written.fetch_add(w, Ordering::Relaxed);
                        });
                        if r.is_err() {
                            failed.store(true, Ordering::Relaxed);
                            return r;
                        }
                        progress(
                            done.fetch_add(CHUNK.min(size - c * CHUNK), Ordering::Relaxed)
                                + CHUNK.min(size - c * CHUNK),
                        );
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("export worker panicked"))
    });
    result?;
    f.sync_all().ctx(out, "cannot fsync", None)?;
    Ok(ExportStats {
        virtual_size: size,
        data_read: read.into_inner(),
        data_written: written.into_inner(),
    })
}

fn copy_chunk(
    image: &FlatImage,
    f: &File,
    out: &Path,
    start: u64,
    len: u64,
    buf: &mut [u8],
) -> Result<(u64, u64)> {
    let layers = image.layers();
    let end = start + len;
    // 1. Metadata: ask every layer to fetch this chunk's tables ahead, then
    //    resolve the whole chunk into runs (no data read yet).
    for l in layers.iter() {
        l.prefetch(start, len);
    }
    let mut runs: Vec<(u64, usize, u64, u64)> = Vec::new(); // (off, depth, file_offset, len)
    let mut off = start;
    while off < end {
        // Runs are cut at the buffer size: one read and one write each.
        let (src, n) = crate::image::resolve(&layers, 0, off, (end - off).min(buf.len() as u64))?;
        if let Source::Data { depth, file_offset } = src {
            match runs.last_mut() {
                Some(r)
                    if r.1 == depth
                        && r.0 + r.3 == off
                        && r.2 + r.3 == file_offset
                        && r.3 + n <= buf.len() as u64 =>
                {
                    r.3 += n
                }
                _ => runs.push((off, depth, file_offset, n)),
            }
        }
        off += n;
    }
    // 2. Data: tell the kernel about every run now, so it reads ahead
    //    while the earlier runs are copied.
    for &(_, depth, fo, n) in &runs {
        layers[depth].will_need(fo, n);
    }
    let (mut read, mut written) = (0, 0);
    for (off, depth, file_offset, n) in runs {
        let part = &mut buf[..n as usize];
        layers[depth].read_data(file_offset, part)?;
        read += n;
        if !is_zero(part) {
            f.write_all_at(part, off)
                .ctx(out, "cannot write", Some(off))?;
            written += n;
        }
    }
    Ok((read, written))
}

/// True when every byte is zero (word-at-a-time).
pub fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(16);
    chunks.all(|c| u128::from_ne_bytes(c.try_into().unwrap()) == 0)
        && chunks.remainder().iter().all(|&x| x == 0)
}
