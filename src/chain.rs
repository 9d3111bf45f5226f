//! Opening a chain: the leaf, then each parent found from the child's own
//! hints, verified by identity where the format records one, bounded in
//! depth, free of cycles, in a format the child's format allows.
//!
//! Drivers report hints as stored; the chain alone decides which files
//! they mean. Candidate order for each link: every stored hint that names
//! a local path (`crate::paths::hint_path`: relative to the child's folder,
//! absolute, Windows shapes, `file://` URLs), in the driver's order, then
//! the basename of every hint in the child's folder, then the basename in
//! each `--parent-dir`. `--parent CHILD=PATH` replaces the search for one
//! child.
//!
//! Where the link records identities ([`ParentLink::ids`]), the first
//! candidate that exists and carries one of them wins; a candidate with
//! another identity is remembered for the error message (or used, with
//! `--ignore-id-mismatch`, when nothing better exists). Where it records
//! none (a format that names its parent by file name only), the first
//! candidate that opens in an allowed format wins, and `info`/`check` say
//! the link is by name only. Either way the chain refuses cycles (the same
//! file by device and inode, whatever name reaches it: hard links and
//! symlinks too; and by identity where there is one), reported as
//! `loop: A -> B -> A`, more than [`MAX_DEPTH`] layers and
//! a parent whose virtual size differs (where the link is by name only, as
//! qemu's backing files are, the sizes may differ: reads past the end of a
//! shorter parent are zeros). Where the link records the parent's format
//! ([`ParentLink::format`]), the parent is opened with that driver, not
//! probed.
//!
//! The selection of one parent (`find_parent`) is also what
//! [`resolve_parent`] answers for `crate::dependents`: a disk is a child
//! of a layer exactly when its own chain would take that layer's file.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::cache::{MetaCache, DEFAULT_CACHE_BYTES};
use crate::error::{Error, ErrorKind, Result};
use crate::format::registry::{
    driver, inspect_as, may_have_parent, mixed_error, open_layer_as, unknown_format_error,
};
use crate::format::{open_layer, Layer, LayerOptions, ParentHint, ParentLink};
use crate::paths::{candidates, canonical, file_id, same_file};

/// The deepest chain chainfs opens.
pub const MAX_DEPTH: usize = 256;

/// How to find and check parents.
#[derive(Clone, Debug, Default)]
pub struct ChainOptions {
    /// Open the leaf for writing (parents are always read-only).
    pub writable: bool,
    /// Extra folders to look for parents in, by basename.
    pub parent_dirs: Vec<PathBuf>,
    /// `(child, parent)`: use this parent for this child, no search.
    pub overrides: Vec<(PathBuf, PathBuf)>,
    /// Accept a parent whose identity differs from the child's record.
    pub ignore_id_mismatch: bool,
    /// Accept wrong checksums (read-only opens only).
    pub ignore_checksums: bool,
    /// Metadata cache budget in bytes (0 = default).
    pub cache_bytes: usize,
    /// Open a writable leaf even when other disks depend on it (they break:
    /// see `crate::dependents`).
    pub force: bool,
    /// How the user asks for `force` where they are (`--force`,
    /// `-o rw,force`), for the refusal message.
    pub force_hint: &'static str,
}

/// How one link was resolved, for `info`.
#[derive(Debug, Clone, Serialize)]
pub struct Link {
    pub hints: Vec<ParentHint>,
    pub resolved: PathBuf,
    pub tried: Vec<PathBuf>,
    pub id_mismatch: bool,
    /// Found only through `--parent-dir` or `--parent`: the child's own
    /// hints no longer lead to it (`check` suggests `set-parent`).
    pub by_search: bool,
    /// The child records no identity for its parent: the link was
    /// verified by name, cycle, depth and size only.
    pub by_name_only: bool,
}

/// An open chain, leaf first.
pub struct Chain {
    pub layers: Vec<Arc<dyn Layer>>,
    /// `links[i]` is how `layers[i + 1]` was found from `layers[i]`.
    pub links: Vec<Link>,
    pub cache: Arc<MetaCache>,
}

impl Chain {
    pub fn open(leaf: &Path, opts: &ChainOptions) -> Result<Chain> {
        let budget = if opts.cache_bytes == 0 {
            DEFAULT_CACHE_BYTES
        } else {
            opts.cache_bytes
        };
        Self::open_with_cache(leaf, opts, MetaCache::new(budget))
    }

