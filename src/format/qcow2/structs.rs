//! qcow2 on-disk structures, parsed from and written to byte slices. All
//! integers are big-endian. See the module doc of `super` for the layout.
//!
//! A value that leaves a parser here has been range-checked (cluster_bits,
//! table offsets and sizes, extension lengths), so the driver can do offset
//! arithmetic on it without further checks. Errors carry the absolute file
//! offset and the field name.
//!
//! Where the spec and qemu differ, we do what qemu does with the images it
//! writes and opens:
//! * the L2 zero flag (bit 0) is honoured in version 2 images too (the spec
//!   says v2 never sets it; qemu reads it as zero) and ignored with
//!   extended L2, where the subcluster bitmaps say what is zero;
//! * reserved bits in L1/L2 entries are ignored on reading (qemu's `check`
//!   reports them); misaligned offsets are corruption;
//! * the extension area ends at the backing file name, which may start
//!   inside the padding of the last extension; a file shorter than its
//!   first cluster reads as zeros (an end marker) past its end;
//! * a bitmaps extension is only validated when autoclear bit 0 marks it
//!   consistent; an odd-length feature name table is kept raw.
//!
//! Stricter than qemu: a known extension type that appears twice is refused
//! (the spec allows each once; qemu lets the last one win), and so is a
//! compressed L2 entry with host offset 0.
//!
//! Spec slip worth knowing: the text of autoclear bit 1 (raw external data)
//! says it needs "incompatible feature bit 1"; the external data file is
//! incompatible bit 2, which is what qemu checks and what we check.

use crate::error::{Error, ErrorKind, Result};

pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Header length of a version 2 image (and the fixed part of version 3).
pub const V2_HEADER_LEN: u32 = 72;
/// The shortest version 3 header: the fields up to header_length.
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// A v3 header at least this long has the compression_type byte (offset 104).
pub const HEADER_LEN_WITH_COMPRESSION: u32 = 105;
pub const MIN_CLUSTER_BITS: u32 = 9;
/// qemu's implementation limit (2 MiB clusters); it refuses larger ones.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Extended L2 needs clusters of at least 16 KiB (32 subclusters of 512 B).
pub const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;
pub const MAX_BACKING_NAME: u32 = 1023;
/// qemu's limits on table sizes, in bytes.
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
pub const MAX_SNAPSHOTS: u32 = 65536;
pub const MAX_SNAPSHOT_EXTRA: u32 = 1024;
/// refcount_bits = 1 << refcount_order, at most 64.
pub const MAX_REFCOUNT_ORDER: u32 = 6;
pub const SUBCLUSTERS: u32 = 32;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
pub const INCOMPAT_KNOWN: u64 = 0x1f;
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;
pub const AUTOCLEAR_KNOWN: u64 = 0x3;

pub const CRYPT_NONE: u32 = 0;
pub const CRYPT_AES: u32 = 1;
pub const CRYPT_LUKS: u32 = 2;

pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const EXT_ENCRYPTION: u32 = 0x0537_be77;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Bits 9..=55: a cluster-aligned host offset in L1, L2 and refcount tables.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const FLAG_COPIED: u64 = 1 << 63;
pub const FLAG_COMPRESSED: u64 = 1 << 62;
pub const FLAG_ZERO: u64 = 1;
/// Bits an L1 entry must leave clear (qemu ignores them when reading; `check`
/// reports them).
pub const L1_RESERVED: u64 = !(OFFSET_MASK | FLAG_COPIED);
/// Reserved bits of a standard L2 entry (1..=8 and 56..=61).
pub const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}
fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}
fn pad8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

/// A corruption found at absolute file offset `at` in `field`.
fn corrupt(at: u64, field: &str, msg: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Corrupt,
        format!("qcow2 {field} at offset {at:#x}: {msg}"),
    )
}

fn unsupported(at: u64, field: &str, msg: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        format!("qcow2 {field} at offset {at:#x}: {msg}"),
    )
}

/// How compressed clusters are compressed (header byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (no zlib header), window bits 12.
    Zlib,
    /// One zstd frame per cluster.
    Zstd,
}

/// One entry of the feature name table extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    pub bit: u8,
    /// Up to 46 bytes, trailing NULs removed.
    pub name: Vec<u8>,
}

pub const FEATURE_NAME_ENTRY: usize = 48;

/// A header extension. Known types are decoded; the rest are kept as raw
/// bytes so a writer can put them back unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extension {
    /// The backing file's format name (`qcow2`, `raw`), not NUL-terminated.
    BackingFormat(Vec<u8>),
    FeatureNames(Vec<FeatureName>),
    Bitmaps {
        nb_bitmaps: u32,
        directory_size: u64,
        directory_offset: u64,
    },
    /// Where the LUKS header lives (crypt_method 2 only).
    Encryption {
        offset: u64,
        length: u64,
    },
    /// The external data file name, relative to the image's folder.
    DataFile(Vec<u8>),
    Unknown {
        kind: u32,
        data: Vec<u8>,
    },
}

impl Extension {
    pub fn kind(&self) -> u32 {
        match self {
            Extension::BackingFormat(_) => EXT_BACKING_FORMAT,
            Extension::FeatureNames(_) => EXT_FEATURE_NAMES,
            Extension::Bitmaps { .. } => EXT_BITMAPS,
            Extension::Encryption { .. } => EXT_ENCRYPTION,
            Extension::DataFile(_) => EXT_DATA_FILE,
            Extension::Unknown { kind, .. } => *kind,
        }
    }

