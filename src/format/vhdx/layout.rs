//! The layout of a VHDX file, parsed from its bytes: which header is
//! current, the log to replay over the metadata, the region table, the
//! metadata table and items (block size, sector sizes, virtual size, disk
//! id, parent locator) and the BAT geometry they imply.
//!
//! ```text
//! bytes --read_headers--> (Header, slot) --log::active_sequence--> Overlay
//!       --read_layout, through the overlay (MetaSource)----------> Layout
//! ```
//!
//! The parser reads through a [`Source`]: at open that is the file, in
//! tests and fuzzing a whole image in memory ([`Layout::parse`]); both take
//! the same path (`parse_source`), and nothing here writes, locks or
//! caches. It reads only what the tables point at, so an image claiming a
//! 4 GiB metadata region costs no more than a valid one. Errors name the
//! file and the offset of the structure at fault.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use uuid::Uuid;

use super::log;
use super::structs::*;
use crate::error::{Error, ErrorKind, IoContext, Result};

/// The parsed, validated layout of a VHDX file.
#[derive(Debug, Clone)]
pub struct Layout {
    pub header: Header,
    /// Which header slot (0 = 64 KiB, 1 = 128 KiB) is current.
    pub slot: usize,
    pub regions: Vec<RegionEntry>,
    pub bat_offset: u64,
    pub bat_length: u64,
    pub metadata_offset: u64,
    pub metadata_length: u64,
    pub metadata: Vec<MetadataEntry>,
    pub block_size: u64,
    pub leave_allocated: bool,
    pub has_parent: bool,
    pub virtual_size: u64,
    pub disk_id: Uuid,
    pub logical_sector: u32,
    pub physical_sector: u32,
    pub locator: Vec<(String, String)>,
    pub chunk_ratio: u64,
    pub bat_entries: u64,
    pub creator: String,
}

/// Bytes by offset, with errors that name the file and the offset: the
/// file itself (`RawFile`), the file as the log says it is (`MetaSource`),
/// or a whole image held in memory (`Image`, for tests and fuzzing).
pub(super) trait Source {
    /// The file named in errors.
    fn path(&self) -> &Path;
    /// How many bytes are stored now.
    fn stored_len(&self) -> Result<u64>;
    /// Fill `buf` with the bytes at `off`.
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<()>;
}

/// Positional reads of the file with errors that name it.
pub(super) struct RawFile<'a> {
    pub file: &'a File,
    pub path: &'a Path,
}

impl Source for RawFile<'_> {
    fn path(&self) -> &Path {
        self.path
    }

    fn stored_len(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .ctx(self.path, "cannot stat", None)?
            .len())
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, off)
            .ctx(self.path, "cannot read", Some(off))
    }
}

/// A whole image in memory. Reading past its end is an error, as reading
/// past the end of a file is.
struct Image<'a> {
    bytes: &'a [u8],
    path: &'a Path,
}

impl Source for Image<'_> {
    fn path(&self) -> &Path {
        self.path
    }

    fn stored_len(&self) -> Result<u64> {
        Ok(self.bytes.len() as u64)
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let range = usize::try_from(off)
            .ok()
            .and_then(|s| Some(s..s.checked_add(buf.len())?))
            .filter(|r| r.end <= self.bytes.len());
        let Some(range) = range else {
            return Err(Error::corrupt(
                self.path,
                off,
                format!(
                    "{} bytes lie past the end of the {}-byte image",
                    buf.len(),
                    self.bytes.len()
                ),
            ));
        };
        buf.copy_from_slice(&self.bytes[range]);
        Ok(())
    }
}

/// The file as the log says it is: the overlay over the bytes, zeros
/// between the end of the file and the length the log asks for.
pub(super) struct MetaSource<'a, S: Source> {
    pub raw: &'a S,
    pub overlay: &'a log::Overlay,
    pub len: u64,
}

