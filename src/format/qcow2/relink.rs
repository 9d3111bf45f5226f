//! Changing the backing file of a qcow2 (merges, `set-parent`): a new
//! backing file name and format, or the detached marker, crash-safely.
//!
//! qcow2 records no parent identity, so `ParentChange::Expect` has nothing
//! to do. `Set` and `Detach` rewrite the first cluster in two steps:
//!
//! 1. The new name is written in the first cluster past the first sector
//!    (past the extensions), where nothing live lies: not over the current
//!    name. Then `fdatasync`.
//! 2. The first sector is written in one write: the header fields that
//!    point to the name (`backing_file_offset`, `backing_file_size`) and
//!    the extensions, with the backing format extension changed. Then
//!    `fdatasync`.
//!
//! A crash before step 2 leaves the old header (old name, old format)
//! whole; after it, the new one. Step 2 is one sector, so this needs every
//! byte that changes to lie in the first 512 bytes: the backing format
//! extension comes first among qemu's extensions, and `qcow2`/`raw` pad to
//! the same 8 bytes, so nothing after it moves. When the change would move
//! bytes past the first sector (an image without a backing format
//! extension and a long extension area), the feature name table (a table
//! of names for error messages, nothing more) is left out to make room;
//! if that is not enough the relink is refused. With 512-byte clusters the
//! whole header, extensions and name are that one sector.

use std::os::unix::fs::FileExt;

use super::*;
use crate::error::{ErrorKind, IoContext};
use crate::format::ParentChange;

const SECTOR: u64 = 512;

impl Qcow2Layer {
    pub(super) fn relink_impl(&self, change: ParentChange<'_>) -> Result<()> {
        let (name, format) = match change {
            // No identity to expect: the name stays what it is.
            ParentChange::Expect(_) => return Ok(()),
            ParentChange::Set(p) => {
                let abs = std::fs::canonicalize(p.path()).ctx(p.path(), "cannot resolve", None)?;
                let dir = std::fs::canonicalize(folder_of(&self.path)).ctx(
                    &self.path,
                    "cannot resolve folder",
                    None,
                )?;
                (
                    crate::format::hint::header_name(&dir, &abs),
                    Some(p.info().format.to_string()),
                )
            }
            ParentChange::Detach => {
                let link = self.parent.read().clone();
                match link {
                    None => {
                        return Err(Error::new(
                            ErrorKind::InvalidState,
                            format!("{}: not a differencing disk", self.path.display()),
                        ))
                    }
                    Some(l) if l.detached => return Ok(()),
                    Some(l) => (format!("{DETACHED_PREFIX}{}", l.hints[0].stored), None),
                }
            }
        };
        crate::format::require_writable(self.writable, &self.path)?;
        let _g = self.alloc.lock();
        let old = self.header();
        let new = relinked_header(&old, name.as_bytes(), format.as_deref()).map_err(|e| {
            Error::new(
                e.kind,
                format!("{}: cannot relink: {}", self.path.display(), e.message()),
            )
        })?;
        let bytes = new.to_bytes().map_err(|e| in_file(e, &self.path))?;
        let cs = old.cluster_size();
        let p = &self.path;
        if cs > SECTOR {
            let (at, n) = (new.backing_file_offset, u64::from(new.backing_file_size));
            crate::fault::point()?;
            self.file
                .write_all_at(&bytes[at as usize..(at + n) as usize], at)
                .ctx(p, "cannot write the backing file name", Some(at))?;
            self.sync()?;
        }
        let first = &bytes[..(SECTOR as usize).min(bytes.len())];
        crate::fault::point()?;
        self.file
            .write_all_at(first, 0)
            .ctx(p, "cannot write the header", Some(0))?;
        self.sync()?;
        *self.parent.write() = parent_link(&new);
        *self.header.write() = new;
        Ok(())
    }
}