    /// The extension's data, without the type/length prefix or padding.
    pub fn data(&self) -> Vec<u8> {
        match self {
            Extension::BackingFormat(d) | Extension::DataFile(d) => d.clone(),
            Extension::Unknown { data, .. } => data.clone(),
            Extension::FeatureNames(v) => {
                let mut out = Vec::with_capacity(v.len() * FEATURE_NAME_ENTRY);
                for f in v {
                    let mut e = [0u8; FEATURE_NAME_ENTRY];
                    e[0] = f.kind;
                    e[1] = f.bit;
                    let n = f.name.len().min(FEATURE_NAME_ENTRY - 2);
                    e[2..2 + n].copy_from_slice(&f.name[..n]);
                    out.extend_from_slice(&e);
                }
                out
            }
            Extension::Bitmaps {
                nb_bitmaps,
                directory_size,
                directory_offset,
            } => {
                let mut out = Vec::with_capacity(24);
                out.extend_from_slice(&nb_bitmaps.to_be_bytes());
                out.extend_from_slice(&[0; 4]);
                out.extend_from_slice(&directory_size.to_be_bytes());
                out.extend_from_slice(&directory_offset.to_be_bytes());
                out
            }
            Extension::Encryption { offset, length } => {
                let mut out = offset.to_be_bytes().to_vec();
                out.extend_from_slice(&length.to_be_bytes());
                out
            }
        }
    }

    /// Decode the data of an extension of type `kind` found at file offset
    /// `at` (the start of its data) in an image with the given cluster size.
    /// Like qemu, a bitmaps extension is only checked when the autoclear
    /// bitmaps bit says it is consistent; otherwise it is kept raw, as is a
    /// feature name table of odd length (qemu never refuses one: it is
    /// only there for error messages).
    fn parse(
        kind: u32,
        d: &[u8],
        at: u64,
        cluster_size: u64,
        bitmaps_valid: bool,
    ) -> Result<Extension> {
        let aligned = |o: u64| o % cluster_size == 0;
        let raw = || Extension::Unknown {
            kind,
            data: d.to_vec(),
        };
        Ok(match kind {
            EXT_BACKING_FORMAT => Extension::BackingFormat(d.to_vec()),
            EXT_DATA_FILE => Extension::DataFile(d.to_vec()),
            EXT_FEATURE_NAMES if d.len() % FEATURE_NAME_ENTRY != 0 => raw(),
            EXT_BITMAPS if !bitmaps_valid => raw(),
            EXT_FEATURE_NAMES => Extension::FeatureNames(
                d.chunks_exact(FEATURE_NAME_ENTRY)
                    .map(|e| {
                        let name = &e[2..];
                        let n = name.iter().rposition(|&c| c != 0).map_or(0, |p| p + 1);
                        FeatureName {
                            kind: e[0],
                            bit: e[1],
                            name: name[..n].to_vec(),
                        }
                    })
                    .collect(),
            ),
            EXT_BITMAPS => {
                if d.len() != 24 {
                    return Err(corrupt(
                        at,
                        "bitmaps extension",
                        format!("length {} is not 24", d.len()),
                    ));
                }
                if be32(d, 4) != 0 {
                    return Err(corrupt(
                        at + 4,
                        "bitmaps extension",
                        "reserved field is not zero",
                    ));
                }
                let nb_bitmaps = be32(d, 0);
                if nb_bitmaps == 0 {
                    return Err(corrupt(at, "bitmaps extension nb_bitmaps", "is zero"));
                }
                let directory_offset = be64(d, 16);
                if !aligned(directory_offset) {
                    return Err(corrupt(
                        at + 16,
                        "bitmaps extension directory_offset",
                        format!("{directory_offset:#x} is not cluster aligned"),
                    ));
                }
                Extension::Bitmaps {
                    nb_bitmaps,
                    directory_size: be64(d, 8),
                    directory_offset,
                }
            }
            EXT_ENCRYPTION => {
                if d.len() != 16 {
                    return Err(corrupt(
                        at,
                        "encryption header extension",
                        format!("length {} is not 16", d.len()),
                    ));
                }
                let offset = be64(d, 0);
                if !aligned(offset) {
                    return Err(corrupt(
                        at,
                        "encryption header offset",
                        format!("{offset:#x} is not cluster aligned"),
                    ));
                }
                Extension::Encryption {
                    offset,
                    length: be64(d, 8),
                }
            }
            _ => Extension::Unknown {
                kind,
                data: d.to_vec(),
            },
        })
    }
}

/// The image header with its extensions and backing file name: everything
/// the first cluster says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    /// Version 3 fields; zero (and order 4, length 72) for version 2.
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    /// Byte 104 (0 zlib, 1 zstd) when header_length >= 105, else 0.
    pub compression_type: u8,
    /// Header bytes 105..header_length (fields newer than this code and
    /// padding), kept so a rewrite preserves them.
    pub tail: Vec<u8>,
    pub extensions: Vec<Extension>,
    /// The backing file name (not NUL-terminated), when backing_file_offset
    /// is not zero.
    pub backing_file: Option<Vec<u8>>,
}

