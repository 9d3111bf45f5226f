//! The VHDX metadata log ([MS-VHDX] 2.3): finding the active sequence and
//! replaying it. Read-only opens replay into an in-memory overlay of 4 KiB
//! file sectors, so a dirty image is read correctly without changing a byte
//! of it; writable opens write the same sectors into the file.

use std::collections::BTreeMap;

use uuid::Uuid;

use super::structs::{crc_with_zeroed, guid, le32, le64};
use crate::error::FormatError;

const SECTOR: usize = 4096;
/// Zero descriptors longer than this are not believed.
const MAX_ZERO: u64 = 1 << 30;

/// One write the log asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogWrite {
    Data { file_offset: u64, bytes: Vec<u8> },
    Zero { file_offset: u64, length: u64 },
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub pos: usize,
    pub length: usize,
    pub tail: usize,
    pub sequence: u64,
    pub flushed_file_offset: u64,
    pub last_file_offset: u64,
    pub writes: Vec<LogWrite>,
}

/// `len` bytes of the ring `log` from `pos`, wrapping at its end.
fn ring(log: &[u8], pos: usize, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut p = pos % log.len();
    while out.len() < len {
        let n = (len - out.len()).min(log.len() - p);
        out.extend_from_slice(&log[p..p + n]);
        p = (p + n) % log.len();
    }
    out
}

/// Parse and fully validate the entry at `pos`, or `None`.
pub fn parse_entry(log: &[u8], pos: usize, log_guid: Uuid) -> Option<Entry> {
    if log.len() < SECTOR || log.len() % SECTOR != 0 {
        return None;
    }
    let h = ring(log, pos, 64);
    if &h[0..4] != b"loge" {
        return None;
    }
    let length = le32(&h, 8) as usize;
    let tail = le32(&h, 12) as usize;
    let sequence = le64(&h, 16);
    let count = le32(&h, 24) as usize;
    if length < SECTOR
        || length % SECTOR != 0
        || length > log.len()
        || tail % SECTOR != 0
        || tail >= log.len()
        || sequence == 0
        || guid(&h, 32) != log_guid
    {
        return None;
    }
    let e = ring(log, pos, length);
    if le32(&e, 4) != crc_with_zeroed(&e, 4) {
        return None;
    }
    let desc_sectors = (count + 2).div_ceil(128);
    let mut writes = Vec::with_capacity(count);
    let mut data_sector = desc_sectors;
    for i in 0..count {
        let d = 64 + i * 32;
        if d + 32 > length {
            return None;
        }
        let file_offset = le64(&e, d + 16);
        if le64(&e, d + 24) != sequence || file_offset % SECTOR as u64 != 0 {
            return None;
        }
        match &e[d..d + 4] {
            b"desc" => {
                let s = data_sector * SECTOR;
                if s + SECTOR > length || &e[s..s + 4] != b"data" {
                    return None;
                }
                let seq = (le32(&e, s + 4) as u64) << 32 | le32(&e, s + 4092) as u64;
                if seq != sequence {
                    return None;
                }
                let mut bytes = Vec::with_capacity(SECTOR);
                bytes.extend_from_slice(&e[d + 8..d + 16]); // leading bytes
                bytes.extend_from_slice(&e[s + 8..s + 4092]);
                bytes.extend_from_slice(&e[d + 4..d + 8]); // trailing bytes
                writes.push(LogWrite::Data { file_offset, bytes });
                data_sector += 1;
            }
            b"zero" => {
                let zl = le64(&e, d + 8);
                if zl % SECTOR as u64 != 0 || zl > MAX_ZERO {
                    return None;
                }
                writes.push(LogWrite::Zero {
                    file_offset,
                    length: zl,
                });
            }
            _ => return None,
        }
    }
    Some(Entry {
        pos,
        length,
        tail,
        sequence,
        flushed_file_offset: le64(&h, 48),
        last_file_offset: le64(&h, 56),
        writes,
    })
}

/// The active sequence, tail first, or an empty list when the log holds
/// none. `Err` when the log is not empty but no valid sequence exists.
pub fn active_sequence(log: &[u8], log_guid: Uuid) -> Result<Vec<Entry>, FormatError> {
    let slots = log.len() / SECTOR;
    let entries: Vec<Option<Entry>> = (0..slots)
        .map(|i| parse_entry(log, i * SECTOR, log_guid))
        .collect();
    let mut best: Option<Vec<Entry>> = None;
    for start in entries.iter().flatten() {
        let mut seq = vec![start.clone()];
        let mut used = start.length;
        loop {
            let last = seq.last().unwrap();
            let next = (last.pos + last.length) % log.len();
            match &entries[next / SECTOR] {
                Some(n) if n.sequence == last.sequence + 1 && used + n.length <= log.len() => {
                    used += n.length;
                    seq.push(n.clone());
                }
                _ => break,
            }
        }
        let head = seq.last().unwrap();
        let Some(t) = seq.iter().position(|e| e.pos == head.tail) else {
            continue;
        };
        let active: Vec<Entry> = seq.drain(t..).collect();
        let better = best
            .as_ref()
            .is_none_or(|b| b.last().unwrap().sequence < active.last().unwrap().sequence);
        if better {
            best = Some(active);
        }
    }
    best.ok_or_else(|| {
        FormatError::new(0, "the log is not empty but holds no valid entry sequence")
    })
}

/// The file as the replayed log says it is: 4 KiB sectors that differ from
/// the file, and the length the file must have at least.
#[derive(Debug, Default, Clone)]
pub struct Overlay {
    pub sectors: BTreeMap<u64, Vec<u8>>,
    pub min_len: u64,
}

impl Overlay {
    pub fn from_sequence(seq: &[Entry]) -> Overlay {
        let mut o = Overlay::default();
        for e in seq {
            for w in &e.writes {
                match w {
                    LogWrite::Data { file_offset, bytes } => {
                        o.sectors.insert(*file_offset, bytes.clone());
                    }
                    LogWrite::Zero {
                        file_offset,
                        length,
                    } => {
                        for s in (0..*length).step_by(SECTOR) {
                            o.sectors.insert(file_offset + s, vec![0u8; SECTOR]);
                        }
                    }
                }
            }
            o.min_len = o.min_len.max(e.last_file_offset);
        }
        o
    }

    /// Patch `buf` (file bytes at `off`) with the overlay.
    pub fn apply(&self, off: u64, buf: &mut [u8]) {
        if self.sectors.is_empty() {
            return;
        }
        let end = off + buf.len() as u64;
        let first = off - off % SECTOR as u64;
        for (&s, data) in self.sectors.range(first..end) {
            let a = s.max(off);
            let b = (s + SECTOR as u64).min(end);
            buf[(a - off) as usize..(b - off) as usize]
                .copy_from_slice(&data[(a - s) as usize..(b - s) as usize]);
        }
    }
}
