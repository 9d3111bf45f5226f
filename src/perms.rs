//! Who may see and change a mount: the owner, group and mode bits of `/`,
//! `disk.raw`, `control`, `chain` and `jobs/`.
//!
//! The session runs with `default_permissions`, so the kernel enforces these
//! bits; under `-o allow_other` they are all that stands between other local
//! users and the guest's disk. The rule: **the view is never readable by a
//! user who could not read every layer file**, and never writable by one
//! who could not write the leaf.
//!
//! The view is owned by the leaf's owner and group (or `uid=`/`gid=`). For
//! each class of the view (owner, group, other) we ask, for every file a
//! reader of the disk would need — each layer (read) and each folder on the
//! way to it (search) — which of that object's classes a member of the
//! view's class *might* fall into, and grant the bit only if all of them
//! carry it:
//!
//! ```text
//! view class   may be judged at an object owned U:G by its ...
//! owner        owner bits if U = view owner; else group or other bits
//! group        owner bits if U ≠ view owner (he might be U);
//!              group bits, plus other bits if G ≠ view group
//! other        other bits; owner bits if U ≠ view owner;
//!              group bits if G ≠ view group
//! ```
//!
//! The view owner's supplementary groups are unknown (and are the caller's
//! at access time anyway), so "might" is taken at its widest: the result
//! never grants a class more than its weakest possible member may read.
//! Root is not special here; the kernel lets it through everything.
//!
//! `umask=M` is the one explicit override: it replaces the computed bits by
//! a fixed mode masked by `M`, as in other FUSE file systems, so an admin
//! can share a disk the layer modes would hide. `uid=`/`gid=` only choose
//! the owner and group; the bits are then narrowed for them, so they never
//! widen access on their own.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Permission bits within one class.
pub const R: u32 = 4;
pub const W: u32 = 2;
pub const X: u32 = 1;

/// Classes as a set, each the unit of its class in a mode: multiplying a
/// set by a bit spreads the bit over the classes (`ALL * R == 0o444`).
pub const OWNER: u32 = 0o100;
pub const GROUP: u32 = 0o010;
pub const OTHER: u32 = 0o001;
pub const ALL: u32 = OWNER | GROUP | OTHER;

/// One object a user of the view would need `need` access to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Node {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub need: u32,
}

impl Node {
    /// What nobody can pass (an object we could not stat): fail closed.
    pub const DENY: Node = Node {
        uid: u32::MAX,
        gid: u32::MAX,
        mode: 0,
        need: R,
    };
}

/// The view's classes every member of which has `n.need` on `n`.
fn granted_by(owner: u32, group: u32, n: &Node) -> u32 {
    let has = |classes: u32| {
        [OWNER, GROUP, OTHER]
            .into_iter()
            .filter(|c| classes & c != 0)
            .all(|c| (n.mode / c) & 7 & n.need == n.need)
    };
    let foreign_owner = if n.uid != owner { OWNER } else { 0 };
    let foreign_group = n.gid != group;
    let as_owner = if n.uid == owner { OWNER } else { GROUP | OTHER };
    let as_group = foreign_owner | GROUP | if foreign_group { OTHER } else { 0 };
    let as_other = foreign_owner | OTHER | if foreign_group { GROUP } else { 0 };
    let mut out = 0;
    for (class, judged) in [(OWNER, as_owner), (GROUP, as_group), (OTHER, as_other)] {
        if has(judged) {
            out |= class;
        }
    }
    out
}

/// The view's classes (owned `owner`:`group`) granted every node's need.
pub fn granted(owner: u32, group: u32, nodes: &[Node]) -> u32 {
    nodes
        .iter()
        .fold(ALL, |acc, n| acc & granted_by(owner, group, n))
}

/// The `-o uid=,gid=,umask=` overrides.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Overrides {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub umask: Option<u32>,
}

/// Owner, group and modes of the mount's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViewPerms {
    pub uid: u32,
    pub gid: u32,
    /// `/` and `jobs/`.
    pub dir: u16,
    pub disk: u16,
    pub control: u16,
    /// `chain` and `jobs/N`.
    pub text: u16,
}

