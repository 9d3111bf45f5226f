//! Bodies of the fuzz targets, one plain function per target, so that the
//! cargo-fuzz crate in `fuzz/` stays a set of one-line wrappers and the
//! ordinary test suite (`tests/fuzz_replay.rs`) can replay the corpus and
//! every saved crash through exactly the same code on stable Rust.
//!
//! The rule for every function here: **errors are fine, panics are bugs.**
//! Any input may be rejected with an `Err`; none may panic, hang, or make a
//! layer answer with an extent that breaks the [`Layer`] contract. The
//! contract checks below are `assert!`s on purpose: a broken contract (an
//! empty extent, data outside the file) turns into a hang or a wrong read
//! further up, so the fuzzer must see it as a crash.
//!
//! Work per input is bounded (steps, bytes read) so that an image claiming
//! a 2 TiB disk of 512-byte blocks is walked in milliseconds, not hours.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cache::MetaCache;
use crate::format::vhd::{self, DynamicHeader, Footer};
use crate::format::{open_layer, Extent, Layer, LayerOptions};

/// At most this many `map()` calls in the sequential walk of one layer.
const MAX_STEPS: u32 = 2048;
/// At most this many bytes per `read_data()` call.
const MAX_READ: u64 = 64 << 10;
/// At most this many bytes read in total per opened layer.
const READ_BUDGET: u64 = 2 << 20;

/// `Footer::parse`, with and without checksum verification. A footer that
/// parses must survive `to_bytes()` and parse back to the same value.
pub fn vhd_footer(data: &[u8]) {
    for verify in [true, false] {
        let Ok(f) = Footer::parse(data, verify) else {
            continue;
        };
        let again = Footer::parse(&f.to_bytes(), true).expect("to_bytes() of a parsed footer");
        assert_eq!(again, f, "footer does not round-trip");
        let _ = f.creator();
        let _ = vhd::geometry(f.current_size);
    }
}

/// `DynamicHeader::parse`, with and without checksum verification, plus
/// the locator decoders on the same bytes. A header that parses must
/// survive `to_bytes()` and parse back to the same value.
pub fn vhd_header(data: &[u8]) {
    for verify in [true, false] {
        let Ok(h) = DynamicHeader::parse(data, verify) else {
            continue;
        };
        let again =
            DynamicHeader::parse(&h.to_bytes(), true).expect("to_bytes() of a parsed header");
        assert_eq!(again, h, "dynamic header does not round-trip");
        let _ = vhd::bitmap_bytes(h.block_size);
        for l in &h.locators {
            let _ = vhd::code_name(l.code);
            // Decode some of the input as this locator's data.
            let n = (l.data_len as usize).min(data.len());
            let _ = vhd::decode_locator(l.code, &data[..n]);
        }
    }
}

/// A whole file: open it as one read-only layer (verifying checksums, and
/// if that fails, ignoring them, so that mutations behind a checksum are
/// reached too) and use everything a reader uses: `info()`, `parent()`,
/// `map()` and `read_data()` over the virtual disk, the resolver,
/// `check()` and `allocated_bytes()`. Afterwards the file must hold
/// exactly the input: a read-only open writes nothing.
pub fn vhd_image(data: &[u8]) {
    let Some(file) = ScratchFile::new(data) else {
        return;
    };
    for ignore_checksums in [false, true] {
        let opts = LayerOptions {
            writable: false,
            ignore_checksums,
            cache: MetaCache::new(1 << 20),
        };
        let opened = match open_layer(file.path(), &opts) {
            Ok(layer) => {
                exercise_layer(&layer, data.len() as u64);
                true
            }
            Err(_) => false,
        };
        // Read-only means read-only: not one byte changed, on any path.
        assert!(
            file.contents().is_some_and(|now| now == data),
            "a read-only open changed the file"
        );
        if opened {
            // Ignoring checksums would read the same structures again.
            break;
        }
    }
}

/// A whole qcow2 file, through the same body as [`vhd_image`]
/// (`open_layer` probes the format): its own target so that its corpus
/// (small qemu-made images: v2, v3, zlib and zstd compressed clusters,
/// extended L2, a backing-file child) is mutated on its own.
pub fn qcow2_image(data: &[u8]) {
    vhd_image(data)
}

