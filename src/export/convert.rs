//! `chainfs export` into an image format: the flattened chain becomes a new
//! standalone image (a base, no parent) in whatever format the registry's
//! driver writes, through the [`Layer`] trait alone, so a new driver is
//! exported to with no change here.
//!
//! ```text
//!   registry::create(TMP, virtual size) ─▶ open_layer(TMP, writable)
//!   workers: chunk ─plan─▶ runs ─read─▶ 8 MiB window ─zero check per grain─▶ write_sectors
//!   flush ─▶ close ─▶ link (or rename with --force) TMP to OUTPUT
//! ```
//!
//! A new image reads as zeros everywhere, so only data is written: runs
//! the chain resolves to zeros are never read, and read data is cut into
//! `GRAIN`-sized pieces of which the all-zero ones are skipped, so no
//! block of the new image is allocated for zeros and the image stays as
//! sparse as the format allows. Consecutive non-zero pieces go out as one
//! write, aligned to the window (a multiple of every sector size).
//!
//! The image is created under a temporary name carrying the format's
//! extension (`.OUTPUT.chainfs-export-PID.EXT`), made durable by the
//! driver's `flush`, and placed like a raw export (`super::via_temp`); on
//! any failure that one file is removed and the error says what failed.

use std::path::Path;

use super::{plan, via_temp, write_nonzero, ExportOptions, ExportStats, GRAIN, RUN};
use crate::cache::MetaCache;
use crate::error::{Error, Result};
use crate::format::registry::{self, Driver};
use crate::format::{CreateOptions, Layer, LayerOptions};
use crate::image::{FlatImage, Source};

/// Metadata cache of the new image (its tables are written, rarely read).
const CACHE: usize = 16 << 20;

/// Export `image` as a new `driver` image at `out` (`replace`: rename it
/// over the regular file there).
pub(super) fn to_image(
    image: &FlatImage,
    driver: &'static Driver,
    out: &Path,
    replace: bool,
    opts: &ExportOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<ExportStats> {
    let ext = driver.extensions.first().copied().unwrap_or(driver.name);
    // The extension makes `registry::create` pick this driver.
    let tmp = super::temp_name(out, &format!(".{ext}"));
    let create = CreateOptions {
        size: Some(image.size()),
        fixed: opts.fixed,
        block_size: opts.block_size,
        // The leaf's logical sector size, so a 4K-native disk stays one
        // where the format can say so.
        logical_sector: image.layers()[0].sector_size(),
        parent: None,
        version: None,
        subblocks: false,
    };
    via_temp(
        out,
        &tmp,
        replace,
        |tmp| registry::create(tmp, &create),
        |tmp, ()| fill(image, tmp, opts.threads, progress),
    )
    .map_err(|e| {
        Error::new(
            e.kind,
            format!("{}: cannot export as {}: {e}", out.display(), driver.name),
        )
    })
}

/// Open the new image at `tmp` and copy the chain's data into it.
fn fill(
    image: &FlatImage,
    tmp: &Path,
    threads: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<ExportStats> {
    let dst = registry::open_layer(
        tmp,
        &LayerOptions {
            writable: true,
            ignore_checksums: false,
            cache: MetaCache::new(CACHE),
        },
    )?;
    let size = image.size();
    if dst.virtual_size() < size {
        return Err(Error::invalid(format!(
            "{}: created with {} bytes, less than the chain's {size}",
            tmp.display(),
            dst.virtual_size()
        )));
    }
    let sector = u64::from(dst.sector_size());
    if sector == 0 || RUN % sector != 0 || GRAIN % sector != 0 || size % sector != 0 {
        return Err(Error::invalid(format!(
            "{}: the virtual size {size} is not a whole number of the image's {sector}-byte \
             sectors",
            tmp.display()
        )));
    }
    let (read, written, _) = super::in_chunks(size, threads, progress, |start, len, buf| {
        let (r, w) = copy_chunk(image, &*dst, start, len, buf)?;
        // Write-behind, as for a raw file: the final flush has little left.
        dst.write_behind();
        Ok((r, w, 0))
    })?;
    dst.flush()?;
    // Closed before it is linked into place (the driver finishes the file
    // on close; everything is flushed already).
    drop(dst);
    Ok(ExportStats {
        virtual_size: size,
        data_read: read,
        data_written: written,
        ..Default::default()
    })
}

/// Copy the data of `[start, start + len)` into `dst`, window by window;
/// returns (bytes read from layers, bytes written).
fn copy_chunk(
    image: &FlatImage,
    dst: &dyn Layer,
    start: u64,
    len: u64,
    buf: &mut [u8],
) -> Result<(u64, u64)> {
    let snap = image.snapshot();
    let window = buf.len() as u64;
    // The whole chunk at once: the plan tells the kernel what to read ahead.
    let runs = plan(&snap, start, len, window)?;
    let (mut read, mut written) = (0, 0);
    let mut first = 0; // the first run that may reach into this window
    let end = start + len;
    let mut w = start;
    while w < end {
        let wend = (w + window).min(end);
        let mut data = false;
        for r in runs[first..].iter().take_while(|r| r.off < wend) {
            let a = r.off.max(w);
            let b = (r.off + r.len).min(wend);
            let part = &mut buf[(a - w) as usize..(b - w) as usize];
            match r.src {
                Source::Zero => part.fill(0),
                src => {
                    snap.read(src.advanced(a - r.off), a, part)?;
                    read += b - a;
                    data = true;
                }
            }
        }
        while first < runs.len() && runs[first].off + runs[first].len <= wend {
            first += 1;
        }
        if data {
            written += write_nonzero(w, &buf[..(wend - w) as usize], |o, d| {
                dst.write_sectors(o, d)
            })?;
        }
        w = wend;
    }
    Ok((read, written))
}