/// The view's permissions from plain numbers: `leaf` = (uid, gid) of the
/// leaf file, `read` = what reading the disk needs (every layer and the
/// folders above it), `write` = what writing the leaf needs.
pub fn compute(
    leaf: (u32, u32),
    read: &[Node],
    write: &[Node],
    writable: bool,
    o: &Overrides,
) -> ViewPerms {
    let uid = o.uid.unwrap_or(leaf.0);
    let gid = o.gid.unwrap_or(leaf.1);
    let (dir, disk, control, text) = match o.umask {
        Some(m) => {
            let disk = if writable { 0o666 } else { 0o444 };
            (0o555 & !m, disk & !m, 0o666 & !m, 0o444 & !m)
        }
        None => {
            let r = granted(uid, gid, read);
            // Commanding merges through `control` needs the view too.
            let w = granted(uid, gid, write) & r;
            let disk = (r * R) | if writable { w * W } else { 0 };
            (r * (R | X), disk, (r * R) | (w * W), r * R)
        }
    };
    // Every value is masked to 0o777 above.
    ViewPerms {
        uid,
        gid,
        dir: dir as u16,
        disk: disk as u16,
        control: control as u16,
        text: text as u16,
    }
}

/// `need` on `path` itself and search permission on every folder above it
/// (the canonical path: the one the kernel walks). Anything that cannot be
/// looked at counts as closed.
pub fn nodes_for(path: &Path, need: u32) -> Vec<Node> {
    let node = |p: &Path, need: u32| match std::fs::metadata(p) {
        Ok(m) => Node {
            uid: m.uid(),
            gid: m.gid(),
            mode: m.mode() & 0o777,
            need,
        },
        Err(e) => {
            log::warn!("{}: {e}; the mount is closed to other users", p.display());
            Node::DENY
        }
    };
    let canon = match std::fs::canonicalize(path) {
        Ok(c) => c,
        Err(e) => {
            log::warn!(
                "{}: {e}; the mount is closed to other users",
                path.display()
            );
            return vec![Node::DENY];
        }
    };
    let mut out = vec![node(&canon, need)];
    out.extend(canon.ancestors().skip(1).map(|d| node(d, X)));
    out
}