/// `old` with backing file `name` (placed past the first sector, not over
/// the current name) and backing format `format` (`None`: kept), such that
/// only the first sector and the new name's bytes differ from `old`.
pub(super) fn relinked_header(old: &Header, name: &[u8], format: Option<&str>) -> Result<Header> {
    let cs = old.cluster_size();
    for drop_names in [false, true] {
        let mut h = old.clone();
        if let Some(f) = format {
            let f = f.as_bytes().to_vec();
            match h
                .extensions
                .iter_mut()
                .find(|e| matches!(e, Extension::BackingFormat(_)))
            {
                Some(e) => *e = Extension::BackingFormat(f),
                None => h.extensions.insert(0, Extension::BackingFormat(f)),
            }
        }
        if drop_names {
            h.extensions
                .retain(|e| !matches!(e, Extension::FeatureNames(_)));
        }
        let ext_end = u64::from(h.header_length)
            + h.extensions
                .iter()
                .map(|e| 8 + (e.data().len() as u64).div_ceil(8) * 8)
                .sum::<u64>()
            + 8;
        let (old_at, old_n) = (old.backing_file_offset, u64::from(old.backing_file_size));
        let n = name.len() as u64;
        let mut at = if cs == SECTOR {
            ext_end
        } else {
            ext_end.max(SECTOR)
        };
        if cs > SECTOR && old_at != 0 && at < old_at + old_n && old_at < at + n {
            at = (old_at + old_n).next_multiple_of(8);
        }
        if name.is_empty() || n > u64::from(MAX_BACKING_NAME) || at + n > cs {
            return Err(Error::invalid(format!(
                "the backing file name {:?} ({n} bytes) does not fit in the first cluster ({cs} bytes; \
                 the header area ends at {at:#x})",
                String::from_utf8_lossy(name)
            )));
        }
        h.backing_file_offset = at;
        h.backing_file_size = n as u32;
        h.backing_file = Some(name.to_vec());
        // Everything past the first sector, other than the new name, must
        // stay as it is on disk.
        let (a, b) = (old.to_bytes()?, h.to_bytes()?);
        let live_end = ext_end.max(old_at + old_n).min(cs) as usize;
        let same = (SECTOR as usize..live_end).all(|i| {
            let in_name = (i as u64) >= at && (i as u64) < at + n;
            let in_old_name = old_at != 0 && (i as u64) >= old_at && (i as u64) < old_at + old_n;
            in_name
                || in_old_name
                || a.get(i).copied().unwrap_or(0) == b.get(i).copied().unwrap_or(0)
        });
        if cs == SECTOR || same {
            return Ok(h);
        }
    }
    Err(Error::new(
        ErrorKind::Unsupported,
        "the header extensions would move past the first sector, which cannot be rewritten \
         in one write",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new header with its tables placed (so that it parses).
    fn new_header(size: u64, bits: u32, b: Option<&(String, String)>) -> Result<Header> {
        let mut h = super::super::create::new_header(size, bits, b)?;
        let cs = 1u64 << bits;
        h.refcount_table_offset = cs;
        h.refcount_table_clusters = 1;
        h.l1_table_offset = 2 * cs;
        h.l1_size = h.layout().l1_entries_for(size) as u32;
        Ok(h)
    }

    fn names(n: usize) -> Extension {
        Extension::FeatureNames(
            (0..n)
                .map(|i| FeatureName {
                    kind: 0,
                    bit: i as u8,
                    name: b"some feature".to_vec(),
                })
                .collect(),
        )
    }

    #[test]
    fn a_new_name_goes_past_the_first_sector_and_not_over_the_old_one() {
        let b = ("base.qcow2".to_string(), "qcow2".to_string());
        let old = new_header(1 << 20, 16, Some(&b)).unwrap();
        let h = relinked_header(&old, b"../other/base.raw", Some("raw")).unwrap();
        assert_eq!(h.backing_file_offset, 512);
        assert_eq!(h.backing_format(), Some(&b"raw"[..]));
        let again = relinked_header(&h, b"x.qcow2", Some("qcow2")).unwrap();
        assert!(
            again.backing_file_offset >= 512 + 17,
            "not over the live name"
        );
        // Both parse back as written.
        let bytes = again.to_bytes().unwrap();
        assert_eq!(Header::parse(&bytes).unwrap(), again);
    }

    #[test]
    fn names_that_do_not_fit_and_extensions_that_would_move_are_refused() {
        let b = ("b.qcow2".to_string(), "qcow2".to_string());
        let small = new_header(1 << 20, 9, Some(&b)).unwrap();
        let long = vec![b'a'; 400];
        let e = relinked_header(&small, &long, None).unwrap_err();
        assert!(e.message().contains("does not fit"), "{e}");
        // No backing format yet and a feature table past the first
        // sector: the table is dropped to make room.
        let mut h = new_header(1 << 20, 16, None).unwrap();
        h.extensions.push(names(9));
        let r = relinked_header(&h, b"p.qcow2", Some("qcow2")).unwrap();
        assert!(r.feature_names().is_empty());
        assert_eq!(r.backing_format(), Some(&b"qcow2"[..]));
        // An unknown extension that would move past the sector: refused.
        let mut h = new_header(1 << 20, 16, None).unwrap();
        h.extensions.push(Extension::Unknown {
            kind: 0x1234_5678,
            data: vec![1; 600],
        });
        assert!(relinked_header(&h, b"p.qcow2", Some("qcow2")).is_err());
    }
}
