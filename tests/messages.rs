//! Messages that lead the user to the fix (issue 15, defect 7): swapped
//! merge arguments name the ancestor rule and the chain order; refusals use
//! the vocabulary of where the user is (`--force` on the command line,
//! `force` in the control file); a refused control command is logged;
//! `umount` names the loop device that keeps the mount busy; a clean
//! mount and unmount log no warning.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use common::*;

/// base.vhd <- mid.vhd <- leaf.vhd, and other.vhd, a second child of mid.
fn chain_with_sibling(dir: &Path) -> PathBuf {
    let base = dir.join("base.vhd");
    chainfs_ok(&["create", p(&base), "--size", "8M", "--block-size", "512K"]);
    chainfs_write(&base, 0, &[1u8; 4096], &dir.join("chunk"));
    let mid = dir.join("mid.vhd");
    chainfs_ok(&["create", p(&mid), "--parent", p(&base)]);
    chainfs_write(&mid, 8192, &[2u8; 4096], &dir.join("chunk"));
    chainfs_ok(&["create", p(&dir.join("leaf.vhd")), "--parent", p(&mid)]);
    chainfs_ok(&["create", p(&dir.join("other.vhd")), "--parent", p(&mid)]);
    dir.join("leaf.vhd")
}

#[test]
fn swapped_merge_arguments_name_the_ancestor_rule_and_the_chain_order() {
    let t = tempfile::tempdir().unwrap();
    let leaf = chain_with_sibling(t.path());
    let base = t.path().join("base.vhd");
    let mid = t.path().join("mid.vhd");
    let before = sha256_file(&base);
    // By file name (resolved in SOURCE's chain) and by path.
    for (src, dst) in [
        (p(&base).to_string(), "leaf.vhd".to_string()),
        (p(&mid).to_string(), p(&leaf).to_string()),
    ] {
        let o = chainfs(&["merge", &src, &dst]);
        let msg = text(&o);
        // The exit codes stay what they were: a bare name not found in the
        // chain is "not found" (4), a path that is not a layer of it is an
        // invalid argument (9).
        let want = if dst.contains('/') { 9 } else { 4 };
        assert_eq!(code(&o), want, "{msg}");
        assert!(
            msg.contains("DESTINATION must be an ancestor of SOURCE"),
            "names the ancestor rule: {msg}"
        );
        assert!(
            msg.contains("leaf.vhd -> mid.vhd -> base.vhd"),
            "shows the chain order, leaf first: {msg}"
        );
        assert!(msg.contains("swap"), "suggests swapping: {msg}");
    }
    assert_eq!(sha256_file(&base), before);
}

#[test]
fn a_merge_refused_on_the_command_line_suggests_the_force_option() {
    let t = tempfile::tempdir().unwrap();
    chain_with_sibling(t.path());
    let o = chainfs(&[
        "merge",
        p(&t.path().join("leaf.vhd")),
        p(&t.path().join("base.vhd")),
    ]);
    let msg = text(&o);
    assert_eq!(code(&o), 10, "{msg}");
    assert!(msg.contains("other.vhd"), "{msg}");
    assert!(
        msg.contains("--force"),
        "the CLI option, not the control word: {msg}"
    );
    assert!(!msg.contains("`force`"), "{msg}");
}

#[test]
fn a_merge_refused_through_the_control_file_suggests_the_force_word_and_is_logged() {
    if !require_fuse() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let leaf = chain_with_sibling(t.path());
    let mnt = t.path().join("mnt");
    let log = t.path().join("daemon.log");
    let g = mount(&leaf, &mnt, &["-o", &format!("rw,log={}", p(&log))]);
    // As a shell's `exec 3<>control; echo … >&3; cat <&3`.
    let mut c = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join("control"))
        .unwrap();
    let e = c.write(b"merge leaf.vhd base.vhd\n").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    let mut reply = String::new();
    c.read_to_string(&mut reply).unwrap();
    assert!(reply.contains("other.vhd"), "{reply}");
    assert!(reply.contains("`force`"), "the control word: {reply}");
    assert!(!reply.contains("--force"), "not the CLI option: {reply}");
    drop(c);
    // As a shell's `echo … > control`, which sees only the errno: the reply
    // is in the log at warn level.
    let e = std::fs::write(mnt.join("control"), "merge mid.vhd nosuch.vhd\n").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    chainfs_ok(&["umount", p(&mnt)]);
    drop(g);
    let text = std::fs::read_to_string(&log).unwrap();
    let warns: Vec<&str> = text.lines().filter(|l| l.contains("WARN")).collect();
    assert!(
        warns
            .iter()
            .any(|l| l.contains("merge mid.vhd nosuch.vhd") && l.contains("nosuch.vhd: no layer")),
        "the refused command and its reply are logged at warn level: {text}"
    );
    assert!(
        warns.iter().any(|l| l.contains("merge leaf.vhd base.vhd")),
        "{text}"
    );
}

#[test]
fn a_clean_mount_and_unmount_log_no_warning() {
    if !require_fuse() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let leaf = chain_with_sibling(t.path());
    let mnt = t.path().join("mnt");
    for opts in ["ro", "rw"] {
        let log = t.path().join(format!("{opts}.log"));
        let g = mount(&leaf, &mnt, &["-o", &format!("{opts},log={}", p(&log))]);
        let mut buf = vec![0u8; 65536];
        std::fs::File::open(mnt.join("disk.raw"))
            .unwrap()
            .read_exact(&mut buf)
            .unwrap();
        chainfs_ok(&["umount", p(&mnt)]);
        drop(g);
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            !text.contains("WARN") && !text.contains("ERROR"),
            "-o {opts}: a clean mount and unmount logged: {text}"
        );
    }
}

#[test]
fn umount_names_the_loop_device_that_keeps_the_mount_busy() {
    if !require_fuse() || !require_loop() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let leaf = chain_with_sibling(t.path());
    let mnt = t.path().join("mnt");
    let g = mount(&leaf, &mnt, &["-o", "ro"]);
    let lo = LoopGuard::attach(&mnt.join("disk.raw"), true, false);
    let o = chainfs(&["umount", p(&mnt)]);
    let msg = text(&o);
    assert_ne!(code(&o), 0, "{msg}");
    assert!(is_mounted(&mnt));
    assert!(
        msg.contains(&lo.dev) && msg.contains(&format!("losetup -d {}", lo.dev)),
        "names the loop device and how to detach it: {msg}"
    );
    drop(lo);
    chainfs_ok(&["umount", p(&mnt)]);
    assert!(!is_mounted(&mnt));
    drop(g);
}