impl Header {
    /// Parse and validate the header from the start of the file. `b` should
    /// be the first cluster (or the whole file when it is shorter); it must
    /// at least hold the header, the extensions and the backing file name.
    pub fn parse(b: &[u8]) -> Result<Header> {
        if b.len() < V2_HEADER_LEN as usize {
            return Err(corrupt(
                0,
                "header",
                format!("file too short ({} bytes)", b.len()),
            ));
        }
        if b[0..4] != MAGIC {
            return Err(corrupt(0, "header magic", "is not QFI\\xfb"));
        }
        let version = be32(b, 4);
        if version != 2 && version != 3 {
            return Err(unsupported(
                4,
                "header version",
                format!("{version} (only 2 and 3 exist)"),
            ));
        }
        let cluster_bits = be32(b, 20);
        if cluster_bits < MIN_CLUSTER_BITS {
            return Err(corrupt(
                20,
                "header cluster_bits",
                format!("{cluster_bits} is below 9"),
            ));
        }
        if cluster_bits > MAX_CLUSTER_BITS {
            return Err(unsupported(
                20,
                "header cluster_bits",
                format!("{cluster_bits}: clusters over 2 MiB are not supported (nor by qemu)"),
            ));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(b, 8),
            backing_file_size: be32(b, 16),
            cluster_bits,
            size: be64(b, 24),
            crypt_method: be32(b, 32),
            l1_size: be32(b, 36),
            l1_table_offset: be64(b, 40),
            refcount_table_offset: be64(b, 48),
            refcount_table_clusters: be32(b, 56),
            nb_snapshots: be32(b, 60),
            snapshots_offset: be64(b, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
            tail: Vec::new(),
            extensions: Vec::new(),
            backing_file: None,
        };
        if version == 3 {
            if b.len() < V3_MIN_HEADER_LEN as usize {
                return Err(corrupt(
                    0,
                    "header",
                    format!("version 3 header cut short at {} bytes", b.len()),
                ));
            }
            h.incompatible_features = be64(b, 72);
            h.compatible_features = be64(b, 80);
            h.autoclear_features = be64(b, 88);
            h.refcount_order = be32(b, 96);
            h.header_length = be32(b, 100);
            let hl = h.header_length;
            if hl < V3_MIN_HEADER_LEN || hl % 8 != 0 {
                return Err(corrupt(
                    100,
                    "header header_length",
                    format!("{hl} is not a multiple of 8 of at least 104"),
                ));
            }
            if u64::from(hl) > cluster_size.min(b.len() as u64) {
                return Err(corrupt(
                    100,
                    "header header_length",
                    format!("{hl} runs past the first cluster or the file"),
                ));
            }
            if hl >= HEADER_LEN_WITH_COMPRESSION {
                h.compression_type = b[104];
                h.tail = b[105..hl as usize].to_vec();
            }
        }
        h.validate_fields()?;
        h.parse_extensions_and_name(b)?;
        Ok(h)
    }

    fn validate_fields(&self) -> Result<()> {
        let cs = self.cluster_size();
        if self.crypt_method > CRYPT_LUKS {
            return Err(corrupt(
                32,
                "header crypt_method",
                format!("{} is not 0 (none), 1 (AES) or 2 (LUKS)", self.crypt_method),
            ));
        }
        if self.refcount_order > MAX_REFCOUNT_ORDER {
            return Err(corrupt(
                96,
                "header refcount_order",
                format!("{} is over 6 (64-bit refcounts)", self.refcount_order),
            ));
        }
        if self.size > i64::MAX as u64 {
            return Err(corrupt(
                24,
                "header size",
                format!("{} is over 2^63 - 1", self.size),
            ));
        }
        let ext_l2 = self.incompatible_features & INCOMPAT_EXTENDED_L2 != 0;
        if ext_l2 && self.cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
            return Err(corrupt(
                20,
                "header cluster_bits",
                format!(
                    "{} is below 14, which extended L2 entries need",
                    self.cluster_bits
                ),
            ));
        }
        let need = self.layout().l1_entries_for(self.size);
        if u64::from(self.l1_size) < need {
            return Err(corrupt(
                36,
                "header l1_size",
                format!(
                    "{} entries cannot map a virtual size of {} bytes ({need} needed)",
                    self.l1_size, self.size
                ),
            ));
        }
        if u64::from(self.l1_size) * 8 > MAX_L1_BYTES {
            return Err(unsupported(
                36,
                "header l1_size",
                format!("{} entries is over qemu's 32 MiB L1 limit", self.l1_size),
            ));
        }
        for (at, field, off) in [
            (40, "header l1_table_offset", self.l1_table_offset),
            (
                48,
                "header refcount_table_offset",
                self.refcount_table_offset,
            ),
            (64, "header snapshots_offset", self.snapshots_offset),
        ] {
            if off % cs != 0 {
                return Err(corrupt(
                    at,
                    field,
                    format!("{off:#x} is not aligned to the {cs}-byte cluster"),
                ));
            }
            if off > i64::MAX as u64 {
                return Err(corrupt(at, field, format!("{off:#x} is past 2^63")));
            }
        }
        if self.l1_size > 0 && self.l1_table_offset == 0 {
            return Err(corrupt(
                40,
                "header l1_table_offset",
                "is 0 (the header cluster) for a non-empty L1 table",
            ));
        }
        if self.refcount_table_clusters == 0 {
            return Err(corrupt(
                56,
                "header refcount_table_clusters",
                "is 0: the image has no refcount table",
            ));
        }
        if u64::from(self.refcount_table_clusters) * cs > MAX_REFTABLE_BYTES {
            return Err(unsupported(
                56,
                "header refcount_table_clusters",
                format!(
                    "{} clusters is over qemu's 8 MiB refcount table limit",
                    self.refcount_table_clusters
                ),
            ));
        }
        if self.refcount_table_offset == 0 {
            return Err(corrupt(
                48,
                "header refcount_table_offset",
                "is 0 (the header cluster)",
            ));
        }
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(corrupt(
                60,
                "header nb_snapshots",
                format!("{} is over qemu's limit of 65536", self.nb_snapshots),
            ));
        }
        if self.nb_snapshots > 0 && self.snapshots_offset == 0 {
            return Err(corrupt(
                64,
                "header snapshots_offset",
                "is 0 (the header cluster) with snapshots present",
            ));
        }
        let bit = self.incompatible_features & INCOMPAT_COMPRESSION != 0;
        match (bit, self.compression_type) {
            (false, 0) => {}
            (false, t) => {
                return Err(corrupt(
                    104,
                    "header compression_type",
                    format!("{t} without the compression type feature bit (3)"),
                ))
            }
            (true, 0) if self.header_length < HEADER_LEN_WITH_COMPRESSION => return Err(corrupt(
                100,
                "header header_length",
                "has no compression_type field, but the compression type feature bit (3) is set",
            )),
            (true, 0) => {
                return Err(corrupt(
                    104,
                    "header compression_type",
                    "is 0 (zlib) with the compression type feature bit (3) set",
                ))
            }
            (true, 1) => {}
            (true, t) => {
                return Err(unsupported(
                    104,
                    "header compression_type",
                    format!("{t} is not zlib (0) or zstd (1)"),
                ))
            }
        }
        if self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0
            && self.incompatible_features & INCOMPAT_DATA_FILE == 0
        {
            return Err(corrupt(88, "header autoclear_features", "raw external data (bit 1) is set without an external data file (incompatible bit 2)"));
        }
        Ok(())
    }

    /// Extensions from header_length up to the backing file name (or the end
    /// of the first cluster), then the name itself.
    fn parse_extensions_and_name(&mut self, b: &[u8]) -> Result<()> {
        let cs = self.cluster_size();
        let first = cs.min(b.len() as u64);
        let mut end = first;
        if self.backing_file_offset != 0 {
            let (o, n) = (self.backing_file_offset, u64::from(self.backing_file_size));
            if n > u64::from(MAX_BACKING_NAME) {
                return Err(corrupt(
                    16,
                    "header backing_file_size",
                    format!("{n} is over 1023"),
                ));
            }
            if o < u64::from(self.header_length) || o.checked_add(n).is_none_or(|e| e > cs) {
                return Err(corrupt(8, "header backing_file_offset", format!("name at {o:#x}+{n} is not between the header and the end of the first cluster")));
            }
            if o + n > first {
                return Err(corrupt(
                    o,
                    "backing file name",
                    "runs past the end of the file",
                ));
            }
            self.backing_file = Some(b[o as usize..(o + n) as usize].to_vec());
            end = o;
        }
        let mut at = u64::from(self.header_length);
        while at < end {
            if end - at < 8 {
                // A file shorter than its first cluster reads as zeros past
                // its end (as in qemu): an end marker.
                if self.backing_file.is_none() && end < cs {
                    break;
                }
                return Err(corrupt(at, "header extension", "type and length cut short"));
            }
            let kind = be32(b, at as usize);
            if kind == EXT_END {
                break;
            }
            let len = u64::from(be32(b, at as usize + 4));
            if len > end - at - 8 {
                return Err(corrupt(at + 4, "header extension", format!("type {kind:#010x}: length {len} runs past the extension area (ends at {end:#x})")));
            }
            let data = &b[(at + 8) as usize..(at + 8 + len) as usize];
            let bitmaps_valid = self.autoclear_features & AUTOCLEAR_BITMAPS != 0;
            let ext = Extension::parse(kind, data, at + 8, cs, bitmaps_valid)?;
            if !matches!(ext, Extension::Unknown { .. })
                && self.extensions.iter().any(|e| e.kind() == kind)
            {
                return Err(corrupt(
                    at,
                    "header extension",
                    format!("type {kind:#010x} appears twice"),
                ));
            }
            self.extensions.push(ext);
            at = at + 8 + pad8(len as usize) as u64;
        }
        if self.autoclear_features & AUTOCLEAR_BITMAPS != 0 && self.bitmaps().is_none() {
            return Err(corrupt(
                88,
                "header autoclear_features",
                "bitmaps (bit 0) is set without a bitmaps extension",
            ));
        }
        if self.crypt_method == CRYPT_LUKS && self.encryption().is_none() {
            return Err(corrupt(
                32,
                "header crypt_method",
                "LUKS without the encryption header extension",
            ));
        }
        Ok(())
    }

    /// The first cluster's bytes as a writer stores them: header (with the
    /// preserved tail), extensions padded to 8, the end marker (when there
    /// is room for it before the backing name), zero fill, the backing name.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.backing_file_offset.to_be_bytes());
        out.extend_from_slice(&self.backing_file_size.to_be_bytes());
        out.extend_from_slice(&self.cluster_bits.to_be_bytes());
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.crypt_method.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        out.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        out.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        out.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            out.extend_from_slice(&self.incompatible_features.to_be_bytes());
            out.extend_from_slice(&self.compatible_features.to_be_bytes());
            out.extend_from_slice(&self.autoclear_features.to_be_bytes());
            out.extend_from_slice(&self.refcount_order.to_be_bytes());
            out.extend_from_slice(&self.header_length.to_be_bytes());
            if self.header_length >= HEADER_LEN_WITH_COMPRESSION {
                out.push(self.compression_type);
                out.extend_from_slice(&self.tail);
            }
        }
        if out.len() != self.header_length as usize {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "qcow2 header: header_length {} does not match the {} bytes of fields and tail",
                    self.header_length,
                    out.len()
                ),
            ));
        }
        let mut data_end = out.len();
        for e in &self.extensions {
            let d = e.data();
            out.extend_from_slice(&e.kind().to_be_bytes());
            out.extend_from_slice(&(d.len() as u32).to_be_bytes());
            out.extend_from_slice(&d);
            data_end = out.len();
            out.resize(pad8(out.len()), 0);
        }
        let limit = match &self.backing_file {
            Some(_) => self.backing_file_offset,
            None => self.cluster_size(),
        };
        // A backing name at an offset that is not a multiple of 8 may start
        // inside the last extension's padding (qemu accepts that): the
        // padding gives way to the name.
        if out.len() as u64 > limit && data_end as u64 <= limit {
            out.truncate(limit as usize);
        }
        if out.len() as u64 > limit {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "qcow2 header: extensions end at {:#x}, past {limit:#x}",
                    out.len()
                ),
            ));
        }
        if out.len() as u64 + 8 <= limit {
            out.extend_from_slice(&[0; 8]);
        }
        if let Some(name) = &self.backing_file {
            if name.len() != self.backing_file_size as usize {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    "qcow2 header: backing_file_size does not match the name",
                ));
            }
            out.resize(self.backing_file_offset as usize, 0);
            out.extend_from_slice(name);
        }
        Ok(out)
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The table geometry the L1/L2/refcount decoders need.
    pub fn layout(&self) -> Layout {
        Layout {
            cluster_bits: self.cluster_bits,
            extended_l2: self.incompatible_features & INCOMPAT_EXTENDED_L2 != 0,
            external_data: self.incompatible_features & INCOMPAT_DATA_FILE != 0,
            refcount_order: self.refcount_order,
        }
    }

    pub fn compression(&self) -> Compression {
        if self.compression_type == 1 {
            Compression::Zstd
        } else {
            Compression::Zlib
        }
    }

    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & COMPAT_LAZY_REFCOUNTS != 0
    }
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & INCOMPAT_DIRTY != 0
    }
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & INCOMPAT_CORRUPT != 0
    }
    /// The external data file holds a consistent raw image by itself.
    pub fn data_file_raw(&self) -> bool {
        self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0
    }

    pub fn backing_format(&self) -> Option<&[u8]> {
        self.extensions.iter().find_map(|e| match e {
            Extension::BackingFormat(f) => Some(f.as_slice()),
            _ => None,
        })
    }
    pub fn data_file(&self) -> Option<&[u8]> {
        self.extensions.iter().find_map(|e| match e {
            Extension::DataFile(f) => Some(f.as_slice()),
            _ => None,
        })
    }
    pub fn feature_names(&self) -> &[FeatureName] {
        self.extensions
            .iter()
            .find_map(|e| match e {
                Extension::FeatureNames(v) => Some(v.as_slice()),
                _ => None,
            })
            .unwrap_or(&[])
    }
    /// (nb_bitmaps, directory_size, directory_offset)
    pub fn bitmaps(&self) -> Option<(u32, u64, u64)> {
        self.extensions.iter().find_map(|e| match *e {
            Extension::Bitmaps {
                nb_bitmaps,
                directory_size,
                directory_offset,
            } => Some((nb_bitmaps, directory_size, directory_offset)),
            _ => None,
        })
    }
    /// (offset, length) of the LUKS header.
    pub fn encryption(&self) -> Option<(u64, u64)> {
        self.extensions.iter().find_map(|e| match *e {
            Extension::Encryption { offset, length } => Some((offset, length)),
            _ => None,
        })
    }

    /// The name an image gives a feature bit (`kind` 0 incompatible,
    /// 1 compatible, 2 autoclear), from its feature name table.
    pub fn feature_name(&self, kind: u8, bit: u8) -> Option<String> {
        self.feature_names()
            .iter()
            .find(|f| f.kind == kind && f.bit == bit)
            .map(|f| String::from_utf8_lossy(&f.name).into_owned())
    }

    /// Incompatible bits this code does not know, each named from the
    /// image's feature name table when it has one.
    pub fn unknown_incompatible(&self) -> Vec<String> {
        (0..64u8)
            .filter(|&bit| self.incompatible_features & !INCOMPAT_KNOWN & (1 << bit) != 0)
            .map(|bit| match self.feature_name(0, bit) {
                Some(n) => format!("bit {bit} ({n:?})"),
                None => format!("bit {bit}"),
            })
            .collect()
    }

    /// Autoclear bits a writer must clear before its first write, as the
    /// spec requires of one that does not maintain what they guard: the
    /// bitmaps bit (persistent dirty bitmaps would go stale; qemu then
    /// treats them as inconsistent) and every unknown bit. Raw external
    /// data (bit 1) is kept: a writer honours it by storing every guest
    /// byte, zeros included, in the data file at its guest offset.
    pub fn autoclear_to_clear(&self) -> u64 {
        self.autoclear_features & !AUTOCLEAR_DATA_FILE_RAW
    }

    /// Can chainfs open this image? Refuses encryption (naming the method)
    /// and unknown incompatible feature bits, with ErrorKind::Unsupported.
    /// A writable open of an image marked corrupt is refused too; dirty is
    /// fine here (a reader ignores refcounts; a writer rebuilds them).
    pub fn check_supported(&self, writable: bool) -> Result<()> {
        match self.crypt_method {
            CRYPT_NONE => {}
            CRYPT_AES => return Err(unsupported(32, "header crypt_method", "the image is encrypted with legacy AES-CBC (crypt_method 1); encrypted qcow2 images are not supported")),
            _ => return Err(unsupported(32, "header crypt_method", "the image is encrypted with LUKS (crypt_method 2); encrypted qcow2 images are not supported")),
        }
        let unknown = self.unknown_incompatible();
        if !unknown.is_empty() {
            return Err(unsupported(
                72,
                "header incompatible_features",
                format!(
                    "{:#x} has unknown feature {}; refusing to open",
                    self.incompatible_features,
                    unknown.join(", ")
                ),
            ));
        }
        if writable && self.is_corrupt() {
            return Err(unsupported(72, "header incompatible_features", "the corrupt bit (1) is set: the image may only be opened read-only (repair it with `qemu-img check -r all`)"));
        }
        Ok(())
    }
}

