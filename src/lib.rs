//! chainfs: chains of differencing virtual disks as one flat image, mounted
//! through FUSE (read-only or writable, with merges while mounted), and
//! offline tools to inspect, check, export, write, compact, relink and merge
//! them. It reads and writes VHD and VHDX today, each a driver behind the
//! [`format::Layer`] trait; the rest of the crate is being made to name no
//! format, so that raw and qcow2 slot in as further drivers.
//!
//! Module map:
//! - [`format`]: one driver per disk format, parsing bytes into structs and
//!   answering "where do these bytes live"; shared file helpers.
//! - [`paths`]: path rules: folders, canonical names, and turning a parent
//!   name stored in an image into a local path.
//! - [`chain`]: parent discovery, identity checks, depth and cycle bounds.
//! - [`dependents`]: the children of a layer (parents are not written).
//! - [`cache`]: the bounded LRU that holds every layer's metadata.
//! - [`image`]: the resolver; full-length reads, writes to the leaf;
//!   [`runs`]: the cache of resolved runs that makes depth cost nothing.
//! - [`merge`]: folding layers into an ancestor while the chain reads the
//!   same; [`intent`]: the checksummed record that makes an interrupted
//!   merge a replay.
//! - [`export`], [`check`], [`info`], [`write`], [`compact`], [`relink`]: the offline operations behind the CLI.
//! - [`map`]: which layer holds each run; the SVG picture of a chain.
//! - [`fs`]: the mounted directory without FUSE; [`fuse`]: the thin `fuser`
//!   adapter; [`mount`]: mounting, daemon start-up, unmounting.
//! - [`control`]: the control-file command parser and replies; [`jobs`]:
//!   merge jobs as the mount shows them.
//! - [`perms`]: who may see and change a mount (owner, group, modes).
//! - [`readahead`]: noticing sequential readers of the mount, to fetch ahead;
//!   [`staging`]: the mount's read-ahead of `disk.raw` into its own memory,
//!   with [`direct`] reads of the layer files.
//! - [`error`]: error kinds, errno and return codes, chosen in one place.
//! - [`size`]: human sizes; [`fault`]: fault injection for crash tests;
//!   [`fuzzing`]: the bodies of the fuzz targets.

pub mod cache;
pub mod chain;
pub mod check;
pub mod compact;
pub mod control;
#[cfg(test)]
mod core_tests;
pub mod dependents;
pub mod direct;
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
pub mod readahead;
pub mod relink;
pub mod runs;
pub mod size;
pub mod staging;
pub mod write;

pub use chain::{Chain, ChainOptions};
pub use error::{Error, ErrorKind, Result};
pub use image::FlatImage;
