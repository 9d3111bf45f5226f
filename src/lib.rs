//! chainfs: chains of differencing virtual disks (VHD today; VHDX and qcow2
//! fit behind the same [`format::Layer`] trait) as one flat image, with
//! offline tools to inspect, check, export and write them.
//!
//! Module map:
//! - [`format`]: one driver per disk format, parsing bytes into structs and
//!   answering "where do these bytes live".
//! - [`chain`]: parent discovery, identity checks, depth and cycle bounds.
//! - [`dependents`]: the children of a layer (parents are not written).
//! - [`cache`]: the bounded LRU that holds every layer's metadata.
//! - [`image`]: the resolver; full-length reads, writes to the leaf.
//! - [`export`], [`check`], [`info`], [`write`], [`compact`], [`relink`]: the offline operations behind the CLI.
//! - [`map`]: which layer holds each run; the SVG picture of a chain.
//! - [`perms`]: who may see and change a mount (owner, group, modes).
//! - [`error`]: error kinds, errno and return codes, chosen in one place.

pub mod cache;
pub mod chain;
pub mod check;
pub mod compact;
pub mod control;
#[cfg(test)]
mod core_tests;
pub mod dependents;
pub mod error;
pub mod export;
pub mod fault;
pub mod format;
pub mod fs;
pub mod fuse;
pub mod fuzzing;
pub mod image;
pub mod info;
pub mod intent;
pub mod jobs;
pub mod map;
pub mod merge;
pub mod mount;
pub mod paths;
pub mod perms;
pub mod relink;
pub mod size;
pub mod write;

pub use chain::{Chain, ChainOptions};
pub use error::{Error, ErrorKind, Result};
pub use image::FlatImage;
