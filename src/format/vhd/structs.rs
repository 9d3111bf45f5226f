//! VHD on-disk structures (Virtual Hard Disk Image Format Specification v1.0),
//! parsed from and written to byte slices. All integers are big-endian.
//!
//! Each parser checks what one structure can say about itself: cookie,
//! checksum (unless told not to), version, disk type, the virtual size
//! (sector multiple, at most 2040 GiB), the block size (a power of two,
//! 512 bytes to 256 MiB) and the alignment of the offsets it holds. What
//! needs the file or the other structure (the header and BAT inside the
//! file, enough BAT entries for the virtual size) is checked where the
//! layer is opened, in `super`.

use uuid::Uuid;

use crate::error::FormatError;

pub const SECTOR: u64 = 512;
pub const FOOTER_SIZE: usize = 512;
pub const HEADER_SIZE: usize = 1024;
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
pub const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
pub const UNALLOCATED: u32 = 0xFFFF_FFFF;
/// The largest virtual size qemu and Windows accept: 2040 GiB.
pub const MAX_SIZE: u64 = 0xFF00_0000 * SECTOR;
/// Seconds between 1970-01-01 and 2000-01-01 (the VHD epoch).
pub const VHD_EPOCH: u64 = 946_684_800;

pub const TYPE_FIXED: u32 = 2;
pub const TYPE_DYNAMIC: u32 = 3;
pub const TYPE_DIFFERENCING: u32 = 4;

pub const PLAT_NONE: u32 = 0;
pub const PLAT_WI2R: u32 = u32::from_be_bytes(*b"Wi2r");
pub const PLAT_WI2K: u32 = u32::from_be_bytes(*b"Wi2k");
pub const PLAT_W2RU: u32 = u32::from_be_bytes(*b"W2ru");
pub const PLAT_W2KU: u32 = u32::from_be_bytes(*b"W2ku");
pub const PLAT_MACX: u32 = u32::from_be_bytes(*b"MacX");

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}
fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}

/// The VHD checksum: one's complement of the byte sum, with the checksum
/// field (at `field`) counted as zero.
pub fn checksum(bytes: &[u8], field: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field..field + 4).contains(i))
        .fold(0u32, |acc, (_, &b)| acc.wrapping_add(b as u32));
    !sum
}

/// The 512-byte footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub features: u32,
    pub version: u32,
    pub data_offset: u64,
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_os: u32,
    pub original_size: u64,
    pub current_size: u64,
    pub geometry: (u16, u8, u8),
    pub disk_type: u32,
    pub unique_id: Uuid,
    pub saved_state: u8,
}

impl Footer {
    /// Parse and validate a footer. `verify_checksum` false accepts a wrong
    /// checksum (for `--ignore-checksum`-like recovery paths and `check`).
    pub fn parse(b: &[u8], verify_checksum: bool) -> Result<Footer, FormatError> {
        if b.len() < FOOTER_SIZE {
            return Err(FormatError::new(0, "footer shorter than 512 bytes"));
        }
        let b = &b[..FOOTER_SIZE];
        if &b[0..8] != FOOTER_COOKIE {
            return Err(FormatError::new(0, "footer cookie is not `conectix`"));
        }
        let stored = be32(b, 64);
        let computed = checksum(b, 64);
        if verify_checksum && stored != computed {
            return Err(FormatError::new(
                64,
                format!("footer checksum {stored:#010x} does not match computed {computed:#010x}"),
            ));
        }
        let version = be32(b, 12);
        if version >> 16 != 1 {
            return Err(FormatError::new(
                12,
                format!("unsupported file format version {version:#010x}"),
            ));
        }
        let disk_type = be32(b, 60);
        if !matches!(disk_type, TYPE_FIXED | TYPE_DYNAMIC | TYPE_DIFFERENCING) {
            return Err(FormatError::new(
                60,
                format!("disk type {disk_type} is not fixed (2), dynamic (3) or differencing (4)"),
            ));
        }
        let current_size = be64(b, 48);
        if current_size % SECTOR != 0 {
            return Err(FormatError::new(
                48,
                format!("current size {current_size} is not a multiple of 512"),
            ));
        }
        if current_size > MAX_SIZE {
            return Err(FormatError::new(
                48,
                format!("current size {current_size} is over the 2040 GiB VHD limit"),
            ));
        }
        let data_offset = be64(b, 16);
        if disk_type != TYPE_FIXED && (data_offset % SECTOR != 0 || data_offset < 512) {
            return Err(FormatError::new(
                16,
                format!("data offset {data_offset:#x} is not a sector-aligned offset after the footer copy"),
            ));
        }
        Ok(Footer {
            features: be32(b, 8),
            version,
            data_offset,
            timestamp: be32(b, 24),
            creator_app: b[28..32].try_into().unwrap(),
            creator_version: be32(b, 32),
            creator_os: be32(b, 36),
            original_size: be64(b, 40),
            current_size,
            geometry: (u16::from_be_bytes([b[56], b[57]]), b[58], b[59]),
            disk_type,
            unique_id: Uuid::from_bytes(b[68..84].try_into().unwrap()),
            saved_state: b[84],
        })
    }

