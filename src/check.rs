//! `chainfs check`: every layer's own structure, then every link (parent
//! found, identity, size). Opens everything read-only; reports one line per
//! problem and keeps going as far as the chain can be opened.

use std::path::Path;

use crate::cache::MetaCache;
use crate::chain::{Chain, ChainOptions};
use crate::error::Result;

/// Problems found, one message each; empty when the chain is clean.
pub fn check_chain(leaf: &Path, opts: &ChainOptions) -> Result<Vec<String>> {
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
            return Ok(vec![e.to_string()])
        }
        Err(e) => return Err(e),
    };
    let mut problems = Vec::new();
    for l in &chain.layers {
        problems.extend(l.check()?);
        if let Some(r) = crate::merge::intent::read(l.path())? {
            problems.push(format!("{}: {r}", l.path().display()));
        }
    }
    for link in &chain.links {
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
    Ok(problems)
}