impl<S: Source> Source for MetaSource<'_, S> {
    fn path(&self) -> &Path {
        self.raw.path()
    }

    fn stored_len(&self) -> Result<u64> {
        Ok(self.len)
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let end = off.saturating_add(buf.len() as u64);
        if end > self.len {
            return Err(Error::corrupt(
                self.raw.path(),
                off,
                format!(
                    "{} bytes of metadata lie past the end of the file",
                    buf.len()
                ),
            ));
        }
        let flen = self.raw.stored_len()?;
        let n = flen.saturating_sub(off).min(buf.len() as u64) as usize;
        self.raw.read(off, &mut buf[..n])?;
        buf[n..].fill(0);
        self.overlay.apply(off, buf);
        Ok(())
    }
}

/// What the bytes of a VHDX file say before any of it is used.
pub(super) struct Parsed {
    pub layout: Layout,
    /// The log replayed in memory (empty when the log is clean).
    pub overlay: log::Overlay,
    /// How many log entries the overlay holds (0: the log is clean).
    pub log_entries: usize,
    /// The file's length as the log says it is.
    pub len: u64,
}

/// The current header, the log and the layout as the log says it is, from
/// `raw` holding `len` bytes. Headers are read as stored (they say whether
/// there is a log); everything after them through the log's overlay.
pub(super) fn parse_source(raw: &impl Source, len: u64, ignore: bool) -> Result<Parsed> {
    let path = raw.path();
    let (header, slot) = read_headers(raw, len, ignore)?;
    let mut overlay = log::Overlay::default();
    let mut log_entries = 0;
    if !header.log_guid.is_nil() {
        let end = header.log_offset.saturating_add(header.log_length as u64);
        if header.log_length as u64 > 256 * MIB || end > len {
            return Err(Error::corrupt(
                path,
                if slot == 0 { HEADER1 } else { HEADER2 } + 68,
                format!(
                    "log at {:#x}+{:#x} lies outside the file ({len} bytes)",
                    header.log_offset, header.log_length
                ),
            ));
        }
        let mut logb = vec![0u8; header.log_length as usize];
        raw.read(header.log_offset, &mut logb)?;
        let seq = log::active_sequence(&logb, header.log_guid)
            .map_err(|e| Error::format(path, header.log_offset, "log", e))?;
        if let Some(head) = seq.last() {
            if len < head.flushed_file_offset {
                return Err(Error::corrupt(
                    path,
                    header.log_offset + head.pos as u64,
                    format!(
                        "file is truncated: {len} bytes, the log says at least {}",
                        head.flushed_file_offset
                    ),
                ));
            }
            overlay = log::Overlay::from_sequence(&seq);
            log_entries = seq.len();
        }
    }
    let layer_len = len.max(overlay.min_len);
    let layout = {
        let src = MetaSource {
            raw,
            overlay: &overlay,
            len: layer_len,
        };
        read_layout(&src, header, slot)?
    };
    Ok(Parsed {
        layout,
        overlay,
        log_entries,
        len: layer_len,
    })
}

impl Layout {
    /// The layout of the VHDX image held whole in `image` (the same parser
    /// as `VhdxLayer::open`, log replayed in memory, checksums verified);
    /// `path` names it in errors.
    pub fn parse(image: &[u8], path: &Path) -> Result<Layout> {
        let src = Image { bytes: image, path };
        Ok(parse_source(&src, image.len() as u64, false)?.layout)
    }
}

/// Fuzz body for the layout parser (for a target in `fuzz/`): `data` is a
/// whole VHDX image. Errors are fine, panics are bugs. A layout that parses
/// must describe a disk its BAT can map.
pub fn fuzz_layout(data: &[u8]) {
    let Ok(l) = Layout::parse(data, Path::new("fuzz.vhdx")) else {
        return;
    };
    assert!(l.block_size.is_power_of_two() && l.chunk_ratio > 0);
    assert!(l.virtual_size > 0 && l.virtual_size % l.logical_sector as u64 == 0);
    assert!(l.bat_entries * 8 <= l.bat_length);
}

