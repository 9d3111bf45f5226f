//! The merge intent record: a small checksummed JSON file next to the
//! source, `.<source name>.chainfs-merge`, written before a merge changes
//! anything and removed when it is done. Its `phase` says how far it got:
//!
//! - `copy`: the destination may hold some of the merged data (only where
//!   the layers being merged shadow it, so the chain still reads the same).
//!   Rerunning the merge redoes the copy and goes on.
//! - `relinking`: the destination holds everything; some children may point
//!   at it already, others still at the source (both read the same).
//!   Rerunning relinks them all.
//! - `relinked`: the destination holds everything and the children point at
//!   it; what is left is retiring the merged files. Rerunning finishes that.
//!
//! Written with the usual atomic-replace: temp file, fsync, rename, fsync of
//! the folder, so a reader sees the old record or the new one, never a mix.
//!
//! The bytes are parsed and checked (JSON shape, version, checksum) in one
//! place, [`Record::from_bytes`], which [`read`] wraps with the file's path
//! and which the `intent_record` fuzz target drives directly.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, FormatError, IoContext, Result};

/// The record layout this code writes and reads.
pub const VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Copy,
    Relinking,
    Relinked,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub version: u32,
    pub phase: Phase,
    pub source: PathBuf,
    pub destination: PathBuf,
    /// The files the merge retires: SOURCE and the layers down to (not
    /// including) DESTINATION.
    pub removed: Vec<PathBuf>,
    /// The children relinked to DESTINATION.
    pub children: Vec<PathBuf>,
    pub keep: bool,
    pub destination_id: String,
    /// CRC-32C of the record's JSON with this field 0.
    pub crc32c: u32,
}

/// Where the record of a merge out of `source` lives.
pub fn path_for(source: &Path) -> PathBuf {
    let dir = crate::paths::folder_of(source);
    let name = source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.join(format!(".{name}.chainfs-merge"))
}

fn checksum(r: &Record) -> u32 {
    let mut c = r.clone();
    c.crc32c = 0;
    crc32c::crc32c(&serde_json::to_vec(&c).expect("serialisable"))
}

/// The byte offset of a JSON error's line and column in `bytes`.
fn json_offset(bytes: &[u8], e: &serde_json::Error) -> u64 {
    let line_start: usize = bytes
        .split(|&b| b == b'\n')
        .take(e.line().saturating_sub(1))
        .map(|l| l.len() + 1)
        .sum();
    (line_start + e.column().saturating_sub(1)).min(bytes.len()) as u64
}

impl Record {
    /// Parse a stored record and check it: its JSON shape, `version` and
    /// checksum. An error's offset is where the JSON breaks, or 0 when the
    /// record as a whole is refused.
    pub fn from_bytes(bytes: &[u8]) -> Result<Record, FormatError> {
        let r: Record = serde_json::from_slice(bytes).map_err(|e| {
            FormatError::new(json_offset(bytes, &e), format!("not a valid record: {e}"))
        })?;
        if r.version != VERSION {
            return Err(FormatError::new(
                0,
                format!("version {} is not {VERSION}", r.version),
            ));
        }
        let computed = checksum(&r);
        if computed != r.crc32c {
            return Err(FormatError::new(
                0,
                format!(
                    "checksum {:#010x} does not match computed {computed:#010x}",
                    r.crc32c
                ),
            ));
        }
        Ok(r)
    }

    /// The stored form: pretty JSON whose `crc32c` is the checksum of the
    /// rest (whatever `self.crc32c` holds), so `from_bytes` accepts it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut sealed = self.clone();
        sealed.crc32c = checksum(self);
        serde_json::to_vec_pretty(&sealed).expect("serialisable")
    }

    pub fn write(&mut self) -> Result<()> {
        self.crc32c = checksum(self);
        let path = path_for(&self.source);
        let tmp = path.with_extension("chainfs-merge.tmp");
        let bytes = self.to_bytes();
        crate::fault::point()?;
        std::fs::write(&tmp, &bytes).ctx(&tmp, "cannot write merge record", None)?;
        crate::fault::point()?;
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).ctx(
            &tmp,
            "cannot fsync merge record",
            None,
        )?;
        crate::fault::point()?;
        std::fs::rename(&tmp, &path).ctx(&path, "cannot install merge record", None)?;
        sync_dir(&path)
    }
}

/// Read the record of a merge out of `source`, if there is one.
pub fn read(source: &Path) -> Result<Option<Record>> {
    let path = path_for(source);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&path, "cannot read merge record", None, e)),
    };
    Record::from_bytes(&bytes)
        .map(Some)
        .map_err(|e| Error::format(&path, 0, "merge record", e))
}

/// Remove the record of a merge out of `source` (the merge is done).
pub fn remove(source: &Path) -> Result<()> {
    let path = path_for(source);
    crate::fault::point()?;
    match std::fs::remove_file(&path) {
        Ok(()) => sync_dir(&path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(&path, "cannot remove merge record", None, e)),
    }
}

/// fsync the folder holding `path`, so a rename or unlink in it is durable.
pub fn sync_dir(path: &Path) -> Result<()> {
    let dir = crate::paths::folder_of(path);
    crate::fault::point()?;
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .ctx(dir, "cannot fsync folder", None)
}

impl std::fmt::Display for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "interrupted merge of {} into {} ({}); run `chainfs merge {} {}` to finish it",
            self.source.display(),
            self.destination.display(),
            match self.phase {
                Phase::Copy => "copying: the chain is unchanged",
                Phase::Relinking =>
                    "relinking: the destination holds everything; the chain reads the same either way",
                Phase::Relinked => "relinked: only retiring the merged files is left",
            },
            self.source.display(),
            self.destination.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            version: VERSION,
            phase: Phase::Relinking,
            source: "/d/leaf.vhdx".into(),
            destination: "/d/base.vhdx".into(),
            removed: vec!["/d/leaf.vhdx".into()],
            children: vec!["/d/child.vhdx".into()],
            keep: false,
            destination_id: "id".into(),
            crc32c: 0,
        }
    }

    #[test]
    fn to_bytes_parses_back_and_from_bytes_refuses_damage() {
        let bytes = record().to_bytes();
        let r = Record::from_bytes(&bytes).unwrap();
        assert_eq!(r.crc32c, checksum(&record()));
        assert_eq!(Record { crc32c: 0, ..r }, record());

        let text = String::from_utf8(bytes).unwrap();
        let flipped = text.replace("relinking", "relinked");
        let e = Record::from_bytes(flipped.as_bytes()).unwrap_err();
        assert!(e.msg.contains("checksum"), "{e}");

        let mut old = record();
        old.version = 2;
        let e = Record::from_bytes(&old.to_bytes()).unwrap_err();
        assert!(e.msg.contains("version 2"), "{e}");

        // A JSON error names where the bytes break: the stray `x` here.
        let cut = format!("{}x", &text[..text.find("\"keep\"").unwrap()]);
        let e = Record::from_bytes(cut.as_bytes()).unwrap_err();
        assert_eq!(e.offset, cut.len() as u64 - 1, "{e}");
    }
}