/// Everything a read-only user of a layer may call, with the contract of
/// [`Layer::map`] checked on every answer.
fn exercise_layer(layer: &Arc<dyn Layer>, file_len: u64) {
    let info = layer.info();
    let size = layer.virtual_size();
    assert_eq!(size, info.virtual_size);
    assert!(layer.sector_size() > 0);
    assert!(!layer.writable());
    let _ = layer.parent();
    let unit = info.block_size.unwrap_or(vhd::SECTOR).max(1);
    let mut budget = READ_BUDGET;
    let mut buf = vec![0u8; MAX_READ as usize];

    // The sequential walk over the whole disk, as export does it.
    let mut off = 0u64;
    let mut steps = 0;
    while off < size && steps < MAX_STEPS {
        steps += 1;
        match checked_map(layer.as_ref(), off, size - off, file_len) {
            Some(e) => {
                read_extent(layer.as_ref(), &e, &mut buf, &mut budget);
                off += e.len();
            }
            // A bad block: carry on at the next one, as a careful reader would.
            None => off = (off / unit + 1).saturating_mul(unit),
        }
    }

    // Small, unaligned probes where edge cases live: the first and last
    // bytes, block boundaries, and past the end.
    let mut probes = vec![0, 1, 511, 513, unit - 1, unit, unit + 7, size / 2 + 3];
    probes.extend([size.saturating_sub(1), size, size.saturating_add(512)]);
    for &o in &probes {
        for len in [1, 512, 4097, unit + 1] {
            if let Some(e) = checked_map(layer.as_ref(), o, len, file_len) {
                read_extent(layer.as_ref(), &e, &mut buf, &mut budget);
            }
        }
        // The resolver over a one-layer chain (the path FUSE reads take).
        if o < size {
            let n = (size - o).min(4096) as usize;
            let _ = crate::image::read_layers(std::slice::from_ref(layer), 0, o, &mut buf[..n]);
        }
    }

    let _ = layer.check();
    // `info`'s report; it calls `allocated_bytes()`.
    let _ = crate::info::layer_report(0, layer.as_ref(), None);
    let _ = layer.flush();
}

/// `map(offset, len)` with the trait's contract asserted; `None` on `Err`.
fn checked_map(layer: &dyn Layer, offset: u64, len: u64, file_len: u64) -> Option<Extent> {
    let e = layer.map(offset, len).ok()?;
    assert!(
        e.len() <= len,
        "map({offset:#x}, {len}) returned {e:?}, longer than asked"
    );
    if len > 0 {
        assert!(
            !e.is_empty(),
            "map({offset:#x}, {len}) returned an empty extent"
        );
    }
    if let Extent::Data { file_offset, len } = e {
        assert!(
            file_offset.checked_add(len).is_some_and(|end| end <= file_len),
            "map({offset:#x}) returned data at {file_offset:#x}+{len}, outside the {file_len}-byte file"
        );
    }
    Some(e)
}

fn read_extent(layer: &dyn Layer, e: &Extent, buf: &mut [u8], budget: &mut u64) {
    if let Extent::Data { file_offset, len } = *e {
        let n = len.min(MAX_READ).min(*budget);
        if n > 0 {
            *budget -= n;
            let _ = layer.read_data(file_offset, &mut buf[..n as usize]);
        }
    }
}

/// The fuzz input as a file with a path `open_layer` can open: an anonymous
/// memory file (`memfd`, reached through `/proc/self/fd`), or a temporary
/// file when memfd is not available. Removed on drop.
struct ScratchFile {
    file: File,
    path: PathBuf,
    remove: bool,
}