/// The geometry of an image's tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub cluster_bits: u32,
    pub extended_l2: bool,
    pub external_data: bool,
    pub refcount_order: u32,
}

impl Layout {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Bytes per L2 entry: 8, or 16 with extended L2.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }
    /// Guest bytes one L2 table maps.
    pub fn l2_coverage(&self) -> u64 {
        self.l2_entries() << self.cluster_bits
    }
    pub fn subcluster_size(&self) -> u64 {
        if self.extended_l2 {
            self.cluster_size() / u64::from(SUBCLUSTERS)
        } else {
            self.cluster_size()
        }
    }
    /// L1 entries needed to map `size` guest bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.l2_coverage())
    }
    /// (L1 index, L2 index) of a guest offset.
    pub fn indices(&self, guest: u64) -> (u64, u64) {
        let c = guest >> self.cluster_bits;
        (c / self.l2_entries(), c % self.l2_entries())
    }
    pub fn refcount_bits(&self) -> u64 {
        1 << self.refcount_order
    }
    /// Refcounts in one refcount block.
    pub fn refcount_block_entries(&self) -> u64 {
        (self.cluster_size() * 8) >> self.refcount_order
    }
    /// Bit where the sector count of a compressed descriptor starts.
    fn compressed_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }
}

/// An L1 entry: where the L2 table for one L1 slot lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L1Entry {
    /// 0: no L2 table, every cluster it would map is unallocated.
    pub l2_offset: u64,
    /// Refcount of the L2 table is exactly one (active table only).
    pub copied: bool,
}