pub(super) fn read_headers(raw: &impl Source, len: u64, ignore: bool) -> Result<(Header, usize)> {
    let (h, slot) = current_header(raw, len, ignore)?;
    let at = [HEADER1, HEADER2][slot];
    h.check_version()
        .map_err(|e| Error::unsupported(raw.path(), Error::format(raw.path(), at, "header", e)))?;
    Ok((h, slot))
}

/// The VHDX signatures of a file of `len` bytes: the 8 bytes at offset 0
/// (the identifier, `vhdxfile` when intact; fewer in a shorter file) and
/// the offsets of [`SECTION_SIGNATURES`] found in place.
pub(super) fn signatures(raw: &impl Source, len: u64) -> Result<(Vec<u8>, Vec<u64>)> {
    let mut ident = vec![0u8; len.min(8) as usize];
    raw.read(0, &mut ident)?;
    let mut found = Vec::new();
    for (at, sig) in SECTION_SIGNATURES {
        if len >= at + 4 {
            let mut b = [0u8; 4];
            raw.read(at, &mut b)?;
            if &b == sig {
                found.push(at);
            }
        }
    }
    Ok((ident, found))
}

fn current_header(raw: &impl Source, len: u64, _ignore: bool) -> Result<(Header, usize)> {
    if len < MIB {
        return Err(Error::corrupt(
            raw.path(),
            0,
            format!("file is {len} bytes, shorter than the 1 MiB VHDX header section"),
        ));
    }
    // The probe also claims a file whose identifier is damaged but whose
    // headers or region tables are in place: refuse it as what it is.
    let (ident, found) = signatures(raw, len)?;
    if ident != FILE_SIGNATURE {
        let at: Vec<String> = found.iter().map(|o| format!("{o:#x}")).collect();
        return Err(Error::corrupt(
            raw.path(),
            0,
            format!(
                "the VHDX file identifier is \"{}\", not `vhdxfile`; a damaged VHDX (its \
                 header and region table signatures are at {}), refused, not read as raw",
                ident.escape_ascii(),
                if at.is_empty() {
                    "none of 0x10000, 0x20000, 0x30000, 0x40000".to_string()
                } else {
                    at.join(", ")
                }
            ),
        ));
    }
    let mut hs = Vec::new();
    let mut errs = Vec::new();
    for (slot, at) in [HEADER1, HEADER2].into_iter().enumerate() {
        let mut b = vec![0u8; HEADER_SIZE];
        raw.read(at, &mut b)?;
        match Header::parse(&b) {
            Ok(h) => hs.push((h, slot, b)),
            Err(e) => errs.push(Error::format(raw.path(), at, "header", e).to_string()),
        }
    }
    match hs.len() {
        0 => Err(Error::new(
            ErrorKind::Corrupt,
            format!("no valid VHDX header: {}", errs.join("; ")),
        )),
        1 => {
            let (h, slot, _) = hs.pop().unwrap();
            Ok((h, slot))
        }
        _ => {
            let (b, a) = (hs.pop().unwrap(), hs.pop().unwrap());
            if a.0.sequence == b.0.sequence && a.2 != b.2 {
                return Err(Error::corrupt(
                    raw.path(),
                    HEADER2 + 8,
                    "both headers have the same sequence number but differ",
                ));
            }
            Ok(if b.0.sequence > a.0.sequence {
                (b.0, b.1)
            } else {
                (a.0, a.1)
            })
        }
    }
}

