//! The format registry: every driver chainfs has, and the only place above
//! a driver's own folder that names one. Adding a format is a new folder
//! under `src/format/` with a [`Driver`] value, plus one line in
//! [`DRIVERS`] (docs/ARCHITECTURE.md, "Adding a format").
//!
//! Opening a file asks each driver's `probe` in [`DRIVERS`] order; the
//! first that claims the file opens it. Formats with a signature come
//! first; `raw`, which has none, comes last and claims only what nothing
//! else recognises (see `raw::probe`). A file no driver claims gets an
//! error that says what it looks like instead (`probe::identify`).

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use crate::cache::MetaCache;
use crate::error::{Error, ErrorKind, Result};

use super::{
    open_file, probe, qcow2, raw, vhd, vhdx, CreateOptions, Layer, LayerOptions, ParentLink,
};

/// What a driver tells about a file without locking or fully opening it
/// (finding the children of a layer reads every image in a folder).
#[derive(Debug, Clone)]
pub struct Peek {
    pub format: &'static str,
    /// The identity children record for it, where the format has one.
    pub id: Option<uuid::Uuid>,
    /// Its parent link (`None` for a base). Drivers whose links carry ids
    /// may leave the hints out.
    pub parent: Option<ParentLink>,
}

/// One format.
pub struct Driver {
    /// The name `info` shows and `LayerInfo::format` carries.
    pub name: &'static str,
    /// File name endings (lowercase, no dot) of this format; the first is
    /// the usual one. `create` picks the driver by them.
    pub extensions: &'static [&'static str],
    /// The formats a child of this format may have as its parent.
    pub parents: &'static [&'static str],
    /// Is this file in this format? (Reads only; `Err` only for I/O.)
    pub probe: fn(&File, &Path) -> Result<bool>,
    /// Open a file `probe` accepted.
    pub open: fn(File, &Path, &LayerOptions) -> Result<Arc<dyn Layer>>,
    /// Create a new file (never replacing one); `parent` is open read-only
    /// and of a format in `parents`.
    pub create: fn(&Path, &CreateOptions, Option<&dyn Layer>) -> Result<()>,
    /// Identity and parent link, without locks; `None` when not this format.
    pub peek: fn(&Path) -> Option<Peek>,
    /// The versions `create` may write ([`CreateOptions::version`]); empty:
    /// the format has one.
    pub create_versions: &'static [&'static str],
    /// `create` can divide blocks into sub-blocks
    /// ([`CreateOptions::subblocks`]).
    pub create_subblocks: bool,
}

/// Every driver, in probe order.
#[cfg(not(test))]
pub static DRIVERS: &[&Driver] = &[&vhdx::DRIVER, &vhd::DRIVER, &qcow2::DRIVER, &raw::DRIVER];
/// Every driver, in probe order, and the in-memory test layer.
#[cfg(test)]
pub static DRIVERS: &[&Driver] = &[
    &vhdx::DRIVER,
    &vhd::DRIVER,
    &qcow2::DRIVER,
    &raw::DRIVER,
    &super::mem::DRIVER,
];

/// The driver called `name`.
pub fn driver(name: &str) -> Option<&'static Driver> {
    DRIVERS.iter().copied().find(|d| d.name == name)
}

/// The format whose file is the flat disk itself, byte for byte. `chainfs
/// export` writes it without a driver (its own fast path), and it is the
/// only format a block device, a pipe or standard output can receive.
pub fn flat() -> &'static Driver {
    &raw::DRIVER
}

/// Every format's name, for messages ("vhdx, vhd, raw").
pub fn names() -> String {
    let n: Vec<&str> = DRIVERS.iter().map(|d| d.name).collect();
    n.join(", ")
}

fn extension(path: &Path) -> String {
    path.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default()
}

/// Does the name end like an image of some format?
pub fn is_image_name(path: &Path) -> bool {
    let ext = extension(path);
    DRIVERS.iter().any(|d| d.extensions.contains(&ext.as_str()))
}

/// The driver a new file's name asks for.
pub fn driver_for_name(path: &Path) -> Result<&'static Driver> {
    let ext = extension(path);
    DRIVERS
        .iter()
        .copied()
        .find(|d| d.extensions.contains(&ext.as_str()))
        .ok_or_else(|| {
            let names: Vec<String> = DRIVERS
                .iter()
                .map(|d| {
                    let e: Vec<String> = d.extensions.iter().map(|e| format!(".{e}")).collect();
                    format!("{} ({})", e.join("/"), d.name)
                })
                .collect();
            Error::invalid(format!("{}: name it {}", path.display(), names.join(", ")))
        })
}

/// May a `child` layer have a `parent` layer (format names)?
pub fn may_have_parent(child: &str, parent: &str) -> bool {
    driver(child).is_some_and(|d| d.parents.contains(&parent))
}

/// The refusal for a child over a parent its format does not allow.
pub fn mixed_error(child: &Path, cf: &str, pf: &str, parent: &Path) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        format!(
            "{}: a {cf} child of a {pf} parent ({}) is not supported",
            child.display(),
            parent.display()
        ),
    )
}