impl L1Entry {
    /// Decode the entry stored at file offset `at`. Reserved bits are
    /// ignored as qemu does; a misaligned L2 offset is corruption.
    pub fn decode(raw: u64, at: u64, layout: &Layout) -> Result<L1Entry> {
        let l2_offset = raw & OFFSET_MASK;
        if l2_offset % layout.cluster_size() != 0 {
            return Err(corrupt(
                at,
                "L1 entry",
                format!("L2 table offset {l2_offset:#x} is not cluster aligned"),
            ));
        }
        Ok(L1Entry {
            l2_offset,
            copied: raw & FLAG_COPIED != 0,
        })
    }
    pub fn encode(&self) -> u64 {
        self.l2_offset | if self.copied { FLAG_COPIED } else { 0 }
    }
}

/// What a (standard or extended) L2 entry says about one guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cluster {
    /// Read from the backing file (zeros past its end or without one). With
    /// extended L2, only the cluster-level state: see the subcluster bitmaps.
    Unallocated,
    /// Reads as zeros, never from the backing file; `host_offset` is a
    /// preallocated cluster a writer may reuse. Never used with extended L2.
    Zero {
        host_offset: Option<u64>,
        copied: bool,
    },
    /// Stored at `host_offset` (cluster aligned; in the data file when the
    /// image has one, where it equals the guest offset).
    Data { host_offset: u64, copied: bool },
    /// Compressed data starting at byte `host_offset` (any alignment), at
    /// most `compressed_len_bytes_upper_bound` bytes long (the sector count
    /// rounds up; the bound may run past the end of the file: clamp).
    Compressed {
        host_offset: u64,
        compressed_len_bytes_upper_bound: u64,
    },
}