pub(super) fn read_layout(src: &impl Source, header: Header, slot: usize) -> Result<Layout> {
    let path = src.path();
    let mut rt = vec![0u8; REGION_SIZE];
    src.read(REGION1, &mut rt)?;
    let regions = match parse_region_table(&rt) {
        Ok(r) => r,
        Err(e1) => {
            src.read(REGION2, &mut rt)?;
            parse_region_table(&rt).map_err(|_| Error::format(path, REGION1, "region table", e1))?
        }
    };
    let mut bat = None;
    let mut meta = None;
    for r in &regions {
        match r.guid {
            BAT_GUID => bat = Some((r.offset, r.length as u64)),
            METADATA_GUID => meta = Some((r.offset, r.length as u64)),
            g if r.required => {
                return Err(Error::unsupported(
                    path,
                    format!("required region {g} is unknown to chainfs"),
                ))
            }
            _ => {}
        }
    }
    let (Some((bat_offset, bat_length)), Some((mo, ml))) = (bat, meta) else {
        return Err(Error::corrupt(
            path,
            REGION1,
            "the BAT or metadata region is missing",
        ));
    };
    // Regions must not overlap each other or the log.
    let mut spans = vec![
        (
            header.log_offset,
            header.log_offset.saturating_add(header.log_length as u64),
            "log",
        ),
        (bat_offset, bat_offset.saturating_add(bat_length), "BAT"),
        (mo, mo.saturating_add(ml), "metadata"),
    ];
    spans.retain(|s| s.1 > s.0);
    spans.sort();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(Error::corrupt(
                path,
                REGION1,
                format!("the {} and {} regions overlap", w[0].2, w[1].2),
            ));
        }
    }
    let mut mt = vec![0u8; REGION_SIZE];
    src.read(mo, &mut mt)?;
    let metadata =
        parse_metadata_table(&mt).map_err(|e| Error::format(path, mo, "metadata table", e))?;
    let item = |id: Uuid, min: usize| -> Result<Option<Vec<u8>>> {
        let Some(e) = metadata.iter().find(|e| e.item == id && !e.is_user) else {
            return Ok(None);
        };
        if e.length as usize > MIB as usize
            || (e.length as usize) < min
            || e.offset as u64 + e.length as u64 > ml
            || (e.length > 0 && (e.offset as u64) < 64 * KIB)
        {
            return Err(Error::corrupt(
                path,
                mo,
                format!(
                    "metadata item {id} at +{:#x} ({} bytes) is out of range",
                    e.offset, e.length
                ),
            ));
        }
        let mut b = vec![0u8; e.length as usize];
        src.read(mo.saturating_add(e.offset as u64), &mut b)?;
        Ok(Some(b))
    };
    for e in &metadata {
        let known = [
            FILE_PARAMETERS,
            VIRTUAL_DISK_SIZE,
            VIRTUAL_DISK_ID,
            LOGICAL_SECTOR_SIZE,
            PHYSICAL_SECTOR_SIZE,
            PARENT_LOCATOR,
        ];
        if e.required && (e.is_user || !known.contains(&e.item)) {
            return Err(Error::unsupported(
                path,
                format!("required metadata item {} is unknown to chainfs", e.item),
            ));
        }
    }
    let missing = |what: &str| Error::corrupt(path, mo, format!("metadata item {what} is missing"));
    let fp = item(FILE_PARAMETERS, 8)?.ok_or_else(|| missing("File Parameters"))?;
    let block_size = le32(&fp, 0) as u64;
    let flags = le32(&fp, 4);
    if !block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&block_size) {
        return Err(Error::corrupt(
            path,
            mo,
            format!("block size {block_size} is not a power of two from 1 MiB to 256 MiB"),
        ));
    }
    let vs = item(VIRTUAL_DISK_SIZE, 8)?.ok_or_else(|| missing("Virtual Disk Size"))?;
    let virtual_size = le64(&vs, 0);
    let lss = le32(
        &item(LOGICAL_SECTOR_SIZE, 4)?.ok_or_else(|| missing("Logical Sector Size"))?,
        0,
    );
    let pss = le32(
        &item(PHYSICAL_SECTOR_SIZE, 4)?.ok_or_else(|| missing("Physical Sector Size"))?,
        0,
    );
    let disk_id = item(VIRTUAL_DISK_ID, 16)?
        .map(|b| guid(&b, 0))
        .ok_or_else(|| missing("Virtual Disk ID"))?;
    if !matches!(lss, 512 | 4096) || !matches!(pss, 512 | 4096) {
        return Err(Error::corrupt(
            path,
            mo,
            format!("sector sizes {lss}/{pss} are not 512 or 4096"),
        ));
    }
    if virtual_size == 0 || virtual_size % lss as u64 != 0 || virtual_size > 64 << 40 {
        return Err(Error::corrupt(
            path,
            mo,
            format!("virtual size {virtual_size} is not a multiple of {lss} up to 64 TiB"),
        ));
    }
    let has_parent = flags & 2 != 0;
    let locator = if has_parent {
        let b = item(PARENT_LOCATOR, 20)?.ok_or_else(|| missing("Parent Locator"))?;
        parse_parent_locator(&b).map_err(|e| Error::format(path, mo, "parent locator", e))?
    } else {
        Vec::new()
    };
    let chunk_ratio = ((1u64 << 23) * lss as u64) / block_size;
    let data_blocks = virtual_size.div_ceil(block_size);
    let sb_blocks = data_blocks.div_ceil(chunk_ratio);
    let bat_entries = if has_parent {
        sb_blocks * (chunk_ratio + 1)
    } else {
        data_blocks + (data_blocks - 1) / chunk_ratio
    };
    if bat_entries * 8 > bat_length {
        return Err(Error::corrupt(
            path,
            bat_offset,
            format!(
                "BAT region of {bat_length} bytes cannot hold the {bat_entries} entries the disk needs"
            ),
        ));
    }
    let mut ident = vec![0u8; 520];
    src.read(0, &mut ident)?;
    let units: Vec<u16> = ident[8..520]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    Ok(Layout {
        header,
        slot,
        regions,
        bat_offset,
        bat_length,
        metadata_offset: mo,
        metadata_length: ml,
        metadata,
        block_size,
        leave_allocated: flags & 1 != 0,
        has_parent,
        virtual_size,
        disk_id,
        logical_sector: lss,
        physical_sector: pss,
        locator,
        chunk_ratio,
        bat_entries,
        creator: String::from_utf16_lossy(&units),
    })
}

