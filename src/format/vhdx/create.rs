//! Creating VHDX files laid out as Windows does: header section, log at
//! 1 MiB (1 MiB), metadata at 2 MiB (1 MiB), BAT at 3 MiB, blocks after.

use std::os::unix::fs::FileExt;
use std::path::Path;

use uuid::Uuid;

use super::*;
use crate::format::CreateOptions;

/// What to create.
pub struct VhdxSpec<'a> {
    pub size: u64,
    pub fixed: bool,
    pub block_size: u64,
    pub logical_sector: u32,
    /// Differencing: the parent's path and its layer.
    pub parent: Option<(&'a Path, &'a dyn Layer)>,
}

/// `chainfs create` for a VHDX: a base (`--size`, `--fixed`, 32 MiB
/// blocks when dynamic as Hyper-V makes them) or a child of `parent`
/// (2 MiB blocks, as Hyper-V makes checkpoints).
pub fn create_file(path: &Path, o: &CreateOptions, parent: Option<&dyn Layer>) -> Result<()> {
    let default_bs = if o.fixed || parent.is_some() {
        2 << 20
    } else {
        32 << 20
    };
    let size = match parent {
        Some(_) => 0,
        None => o
            .size
            .ok_or_else(|| Error::invalid("--size is required for a base disk"))?,
    };
    create(
        path,
        &VhdxSpec {
            size,
            fixed: o.fixed,
            block_size: o.block_size.unwrap_or(default_bs),
            logical_sector: o.logical_sector,
            parent: parent.map(|p| (p.path(), p)),
        },
    )
}

pub fn create(path: &Path, spec: &VhdxSpec<'_>) -> Result<()> {
    let (size, logical_sector, disk_id, locator) = match spec.parent {
        Some((pp, pl)) => {
            let i = pl.info();
            let unique_id = match (i.format == DRIVER.name, i.unique_id) {
                (true, Some(id)) => id,
                _ => return Err(Error::unsupported(pp, "a VHDX child needs a VHDX parent")),
            };
            let abs = std::fs::canonicalize(pp).ctx(pp, "cannot resolve", None)?;
            let dir = std::fs::canonicalize(crate::paths::folder_of(path)).ctx(
                path,
                "cannot resolve folder",
                None,
            )?;
            let pairs = vec![
                ("parent_linkage".to_string(), guid_text(&unique_id)),
                (
                    "relative_path".to_string(),
                    crate::format::hint::windows_relative(&dir, &abs),
                ),
                (
                    "absolute_win32_path".to_string(),
                    crate::format::hint::windows_absolute(&abs),
                ),
            ];
            let disk_id = peek_disk_id(pp).unwrap_or_else(Uuid::new_v4);
            (i.virtual_size, i.sector_size, disk_id, Some(pairs))
        }
        None => (spec.size, spec.logical_sector, Uuid::new_v4(), None),
    };
    let image = NewImage {
        size,
        fixed: spec.fixed,
        block_size: spec.block_size,
        logical_sector,
        disk_id,
        file_write_guid: Uuid::new_v4(),
        data_write_guid: Uuid::new_v4(),
        locator,
    }
    .bytes()?;

    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .ctx(path, "cannot create", None)?;
    let r = (|| -> Result<()> {
        for (off, b) in &image.writes {
            f.write_all_at(b, *off)
                .ctx(path, "cannot write", Some(*off))?;
        }
        f.set_len(image.len).ctx(path, "cannot size", None)?;
        f.sync_all().ctx(path, "cannot fsync", None)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(path);
    }
    r
}

/// Everything the bytes of a new VHDX depend on, its ids included: random
/// when `create` makes a file, fixed where the same bytes are wanted every
/// time (the fuzz templates of `crate::fuzzing::vhdx_layout`).
#[derive(Debug, Clone)]
pub struct NewImage {
    pub size: u64,
    pub fixed: bool,
    pub block_size: u64,
    pub logical_sector: u32,
    pub disk_id: Uuid,
    pub file_write_guid: Uuid,
    pub data_write_guid: Uuid,
    /// The parent locator's pairs of a differencing disk.
    pub locator: Option<Vec<(String, String)>>,
}

/// A new VHDX as bytes: what goes where (everything not written is zero),
/// and the file's length.
pub struct ImageBytes {
    pub writes: Vec<(u64, Vec<u8>)>,
    pub len: u64,
}

impl ImageBytes {
    /// The whole file in memory.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len as usize];
        for (off, b) in &self.writes {
            v[*off as usize..*off as usize + b.len()].copy_from_slice(b);
        }
        v
    }
}