impl Cluster {
    /// Decode a standard L2 entry (or the first word of an extended one)
    /// stored at file offset `at`.
    pub fn decode(raw: u64, at: u64, layout: &Layout) -> Result<Cluster> {
        if raw & FLAG_COMPRESSED != 0 {
            if layout.external_data {
                return Err(corrupt(
                    at,
                    "L2 entry",
                    "compressed cluster in an image with an external data file",
                ));
            }
            let x = layout.compressed_shift();
            let host_offset = raw & ((1u64 << x) - 1);
            if host_offset >> 56 != 0 {
                return Err(corrupt(
                    at,
                    "L2 entry",
                    format!("compressed cluster offset {host_offset:#x} has bits above 55 set"),
                ));
            }
            let nsect = (raw & !(FLAG_COMPRESSED | FLAG_COPIED)) >> x;
            if host_offset == 0 {
                return Err(corrupt(
                    at,
                    "L2 entry",
                    "compressed cluster at offset 0 (the header)",
                ));
            }
            return Ok(Cluster::Compressed {
                host_offset,
                compressed_len_bytes_upper_bound: (nsect + 1) * 512 - (host_offset & 511),
            });
        }
        let host = raw & OFFSET_MASK;
        let copied = raw & FLAG_COPIED != 0;
        if host % layout.cluster_size() != 0 {
            return Err(corrupt(
                at,
                "L2 entry",
                format!("host cluster offset {host:#x} is not cluster aligned"),
            ));
        }
        // Offset 0 is a real cluster only in an external data file, and
        // only with COPIED set (its clusters all have refcount 1).
        let allocated = host != 0 || (layout.external_data && copied);
        if !layout.extended_l2 && raw & FLAG_ZERO != 0 {
            return Ok(Cluster::Zero {
                host_offset: allocated.then_some(host),
                copied,
            });
        }
        Ok(if allocated {
            Cluster::Data {
                host_offset: host,
                copied,
            }
        } else {
            Cluster::Unallocated
        })
    }

    /// The standard L2 entry (or first word of an extended one). For
    /// compressed clusters `compressed_len_bytes_upper_bound` must be what
    /// the sector count allows: `(n + 1) * 512 - (host_offset & 511)`.
    pub fn encode(&self, layout: &Layout) -> u64 {
        let c = |copied: bool| if copied { FLAG_COPIED } else { 0 };
        match *self {
            Cluster::Unallocated => 0,
            Cluster::Zero {
                host_offset,
                copied,
            } => host_offset.unwrap_or(0) | c(copied) | FLAG_ZERO,
            Cluster::Data {
                host_offset,
                copied,
            } => host_offset | c(copied),
            Cluster::Compressed {
                host_offset,
                compressed_len_bytes_upper_bound: len,
            } => {
                let nsect = (len + (host_offset & 511)).div_ceil(512) - 1;
                FLAG_COMPRESSED | (nsect << layout.compressed_shift()) | host_offset
            }
        }
    }
}

