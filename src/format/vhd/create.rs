//! Creating VHD files: fixed, dynamic, and differencing children with the
//! `W2ru` and `W2ku` locators Hyper-V writes.
//!
//! Layout written (dynamic/differencing):
//! `[footer copy][header @512][W2ku data][W2ru data][BAT @4 KiB multiple][footer]`;
//! blocks are appended later by the writer, 4 KiB aligned.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use super::*;
use crate::format::hint;

pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;

/// A new base disk.
pub fn create_base(path: &Path, size: u64, fixed: bool, block_size: u32) -> Result<()> {
    validate_size(size)?;
    if !fixed {
        check_block_size(block_size)?;
    }
    let footer = new_footer(size, if fixed { TYPE_FIXED } else { TYPE_DYNAMIC });
    write_new(path, |f| {
        if fixed {
            f.set_len(size).ctx(path, "cannot size", None)?;
            f.write_all_at(&footer.to_bytes(), size)
                .ctx(path, "cannot write footer", Some(size))
        } else {
            write_dynamic(f, path, &footer, block_size, None)
        }
    })
}

/// What a differencing child records about its parent.
pub struct ParentSpec<'a> {
    pub path: &'a Path,
    pub unique_id: Uuid,
    pub virtual_size: u64,
}

/// A new differencing child of `parent`.
pub fn create_child(path: &Path, parent: &ParentSpec<'_>, block_size: u32) -> Result<()> {
    check_block_size(block_size)?;
    let footer = new_footer(parent.virtual_size, TYPE_DIFFERENCING);
    write_new(path, |f| {
        write_dynamic(f, path, &footer, block_size, Some(parent))
    })
}

fn check_block_size(block_size: u32) -> Result<()> {
    if !block_size.is_power_of_two() || !(512..=(256 << 20)).contains(&block_size) {
        return Err(Error::invalid(format!(
            "block size {block_size} is not a power of two between 512 bytes and 256 MiB"
        )));
    }
    Ok(())
}

fn validate_size(size: u64) -> Result<()> {
    if size == 0 || size % SECTOR != 0 || size > MAX_SIZE {
        return Err(Error::invalid(format!(
            "size {size} must be a non-zero multiple of 512 bytes, at most 2040 GiB"
        )));
    }
    Ok(())
}

fn now_vhd() -> u32 {
    let s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    s.saturating_sub(VHD_EPOCH) as u32
}

fn new_footer(size: u64, disk_type: u32) -> Footer {
    Footer {
        features: 2,
        version: 0x0001_0000,
        data_offset: if disk_type == TYPE_FIXED {
            u64::MAX
        } else {
            512
        },
        timestamp: now_vhd(),
        // Not `vpc `/`qemu`, so qemu uses current_size as Hyper-V does.
        creator_app: *b"chfs",
        creator_version: 0x0001_0000,
        creator_os: u32::from_be_bytes(*b"Wi2k"),
        original_size: size,
        current_size: size,
        geometry: geometry(size),
        disk_type,
        unique_id: Uuid::new_v4(),
        saved_state: 0,
    }
}

/// Create `path` (never replacing a file), fill it, fsync; remove it on error.
fn write_new(path: &Path, fill: impl FnOnce(&File) -> Result<()>) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .ctx(path, "cannot create", None)?;
    let r = fill(&f).and_then(|_| f.sync_all().ctx(path, "cannot fsync", None));
    if r.is_err() {
        let _ = std::fs::remove_file(path);
    }
    r
}

