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

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, IoContext, Result};

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

impl Record {
    pub fn write(&mut self) -> Result<()> {
        self.crc32c = 0;
        self.crc32c = checksum(self);
        let path = path_for(&self.source);
        let tmp = path.with_extension("chainfs-merge.tmp");
        let bytes = serde_json::to_vec_pretty(self).expect("serialisable");
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
    let r: Record = serde_json::from_slice(&bytes).map_err(|e| {
        Error::new(
            ErrorKind::Corrupt,
            format!("{}: merge record is not valid: {e}", path.display()),
        )
    })?;
    if r.version != 1 || checksum(&r) != r.crc32c {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "{}: merge record checksum or version is wrong",
                path.display()
            ),
        ));
    }
    Ok(Some(r))
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
