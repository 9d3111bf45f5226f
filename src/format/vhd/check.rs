//! `chainfs check` for one VHD file: checksums, the footer copy, and that
//! every BAT entry points inside the file, clear of the metadata and of
//! every other block.

use std::os::unix::fs::FileExt;

use super::*;

pub(super) fn check(l: &VhdLayer) -> Result<Vec<String>> {
    let path = l.path.display().to_string();
    let mut problems = Vec::new();
    let tail = l.data_end.load(Ordering::Acquire);
    let mut last = [0u8; FOOTER_SIZE];
    l.file
        .read_exact_at(&mut last, tail)
        .ctx(&l.path, "cannot read footer", Some(tail))?;
    match (&l.footer_problem, Footer::parse(&last, true)) {
        (Some(e), _) => problems.push(e.clone()),
        (None, Err(e)) => {
            problems.push(Error::format(&l.path, tail, "trailing footer", e).to_string())
        }
        _ => {}
    }
    if l.header.is_none() {
        return Ok(problems);
    }
    let mut copy = [0u8; FOOTER_SIZE];
    l.file
        .read_exact_at(&mut copy, 0)
        .ctx(&l.path, "cannot read footer copy", Some(0))?;
    if l.footer_problem.is_none() && copy != last {
        problems.push(format!(
            "{path}: at offset 0x0: footer copy differs from the footer at {tail:#x}"
        ));
    }
    let data_offset = l.footer.lock().data_offset;
    let hb = {
        let mut b = [0u8; HEADER_SIZE];
        l.file.read_exact_at(&mut b, data_offset).ctx(
            &l.path,
            "cannot read dynamic header",
            Some(data_offset),
        )?;
        b
    };
    if let Some(j) = &l.journal {
        problems.push(format!(
            "{path}: at offset {:#x}: an interrupted relink (its journal holds the new dynamic \
             header; a writable open, or rerunning the merge or set-parent, finishes it)",
            j.at
        ));
    } else if let Err(e) = DynamicHeader::parse(&hb, true) {
        problems.push(Error::format(&l.path, data_offset, "dynamic header", e).to_string());
    }
    let h = &l.current_header()?;

    // Metadata regions no block may overlap: [start, end, name].
    let mut meta: Vec<(u64, u64, String)> = vec![
        (0, FOOTER_SIZE as u64, "footer copy".into()),
        (
            data_offset,
            data_offset + HEADER_SIZE as u64,
            "dynamic header".into(),
        ),
        (
            h.table_offset,
            h.table_offset + (h.max_table_entries as u64 * 4).next_multiple_of(SECTOR),
            "BAT".into(),
        ),
    ];
    for (i, loc) in h.locators.iter().enumerate() {
        if loc.code == PLAT_NONE {
            continue;
        }
        let end = loc.data_offset.saturating_add(loc.data_len as u64);
        if end > tail || loc.data_len > MAX_LOCATOR_LEN {
            problems.push(format!(
                "{path}: at offset {:#x}: parent locator {i} ({}) data {:#x}+{} lies outside the file",
                data_offset + 576 + i as u64 * 24,
                code_name(loc.code),
                loc.data_offset,
                loc.data_len
            ));
            continue;
        }
        meta.push((
            loc.data_offset,
            loc.data_offset + (loc.data_len as u64).next_multiple_of(SECTOR),
            format!("{} locator data", code_name(loc.code)),
        ));
    }

    let span = l.bitmap_size + l.block_size;
    let mut blocks = Vec::new();
    for b in 0..h.max_table_entries as u64 {
        let e = l.bat_entry(b)?;
        if e == UNALLOCATED {
            continue;
        }
        let at = h.table_offset + b * 4;
        let start = e as u64 * SECTOR;
        let end = start + span;
        if end > tail {
            problems.push(format!(
                "{path}: at offset {at:#x}: BAT entry {b} points to {start:#x}..{end:#x}, past the footer at {tail:#x}"
            ));
            continue;
        }
        for (ms, me, name) in &meta {
            if start < *me && *ms < end {
                problems.push(format!(
                    "{path}: at offset {at:#x}: BAT entry {b} ({start:#x}..{end:#x}) overlaps the {name} at {ms:#x}..{me:#x}"
                ));
            }
        }
        blocks.push((start, end, b));
    }
    blocks.sort_unstable();
    for w in blocks.windows(2) {
        let ((s1, e1, b1), (s2, _, b2)) = (w[0], w[1]);
        if s2 < e1 {
            problems.push(format!(
                "{path}: at offset {:#x}: BAT entry {b2} ({s2:#x}) overlaps block {b1} ({s1:#x}..{e1:#x})",
                h.table_offset + b2 * 4
            ));
        }
    }
    problems.extend(l.leaks()?);
    Ok(problems)
}
