//! `chainfs check`: every layer's own structure, then every link (parent
//! found, identity, size). Opens everything read-only; reports one line per
//! problem and keeps going as far as the chain can be opened. Notes say
//! what is worth knowing but not wrong, such as a link a format records by
//! file name only (no identity to verify).

use std::path::Path;

use crate::cache::MetaCache;
use std::path::PathBuf;

use crate::chain::{Chain, ChainOptions};
use crate::error::Result;
use crate::paths::{canonical, folder_of};

/// What `check` found.
#[derive(Debug, Default)]
pub struct Findings {
    /// One message per problem; empty when the chain is clean.
    pub problems: Vec<String>,
    /// Not problems: what the user should know about the chain.
    pub notes: Vec<String>,
}

/// Check the chain of `leaf`; see the module docs.
pub fn check_chain(leaf: &Path, opts: &ChainOptions) -> Result<Findings> {
    let opts = ChainOptions {
        writable: false,
        ..opts.clone()
    };
    let cache = MetaCache::new(if opts.cache_bytes == 0 {
        crate::cache::DEFAULT_CACHE_BYTES
    } else {
        opts.cache_bytes
    });
    let (chain, err) = match Chain::open_partial(leaf, &opts, cache) {
        Ok(r) => r,
        // A leaf a merge retired: that is a finding, not a failure to check.
        Err(e) if e.kind == crate::error::ErrorKind::InvalidState => {
            return Ok(Findings {
                problems: vec![e.to_string()],
                notes: Vec::new(),
            })
        }
        Err(e) => return Err(e),
    };
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    for l in &chain.layers {
        problems.extend(l.check()?);
        if let Some(r) = crate::intent::read(l.path())? {
            problems.push(format!("{}: {r}", l.path().display()));
        }
    }
    // Records of merges that involve this chain although their SOURCE is
    // no longer in it (it was relinked away): look in the chain's folders.
    let members: Vec<PathBuf> = chain.layers.iter().map(|l| canonical(l.path())).collect();
    let mut dirs: Vec<PathBuf> = members.iter().map(|m| folder_of(m).to_path_buf()).collect();
    dirs.dedup();
    for dir in dirs {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(src) = name
                .strip_prefix('.')
                .and_then(|n| n.strip_suffix(".chainfs-merge"))
            else {
                continue;
            };
            let source = dir.join(src);
            if members.contains(&canonical(&source)) {
                continue; // reported with its layer above
            }
            match crate::intent::read(&source) {
                Ok(Some(r)) => {
                    let involved = std::iter::once(&r.destination)
                        .chain(r.children.iter())
                        .any(|p| members.contains(&canonical(p)));
                    if involved {
                        problems.push(format!("{}: {r}", source.display()));
                    }
                }
                Ok(None) => {}
                Err(e) => problems.push(e.to_string()),
            }
        }
    }
    for (i, link) in chain.links.iter().enumerate() {
        if link.by_name_only {
            notes.push(format!(
                "{}: linked to its parent {} by name only (the format records no parent id to verify)",
                chain.layers[i].path().display(),
                link.resolved.display()
            ));
        }
        let child_link = chain.layers[i].parent();
        if link.by_name_only && child_link.is_some_and(|l| l.format.is_none()) {
            notes.push(format!(
                "{}: records no format for its parent {}: it was detected as {} from its content",
                chain.layers[i].path().display(),
                link.resolved.display(),
                chain.layers[i + 1].info().format
            ));
        }
        if link.by_search && !link.id_mismatch {
            let child = chain.layers[i].path().display();
            problems.push(format!(
                "{child}: its parent was found only through --parent-dir/--parent, at {}; \
                 run `chainfs set-parent {child} {}` to record where it is",
                link.resolved.display(),
                link.resolved.display()
            ));
        }
        if link.id_mismatch {
            problems.push(format!(
                "{}: used as a parent although its id differs from the child's record (--ignore-id-mismatch)",
                link.resolved.display()
            ));
        }
    }
    if let Some(e) = err {
        problems.push(e.to_string());
    }
    Ok(Findings { problems, notes })
}