#[cfg(test)]
mod tests {
    use super::super::{create, VhdxLayer};
    use super::*;
    use crate::cache::MetaCache;
    use crate::format::{open_layer, LayerOptions};

    fn opts() -> LayerOptions {
        LayerOptions {
            writable: false,
            ignore_checksums: false,
            cache: MetaCache::new(1 << 20),
        }
    }

    /// A base and a differencing child (which has a parent locator), as
    /// our writer lays them out: their paths.
    fn base_and_child(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let base = dir.join("base.vhdx");
        let child = dir.join("child.avhdx");
        let spec = |parent| create::VhdxSpec {
            size: 8 << 20,
            fixed: false,
            block_size: 2 << 20,
            logical_sector: 512,
            parent,
        };
        create::create(&base, &spec(None)).unwrap();
        let b = open_layer(&base, &opts()).unwrap();
        create::create(&child, &spec(Some((base.as_path(), b.as_ref())))).unwrap();
        (base, child)
    }

    #[test]
    fn an_image_in_memory_parses_to_the_layout_open_reads_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (base, child) = base_and_child(dir.path());
        for p in [base, child] {
            let bytes = std::fs::read(&p).unwrap();
            let parsed = Layout::parse(&bytes, &p).unwrap();
            let file = File::open(&p).unwrap();
            let opened = VhdxLayer::open(file, &p, &opts()).unwrap().layout();
            assert_eq!(format!("{parsed:?}"), format!("{opened:?}"), "{p:?}");
            assert_eq!(parsed.block_size, 2 << 20);
            assert_eq!(parsed.virtual_size, 8 << 20);
            assert_eq!(parsed.has_parent, p.ends_with("child.avhdx"));
            assert_eq!(
                parsed.locator.iter().any(|(k, _)| k == "parent_linkage"),
                parsed.has_parent
            );
        }
    }

    #[test]
    fn a_damaged_file_identifier_is_refused_naming_the_signatures_still_there() {
        let dir = tempfile::tempdir().unwrap();
        let (base, _) = base_and_child(dir.path());
        let mut bytes = std::fs::read(&base).unwrap();
        bytes[..8].copy_from_slice(b"vhdxfilE");
        bytes[(HEADER1 + 1) as usize] = b'E';
        let e = Layout::parse(&bytes, &base).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Corrupt);
        let e = e.to_string();
        assert!(
            e.contains("base.vhdx: at offset 0x0")
                && e.contains("\"vhdxfilE\", not `vhdxfile`")
                && e.contains("at 0x20000, 0x30000, 0x40000"),
            "{e}"
        );
    }

    #[test]
    fn a_bad_metadata_table_is_an_error_that_names_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        let (base, _) = base_and_child(dir.path());
        let mut bytes = std::fs::read(&base).unwrap();
        let mo = Layout::parse(&bytes, &base).unwrap().metadata_offset as usize;
        bytes[mo] = b'X';
        let e = Layout::parse(&bytes, &base).unwrap_err().to_string();
        assert!(
            e.contains("metadata table") && e.contains(&format!("{mo:#x}")),
            "{e}"
        );
    }

    #[test]
    fn an_image_shorter_than_the_header_section_is_an_error_at_offset_0() {
        let e = Layout::parse(&[0u8; 4096], Path::new("short.vhdx"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("short.vhdx: at offset 0x0") && e.contains("1 MiB"),
            "{e}"
        );
    }

    /// A metadata region at the top of the 64-bit range: its end does not
    /// fit in a u64. An error naming the region's offset, not an overflow.
    #[test]
    fn a_region_ending_past_the_64_bit_range_is_an_error_not_an_overflow() {
        let dir = tempfile::tempdir().unwrap();
        let (base, _) = base_and_child(dir.path());
        let mut bytes = std::fs::read(&base).unwrap();
        let l = Layout::parse(&bytes, &base).unwrap();
        let top = u64::MAX - (MIB - 1);
        let regions: Vec<RegionEntry> = l
            .regions
            .iter()
            .map(|r| match r.guid {
                METADATA_GUID => RegionEntry {
                    offset: top,
                    length: 2 * MIB as u32,
                    ..r.clone()
                },
                _ => r.clone(),
            })
            .collect();
        let rt = region_table_bytes(&regions);
        for at in [REGION1, REGION2] {
            bytes[at as usize..at as usize + REGION_SIZE].copy_from_slice(&rt);
        }
        let e = Layout::parse(&bytes, &base).unwrap_err().to_string();
        assert!(e.contains(&format!("{top:#x}")), "{e}");
    }

    /// The fuzz body over damaged copies of real images: every byte of the
    /// metadata table's used part and items, and a sample of the header
    /// section, flipped one at a time. Errors are fine; this must not panic.
    #[test]
    fn the_fuzz_body_survives_byte_flips_of_real_images() {
        let dir = tempfile::tempdir().unwrap();
        let (base, child) = base_and_child(dir.path());
        for p in [base, child] {
            let bytes = std::fs::read(&p).unwrap();
            let l = Layout::parse(&bytes, &p).unwrap();
            let mo = l.metadata_offset as usize;
            let items_end = l
                .metadata
                .iter()
                .map(|e| mo + (e.offset + e.length) as usize)
                .max()
                .unwrap();
            let table = mo..mo + 32 + 32 * l.metadata.len();
            let items = mo + 64 * KIB as usize..items_end;
            let head = (0..MIB as usize).step_by(251);
            let mut b = bytes.clone();
            for i in table.chain(items).chain(head) {
                b[i] ^= 0xA5;
                fuzz_layout(&b);
                b[i] ^= 0xA5;
            }
            for n in [0, 8, MIB as usize - 1, MIB as usize, bytes.len() - 1] {
                fuzz_layout(&bytes[..n]);
            }
        }
    }
}