    pub fn open_with_cache(
        leaf: &Path,
        opts: &ChainOptions,
        cache: Arc<MetaCache>,
    ) -> Result<Chain> {
        let (chain, err) = Self::open_partial(leaf, opts, cache)?;
        match err {
            Some(e) => Err(e),
            None => Ok(chain),
        }
    }

    /// Open as much of the chain as can be opened: the layers up to the
    /// first broken link, and the error that stopped the walk (for `check`).
    /// Fails outright only when the leaf itself does not open.
    pub fn open_partial(
        leaf: &Path,
        opts: &ChainOptions,
        cache: Arc<MetaCache>,
    ) -> Result<(Chain, Option<Error>)> {
        let lo = LayerOptions {
            writable: opts.writable,
            ignore_checksums: opts.ignore_checksums,
            cache: cache.clone(),
        };
        refuse_retired(leaf)?;
        if opts.writable && !opts.force {
            let hint = if opts.force_hint.is_empty() {
                "`force`"
            } else {
                opts.force_hint
            };
            crate::dependents::refuse_if_parent(leaf, opts, hint)?;
        }
        let first = open_layer(leaf, &lo)?;
        let ro = LayerOptions {
            writable: false,
            ignore_checksums: opts.ignore_checksums,
            cache: cache.clone(),
        };
        let mut chain = Chain {
            layers: vec![first],
            links: Vec::new(),
            cache,
        };
        let mut walked = Walked::default();
        walked.push(leaf);
        let mut seen_ids = HashSet::new();
        seen_ids.extend(chain.layers[0].info().unique_id);
        loop {
            let child = chain.layers.last().unwrap().clone();
            let Some(link) = child.parent() else { break };
            if link.detached {
                let e = Error::new(
                    ErrorKind::BadChain,
                    format!(
                        "{}: detached by a merge (its parent chain was merged into another disk; open that disk instead)",
                        child.path().display()
                    ),
                );
                return Ok((chain, Some(e)));
            }
            let step = (|| {
                if chain.layers.len() >= MAX_DEPTH {
                    return Err(Error::new(
                        ErrorKind::BadChain,
                        format!(
                            "{}: the chain is deeper than {MAX_DEPTH} layers",
                            leaf.display()
                        ),
                    ));
                }
                let open = |p: &Path| open_layer_as(p, link.format.as_deref(), &ro);
                let (parent, found) = find_parent(
                    child.path(),
                    child.info().format,
                    &link,
                    opts,
                    &walked,
                    &open,
                )?;
                let pid = parent.info().unique_id;
                let id_seen = pid.is_some_and(|id| !found.id_mismatch && !seen_ids.insert(id));
                let again = walked.position(&found.resolved).or_else(|| {
                    id_seen
                        .then(|| chain.layers.iter().position(|l| l.info().unique_id == pid))
                        .flatten()
                });
                if let Some(at) = again {
                    let id = pid.map(|u| format!(" ({u})")).unwrap_or_default();
                    return Err(walked.loop_error(child.path(), at, &found.resolved, &id));
                }
                let (cs, ps) = (child.virtual_size(), parent.virtual_size());
                if cs != ps && !link.allows_other_size() {
                    return Err(Error::new(
                        ErrorKind::BadChain,
                        format!(
                            "{}: virtual size {cs} differs from its parent {}'s {ps}",
                            child.path().display(),
                            found.resolved.display()
                        ),
                    ));
                }
                let (cf, pf) = (child.info().format, parent.info().format);
                if !may_have_parent(cf, pf) {
                    return Err(mixed_error(child.path(), cf, pf, &found.resolved));
                }
                Ok((parent, found))
            })();
            let step = step.and_then(|(p, f)| {
                refuse_retired(p.path())?;
                Ok((p, f))
            });
            match step {
                Ok((parent, found)) => {
                    walked.push(&found.resolved);
                    chain.links.push(found);
                    chain.layers.push(parent);
                }
                Err(e) => return Ok((chain, Some(e))),
            }
        }
        Ok((chain, None))
    }

    pub fn leaf(&self) -> &Arc<dyn Layer> {
        &self.layers[0]
    }