/// Identity and parent link of `path`, if the driver that claims it reads
/// it. Only the claiming driver is asked: a damaged VHDX or qcow2 whose
/// `peek` fails is nobody's (it is never peeked as raw by the next driver).
pub fn peek(path: &Path) -> Option<Peek> {
    // Only regular files: opening a FIFO would block.
    if !std::fs::metadata(path).ok()?.is_file() {
        return None;
    }
    let file = File::open(path).ok()?;
    let d = claimant(&file, path).ok()??;
    (d.peek)(path)
}

/// The first driver in [`DRIVERS`] order whose `probe` claims `file`.
fn claimant(file: &File, path: &Path) -> Result<Option<&'static Driver>> {
    for d in DRIVERS {
        if (d.probe)(file, path)? {
            return Ok(Some(d));
        }
    }
    Ok(None)
}

/// Create a new image, in the format its name asks for.
pub fn create(path: &Path, o: &CreateOptions) -> Result<()> {
    let d = driver_for_name(path)?;
    if let Some(v) = &o.version {
        if !d.create_versions.contains(&v.as_str()) {
            return Err(Error::invalid(format!(
                "{}: --compat {v}: {} images are created as {}",
                path.display(),
                d.name,
                if d.create_versions.is_empty() {
                    "their one version".to_string()
                } else {
                    d.create_versions.join(" or ")
                }
            )));
        }
    }
    if o.subblocks && !d.create_subblocks {
        return Err(Error::invalid(format!(
            "{}: --extended-l2: {} images have no sub-blocks",
            path.display(),
            d.name
        )));
    }
    let parent = match &o.parent {
        Some(p) => Some(open_layer(
            p,
            &LayerOptions {
                writable: false,
                ignore_checksums: false,
                cache: MetaCache::new(1 << 20),
            },
        )?),
        None => None,
    };
    if let Some(pl) = &parent {
        let pf = pl.info().format;
        if !d.parents.contains(&pf) {
            return Err(mixed_error(path, d.name, pf, pl.path()));
        }
    }
    (d.create)(path, o, parent.as_deref())
}

/// Open one file, detecting its format from its bytes.
pub fn open_layer(path: &Path, opts: &LayerOptions) -> Result<Arc<dyn Layer>> {
    let file = open_file(path, opts.writable)?;
    match claimant(&file, path)? {
        Some(d) => (d.open)(file, path, opts),
        None => Err(unknown_error(&file, path)),
    }
}

/// Open one file with the driver a child's link names (`format`, a
/// registry name, as [`ParentLink::format`] carries it), without probing:
/// the recorded format decides, as it does for qemu. `None`: probe.
pub fn open_layer_as(
    path: &Path,
    format: Option<&str>,
    opts: &LayerOptions,
) -> Result<Arc<dyn Layer>> {
    let Some(name) = format else {
        return open_layer(path, opts);
    };
    let d =
        driver(name).ok_or_else(|| unknown_format_error(path, "recorded by its child as", name))?;
    let file = open_file(path, opts.writable)?;
    (d.open)(file, path, opts)
}

/// Open `path` read-only as [`open_layer_as`] would, but **without its
/// lock**: for looking at files other processes (or this one) may hold
/// open for writing, as finding the children of a layer does. Nothing is
/// written; the layer must not be used for more than its metadata.
pub fn inspect_as(path: &Path, format: Option<&str>) -> Result<Arc<dyn Layer>> {
    use crate::error::IoContext;
    // Refuse FIFOs, devices and folders before open(2), which could block.
    if !std::fs::metadata(path)
        .ctx(path, "cannot open", None)?
        .is_file()
    {
        return Err(Error::invalid(format!(
            "{}: not a regular file",
            path.display()
        )));
    }
    let file = File::open(path).ctx(path, "cannot open", None)?;
    let d = match format {
        Some(name) => driver(name)
            .ok_or_else(|| unknown_format_error(path, "recorded by its child as", name))?,
        None => claimant(&file, path)?.ok_or_else(|| unknown_error(&file, path))?,
    };
    let opts = LayerOptions {
        writable: false,
        ignore_checksums: false,
        cache: MetaCache::new(1 << 20),
    };
    (d.open)(file, path, &opts)
}

/// The refusal for a recorded parent format no driver has: `path` is
/// `what` format `name` (a child: "records its parent as").
pub fn unknown_format_error(path: &Path, what: &str, name: &str) -> Error {
    let known: Vec<&str> = DRIVERS.iter().map(|d| d.name).collect();
    Error::unsupported(
        path,
        format!(
            "{what} format {name:?}, which chainfs does not read (known: {})",
            known.join(", ")
        ),
    )
}

/// The error for a file no driver claimed: what it looks like instead
/// (see [`probe`]), or what each format would have needed.
fn unknown_error(file: &File, path: &Path) -> Error {
    match probe::head(file, path) {
        Err(e) => e,
        Ok((head, len)) => match probe::identify(&head, len) {
            Some(f) => Error::unsupported(path, format!("{f}; {}", f.advice())),
            None => Error::unsupported(
                path,
                "not a disk image chainfs can read (no VHD footer `conectix` at offset 0 or at \
                 the end, no VHDX signature `vhdxfile` at offset 0, no other known format; \
                 name a raw disk image .raw, .img or .dd to read it as one)",
            ),
        },
    }
}