/// The view's permissions for the layer files `layers` (leaf first).
pub fn of_layers<P: AsRef<Path>>(layers: &[P], writable: bool, o: &Overrides) -> ViewPerms {
    let Some(leaf) = layers.first() else {
        return compute((0, 0), &[Node::DENY], &[Node::DENY], writable, o);
    };
    let owner = std::fs::metadata(leaf.as_ref())
        .map(|m| (m.uid(), m.gid()))
        .unwrap_or((0, 0));
    let read: Vec<Node> = layers
        .iter()
        .flat_map(|p| nodes_for(p.as_ref(), R))
        .collect();
    let write = nodes_for(leaf.as_ref(), W);
    compute(owner, &read, &write, writable, o)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(uid: u32, gid: u32, mode: u32) -> Node {
        Node {
            uid,
            gid,
            mode,
            need: R,
        }
    }

    fn dir(uid: u32, gid: u32, mode: u32) -> Node {
        Node {
            uid,
            gid,
            mode,
            need: X,
        }
    }

    const NONE: Overrides = Overrides {
        uid: None,
        gid: None,
        umask: None,
    };

    #[test]
    fn private_layers_give_a_view_only_their_owner_reads() {
        let l = [file(0, 0, 0o600), file(0, 0, 0o600)];
        let w = [Node {
            need: W,
            ..file(0, 0, 0o600)
        }];
        let v = compute((0, 0), &l, &w, false, &NONE);
        assert_eq!((v.uid, v.gid), (0, 0));
        assert_eq!(v.disk, 0o400, "read-only mount: no write bit");
        assert_eq!(v.text, 0o400);
        assert_eq!(v.dir, 0o500);
        assert_eq!(v.control, 0o600, "who may write the leaf commands merges");
        let v = compute((0, 0), &l, &w, true, &NONE);
        assert_eq!(v.disk, 0o600);
    }

    #[test]
    fn open_layers_give_the_usual_modes() {
        let l = [file(0, 0, 0o644), file(0, 0, 0o644)];
        let w = [Node {
            need: W,
            ..file(0, 0, 0o644)
        }];
        let ro = compute((0, 0), &l, &w, false, &NONE);
        assert_eq!(
            (ro.dir, ro.disk, ro.control, ro.text),
            (0o555, 0o444, 0o644, 0o444)
        );
        let rw = compute((0, 0), &l, &w, true, &NONE);
        assert_eq!(rw.disk, 0o644, "writes need -o rw and the leaf's write bit");
    }

    #[test]
    fn one_closed_parent_closes_the_view() {
        // Leaf 0644, parent 0640: others may not read the parent.
        let l = [file(0, 0, 0o644), file(0, 0, 0o640)];
        assert_eq!(granted(0, 0, &l), OWNER | GROUP);
        // A folder others may not enter closes it just as well.
        let l = [file(0, 0, 0o644), dir(0, 0, 0o700), file(0, 0, 0o644)];
        assert_eq!(granted(0, 0, &l), OWNER);
    }

    #[test]
    fn a_parent_of_another_owner_is_judged_by_its_group_and_other_bits() {
        // alice (1000) owns the leaf; the parent is root's: alice reads it
        // only through its group or other bits, whichever applies to her.
        assert_eq!(granted(1000, 100, &[file(0, 0, 0o604)]) & OWNER, 0);
        assert_eq!(granted(1000, 100, &[file(0, 0, 0o644)]) & OWNER, OWNER);
        // root, a possible member of the view's "other" class, owns the
        // parent and its owner bits deny: "other" loses read.
        assert_eq!(granted(1000, 100, &[file(0, 0, 0o044)]) & OTHER, 0);
    }

    #[test]
    fn group_class_is_exact_only_when_the_group_matches() {
        // Same group: group bits decide for the view's group.
        assert_eq!(granted(0, 50, &[file(0, 50, 0o640)]), OWNER | GROUP);
        // Another group: a member of the view's group may be outside it.
        assert_eq!(granted(0, 50, &[file(0, 60, 0o640)]), OWNER);
        assert_eq!(granted(0, 50, &[file(0, 60, 0o644)]), ALL);
        // ...or inside it, where a group that may not read denies.
        assert_eq!(granted(0, 50, &[file(0, 60, 0o604)]), OWNER);
    }

    #[test]
    fn the_leaf_alone_reduces_to_its_own_bits() {
        for mode in [0o000, 0o400, 0o440, 0o444, 0o404, 0o044, 0o004, 0o640] {
            let g = granted(7, 8, &[file(7, 8, mode)]);
            assert_eq!(g * R, mode & 0o444, "mode {mode:o}");
        }
    }

    #[test]
    fn write_bits_need_rw_the_leafs_write_bit_and_read() {
        let l = [file(0, 0, 0o664), file(0, 0, 0o644)];
        let w = [Node {
            need: W,
            ..file(0, 0, 0o664)
        }];
        let v = compute((0, 0), &l, &w, true, &NONE);
        assert_eq!(v.disk, 0o664);
        assert_eq!(v.control, 0o664);
        // The group may write the leaf but not read the parent: no write.
        let l = [file(0, 0, 0o664), file(0, 0, 0o600)];
        let v = compute((0, 0), &l, &w, true, &NONE);
        assert_eq!((v.disk, v.control), (0o600, 0o600));
    }

    #[test]
    fn uid_and_gid_choose_owner_and_group_but_never_widen() {
        let l = [file(0, 0, 0o600)];
        let o = Overrides {
            uid: Some(65534),
            gid: Some(65534),
            umask: None,
        };
        let v = compute((0, 0), &l, &[], false, &o);
        assert_eq!((v.uid, v.gid), (65534, 65534));
        assert_eq!(v.disk, 0, "root's 0600 layers stay closed to uid 65534");
        let l = [file(0, 0, 0o644)];
        let v = compute((0, 0), &l, &[], false, &o);
        assert_eq!(v.disk, 0o444);
    }

    #[test]
    fn umask_replaces_the_computed_bits() {
        let l = [file(0, 0, 0o600)];
        let o = Overrides {
            umask: Some(0o022),
            ..NONE
        };
        let ro = compute((0, 0), &l, &[Node::DENY], false, &o);
        assert_eq!(
            (ro.dir, ro.disk, ro.control, ro.text),
            (0o555, 0o444, 0o644, 0o444)
        );
        let rw = compute((0, 0), &l, &[Node::DENY], true, &o);
        assert_eq!(rw.disk, 0o644);
        let o = Overrides {
            umask: Some(0o077),
            ..NONE
        };
        let v = compute((0, 0), &[file(0, 0, 0o644)], &[], false, &o);
        assert_eq!((v.dir, v.disk, v.text), (0o500, 0o400, 0o400));
    }

    #[test]
    fn what_cannot_be_looked_at_denies_everyone() {
        assert_eq!(granted(0, 0, &[file(0, 0, 0o644), Node::DENY]), 0);
        let missing = nodes_for(Path::new("/nonexistent/chainfs/layer.vhd"), R);
        assert_eq!(granted(0, 0, &missing), 0);
    }

    #[test]
    fn nodes_for_walks_every_folder_above_the_file() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("a.vhd");
        std::fs::write(&f, b"x").unwrap();
        let n = nodes_for(&f, R);
        let canon = std::fs::canonicalize(&f).unwrap();
        assert_eq!(n.len(), canon.ancestors().count());
        assert_eq!(n[0].need, R);
        assert!(n[1..].iter().all(|d| d.need == X));
    }
}