impl ScratchFile {
    fn new(data: &[u8]) -> Option<ScratchFile> {
        if let Some(f) = Self::memfd() {
            let path = PathBuf::from(format!("/proc/self/fd/{}", raw_fd(&f)));
            return Self::fill(f, path, false, data);
        }
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("chainfs-fuzz-{}-{n}.vhd", std::process::id()));
        let f = File::create(&path).ok()?;
        Self::fill(f, path, true, data)
    }

    fn fill(f: File, path: PathBuf, remove: bool, data: &[u8]) -> Option<ScratchFile> {
        // Built first so that a failed write still removes the file.
        let s = ScratchFile {
            file: f,
            path,
            remove,
        };
        (&s.file).write_all(data).ok()?;
        Some(s)
    }

    fn memfd() -> Option<File> {
        use std::os::fd::FromRawFd;
        // SAFETY: the name is a NUL-terminated string; on success the
        // returned descriptor is new and owned by nobody else.
        let fd = unsafe { libc::memfd_create(c"chainfs-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` was just created and is not owned elsewhere.
        Some(unsafe { File::from_raw_fd(fd) })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn contents(&self) -> Option<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let len = self.file.metadata().ok()?.len();
        let mut b = vec![0u8; usize::try_from(len).ok()?];
        self.file.read_exact_at(&mut b, 0).ok()?;
        Some(b)
    }
}

fn raw_fd(f: &File) -> i32 {
    use std::os::fd::AsRawFd;
    f.as_raw_fd()
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The VHDX metadata parsers, chosen by the first byte: 0 header, 1 region
/// table, 2 metadata table, 3 parent locator, 4 log (active sequence). What
/// parses must survive a round trip through the matching writer.
pub fn vhdx_meta(data: &[u8]) {
    use crate::format::vhdx::{self, log};
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 5 {
        0 => {
            if let Ok(h) = vhdx::Header::parse(rest) {
                assert_eq!(vhdx::Header::parse(&h.to_bytes()).unwrap(), h);
            }
        }
        1 => {
            let mut b = rest.to_vec();
            b.resize(b.len().max(vhdx::REGION_SIZE), 0);
            if let Ok(r) = vhdx::parse_region_table(&b) {
                assert_eq!(
                    vhdx::parse_region_table(&vhdx::region_table_bytes(&r)).unwrap(),
                    r
                );
            }
        }
        2 => {
            let mut b = rest.to_vec();
            b.resize(b.len().max(vhdx::REGION_SIZE), 0);
            if let Ok(m) = vhdx::parse_metadata_table(&b) {
                assert_eq!(
                    vhdx::parse_metadata_table(&vhdx::metadata_table_bytes(&m)).unwrap(),
                    m
                );
            }
        }
        3 => {
            if let Ok(pairs) = vhdx::parse_parent_locator(rest) {
                let again = vhdx::parse_parent_locator(&vhdx::parent_locator_bytes(&pairs));
                assert_eq!(again.unwrap(), pairs);
            }
        }
        _ => {
            let len = rest.len() / 4096 * 4096;
            if len >= 4096 {
                let guid = vhdx::guid(rest, 32);
                if let Ok(seq) = log::active_sequence(&rest[..len], guid) {
                    let _ = log::Overlay::from_sequence(&seq);
                }
            }
        }
    }
}

/// The control-file command parser, on the whole input as one line (as
/// `FromStr` sees it) and on each line of it (as a write to the control
/// file is split). A command that parses must print (`Display`) as one
/// line that the control file passes through unsplit and that parses back
/// to the same command.
pub fn control_command(data: &[u8]) {
    use crate::control::Command;
    let text = String::from_utf8_lossy(data);
    for line in std::iter::once(&*text).chain(text.lines()) {
        let Ok(cmd) = line.parse::<Command>() else {
            continue;
        };
        let printed = cmd.to_string();
        let again = printed
            .parse::<Command>()
            .unwrap_or_else(|e| panic!("{cmd:?} prints as {printed:?}, which does not parse: {e}"));
        assert_eq!(
            again, cmd,
            "{cmd:?} does not round-trip through {printed:?}"
        );
        if !line.contains('\n') {
            assert_eq!(
                printed.lines().collect::<Vec<_>>(),
                [printed.as_str()],
                "{cmd:?} from one line prints as more than one"
            );
        }
    }
}

/// The merge intent record. A record that `Record::from_bytes` accepts
/// must survive `to_bytes()` and parse back equal. Past the checksum (which
/// a fuzzer rarely forges): any JSON of a record's shape, sealed by
/// `to_bytes()` at the current version, must parse back to itself.
pub fn intent_record(data: &[u8]) {
    use crate::intent::{Record, VERSION};
    if let Ok(r) = Record::from_bytes(data) {
        let again = Record::from_bytes(&r.to_bytes()).expect("to_bytes() of a parsed record");
        assert_eq!(again, r, "merge record does not round-trip");
        let _ = r.to_string();
    }
    if let Ok(mut r) = serde_json::from_slice::<Record>(data) {
        r.version = VERSION;
        let sealed = r.to_bytes();
        let back = Record::from_bytes(&sealed).expect("to_bytes() of a record");
        r.crc32c = back.crc32c;
        assert_eq!(back, r, "a sealed record does not parse back to itself");
        assert_eq!(back.to_bytes(), sealed, "sealing is not stable");
    }
}

/// The VHDX layout parser (`vhdx::fuzz_layout`: headers, log, region and
/// metadata tables and items) on an image of at least 1 MiB, from a short
/// input. An input of 1 MiB or more is a whole image as it is. A shorter
/// one is a list of patches over a valid image from chainfs's own writer,
/// built once per thread with fixed ids (the same bytes on every run):
///
/// ```text
/// selector: u8   bits 0-1 the template (0 dynamic, 1 fixed, 2 dynamic with
///                4 KiB logical sectors, 3 differencing with a locator);
///                bit 2: after patching, recompute the CRC-32C of both
///                headers and both region tables, so the fuzzer gets past
///                them to the fields they protect
/// patch*:  where: u8 (a structure, VHDX_BASES[where % 9]), off: u16 LE
///          from its start, n: u8, then n bytes (fewer at the end of the
///          input); n = 0 cuts the image at that offset instead
/// ```
///
/// Each patch is undone after the call (also when it panics), so an input
/// costs what it patches, not a copy of the image.
pub fn vhdx_layout(data: &[u8]) {
    use crate::format::vhdx::{fuzz_layout, MIB};
    if data.len() as u64 >= MIB {
        fuzz_layout(data);
        return;
    }
    let Some((&sel, mut rest)) = data.split_first() else {
        return;
    };
    VHDX_TEMPLATES.with(|t| {
        let mut templates = t.borrow_mut();
        let img = &mut templates[(sel & 3) as usize];
        let mut patched = Patched {
            img,
            saved: Vec::new(),
            len: 0,
        };
        patched.len = patched.img.len();
        let mut count = 0;
        while rest.len() >= 4 && count < 64 {
            count += 1;
            let base = VHDX_BASES[rest[0] as usize % VHDX_BASES.len()];
            let at = base + u16::from_le_bytes([rest[1], rest[2]]) as usize;
            let n = rest[3] as usize;
            let bytes = &rest[4..(4 + n).min(rest.len())];
            rest = &rest[(4 + n).min(rest.len())..];
            if n == 0 {
                patched.len = patched.len.min(at);
            } else {
                patched.put(at, bytes);
            }
        }
        if sel & 4 != 0 {
            patched.reseal();
        }
        let len = patched.len;
        fuzz_layout(&patched.img[..len]);
    });
}

/// Where the patches of [`vhdx_layout`] start: the file identifier, both
/// headers, both region tables, the log, the metadata table, its items,
/// and the BAT, as `vhdx::create` lays a new file out.
const VHDX_BASES: [usize; 9] = {
    use crate::format::vhdx::{HEADER1, HEADER2, KIB, MIB, REGION1, REGION2};
    [
        0,
        HEADER1 as usize,
        HEADER2 as usize,
        REGION1 as usize,
        REGION2 as usize,
        MIB as usize,
        2 * MIB as usize,
        (2 * MIB + 64 * KIB) as usize,
        3 * MIB as usize,
    ]
};

thread_local! {
    static VHDX_TEMPLATES: std::cell::RefCell<Vec<Vec<u8>>> =
        std::cell::RefCell::new(vhdx_templates());
}

/// The four template images of [`vhdx_layout`], from the writer.
fn vhdx_templates() -> Vec<Vec<u8>> {
    use crate::format::vhdx::create::NewImage;
    use crate::format::vhdx::{guid_text, MIB};
    let id = |n: u128| uuid::Uuid::from_u128(0x6368_6169_6e66_735f_0000_0000_0000_0000 | n);
    let new = |size, fixed, block_size, logical_sector, locator| NewImage {
        size,
        fixed,
        block_size,
        logical_sector,
        disk_id: id(1),
        file_write_guid: id(2),
        data_write_guid: id(3),
        locator,
    };
    let locator = vec![
        ("parent_linkage".to_string(), guid_text(&id(4))),
        ("relative_path".to_string(), ".\\base.vhdx".to_string()),
        (
            "absolute_win32_path".to_string(),
            "C:\\vms\\base.vhdx".to_string(),
        ),
    ];
    [
        new((8 * MIB) + 512, false, MIB, 512, None),
        new(2 * MIB, true, MIB, 512, None),
        new(64 * MIB, false, 32 * MIB, 4096, None),
        new(8 * MIB, false, 2 * MIB, 512, Some(locator)),
    ]
    .iter()
    .map(|n| n.bytes().expect("a valid template").to_vec())
    .collect()
}

/// A template with patches applied, undone on drop.
struct Patched<'a> {
    img: &'a mut Vec<u8>,
    /// (offset, the bytes there before), in the order written.
    saved: Vec<(usize, Vec<u8>)>,
    /// How much of the image the parser sees.
    len: usize,
}

impl Patched<'_> {
    fn put(&mut self, at: usize, bytes: &[u8]) {
        let end = (at + bytes.len()).min(self.img.len());
        if at >= end {
            return;
        }
        self.saved.push((at, self.img[at..end].to_vec()));
        self.img[at..end].copy_from_slice(&bytes[..end - at]);
    }

    /// Recompute the checksums of both headers and both region tables.
    fn reseal(&mut self) {
        use crate::format::vhdx::{
            crc_with_zeroed, HEADER1, HEADER2, HEADER_SIZE, REGION1, REGION2, REGION_SIZE,
        };
        for (at, size) in [
            (HEADER1, HEADER_SIZE),
            (HEADER2, HEADER_SIZE),
            (REGION1, REGION_SIZE),
            (REGION2, REGION_SIZE),
        ] {
            let at = at as usize;
            let c = crc_with_zeroed(&self.img[at..at + size], 4);
            self.put(at + 4, &c.to_le_bytes());
        }
    }
}

