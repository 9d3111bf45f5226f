//! The mount-helper argument form: `chainfs SOURCE MOUNTPOINT -o OPTIONS`.
//!
//! `mount -t fuse.chainfs SOURCE MNT -o OPTS` (or an `/etc/fstab` line of
//! type `fuse.chainfs`) makes `mount(8)` run `mount.fuse3`, which runs
//! `chainfs SOURCE MNT -o OPTS` through `/bin/sh` with its default PATH.
//! `mount(8)` runs `/sbin/mount.fuse.chainfs SOURCE MNT [-sfnv] [-o OPTS]
//! [-t fuse.chainfs]` directly when that file exists. Both forms are
//! rewritten here into `chainfs mount SOURCE MNT -o OPTS`; everything else
//! goes to clap unchanged. Without the `mount.` name, the form is taken only
//! when the first argument is a path (has a `/` or exists).

use std::ffi::OsString;
use std::path::Path;

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Argv {
    /// Parse these arguments with clap.
    Clap(Vec<OsString>),
    /// `-f`, mount(8)'s "fake" run: do everything but mount, here nothing.
    Fake,
}

/// Rewrite a mount-helper command line into `chainfs mount ...`.
/// `subcommands`: the names clap knows, so `chainfs info X` stays a command.
pub fn rewrite(args: Vec<OsString>, subcommands: &[&str]) -> Result<Argv, String> {
    let name = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("chainfs");
    let as_helper = name.starts_with("mount.");
    let first = args.get(1).and_then(|a| a.to_str());
    // A SOURCE is a path (mount(8) passes fstab's as written): a mistyped
    // command name (`chainfs inof x`) stays with clap and its suggestion.
    let helper_form = as_helper
        || (args.len() >= 3
            && first.is_some_and(|a| {
                !a.starts_with('-')
                    && !subcommands.contains(&a)
                    && (a.contains('/') || Path::new(a).exists())
            }));
    if !helper_form {
        return Ok(Argv::Clap(args));
    }
    let mut positional = Vec::new();
    let mut options = Vec::new();
    let mut it = args.into_iter().skip(1);
    while let Some(a) = it.next() {
        let s = a.to_string_lossy().into_owned();
        match s.as_str() {
            "-o" => options.push(it.next().ok_or("-o needs OPTIONS")?),
            "-t" => {
                let t = it.next().ok_or("-t needs a type")?;
                let t = t.to_string_lossy();
                if !["fuse.chainfs", "chainfs", "fuse"].contains(&t.as_ref()) {
                    return Err(format!("-t {t}: this helper mounts fuse.chainfs"));
                }
            }
            // -n: no mtab; -s: sloppy; -v: verbose (nothing to add).
            "-n" | "-s" | "-v" => {}
            "-f" => return Ok(Argv::Fake),
            _ if s.starts_with("-o") && s.len() > 2 => options.push(OsString::from(&s[2..])),
            _ if s.starts_with('-') => {
                return Err(format!(
                    "{s}: unknown option in the mount-helper form \
                     (chainfs SOURCE MOUNTPOINT [-o OPTIONS]; see chainfs mount --help)"
                ))
            }
            _ => positional.push(a),
        }
    }
    let [source, mountpoint]: [OsString; 2] = positional.try_into().map_err(|p: Vec<_>| {
        format!(
            "the mount-helper form takes SOURCE and MOUNTPOINT, got {} argument(s)",
            p.len()
        )
    })?;
    let mut out = vec!["chainfs".into(), "mount".into(), source, mountpoint];
    for o in options {
        out.push("-o".into());
        out.push(o);
    }
    Ok(Argv::Clap(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }
    const SUBS: &[&str] = &["info", "mount", "help"];

    #[test]
    fn mount_fuse3_form_becomes_chainfs_mount() {
        let got = rewrite(
            v(&["chainfs", "/v/leaf.vhdx", "/mnt", "-o", "ro,dev,suid"]),
            SUBS,
        );
        assert_eq!(
            got,
            Ok(Argv::Clap(v(&[
                "chainfs",
                "mount",
                "/v/leaf.vhdx",
                "/mnt",
                "-o",
                "ro,dev,suid"
            ])))
        );
    }

    #[test]
    fn mount8_direct_helper_form_with_flags_and_type() {
        let got = rewrite(
            v(&[
                "/sbin/mount.fuse.chainfs",
                "leaf.vhd",
                "mnt",
                "-n",
                "-s",
                "-oro",
                "-t",
                "fuse.chainfs",
            ]),
            SUBS,
        );
        assert_eq!(
            got,
            Ok(Argv::Clap(v(&[
                "chainfs", "mount", "leaf.vhd", "mnt", "-o", "ro"
            ])))
        );
        assert_eq!(
            rewrite(v(&["mount.chainfs", "a", "b", "-f"]), SUBS),
            Ok(Argv::Fake)
        );
        assert!(rewrite(v(&["mount.chainfs", "a", "b", "-t", "ext4"]), SUBS).is_err());
        assert!(rewrite(v(&["mount.chainfs", "a"]), SUBS).is_err());
        assert!(rewrite(v(&["mount.chainfs", "a", "b", "-x"]), SUBS).is_err());
    }

    #[test]
    fn subcommands_and_flags_stay_with_clap() {
        for a in [
            &["chainfs", "info", "leaf.vhd"][..],
            &["chainfs", "--help"],
            &["chainfs", "-V"],
            &["chainfs", "leaf.vhd"],
            &["chainfs", "inof", "leaf.vhd"],
            &["chainfs", "moutn", "leaf.vhd", "mnt", "-o", "ro"],
            &["chainfs"],
        ] {
            assert_eq!(rewrite(v(a), SUBS), Ok(Argv::Clap(v(a))), "{a:?}");
        }
    }
}