    pub fn virtual_size(&self) -> u64 {
        self.layers[0].virtual_size()
    }
}

/// A layer that a merge has already retired (its record says `relinked`)
/// must not be used: its content is now in the merge's destination.
fn refuse_retired(path: &Path) -> Result<()> {
    match crate::intent::read(path)? {
        Some(r) if r.phase == crate::intent::Phase::Relinked => Err(Error::new(
            ErrorKind::InvalidState,
            format!("{}: {r}", path.display()),
        )),
        Some(r) => {
            log::warn!("{r}");
            Ok(())
        }
        None => Ok(()),
    }
}

/// The files a chain walk has taken so far, leaf first, by name and by
/// file identity: hard links and symlinks of one file are one file, so a
/// chain whose parent names a second name of a layer already taken is a
/// loop, not a new layer (which would only stop at [`MAX_DEPTH`]).
#[derive(Default)]
struct Walked {
    files: Vec<WalkedFile>,
}

/// One file of a [`Walked`] chain.
struct WalkedFile {
    /// As named (for messages).
    name: PathBuf,
    /// Device and inode (`None`: gone; then the canonical path decides).
    id: Option<(u64, u64)>,
    canon: PathBuf,
}

impl Walked {
    fn push(&mut self, p: &Path) {
        self.files.push(WalkedFile {
            name: p.to_path_buf(),
            id: file_id(p),
            canon: canonical(p),
        });
    }

    /// Where the file `p` names is in the walk already.
    fn position(&self, p: &Path) -> Option<usize> {
        let (id, canon) = (file_id(p), canonical(p));
        self.files.iter().position(|f| match (id, f.id) {
            (Some(a), Some(b)) => a == b,
            _ => f.canon == canon,
        })
    }

    /// The refusal for `child`, whose parent `closing` is the file at
    /// `at` of the walk again: `loop: A -> B -> A`. `id`: the parent's
    /// identity, shown when there is one.
    fn loop_error(&self, child: &Path, at: usize, closing: &Path, id: &str) -> Error {
        let mut steps: Vec<String> = self.files[at..]
            .iter()
            .map(|f| f.name.display().to_string())
            .collect();
        steps.push(closing.display().to_string());
        let first = &self.files[at];
        let same = if first.name == closing {
            String::new()
        } else if first.id.is_some() && first.id == file_id(closing) {
            format!(", the same file as {}", first.name.display())
        } else {
            // Another file carrying the identity of one in the chain.
            format!(", the same disk as {}", first.name.display())
        };
        Error::new(
            ErrorKind::BadChain,
            format!(
                "{}: the chain loops: its parent {}{id} is already in the chain{same} (loop: {})",
                child.display(),
                closing.display(),
                steps.join(" -> ")
            ),
        )
    }
}

/// The file the chain of `child` (a `format` file whose parent link is
/// `link`) would take as its parent: the same candidates, overrides,
/// format and identity rules as [`Chain::open`] (without
/// `--ignore-id-mismatch`), each candidate opened read-only **without a
/// lock** (others may hold these files). `None` when its chain would not
/// open a parent. How `crate::dependents` decides who is a child.
pub fn resolve_parent(
    child: &Path,
    format: &'static str,
    link: &ParentLink,
    opts: &ChainOptions,
) -> Option<PathBuf> {
    let mut walked = Walked::default();
    walked.push(child);
    let opts = ChainOptions {
        ignore_id_mismatch: false,
        ..opts.clone()
    };
    let open = |p: &Path| inspect_as(p, link.format.as_deref());
    find_parent(child, format, link, &opts, &walked, &open)
        .ok()
        .map(|(_, l)| l.resolved)
}