impl NewImage {
    /// Validate the geometry and lay the file out: identifier, both
    /// headers, both region tables, the metadata table and items, and for
    /// a fixed disk a BAT that maps every block.
    pub fn bytes(&self) -> Result<ImageBytes> {
        let (size, lss, pss) = (self.size, self.logical_sector, 4096u32);
        let bs = self.block_size;
        if !bs.is_power_of_two() || !(MIB..=256 * MIB).contains(&bs) {
            return Err(Error::invalid(format!(
                "block size {bs} must be a power of two from 1M to 256M"
            )));
        }
        if !matches!(lss, 512 | 4096) {
            return Err(Error::invalid("logical sector size must be 512 or 4096"));
        }
        if size == 0 || size % lss as u64 != 0 || size > 64 << 40 {
            return Err(Error::invalid(format!(
                "size {size} must be a non-zero multiple of {lss} bytes, at most 64 TiB"
            )));
        }
        let has_parent = self.locator.is_some();
        let chunk_ratio = ((1u64 << 23) * lss as u64) / bs;
        let data_blocks = size.div_ceil(bs);
        let entries = if has_parent {
            data_blocks.div_ceil(chunk_ratio) * (chunk_ratio + 1)
        } else {
            data_blocks + (data_blocks - 1) / chunk_ratio
        };
        let bat_len = (entries * 8).next_multiple_of(MIB);
        let (log_off, meta_off, bat_off) = (MIB, 2 * MIB, 3 * MIB);
        let first_block = bat_off + bat_len;

        let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut ident = vec![0u8; 64 * 1024];
        ident[0..8].copy_from_slice(b"vhdxfile");
        let creator: Vec<u8> = format!("chainfs {}", env!("CARGO_PKG_VERSION"))
            .encode_utf16()
            .flat_map(|u| u.to_le_bytes())
            .collect();
        ident[8..8 + creator.len()].copy_from_slice(&creator);
        writes.push((0, ident));
        for (seq, at) in [(1u64, HEADER1), (2, HEADER2)] {
            let h = Header {
                sequence: seq,
                file_write_guid: self.file_write_guid,
                data_write_guid: self.data_write_guid,
                log_guid: Uuid::nil(),
                log_version: 0,
                version: 1,
                log_length: MIB as u32,
                log_offset: log_off,
            };
            writes.push((at, h.to_bytes()));
        }
        let regions = region_table_bytes(&[
            RegionEntry {
                guid: BAT_GUID,
                offset: bat_off,
                length: bat_len as u32,
                required: true,
            },
            RegionEntry {
                guid: METADATA_GUID,
                offset: meta_off,
                length: MIB as u32,
                required: true,
            },
        ]);
        writes.push((REGION1, regions.clone()));
        writes.push((REGION2, regions));
        // Metadata items from +64 KiB.
        let mut items: Vec<(Uuid, Vec<u8>, bool, bool)> = Vec::new();
        let flags = self.fixed as u32 | (has_parent as u32) << 1;
        let mut fp = (bs as u32).to_le_bytes().to_vec();
        fp.extend_from_slice(&flags.to_le_bytes());
        items.push((FILE_PARAMETERS, fp, false, true));
        items.push((VIRTUAL_DISK_SIZE, size.to_le_bytes().to_vec(), true, true));
        items.push((
            VIRTUAL_DISK_ID,
            self.disk_id.to_bytes_le().to_vec(),
            true,
            true,
        ));
        items.push((LOGICAL_SECTOR_SIZE, lss.to_le_bytes().to_vec(), true, true));
        items.push((PHYSICAL_SECTOR_SIZE, pss.to_le_bytes().to_vec(), true, true));
        if let Some(pairs) = &self.locator {
            items.push((PARENT_LOCATOR, parent_locator_bytes(pairs), false, true));
        }
        let mut table = Vec::new();
        let mut at = 64 * KIB;
        for (id, data, vd, req) in items {
            table.push(MetadataEntry {
                item: id,
                offset: at as u32,
                length: data.len() as u32,
                is_user: false,
                is_virtual_disk: vd,
                required: req,
            });
            let next = (at + data.len() as u64).next_multiple_of(4096);
            writes.push((meta_off + at, data));
            at = next;
        }
        writes.push((meta_off, metadata_table_bytes(&table)));
        // BAT.
        let mut end = first_block;
        if self.fixed {
            let mut bat = vec![0u8; (entries * 8) as usize];
            let mut off = first_block;
            for n in 0..data_blocks {
                let idx = n + n / chunk_ratio;
                let e = PAYLOAD_FULLY_PRESENT | (off / MIB) << 20;
                bat[(idx * 8) as usize..(idx * 8 + 8) as usize].copy_from_slice(&e.to_le_bytes());
                off += bs;
            }
            writes.push((bat_off, bat));
            end = off;
        }
        Ok(ImageBytes {
            writes,
            len: end.max(first_block),
        })
    }
}

fn peek_disk_id(path: &Path) -> Option<Uuid> {
    let file = std::fs::File::open(path).ok()?;
    let opts = LayerOptions {
        writable: false,
        ignore_checksums: false,
        cache: MetaCache::new(1 << 20),
    };
    Some(VhdxLayer::open(file, path, &opts).ok()?.layout().disk_id)
}
