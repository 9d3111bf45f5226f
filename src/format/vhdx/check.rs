//! `chainfs check` for one VHDX file: the log, both region tables, and every
//! BAT entry (state, reserved bits, offsets inside the file and clear of
//! the regions and of each other).

use super::*;

pub(super) fn check(l: &VhdxLayer) -> Result<Vec<String>> {
    let path = l.path.display().to_string();
    let mut problems = Vec::new();
    let lay = l.layout();
    if l.dirty_log {
        problems.push(format!(
            "{path}: at offset {:#x}: the log is not empty (replayed in memory for reading; a writable open replays it into the file)",
            lay.header.log_offset
        ));
    }
    for (i, at) in [HEADER1, HEADER2].into_iter().enumerate() {
        let mut b = vec![0u8; HEADER_SIZE];
        l.read_meta(at, &mut b)?;
        if let Err(e) = Header::parse(&b) {
            problems.push(Error::format(&l.path, at, &format!("header {}", i + 1), e).to_string());
        }
    }
    let mut r1 = vec![0u8; REGION_SIZE];
    let mut r2 = vec![0u8; REGION_SIZE];
    l.read_meta(REGION1, &mut r1)?;
    l.read_meta(REGION2, &mut r2)?;
    if let Err(e) = parse_region_table(&r1) {
        problems.push(Error::format(&l.path, REGION1, "region table 1", e).to_string());
    }
    if let Err(e) = parse_region_table(&r2) {
        problems.push(Error::format(&l.path, REGION2, "region table 2", e).to_string());
    }
    let flen = l.data_end.load(Ordering::Acquire);
    let regions = [
        (
            lay.header.log_offset,
            lay.header.log_offset + lay.header.log_length as u64,
        ),
        (lay.bat_offset, lay.bat_offset + lay.bat_length),
        (
            lay.metadata_offset,
            lay.metadata_offset + lay.metadata_length,
        ),
    ];
    let mut blocks = Vec::new();
    for idx in 0..lay.bat_entries {
        let e = l.bat(idx)?;
        let at = lay.bat_offset + idx * 8;
        let is_sb = idx % (lay.chunk_ratio + 1) == lay.chunk_ratio;
        let state = e & 7;
        if e & 0xF_FFF8 != 0 {
            problems.push(format!(
                "{path}: at offset {at:#x}: BAT entry {idx} has reserved bits set ({e:#x})"
            ));
            continue;
        }
        let len = if is_sb {
            if !matches!(state, 0 | SB_PRESENT) {
                problems.push(format!("{path}: at offset {at:#x}: sector bitmap entry {idx} has invalid state {state}"));
                continue;
            }
            if state != SB_PRESENT {
                continue;
            }
            MIB
        } else {
            match state {
                PAYLOAD_FULLY_PRESENT => lay.block_size,
                PAYLOAD_PARTIALLY_PRESENT if lay.has_parent => {
                    let n = idx - idx / (lay.chunk_ratio + 1);
                    let sidx = (n / lay.chunk_ratio) * (lay.chunk_ratio + 1) + lay.chunk_ratio;
                    if l.bat(sidx)? & 7 != SB_PRESENT {
                        problems.push(format!(
                            "{path}: at offset {at:#x}: block {n} is partially present but its chunk has no sector bitmap (BAT entry {sidx})"
                        ));
                    }
                    lay.block_size
                }
                PAYLOAD_NOT_PRESENT
                | PAYLOAD_UNDEFINED
                | PAYLOAD_ZERO
                | PAYLOAD_UNMAPPED
                | PAYLOAD_UNMAPPED_V095 => continue,
                s => {
                    problems.push(format!(
                        "{path}: at offset {at:#x}: BAT entry {idx} has invalid payload state {s}"
                    ));
                    continue;
                }
            }
        };
        let start = (e >> 20) * MIB;
        let end = start + len;
        if start < MIB || end > flen.max(MIB) {
            problems.push(format!(
                "{path}: at offset {at:#x}: BAT entry {idx} points to {start:#x}..{end:#x}, outside the file ({flen:#x} bytes)"
            ));
            continue;
        }
        for (rs, re) in regions {
            if start < re && rs < end {
                problems.push(format!(
                    "{path}: at offset {at:#x}: BAT entry {idx} ({start:#x}..{end:#x}) overlaps a region at {rs:#x}..{re:#x}"
                ));
            }
        }
        blocks.push((start, end, idx));
    }
    blocks.sort_unstable();
    for w in blocks.windows(2) {
        if w[1].0 < w[0].1 {
            problems.push(format!(
                "{path}: at offset {:#x}: BAT entry {} ({:#x}) overlaps entry {} ({:#x}..{:#x})",
                lay.bat_offset + w[1].2 * 8,
                w[1].2,
                w[1].0,
                w[0].2,
                w[0].0,
                w[0].1
            ));
        }
    }
    problems.extend(l.leaks()?);
    Ok(problems)
}