    pub fn to_bytes(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        b[0..8].copy_from_slice(FOOTER_COOKIE);
        b[8..12].copy_from_slice(&self.features.to_be_bytes());
        b[12..16].copy_from_slice(&self.version.to_be_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.timestamp.to_be_bytes());
        b[28..32].copy_from_slice(&self.creator_app);
        b[32..36].copy_from_slice(&self.creator_version.to_be_bytes());
        b[36..40].copy_from_slice(&self.creator_os.to_be_bytes());
        b[40..48].copy_from_slice(&self.original_size.to_be_bytes());
        b[48..56].copy_from_slice(&self.current_size.to_be_bytes());
        b[56..58].copy_from_slice(&self.geometry.0.to_be_bytes());
        b[58] = self.geometry.1;
        b[59] = self.geometry.2;
        b[60..64].copy_from_slice(&self.disk_type.to_be_bytes());
        b[68..84].copy_from_slice(self.unique_id.as_bytes());
        b[84] = self.saved_state;
        let c = checksum(&b, 64);
        b[64..68].copy_from_slice(&c.to_be_bytes());
        b
    }

    pub fn creator(&self) -> String {
        String::from_utf8_lossy(&self.creator_app)
            .trim_end_matches(['\0', ' '])
            .to_string()
    }
}

/// One of the eight parent locator entries of the dynamic header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Locator {
    pub code: u32,
    pub data_space: u32,
    pub data_len: u32,
    pub data_offset: u64,
}

/// The 1024-byte dynamic disk header (`cxsparse`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicHeader {
    pub table_offset: u64,
    pub max_table_entries: u32,
    pub block_size: u32,
    pub parent_id: Uuid,
    pub parent_timestamp: u32,
    /// Parent unicode name, decoded from UTF-16BE (lossily).
    pub parent_name: String,
    pub locators: [Locator; 8],
}

impl DynamicHeader {
    pub fn parse(b: &[u8], verify_checksum: bool) -> Result<DynamicHeader, FormatError> {
        if b.len() < HEADER_SIZE {
            return Err(FormatError::new(
                0,
                "dynamic header shorter than 1024 bytes",
            ));
        }
        let b = &b[..HEADER_SIZE];
        if &b[0..8] != HEADER_COOKIE {
            return Err(FormatError::new(
                0,
                "dynamic header cookie is not `cxsparse`",
            ));
        }
        let stored = be32(b, 36);
        let computed = checksum(b, 36);
        if verify_checksum && stored != computed {
            return Err(FormatError::new(
                36,
                format!(
                    "dynamic header checksum {stored:#010x} does not match computed {computed:#010x}"
                ),
            ));
        }
        let version = be32(b, 24);
        if version >> 16 != 1 {
            return Err(FormatError::new(
                24,
                format!("unsupported dynamic header version {version:#010x}"),
            ));
        }
        let block_size = be32(b, 32);
        if !block_size.is_power_of_two() || !(SECTOR as u32..=(256 << 20)).contains(&block_size) {
            return Err(FormatError::new(
                32,
                format!(
                    "block size {block_size} is not a power of two between 512 bytes and 256 MiB"
                ),
            ));
        }
        let table_offset = be64(b, 16);
        if table_offset % SECTOR != 0 || table_offset == 0 {
            return Err(FormatError::new(
                16,
                format!("BAT offset {table_offset:#x} is not sector aligned"),
            ));
        }
        let name_units: Vec<u16> = b[64..576]
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let mut locators = [Locator::default(); 8];
        for (i, l) in locators.iter_mut().enumerate() {
            let o = 576 + i * 24;
            *l = Locator {
                code: be32(b, o),
                data_space: be32(b, o + 4),
                data_len: be32(b, o + 8),
                data_offset: be64(b, o + 16),
            };
        }
        Ok(DynamicHeader {
            table_offset,
            max_table_entries: be32(b, 28),
            block_size,
            parent_id: Uuid::from_bytes(b[40..56].try_into().unwrap()),
            parent_timestamp: be32(b, 56),
            parent_name: String::from_utf16_lossy(&name_units),
            locators,
        })
    }

    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(HEADER_COOKIE);
        b[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        b[40..56].copy_from_slice(self.parent_id.as_bytes());
        b[56..60].copy_from_slice(&self.parent_timestamp.to_be_bytes());
        for (i, u) in self.parent_name.encode_utf16().take(256).enumerate() {
            b[64 + 2 * i..66 + 2 * i].copy_from_slice(&u.to_be_bytes());
        }
        for (i, l) in self.locators.iter().enumerate() {
            let o = 576 + i * 24;
            b[o..o + 4].copy_from_slice(&l.code.to_be_bytes());
            b[o + 4..o + 8].copy_from_slice(&l.data_space.to_be_bytes());
            b[o + 8..o + 12].copy_from_slice(&l.data_len.to_be_bytes());
            b[o + 16..o + 24].copy_from_slice(&l.data_offset.to_be_bytes());
        }
        let c = checksum(&b, 36);
        b[36..40].copy_from_slice(&c.to_be_bytes());
        b
    }
}

