//! VHDX on-disk structures ([MS-VHDX]), parsed from byte slices. Integers
//! are little-endian; GUIDs use the Microsoft layout (`Uuid::from_bytes_le`);
//! checksums are CRC-32C over the structure with its checksum field zeroed.

use uuid::Uuid;

use crate::error::FormatError;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
pub const HEADER1: u64 = 64 * KIB;
pub const HEADER2: u64 = 128 * KIB;
pub const REGION1: u64 = 192 * KIB;
pub const REGION2: u64 = 256 * KIB;
pub const HEADER_SIZE: usize = 4096;
/// The file type identifier's signature, at offset 0.
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// The signatures of the header section's structures, by offset: the two
/// headers and the two region tables.
pub const SECTION_SIGNATURES: [(u64, &[u8; 4]); 4] = [
    (HEADER1, b"head"),
    (HEADER2, b"head"),
    (REGION1, b"regi"),
    (REGION2, b"regi"),
];
pub const REGION_SIZE: usize = 64 * 1024;

pub const BAT_GUID: Uuid = Uuid::from_u128(0x2DC27766_F623_4200_9D64_115E9BFD4A08);
pub const METADATA_GUID: Uuid = Uuid::from_u128(0x8B7CA206_4790_4B9A_B8FE_575F050F886E);
pub const FILE_PARAMETERS: Uuid = Uuid::from_u128(0xCAA16737_FA36_4D43_B3B6_33F0AA44E76B);
pub const VIRTUAL_DISK_SIZE: Uuid = Uuid::from_u128(0x2FA54224_CD1B_4876_B211_5DBED83BF4B8);
pub const VIRTUAL_DISK_ID: Uuid = Uuid::from_u128(0xBECA12AB_B2E6_4523_93EF_C309E000C746);
pub const LOGICAL_SECTOR_SIZE: Uuid = Uuid::from_u128(0x8141BF1D_A96F_4709_BA47_F233A8FAAB5F);
pub const PHYSICAL_SECTOR_SIZE: Uuid = Uuid::from_u128(0xCDA348C7_445D_4471_9CC9_E9885251C556);
pub const PARENT_LOCATOR: Uuid = Uuid::from_u128(0xA8D35F2D_B30B_454D_ABF7_D3D84834AB0C);
pub const VHDX_LOCATOR_TYPE: Uuid = Uuid::from_u128(0xB04AEFB7_D19E_4A81_B789_25B8E9445913);

pub const PAYLOAD_NOT_PRESENT: u64 = 0;
pub const PAYLOAD_UNDEFINED: u64 = 1;
pub const PAYLOAD_ZERO: u64 = 2;
pub const PAYLOAD_UNMAPPED: u64 = 3;
pub const PAYLOAD_UNMAPPED_V095: u64 = 5;
pub const PAYLOAD_FULLY_PRESENT: u64 = 6;
pub const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;
pub const SB_PRESENT: u64 = 6;

pub fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
pub fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
pub fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}
pub fn guid(b: &[u8], o: usize) -> Uuid {
    Uuid::from_bytes_le(b[o..o + 16].try_into().unwrap())
}

/// CRC-32C of `b` with the 4 bytes at `field` taken as zero.
pub fn crc_with_zeroed(b: &[u8], field: usize) -> u32 {
    let c = crc32c::crc32c(&b[..field]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, &b[field + 4..])
}