/// An extended L2 entry: the cluster, plus per-subcluster bitmaps (bit i =
/// subcluster i).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtendedL2Entry {
    pub cluster: Cluster,
    /// Subclusters stored in the cluster at `host_offset`.
    pub allocated: u32,
    /// Subclusters that read as zeros.
    pub zero: u32,
}

/// One subcluster's state (extended L2 only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subcluster {
    /// From the backing file.
    Unallocated,
    Zero,
    /// Stored at this host offset (of the subcluster itself).
    Data {
        host_offset: u64,
    },
    /// The whole cluster is compressed (no subclusters).
    Compressed,
}

impl ExtendedL2Entry {
    /// Decode the two words of an extended L2 entry stored at `at`.
    pub fn decode(raw: u64, bitmap: u64, at: u64, layout: &Layout) -> Result<ExtendedL2Entry> {
        let cluster = Cluster::decode(raw, at, layout)?;
        let allocated = bitmap as u32;
        let zero = (bitmap >> 32) as u32;
        match cluster {
            Cluster::Compressed { .. } if bitmap != 0 => Err(corrupt(
                at + 8,
                "extended L2 bitmap",
                "is not zero for a compressed cluster",
            )),
            _ if allocated & zero != 0 => Err(corrupt(
                at + 8,
                "extended L2 bitmap",
                format!(
                    "subclusters {:#010x} are both allocated and zero",
                    allocated & zero
                ),
            )),
            Cluster::Unallocated if allocated != 0 => Err(corrupt(
                at + 8,
                "extended L2 bitmap",
                "allocated subclusters in a cluster with no host offset",
            )),
            _ => Ok(ExtendedL2Entry {
                cluster,
                allocated,
                zero,
            }),
        }
    }

    pub fn encode(&self, layout: &Layout) -> (u64, u64) {
        // Decoding never yields Cluster::Zero here: no zero flag to clear.
        let raw = self.cluster.encode(layout);
        (
            raw,
            u64::from(self.allocated) | (u64::from(self.zero) << 32),
        )
    }

    /// State of subcluster `i` (0..32).
    pub fn subcluster(&self, i: u32, layout: &Layout) -> Subcluster {
        let bit = 1u32 << (i % SUBCLUSTERS);
        match self.cluster {
            Cluster::Compressed { .. } => Subcluster::Compressed,
            _ if self.zero & bit != 0 => Subcluster::Zero,
            Cluster::Data { host_offset, .. } if self.allocated & bit != 0 => Subcluster::Data {
                host_offset: host_offset + u64::from(i % SUBCLUSTERS) * layout.subcluster_size(),
            },
            _ => Subcluster::Unallocated,
        }
    }
}

/// A refcount table entry stored at `at`: the refcount block's offset, or
/// None when the block was never allocated (all its refcounts are 0).
pub fn decode_refcount_table_entry(raw: u64, at: u64, layout: &Layout) -> Result<Option<u64>> {
    if raw & 0x1ff != 0 {
        return Err(corrupt(
            at,
            "refcount table entry",
            format!("{raw:#x} has reserved bits 0-8 set"),
        ));
    }
    if raw % layout.cluster_size() != 0 {
        return Err(corrupt(
            at,
            "refcount table entry",
            format!("block offset {raw:#x} is not cluster aligned"),
        ));
    }
    Ok((raw != 0).then_some(raw))
}

/// Refcount `index` of a refcount block (one cluster of bytes). Entries
/// narrower than a byte are packed from the least significant bit; wider
/// ones are big-endian.
pub fn get_refcount(block: &[u8], index: u64, layout: &Layout) -> u64 {
    let bits = layout.refcount_bits();
    if bits < 8 {
        let per_byte = 8 / bits;
        let byte = block[(index / per_byte) as usize];
        let shift = (index % per_byte) * bits;
        u64::from(byte >> shift) & ((1 << bits) - 1)
    } else {
        let w = (bits / 8) as usize;
        let o = index as usize * w;
        block[o..o + w]
            .iter()
            .fold(0, |acc, &b| (acc << 8) | u64::from(b))
    }
}

/// Set refcount `index` of a refcount block; refuses a value that does not
/// fit the entry width.
pub fn set_refcount(block: &mut [u8], index: u64, value: u64, layout: &Layout) -> Result<()> {
    let bits = layout.refcount_bits();
    if bits < 64 && value >> bits != 0 {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("qcow2 refcount {value} does not fit in {bits} bits"),
        ));
    }
    if bits < 8 {
        let per_byte = 8 / bits;
        let b = &mut block[(index / per_byte) as usize];
        let shift = (index % per_byte) * bits;
        let mask = (((1u16 << bits) - 1) as u8) << shift;
        *b = (*b & !mask) | ((value as u8) << shift);
    } else {
        let w = (bits / 8) as usize;
        let o = index as usize * w;
        block[o..o + w].copy_from_slice(&value.to_be_bytes()[8 - w..]);
    }
    Ok(())
}

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: Vec<u8>,
    pub name: Vec<u8>,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    /// From the 64-bit extra field when present, else the 32-bit one.
    pub vm_state_size: u64,
    /// The disk size when the snapshot was taken (extra data bytes 48..56).
    pub disk_size: Option<u64>,
    /// The whole extra data, kept for rewriting.
    pub extra: Vec<u8>,
    /// The 32-bit vm_state_size field as stored.
    pub vm_state_size_32: u32,
}

