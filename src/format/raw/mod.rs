//! Raw images: the virtual disk is the file, byte for byte.
//!
//! A raw file is always a base layer (it has no place to name a parent)
//! and stores every byte: `map` reports a file's holes (`SEEK_HOLE`) as
//! zero runs and everything else as data at the same offset, so export,
//! merges and `chainfs map` skip holes. Writes go straight into the file;
//! a discard punches a hole, which reads as zeros. There is no metadata
//! and no identity (`LayerInfo::unique_id` is `None`): a child in a format
//! that allows a raw parent names it by file name only.
//!
//! Raw has no signature, so it is probed last and claims a file only when
//! no format is recognised in it (`probe::identify`) and either its content
//! looks like a raw disk (a partition table or file system at the start)
//! or its name ends in `.raw`, `.img` or `.dd`. A qcow2 or VMDK named
//! `disk.img` is refused with what it is, never shown as raw bytes.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, ErrorKind, IoContext, Result};

use super::probe::{self, Foreign};
use super::registry::{Driver, Peek};
use super::{
    fileio, lock_file, space, CreateOptions, Extent, Layer, LayerInfo, LayerOptions, LockMode,
};

/// The registry entry.
pub static DRIVER: Driver = Driver {
    name: "raw",
    extensions: &["raw", "img", "dd"],
    parents: &[],
    probe,
    open,
    create,
    peek,
    create_versions: &[],
    create_subblocks: false,
};

/// Sector size raw layers present (the unit of `write_sectors`).
const SECTOR: u32 = 512;

fn claims(head: &[u8], len: u64, path: &Path) -> bool {
    // A name another format owns (`x.vhd`, `x.qcow2`) is never raw: a
    // fixed VHD whose only footer is damaged still holds the guest's
    // partition table at 0, and must be refused, not shown 512 bytes long.
    if super::registry::driver_for_name(path).is_ok_and(|d| d.name != DRIVER.name) {
        return false;
    }
    match probe::identify(head, len) {
        Some(Foreign::Raw(_)) => true,
        Some(_) => false,
        None => DRIVER.extensions.contains(
            &path
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_default()
                .as_str(),
        ),
    }
}

/// Is `file` a raw image? See the module docs.
pub fn probe(file: &File, path: &Path) -> Result<bool> {
    let (head, len) = probe::head(file, path)?;
    Ok(claims(&head, len, path))
}

fn open(file: File, path: &Path, opts: &LayerOptions) -> Result<Arc<dyn Layer>> {
    let size = file.metadata().ctx(path, "cannot stat", None)?.len();
    Ok(Arc::new(RawLayer {
        file,
        path: path.to_path_buf(),
        size,
        writable: opts.writable,
    }))
}

fn peek(path: &Path) -> Option<Peek> {
    // Only regular files: opening a FIFO would block.
    if !std::fs::metadata(path).ok()?.is_file() {
        return None;
    }
    let file = File::open(path).ok()?;
    if !probe(&file, path).ok()? {
        return None;
    }
    Some(Peek {
        format: DRIVER.name,
        id: None,
        parent: None,
    })
}

/// Create a sparse raw file of `--size` bytes (`--fixed`: allocated).
fn create(path: &Path, o: &CreateOptions, parent: Option<&dyn Layer>) -> Result<()> {
    if parent.is_some() {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "{}: a raw image cannot have a parent (it stores no parent name)",
                path.display()
            ),
        ));
    }
    let size = o
        .size
        .ok_or_else(|| Error::invalid("--size is required for a base disk"))?;
    if o.block_size.is_some() {
        return Err(Error::invalid(format!(
            "{}: a raw image has no blocks; drop --block-size",
            path.display()
        )));
    }
    if size == 0 || size % 512 != 0 {
        return Err(Error::invalid(format!(
            "{}: size {size} is not a positive multiple of 512",
            path.display()
        )));
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .ctx(path, "cannot create", None)?;
    let filled = (|| {
        f.set_len(size).ctx(path, "cannot size", None)?;
        if o.fixed && size > 0 {
            // SAFETY: fallocate on a descriptor we own; no memory involved.
            let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, size as libc::off_t) };
            if r != 0 {
                return Err(Error::io(
                    path,
                    "cannot allocate",
                    Some(0),
                    std::io::Error::last_os_error(),
                ));
            }
        }
        f.sync_all().ctx(path, "cannot fsync", None)
    })();
    if filled.is_err() {
        // Ours: created above with create_new.
        let _ = std::fs::remove_file(path);
    }
    filled
}

/// One raw file.
pub struct RawLayer {
    file: File,
    path: PathBuf,
    size: u64,
    writable: bool,
}