/// Bytes of the per-block sector bitmap, rounded up to whole sectors.
pub fn bitmap_bytes(block_size: u32) -> u64 {
    let sectors = block_size as u64 / SECTOR;
    sectors.div_ceil(8).div_ceil(SECTOR) * SECTOR
}

/// CHS geometry from the specification's appendix.
pub fn geometry(size: u64) -> (u16, u8, u8) {
    let mut ts = size / SECTOR;
    if ts > 65535 * 16 * 255 {
        ts = 65535 * 16 * 255;
    }
    let (spt, heads, cth);
    if ts >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = ts / spt;
    } else {
        let mut s = 17;
        let mut c = ts / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = ts / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = ts / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    ((cth / heads) as u16, heads as u8, spt as u8)
}

/// Decode a locator's platform data into text, per platform code.
pub fn decode_locator(code: u32, data: &[u8]) -> Option<String> {
    let s = match code {
        PLAT_W2RU | PLAT_W2KU => {
            let units: Vec<u16> = data
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16_lossy(&units)
        }
        PLAT_WI2R | PLAT_WI2K | PLAT_MACX => String::from_utf8_lossy(data).into_owned(),
        _ => return None,
    };
    Some(s.trim_end_matches('\0').to_string())
}

pub fn encode_utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

pub fn code_name(code: u32) -> String {
    let b = code.to_be_bytes();
    if b.iter().all(|c| c.is_ascii_graphic() || *c == b' ') {
        String::from_utf8_lossy(&b).into_owned()
    } else {
        format!("{code:#010x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_spec_examples() {
        assert_eq!(geometry(10 << 20), (301, 4, 17));
        assert_eq!(geometry(4 << 20), (120, 4, 17));
    }

    #[test]
    fn footer_round_trip_and_checksum() {
        let f = Footer {
            features: 2,
            version: 0x10000,
            data_offset: 512,
            timestamp: 7,
            creator_app: *b"chfs",
            creator_version: 1,
            creator_os: 0x5769326B,
            original_size: 1 << 20,
            current_size: 1 << 20,
            geometry: geometry(1 << 20),
            disk_type: TYPE_DYNAMIC,
            unique_id: Uuid::from_u128(0x1234),
            saved_state: 0,
        };
        let b = f.to_bytes();
        assert_eq!(Footer::parse(&b, true).unwrap(), f);
        let mut bad = b;
        bad[100] ^= 1;
        let e = Footer::parse(&bad, true).unwrap_err();
        assert_eq!(e.offset, 64);
        assert!(Footer::parse(&bad, false).is_ok());
    }

    #[test]
    fn bitmap_sizes() {
        assert_eq!(bitmap_bytes(2 << 20), 512);
        assert_eq!(bitmap_bytes(512 << 10), 512);
        assert_eq!(bitmap_bytes(4096), 512);
        assert_eq!(bitmap_bytes(4 << 20), 1024);
    }
}