const SNAPSHOT_FIXED: usize = 40;

impl Snapshot {
    /// Parse one entry at the start of `b`, which was read from file offset
    /// `at`; returns it and its padded length.
    pub fn parse(b: &[u8], at: u64, layout: &Layout) -> Result<(Snapshot, usize)> {
        if b.len() < SNAPSHOT_FIXED {
            return Err(corrupt(at, "snapshot table entry", "cut short"));
        }
        let l1_table_offset = be64(b, 0);
        let l1_size = be32(b, 8);
        if l1_table_offset % layout.cluster_size() != 0 {
            return Err(corrupt(
                at,
                "snapshot L1 table offset",
                format!("{l1_table_offset:#x} is not cluster aligned"),
            ));
        }
        if u64::from(l1_size) * 8 > MAX_L1_BYTES {
            return Err(corrupt(
                at + 8,
                "snapshot l1_size",
                format!("{l1_size} entries is over qemu's 32 MiB L1 limit"),
            ));
        }
        let id_len = be16(b, 12) as usize;
        let name_len = be16(b, 14) as usize;
        let extra_len = be32(b, 36);
        if extra_len > MAX_SNAPSHOT_EXTRA {
            return Err(corrupt(
                at + 36,
                "snapshot extra data size",
                format!("{extra_len} is over 1024"),
            ));
        }
        let extra_len = extra_len as usize;
        let total = SNAPSHOT_FIXED + extra_len + id_len + name_len;
        if b.len() < total {
            return Err(corrupt(
                at,
                "snapshot table entry",
                format!("{total} bytes run past the snapshot table"),
            ));
        }
        let extra = b[SNAPSHOT_FIXED..SNAPSHOT_FIXED + extra_len].to_vec();
        let id_at = SNAPSHOT_FIXED + extra_len;
        let vm_state_size_32 = be32(b, 32);
        let vm_state_size = if extra_len >= 8 {
            be64(&extra, 0)
        } else {
            u64::from(vm_state_size_32)
        };
        let disk_size = (extra_len >= 16).then(|| be64(&extra, 8));
        let s = Snapshot {
            l1_table_offset,
            l1_size,
            id: b[id_at..id_at + id_len].to_vec(),
            name: b[id_at + id_len..total].to_vec(),
            date_sec: be32(b, 16),
            date_nsec: be32(b, 20),
            vm_clock_nsec: be64(b, 24),
            vm_state_size,
            disk_size,
            extra,
            vm_state_size_32,
        };
        Ok((s, pad8(total)))
    }

    /// The entry padded to a multiple of 8. `extra` is written as kept; a
    /// writer that changes vm_state_size or disk_size updates it first.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&(self.id.len() as u16).to_be_bytes());
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.date_sec.to_be_bytes());
        out.extend_from_slice(&self.date_nsec.to_be_bytes());
        out.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        out.extend_from_slice(&self.vm_state_size_32.to_be_bytes());
        out.extend_from_slice(&(self.extra.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.extra);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&self.name);
        out.resize(pad8(out.len()), 0);
        out
    }
}

/// Parse `count` snapshot entries from the table bytes `b`, read from file
/// offset `at`.
pub fn parse_snapshot_table(
    b: &[u8],
    at: u64,
    count: u32,
    layout: &Layout,
) -> Result<Vec<Snapshot>> {
    let mut out = Vec::with_capacity(count.min(1024) as usize);
    let mut pos = 0usize;
    for _ in 0..count {
        let (s, len) = Snapshot::parse(b.get(pos..).unwrap_or(&[]), at + pos as u64, layout)?;
        out.push(s);
        pos += len;
    }
    Ok(out)
}

/// Fuzz body for the header parser. Errors are fine, panics are bugs. A
/// header that parses must serialise with `to_bytes` and parse back equal,
/// and the derived checks must not panic.
pub fn fuzz_header(data: &[u8]) {
    let Ok(h) = Header::parse(data) else {
        return;
    };
    let bytes = h.to_bytes().expect("to_bytes() of a parsed header");
    let again = Header::parse(&bytes).expect("parse of to_bytes()");
    assert_eq!(again, h, "qcow2 header does not round-trip");
    let _ = h.check_supported(true);
    let _ = h.check_supported(false);
    let layout = h.layout();
    let _ = layout.indices(h.size.saturating_sub(1));
    let _ = layout.refcount_block_entries();
    for w in data.chunks_exact(16).take(64) {
        let (a, b) = (be64(w, 0), be64(w, 8));
        let _ = L1Entry::decode(a, 0, &layout);
        if let Ok(c) = Cluster::decode(a, 0, &layout) {
            if !layout.extended_l2 {
                assert_eq!(Cluster::decode(c.encode(&layout), 0, &layout).ok(), Some(c));
            }
        }
        if let Ok(e) = ExtendedL2Entry::decode(a, b, 0, &layout) {
            let (x, y) = e.encode(&layout);
            assert_eq!(ExtendedL2Entry::decode(x, y, 0, &layout).ok(), Some(e));
        }
        let _ = decode_refcount_table_entry(a, 0, &layout);
    }
    let block = &data[..data.len().min(h.cluster_size() as usize)];
    if !block.is_empty() {
        let n = (block.len() as u64 * 8) >> layout.refcount_order;
        for i in 0..n.min(64) {
            let _ = get_refcount(block, i, &layout);
        }
    }
    let _ = parse_snapshot_table(data, 0, h.nb_snapshots.min(64), &layout);
}

#[cfg(test)]
#[path = "structs_tests.rs"]
mod tests;