impl RawLayer {
    /// `lseek(whence)` from `offset`; `None` past the last data (ENXIO).
    fn seek(&self, offset: u64, whence: libc::c_int) -> Result<Option<u64>> {
        // SAFETY: lseek on a descriptor we own; no memory is involved.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(Error::io(&self.path, "cannot seek", Some(offset), e)),
        }
    }

    fn require_writable(&self) -> Result<()> {
        super::require_writable(self.writable, &self.path)
    }
}

impl Layer for RawLayer {
    fn path(&self) -> &Path {
        &self.path
    }

    fn info(&self) -> LayerInfo {
        LayerInfo {
            format: DRIVER.name,
            disk_type: "raw",
            virtual_size: self.size,
            block_size: None,
            sector_size: SECTOR,
            unique_id: None,
            id_follows_data: false,
            creator: String::new(),
        }
    }

    fn parent(&self) -> Option<super::ParentLink> {
        None
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        if offset >= self.size {
            // Past the end (the parent of a longer child): zeros.
            return Ok(Extent::Zero { len });
        }
        let len = len.min(self.size - offset);
        let data = self.seek(offset, libc::SEEK_DATA)?.unwrap_or(u64::MAX);
        if data > offset {
            return Ok(Extent::Zero {
                len: len.min(data - offset),
            });
        }
        let hole = self.seek(offset, libc::SEEK_HOLE)?.unwrap_or(self.size);
        Ok(Extent::Data {
            file_offset: offset,
            len: len.min(hole.max(offset + 1) - offset),
        })
    }

    fn read_data(&self, file_offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, file_offset)
            .ctx(&self.path, "cannot read", Some(file_offset))
    }

    fn will_need(&self, file_offset: u64, len: u64) {
        fileio::will_need(&self.file, file_offset, len);
    }

    fn data_file(&self) -> Option<&File> {
        Some(&self.file)
    }

    fn write_behind(&self) {
        fileio::write_behind(&self.file);
    }

    fn allocated_bytes(&self) -> Result<u64> {
        let mut total = 0;
        let mut at = 0;
        while at < self.size {
            let Some(data) = self.seek(at, libc::SEEK_DATA)? else {
                break;
            };
            if data >= self.size {
                break;
            }
            let hole = self.seek(data, libc::SEEK_HOLE)?.unwrap_or(self.size);
            total += hole.min(self.size) - data;
            at = hole.max(data + 1);
        }
        Ok(total)
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn write_sectors(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.require_writable()?;
        // A last partial sector arrives padded to a whole one: the padding
        // lies past the end of the file and is not written.
        let n = (data.len() as u64).min(self.size.saturating_sub(offset)) as usize;
        self.file
            .write_all_at(&data[..n], offset)
            .ctx(&self.path, "cannot write", Some(offset))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.require_writable()?;
        let len = len.min(self.size.saturating_sub(offset));
        if len == 0 {
            return Ok(());
        }
        fileio::punch_hole(&self.file, offset, len).or_else(|e| {
            // No hole punching here: write the zeros.
            log::debug!("{}: punch hole: {e}; writing zeros", self.path.display());
            let zeros = vec![0u8; (1 << 20).min(len) as usize];
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(zeros.len() as u64) as usize;
                self.file.write_all_at(&zeros[..n], at).ctx(
                    &self.path,
                    "cannot write",
                    Some(at),
                )?;
                at += n as u64;
            }
            Ok(())
        })
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.file.sync_data().ctx(&self.path, "cannot fsync", None)
    }

    /// Dig holes: every whole 4 KiB page of data that reads as zeros
    /// becomes a hole (what `fallocate --dig-holes` does). The content and
    /// the length stay; only space goes back to the file system.
    fn compact(&self) -> Result<space::CompactStats> {
        self.require_writable()?;
        let len = self
            .file
            .metadata()
            .ctx(&self.path, "cannot stat", None)?
            .len();
        let mut stats = space::CompactStats {
            file_size_before: len,
            file_size_after: len,
            ..Default::default()
        };
        let mut at = 0;
        while at < self.size {
            let Some(data) = self.seek(at, libc::SEEK_DATA)? else {
                break;
            };
            if data >= self.size {
                break;
            }
            let hole = self
                .seek(data, libc::SEEK_HOLE)?
                .unwrap_or(self.size)
                .min(self.size);
            stats.holes_punched +=
                space::punch_zero_pages(&self.file, &self.path, data, hole - data)?;
            at = hole.max(data + 1);
        }
        self.flush()?;
        Ok(stats)
    }

    fn check(&self) -> Result<Vec<String>> {
        // No metadata: nothing in a raw file can be inconsistent.
        Ok(Vec::new())
    }

    fn set_lock(&self, mode: LockMode) -> Result<()> {
        lock_file(&self.file, &self.path, mode)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