/// One of the two 4 KiB headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub sequence: u64,
    pub file_write_guid: Uuid,
    pub data_write_guid: Uuid,
    pub log_guid: Uuid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    pub fn parse(b: &[u8]) -> Result<Header, FormatError> {
        if b.len() < HEADER_SIZE {
            return Err(FormatError::new(0, "header shorter than 4 KiB"));
        }
        let b = &b[..HEADER_SIZE];
        if &b[0..4] != b"head" {
            return Err(FormatError::new(0, "header signature is not `head`"));
        }
        let stored = le32(b, 4);
        let computed = crc_with_zeroed(b, 4);
        if stored != computed {
            return Err(FormatError::new(
                4,
                format!("header CRC-32C {stored:#010x} does not match computed {computed:#010x}"),
            ));
        }
        let h = Header {
            sequence: le64(b, 8),
            file_write_guid: guid(b, 16),
            data_write_guid: guid(b, 32),
            log_guid: guid(b, 48),
            log_version: le16(b, 64),
            version: le16(b, 66),
            log_length: le32(b, 68),
            log_offset: le64(b, 72),
        };
        if h.log_offset % MIB != 0 || h.log_offset < MIB || h.log_length as u64 % MIB != 0 {
            return Err(FormatError::new(
                68,
                format!(
                    "log at {:#x}+{:#x} is not 1 MiB aligned after the header section",
                    h.log_offset, h.log_length
                ),
            ));
        }
        Ok(h)
    }

    /// A valid header of a version chainfs does not know must not be
    /// skipped for an older one: the file is refused instead.
    pub fn check_version(&self) -> Result<(), FormatError> {
        if self.version != 1 {
            return Err(FormatError::new(
                66,
                format!("header version {} is not 1", self.version),
            ));
        }
        if self.log_version != 0 {
            return Err(FormatError::new(
                64,
                format!("log version {} is not 0", self.log_version),
            ));
        }
        Ok(())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(b"head");
        b[8..16].copy_from_slice(&self.sequence.to_le_bytes());
        b[16..32].copy_from_slice(&self.file_write_guid.to_bytes_le());
        b[32..48].copy_from_slice(&self.data_write_guid.to_bytes_le());
        b[48..64].copy_from_slice(&self.log_guid.to_bytes_le());
        b[64..66].copy_from_slice(&self.log_version.to_le_bytes());
        b[66..68].copy_from_slice(&self.version.to_le_bytes());
        b[68..72].copy_from_slice(&self.log_length.to_le_bytes());
        b[72..80].copy_from_slice(&self.log_offset.to_le_bytes());
        let c = crc_with_zeroed(&b, 4);
        b[4..8].copy_from_slice(&c.to_le_bytes());
        b
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionEntry {
    pub guid: Uuid,
    pub offset: u64,
    pub length: u32,
    pub required: bool,
}

/// The region table (64 KiB).
pub fn parse_region_table(b: &[u8]) -> Result<Vec<RegionEntry>, FormatError> {
    if b.len() < REGION_SIZE {
        return Err(FormatError::new(0, "region table shorter than 64 KiB"));
    }
    let b = &b[..REGION_SIZE];
    if &b[0..4] != b"regi" {
        return Err(FormatError::new(0, "region table signature is not `regi`"));
    }
    let stored = le32(b, 4);
    let computed = crc_with_zeroed(b, 4);
    if stored != computed {
        return Err(FormatError::new(
            4,
            format!("region table CRC-32C {stored:#010x} does not match computed {computed:#010x}"),
        ));
    }
    let count = le32(b, 8) as usize;
    if count > 2047 {
        return Err(FormatError::new(
            8,
            format!("{count} region entries (at most 2047)"),
        ));
    }
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let o = 16 + i * 32;
        let e = RegionEntry {
            guid: guid(b, o),
            offset: le64(b, o + 16),
            length: le32(b, o + 24),
            required: le32(b, o + 28) & 1 != 0,
        };
        if e.offset % MIB != 0 || e.offset < MIB || e.length as u64 % MIB != 0 || e.length == 0 {
            return Err(FormatError::new(
                o as u64 + 16,
                format!(
                    "region {} at {:#x}+{:#x} is not 1 MiB aligned after the header section",
                    e.guid, e.offset, e.length
                ),
            ));
        }
        out.push(e);
    }
    Ok(out)
}

pub fn region_table_bytes(entries: &[RegionEntry]) -> Vec<u8> {
    let mut b = vec![0u8; REGION_SIZE];
    b[0..4].copy_from_slice(b"regi");
    b[8..12].copy_from_slice(&(entries.len() as u32).to_le_bytes());
    for (i, e) in entries.iter().enumerate() {
        let o = 16 + i * 32;
        b[o..o + 16].copy_from_slice(&e.guid.to_bytes_le());
        b[o + 16..o + 24].copy_from_slice(&e.offset.to_le_bytes());
        b[o + 24..o + 28].copy_from_slice(&e.length.to_le_bytes());
        b[o + 28..o + 32].copy_from_slice(&(e.required as u32).to_le_bytes());
    }
    let c = crc_with_zeroed(&b, 4);
    b[4..8].copy_from_slice(&c.to_le_bytes());
    b
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataEntry {
    pub item: Uuid,
    pub offset: u32,
    pub length: u32,
    pub is_user: bool,
    pub is_virtual_disk: bool,
    pub required: bool,
}

/// The metadata table (the first 64 KiB of the metadata region).
pub fn parse_metadata_table(b: &[u8]) -> Result<Vec<MetadataEntry>, FormatError> {
    if b.len() < REGION_SIZE {
        return Err(FormatError::new(0, "metadata table shorter than 64 KiB"));
    }
    if &b[0..8] != b"metadata" {
        return Err(FormatError::new(
            0,
            "metadata table signature is not `metadata`",
        ));
    }
    let count = le16(b, 10) as usize;
    if count > 2047 {
        return Err(FormatError::new(
            10,
            format!("{count} metadata entries (at most 2047)"),
        ));
    }
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let o = 32 + i * 32;
        let flags = le32(b, o + 24);
        out.push(MetadataEntry {
            item: guid(b, o),
            offset: le32(b, o + 16),
            length: le32(b, o + 20),
            is_user: flags & 1 != 0,
            is_virtual_disk: flags & 2 != 0,
            required: flags & 4 != 0,
        });
    }
    Ok(out)
}