fn write_dynamic(
    f: &File,
    path: &Path,
    footer: &Footer,
    block_size: u32,
    parent: Option<&ParentSpec<'_>>,
) -> Result<()> {
    let entries = u32::try_from(footer.current_size.div_ceil(block_size as u64))
        .map_err(|_| Error::invalid("too many blocks for a VHD BAT"))?;
    let mut next = 512 + HEADER_SIZE as u64;
    let mut locators = [Locator::default(); 8];
    let mut blobs: Vec<(u64, Vec<u8>)> = Vec::new();
    let (mut parent_id, mut parent_timestamp, mut parent_name) = (Uuid::nil(), 0, String::new());
    if let Some(p) = parent {
        let f = parent_fields(path, p.path)?;
        for (i, d) in f.blobs.into_iter().enumerate() {
            locators[i] = Locator {
                data_offset: next,
                ..f.locators[i]
            };
            next += f.locators[i].data_space as u64;
            blobs.push((locators[i].data_offset, d));
        }
        parent_id = p.unique_id;
        parent_timestamp = f.timestamp;
        parent_name = f.name;
    }
    let table_offset = next.next_multiple_of(4096);
    let bat_bytes = (entries as u64 * 4).next_multiple_of(SECTOR);
    let header = DynamicHeader {
        table_offset,
        max_table_entries: entries,
        block_size,
        parent_id,
        parent_timestamp,
        parent_name,
        locators,
    };
    let fb = footer.to_bytes();
    f.write_all_at(&fb, 0)
        .ctx(path, "cannot write footer copy", Some(0))?;
    f.write_all_at(&header.to_bytes(), 512)
        .ctx(path, "cannot write dynamic header", Some(512))?;
    for (off, data) in &blobs {
        f.write_all_at(data, *off)
            .ctx(path, "cannot write parent locator", Some(*off))?;
    }
    // The BAT, all unallocated, written in chunks to bound memory.
    let chunk = vec![0xFFu8; 1 << 20];
    let mut done = 0;
    while done < bat_bytes {
        let n = (bat_bytes - done).min(chunk.len() as u64);
        f.write_all_at(&chunk[..n as usize], table_offset + done)
            .ctx(path, "cannot write BAT", Some(table_offset + done))?;
        done += n;
    }
    let footer_at = table_offset + bat_bytes;
    f.write_all_at(&fb, footer_at)
        .ctx(path, "cannot write footer", Some(footer_at))
}

/// How a child names its parent in its dynamic header.
pub struct ParentFields {
    /// W2ku (absolute) and W2ru (relative) entries; data offsets left 0.
    pub locators: [Locator; 8],
    /// The locators' data, in the same order.
    pub blobs: Vec<Vec<u8>>,
    /// The header's parent unicode name.
    pub name: String,
    /// The parent's modification time, VHD epoch.
    pub timestamp: u32,
}

/// The parent-naming fields of a child at `child` whose parent is `parent`.
pub fn parent_fields(child: &Path, parent: &Path) -> Result<ParentFields> {
    let abs = std::fs::canonicalize(parent).ctx(parent, "cannot resolve", None)?;
    let child_dir = absolute_dir(child)?;
    let rel = hint::windows_relative(&child_dir, &abs);
    let abs_s = hint::windows_absolute(&abs);
    let mut locators = [Locator::default(); 8];
    let mut blobs = Vec::new();
    for (i, (code, text)) in [(PLAT_W2KU, abs_s), (PLAT_W2RU, rel)]
        .into_iter()
        .enumerate()
    {
        let data = encode_utf16le(&text);
        let space = (data.len() as u64).next_multiple_of(SECTOR).max(SECTOR);
        locators[i] = Locator {
            code,
            data_space: space as u32,
            data_len: data.len() as u32,
            data_offset: 0,
        };
        blobs.push(data);
    }
    let timestamp = std::fs::metadata(parent)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs().saturating_sub(VHD_EPOCH) as u32);
    // Windows stores its full `C:\...` path here; libvhdi joins the part
    // after the last `\` to the child's folder and vhd-lib resolves it
    // from there: the file name in the same folder, else a `/` relative
    // path, serves both (see `hint`). The locators carry the Windows forms.
    let name = hint::header_name(&child_dir, &abs);
    Ok(ParentFields {
        locators,
        blobs,
        name,
        timestamp,
    })
}

fn absolute_dir(path: &Path) -> Result<PathBuf> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::canonicalize(&dir).ctx(&dir, "cannot resolve folder", None)
}
