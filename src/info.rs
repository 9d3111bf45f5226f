//! The description of an open chain, leaf first, shared by `chainfs info`,
//! its `--json` form and the mount's `chain` file.
//!
//! `info` describes a broken chain too: [`report_partial`] opens the chain
//! as far as it goes (`Chain::open_partial`) and returns the layers it
//! could open together with the error that stopped it, so a user sees an
//! orphan checkpoint's type, size, ids and parent locators next to the
//! reason its parent was not found.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::cache::{MetaCache, DEFAULT_CACHE_BYTES};
use crate::chain::{Chain, ChainOptions};
use crate::error::{Error, Result};
use crate::format::Layer;
use crate::paths::{folder_of, hint_path};
use crate::size::human;

/// One parent name as stored, and the local path it stands for.
#[derive(Debug, Clone, Serialize)]
pub struct Locator {
    pub source: String,
    pub stored: String,
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    pub depth: usize,
    pub path: PathBuf,
    pub format: &'static str,
    pub disk_type: &'static str,
    pub virtual_size: u64,
    pub block_size: Option<u64>,
    pub allocated_bytes: u64,
    /// `None` where the format has no identity (raw).
    pub unique_id: Option<String>,
    pub parent_id: Option<String>,
    /// How the layer names its parent: `id` (an identity the parent must
    /// carry, plus locators) or `name` (a file name only); `None` for a
    /// base.
    pub parent_link: Option<&'static str>,
    pub creator: String,
    /// The parent hints as stored in the file.
    pub parent_locators: Vec<Locator>,
    /// Where the parent was found.
    pub parent_resolved: Option<PathBuf>,
}

pub fn layer_report(depth: usize, l: &dyn Layer, resolved: Option<PathBuf>) -> Result<LayerReport> {
    let i = l.info();
    let link = l.parent();
    let dir = folder_of(l.path());
    Ok(LayerReport {
        depth,
        path: l.path().to_path_buf(),
        format: i.format,
        disk_type: i.disk_type,
        virtual_size: i.virtual_size,
        block_size: i.block_size,
        allocated_bytes: l.allocated_bytes()?,
        unique_id: i.unique_id.map(|u| u.to_string()),
        parent_id: link
            .as_ref()
            .and_then(|k| k.ids.first())
            .map(|u| u.to_string()),
        parent_link: link
            .as_ref()
            .map(|k| if k.by_name_only() { "name" } else { "id" }),
        creator: i.creator,
        parent_locators: link
            .map(|k| k.hints)
            .unwrap_or_default()
            .into_iter()
            .map(|h| Locator {
                path: hint_path(dir, &h.stored),
                source: h.source,
                stored: h.stored,
            })
            .collect(),
        parent_resolved: resolved,
    })
}

pub fn report(chain: &Chain) -> Result<Vec<LayerReport>> {
    chain
        .layers
        .iter()
        .enumerate()
        .map(|(d, l)| {
            layer_report(
                d,
                l.as_ref(),
                chain.links.get(d).map(|k| k.resolved.clone()),
            )
        })
        .collect()
}

/// The layers of `leaf`'s chain that open, leaf first, and the error that
/// stopped the walk down the chain (`None`: the chain is complete). Fails
/// outright only when the leaf itself does not open.
pub fn report_partial(
    leaf: &Path,
    opts: &ChainOptions,
) -> Result<(Vec<LayerReport>, Option<Error>)> {
    let budget = match opts.cache_bytes {
        0 => DEFAULT_CACHE_BYTES,
        n => n,
    };
    let (chain, err) = Chain::open_partial(leaf, opts, MetaCache::new(budget))?;
    Ok((report(&chain)?, err))
}

/// Text form for humans.
pub fn render(reports: &[LayerReport]) -> String {
    let mut s = String::new();
    for r in reports {
        s += &format!("[{}] {}\n", r.depth, r.path.display());
        // "FORMAT TYPE"; a format whose only type is itself once.
        if r.disk_type == r.format {
            s += &format!("    format:        {}\n", r.format);
        } else {
            s += &format!("    format:        {} {}\n", r.format, r.disk_type);
        }
        s += &format!(
            "    virtual size:  {} ({})\n",
            r.virtual_size,
            human(r.virtual_size)
        );
        if let Some(b) = r.block_size {
            s += &format!("    block size:    {} ({})\n", b, human(b));
        }
        s += &format!(
            "    allocated:     {} ({})\n",
            r.allocated_bytes,
            human(r.allocated_bytes)
        );
        s += &format!(
            "    unique id:     {}\n",
            r.unique_id.as_deref().unwrap_or("- (the format has none)")
        );
        if !r.creator.is_empty() {
            s += &format!("    creator:       {}\n", r.creator);
        }
        if let Some(how) = r.parent_link {
            match &r.parent_id {
                Some(p) => s += &format!("    parent id:     {p}\n"),
                None if how == "name" => s +=
                    "    parent id:     - (linked by name only: the format records no parent id)\n",
                None => s += "    parent id:     -\n",
            }
            for h in &r.parent_locators {
                s += &format!("    locator {:5} {}\n", h.source, h.stored);
            }
            match &r.parent_resolved {
                Some(p) => s += &format!("    parent:        {}\n", p.display()),
                // Only the last layer of a broken chain: the error that
                // says why (with the paths tried) follows on stderr.
                None => s += "    parent:        (not opened; see the error below)\n",
            }
        }
    }
    s
}

/// One line per layer, for the mount's `chain` file:
/// depth, path, format, type, virtual size, allocated bytes, unique id, parent id.
pub fn chain_lines(reports: &[LayerReport]) -> String {
    reports
        .iter()
        .map(|r| {
            format!(
                "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
                r.depth,
                r.path.display(),
                r.format,
                r.disk_type,
                r.virtual_size,
                r.allocated_bytes,
                r.unique_id.as_deref().unwrap_or("-"),
                r.parent_id.as_deref().unwrap_or("-")
            )
        })
        .collect()
}