pub fn metadata_table_bytes(entries: &[MetadataEntry]) -> Vec<u8> {
    let mut b = vec![0u8; REGION_SIZE];
    b[0..8].copy_from_slice(b"metadata");
    b[10..12].copy_from_slice(&(entries.len() as u16).to_le_bytes());
    for (i, e) in entries.iter().enumerate() {
        let o = 32 + i * 32;
        b[o..o + 16].copy_from_slice(&e.item.to_bytes_le());
        b[o + 16..o + 20].copy_from_slice(&e.offset.to_le_bytes());
        b[o + 20..o + 24].copy_from_slice(&e.length.to_le_bytes());
        let flags = e.is_user as u32 | (e.is_virtual_disk as u32) << 1 | (e.required as u32) << 2;
        b[o + 24..o + 28].copy_from_slice(&flags.to_le_bytes());
    }
    b
}

/// Parent locator key/value pairs (keys and values UTF-16LE).
pub fn parse_parent_locator(b: &[u8]) -> Result<Vec<(String, String)>, FormatError> {
    if b.len() < 20 {
        return Err(FormatError::new(
            0,
            "parent locator shorter than its header",
        ));
    }
    let kind = guid(b, 0);
    if kind != VHDX_LOCATOR_TYPE {
        return Err(FormatError::new(
            0,
            format!("unknown parent locator type {kind}"),
        ));
    }
    let count = le16(b, 18) as usize;
    if 20 + count * 12 > b.len() {
        return Err(FormatError::new(
            18,
            format!("{count} key/value entries do not fit"),
        ));
    }
    let text = |off: u32, len: u16, at: usize| -> Result<String, FormatError> {
        let (o, l) = (off as usize, len as usize);
        if o.checked_add(l).is_none_or(|e| e > b.len()) || l % 2 != 0 {
            return Err(FormatError::new(
                at as u64,
                "key/value lies outside the locator",
            ));
        }
        let units: Vec<u16> = b[o..o + l]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        Ok(String::from_utf16_lossy(&units))
    };
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let o = 20 + i * 12;
        let k = text(le32(b, o), le16(b, o + 8), o)?;
        let v = text(le32(b, o + 4), le16(b, o + 10), o + 4)?;
        out.push((k, v));
    }
    Ok(out)
}

pub fn parent_locator_bytes(pairs: &[(String, String)]) -> Vec<u8> {
    let enc = |s: &str| -> Vec<u8> { s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect() };
    let mut b = vec![0u8; 20 + pairs.len() * 12];
    b[0..16].copy_from_slice(&VHDX_LOCATOR_TYPE.to_bytes_le());
    b[18..20].copy_from_slice(&(pairs.len() as u16).to_le_bytes());
    for (i, (k, v)) in pairs.iter().enumerate() {
        let (kb, vb) = (enc(k), enc(v));
        let ko = b.len();
        b.extend_from_slice(&kb);
        let vo = b.len();
        b.extend_from_slice(&vb);
        let o = 20 + i * 12;
        b[o..o + 4].copy_from_slice(&(ko as u32).to_le_bytes());
        b[o + 4..o + 8].copy_from_slice(&(vo as u32).to_le_bytes());
        b[o + 8..o + 10].copy_from_slice(&(kb.len() as u16).to_le_bytes());
        b[o + 10..o + 12].copy_from_slice(&(vb.len() as u16).to_le_bytes());
    }
    b
}

/// A GUID written as `{...}` (braces and case optional).
pub fn parse_guid_text(s: &str) -> Option<Uuid> {
    Uuid::parse_str(s.trim().trim_start_matches('{').trim_end_matches('}')).ok()
}

pub fn guid_text(u: &Uuid) -> String {
    format!("{{{}}}", u.hyphenated())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_layout_is_microsoft() {
        let b = BAT_GUID.to_bytes_le();
        assert_eq!(
            b,
            [
                0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd,
                0x4a, 0x08
            ]
        );
    }

    #[test]
    fn header_round_trip() {
        let h = Header {
            sequence: 7,
            file_write_guid: Uuid::from_u128(1),
            data_write_guid: Uuid::from_u128(2),
            log_guid: Uuid::nil(),
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        };
        let b = h.to_bytes();
        assert_eq!(Header::parse(&b).unwrap(), h);
        let mut bad = b.clone();
        bad[100] = 1;
        assert_eq!(Header::parse(&bad).unwrap_err().offset, 4);
    }

    #[test]
    fn locator_round_trip() {
        let pairs = vec![
            (
                "parent_linkage".to_string(),
                "{ff34003b-11ed-4cf8-a166-b2be05e20b80}".to_string(),
            ),
            ("relative_path".to_string(), ".\\p.vhdx".to_string()),
        ];
        assert_eq!(
            parse_parent_locator(&parent_locator_bytes(&pairs)).unwrap(),
            pairs
        );
    }
}