impl Drop for Patched<'_> {
    fn drop(&mut self) {
        for (at, old) in self.saved.drain(..).rev() {
            self.img[at..at + old.len()].copy_from_slice(&old);
        }
    }
}

/// The qcow2 header parser and the table-entry decoders
/// (`qcow2::fuzz_header`): the input is the start of a file.
pub fn qcow2_header(data: &[u8]) {
    crate::format::qcow2::fuzz_header(data);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::vhdx::{Layout, HEADER2, MIB};

    /// The templates are valid images of the kinds they are meant to be,
    /// so unpatched inputs reach the end of the parser.
    #[test]
    fn vhdx_templates_parse() {
        let t = vhdx_templates();
        let l: Vec<Layout> = t
            .iter()
            .map(|b| Layout::parse(b, Path::new("template.vhdx")).unwrap())
            .collect();
        assert!(!l[0].has_parent && l[0].virtual_size == 8 * MIB + 512);
        assert!(l[1].leave_allocated);
        assert_eq!(l[2].logical_sector, 4096);
        assert!(l[3].has_parent && !l[3].locator.is_empty());
        assert_eq!(vhdx_templates(), t, "templates differ between runs");
    }

    /// Patches are undone after each input, and a resealed header patch
    /// gets past the CRC to the field.
    #[test]
    fn vhdx_layout_patches_are_undone_and_resealed() {
        let before = VHDX_TEMPLATES.with(|t| t.borrow().clone());
        // Header 2 (current): a log GUID, resealed, then a cut.
        let mut input = vec![4u8, 2, 48, 0, 16];
        input.extend_from_slice(b"ABCDEFGHIJKLMNOP");
        input.extend_from_slice(&[6, 0, 0, 0]);
        vhdx_layout(&input);
        let after = VHDX_TEMPLATES.with(|t| t.borrow().clone());
        assert!(after == before, "a patch was left in the template");

        let mut img = before[0].clone();
        let mut p = Patched {
            img: &mut img,
            saved: Vec::new(),
            len: 0,
        };
        p.put(HEADER2 as usize + 48, b"ABCDEFGHIJKLMNOP");
        p.reseal();
        let h = crate::format::vhdx::Header::parse(&p.img[HEADER2 as usize..]).unwrap();
        assert!(!h.log_guid.is_nil());
        drop(p);
        assert!(img == before[0]);
    }
}