/// One link of the chain: the parent of `child` (of format `cformat`)
/// under the rules of the module docs. `walked`: the layers taken so far;
/// `open` opens one candidate (the chain: with a shared lock; dependents:
/// without).
fn find_parent(
    child: &Path,
    cformat: &'static str,
    link: &ParentLink,
    opts: &ChainOptions,
    walked: &Walked,
    open: &dyn Fn(&Path) -> Result<Arc<dyn Layer>>,
) -> Result<(Arc<dyn Layer>, Link)> {
    let hints = &link.hints[..];
    if let Some(f) = &link.format {
        if driver(f).is_none() {
            return Err(unknown_format_error(child, "records its parent as", f));
        }
    }
    let over = opts
        .overrides
        .iter()
        .find(|(c, _)| same_file(c, child))
        .map(|(_, p)| p.clone());
    let list = match &over {
        Some(p) => vec![p.clone()],
        None => candidates(child, &link.stored_names(), &opts.parent_dirs),
    };
    let mut tried = Vec::new();
    let mut looped: Option<(PathBuf, usize)> = None;
    let mut unusable: Option<Error> = None;
    let mut mixed: Option<Error> = None;
    let cname = child.display();
    let mut mismatch: Option<(PathBuf, Arc<dyn Layer>, Option<uuid::Uuid>)> = None;
    // The candidates the child's own hints give, without any option.
    let own = candidates(child, &link.stored_names(), &[]);
    let want = || match &link.ids[..] {
        [] => "a parent".to_string(),
        [one] => format!("a parent with id {one}"),
        ids => {
            let all: Vec<String> = ids.iter().map(|u| u.to_string()).collect();
            format!("a parent with id {}", all.join(" or "))
        }
    };
    let show = |id: Option<uuid::Uuid>| match id {
        Some(u) => format!("id {u}"),
        None => "no id".to_string(),
    };
    let by_search = |cand: &PathBuf| over.is_some() || !own.contains(cand);
    for cand in list {
        tried.push(cand.clone());
        if !cand.is_file() {
            continue;
        }
        if let Some(at) = walked.position(&cand) {
            // Already in the chain (by any of its names): taking it would
            // loop. Look further.
            looped.get_or_insert((cand, at));
            continue;
        }
        let layer = match open(&cand) {
            Ok(l) => l,
            Err(e) => {
                // Not this one (corrupt, locked, not an image): look further,
                // and say why if nothing else fits.
                log::debug!("{cname}: candidate parent {}: {e}", cand.display());
                unusable.get_or_insert(e);
                continue;
            }
        };
        let got = layer.info().unique_id;
        log::debug!(
            "{cname}: candidate parent {} has {}",
            cand.display(),
            show(got)
        );
        let pf = layer.info().format;
        if !may_have_parent(cformat, pf) {
            // The child's driver does not list the parent's format.
            mixed.get_or_insert(mixed_error(child, cformat, pf, &cand));
            continue;
        }
        if link.accepts(got) {
            return Ok((
                layer,
                Link {
                    hints: hints.to_vec(),
                    by_search: by_search(&cand),
                    resolved: cand,
                    tried,
                    id_mismatch: false,
                    by_name_only: link.by_name_only(),
                },
            ));
        }
        if mismatch.is_none() {
            mismatch = Some((cand, layer, got));
        }
    }
    if let Some((cand, layer, got)) = mismatch {
        if opts.ignore_id_mismatch {
            log::warn!(
                "{cname}: parent {} has {}, expected {}; used anyway (--ignore-id-mismatch)",
                cand.display(),
                show(got),
                want()
            );
            return Ok((
                layer,
                Link {
                    hints: hints.to_vec(),
                    by_search: by_search(&cand),
                    resolved: cand,
                    tried,
                    id_mismatch: true,
                    by_name_only: false,
                },
            ));
        }
        return Err(Error::new(
            ErrorKind::IdMismatch,
            format!(
                "{cname} expects {}, but {} has {} \
                 (pass --ignore-id-mismatch to use it anyway, or --parent CHILD=PATH)",
                want(),
                cand.display(),
                show(got)
            ),
        ));
    }
    if let Some((p, at)) = looped {
        return Err(walked.loop_error(child, at, &p, ""));
    }
    if let Some(e) = mixed.or(unusable) {
        return Err(e);
    }
    let stored: Vec<String> = hints
        .iter()
        .map(|h| format!("{}={:?}", h.source, h.stored))
        .collect();
    let tried_s: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    Err(Error::new(
        ErrorKind::NotFound,
        format!(
            "{cname}: parent{} not found; locators [{}]; tried [{}] \
             (add --parent-dir DIR or --parent CHILD=PATH)",
            link.ids
                .first()
                .map(|u| format!(" {u}"))
                .unwrap_or_default(),
            stored.join(", "),
            tried_s.join(", ")
        ),
    ))
}
