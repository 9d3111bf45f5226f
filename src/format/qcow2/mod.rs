//! qcow2 images (qemu's format, versions 2 and 3), per qemu's
//! `docs/interop/qcow2.txt`. This module holds the on-disk structures only
//! (`structs`); the layer driver comes with the format seam.
//!
//! Everything is big-endian and allocated in clusters of `1 << cluster_bits`
//! bytes (512 B to 2 MiB). The first cluster holds the header, the header
//! extensions and the backing file name:
//!
//! ```text
//! cluster 0: [header 72 (v2) | header_length >= 104 (v3)][ext type,len,data pad8]..[end 0]  ..  [backing name]
//! elsewhere: [L1 table, contiguous] [refcount table, contiguous] [snapshot table]
//!            [L2 tables, refcount blocks, data clusters: one cluster each, any order]
//!
//! guest offset ─▶ L1[cluster / l2_entries] ─▶ L2 table ─▶ L2[cluster % l2_entries]
//!                 (0: unallocated)               ├─ standard: host cluster | zero flag | unallocated → backing file
//!                                                ├─ compressed: byte offset + sector count (not cluster aligned)
//!                                                └─ extended L2 (128-bit): cluster + 32 allocated bits + 32 zero bits
//! host cluster ─▶ refcount table[c / rb_entries] ─▶ refcount block[c % rb_entries] (1 << refcount_order bits each)
//! ```
//!
//! The header's L1 table is the active disk; snapshot table entries point to
//! other L1 tables that share clusters through refcounts greater than one
//! (the COPIED bit 63 marks an entry whose refcount is exactly one, so it
//! may be written in place).
//!
//! Parsers take bytes and the absolute file offset they came from, so every
//! [`crate::error::Error`] names the offset and the field; [`in_file`] adds
//! the path once the driver knows it. Validation follows qemu: what qemu
//! refuses to open is refused here (corrupt or unsupported), what qemu
//! reads despite a spec violation (reserved bits in table entries) is read.

pub mod structs;

pub use structs::*;

use std::path::Path;

use crate::error::Error;

/// Prefix a parser's error with the file it came from, keeping its kind.
pub fn in_file(e: Error, path: &Path) -> Error {
    Error::new(e.kind, format!("{}: {}", path.display(), e.message()))
}
