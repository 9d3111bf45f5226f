//! chainfs fits the system (issue 13): `scripts/install.sh` installs the
//! binary, the mount helper, man pages and completions under PREFIX (and
//! `--uninstall` removes exactly those), and `mount -t fuse.chainfs` and an
//! fstab line mount a chain the way Linux mounts anything.
//!
//! The mount tests run real `mount(8)`, `mount.fuse3` and `umount` in a
//! private mount namespace (`unshare -m`): there a temporary folder is bound
//! over /usr/local and install.sh installs into it, because mount.fuse3
//! finds `chainfs` on /bin/sh's default PATH only (mount(8) drops PATH) and
//! tests must not write into the real /usr/local or /sbin. Everything the
//! namespace mounts goes with it; its script's exit trap unmounts too.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn install_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install.sh")
}

/// Run install.sh with DESTDIR and PREFIX; insist on success.
fn install(destdir: &Path, prefix: &str, extra: &[&str]) -> String {
    let o = Command::new(install_sh())
        .args(extra)
        .env("DESTDIR", destdir)
        .env("PREFIX", prefix)
        .current_dir("/")
        .output()
        .expect("run install.sh");
    assert!(
        o.status.success(),
        "install.sh {extra:?} failed: {}{}",
        text(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    text(&o)
}

/// Every file and symlink under `dir`, relative, sorted.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                todo.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn install_puts_binary_helper_man_pages_and_completions_under_prefix_and_uninstall_removes_exactly_them(
) {
    let t = tempfile::tempdir().unwrap();
    let dest = t.path();
    let root = dest.join("opt/cfs");
    // Somebody else's files in the same folders: uninstall must keep them.
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("share/man/man1")).unwrap();
    std::fs::write(root.join("bin/other"), "x").unwrap();
    std::fs::write(root.join("share/man/man1/other.1"), "x").unwrap();
    let before = files_under(dest);

    install(dest, "/opt/cfs", &["--bin", p(&bin())]);

    // The binary runs, and the helper name points at it.
    let v = Command::new(root.join("bin/chainfs"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(text(&v).starts_with("chainfs "), "{}", text(&v));
    assert_eq!(
        std::fs::read_link(root.join("sbin/mount.fuse.chainfs")).unwrap(),
        Path::new("../bin/chainfs")
    );
    assert!(root.join("sbin/mount.fuse.chainfs").is_file());

    // A man page for the command and each subcommand, with the sections
    // clap has no slot for.
    let man1 = root.join("share/man/man1");
    for cmd in [
        "", "-create", "-info", "-check", "-export", "-mount", "-merge", "-umount", "-write",
    ] {
        let page = man1.join(format!("chainfs{cmd}.1"));
        let src =
            std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
        assert!(
            src.starts_with(".ie") || src.contains("\n.TH "),
            "{}: no .TH",
            page.display()
        );
        for sec in [
            "NAME",
            "SYNOPSIS",
            "DESCRIPTION",
            "\"EXIT STATUS\"",
            "ENVIRONMENT",
            "\"SEE ALSO\"",
        ] {
            assert!(
                src.contains(&format!(".SH {sec}")),
                "{}: no {sec}",
                page.display()
            );
        }
    }
    let root_page = std::fs::read_to_string(man1.join("chainfs.1")).unwrap();
    for sec in ["FILES", "EXAMPLES"] {
        assert!(
            root_page.contains(&format!(".SH {sec}")),
            "chainfs.1: no {sec}"
        );
    }
    // They render: no groff warnings, and man shows the sections.
    if require("man and groff", have("man") && have("groff")) {
        for page in std::fs::read_dir(&man1).unwrap() {
            let page = page.unwrap().path();
            if !page
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("chainfs")
            {
                continue;
            }
            let g = Command::new("groff")
                .args(["-man", "-Tutf8", "-ww", "-z"])
                .arg(&page)
                .output()
                .unwrap();
            assert!(
                g.status.success() && g.stderr.is_empty(),
                "groff warns about {}: {}",
                page.display(),
                String::from_utf8_lossy(&g.stderr)
            );
        }
        let m = Command::new("man")
            .arg("-l")
            .arg(man1.join("chainfs-mount.1"))
            .env("MANWIDTH", "100")
            .output()
            .unwrap();
        // Without a terminal, man prints bold as "X\bX": keep the letters.
        let mut shown = String::new();
        for c in text(&m).chars() {
            if c == '\u{8}' {
                shown.pop();
            } else {
                shown.push(c);
            }
        }
        for s in [
            "chainfs-mount",
            "EXIT STATUS",
            "RUST_LOG",
            "EXAMPLES",
            "mount -t fuse.chainfs",
        ] {
            assert!(
                shown.contains(s),
                "man -l chainfs-mount.1 lacks {s:?}:\n{shown}"
            );
        }
    }

    // Completions in the places bash-completion, zsh and fish look.
    let bash = root.join("share/bash-completion/completions/chainfs");
    let st = Command::new("bash").arg("-n").arg(&bash).status().unwrap();
    assert!(st.success(), "bash -n {}", bash.display());
    assert!(std::fs::read_to_string(&bash)
        .unwrap()
        .contains("complete -F _chainfs"));
    let zsh = std::fs::read_to_string(root.join("share/zsh/site-functions/_chainfs")).unwrap();
    assert!(
        zsh.starts_with("#compdef chainfs"),
        "{}",
        &zsh[..40.min(zsh.len())]
    );
    let fish =
        std::fs::read_to_string(root.join("share/fish/vendor_completions.d/chainfs.fish")).unwrap();
    assert!(fish.contains("complete -c chainfs") && fish.contains("mount"));

    // Installing again changes nothing; uninstalling restores the folder
    // exactly as it was, other people's files included.
    let once = files_under(dest);
    install(dest, "/opt/cfs", &["--bin", p(&bin())]);
    assert_eq!(files_under(dest), once);
    let out = install(dest, "/opt/cfs", &["--uninstall"]);
    assert!(out.contains("removed"), "{out}");
    assert_eq!(files_under(dest), before, "uninstall left or took files");
    assert!(!root.join("sbin").exists() && !root.join("share/zsh").exists());
    assert!(root.join("share/man/man1/other.1").is_file());
    // A second uninstall finds no manifest and says so.
    let o = Command::new(install_sh())
        .arg("--uninstall")
        .env("DESTDIR", dest)
        .env("PREFIX", "/opt/cfs")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("install-manifest not found"));
}

/// A two-layer VHDX chain with data in both layers, and its flat content.
fn chain(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.vhdx");
    let leaf = dir.join("leaf.vhdx");
    chainfs_ok(&["create", p(&base), "--size", "8M"]);
    let scratch = dir.join("scratch");
    chainfs_write(&base, 0, &Rng(7).bytes(300_000), &scratch);
    chainfs_ok(&["create", p(&leaf), "--parent", p(&base)]);
    chainfs_write(&leaf, 1 << 20, &Rng(8).bytes(100_000), &scratch);
    let flat = dir.join("flat.raw");
    chainfs_ok(&["export", p(&leaf), p(&flat)]);
    (leaf, flat)
}

/// Run `script` in a private mount namespace with install.sh's /usr/local
/// in `usrlocal`; return (success, stdout+stderr).
fn in_namespace(usrlocal: &Path, script: &str) -> (bool, String) {
    let full = format!(
        "set -eu\n\
         mount --bind {usrlocal} /usr/local\n\
         PREFIX=/usr/local {install} --bin {bin} >/dev/null\n\
         {script}",
        usrlocal = p(usrlocal),
        install = p(&install_sh()),
        bin = p(&bin()),
    );
    let o = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "bash", "-c", &full])
        .current_dir("/")
        .output()
        .expect("run unshare");
    (
        o.status.success(),
        format!("{}{}", text(&o), String::from_utf8_lossy(&o.stderr)),
    )
}

/// The script's cleanup: whatever happens, nothing stays mounted.
const TRAP: &str = "trap 'mountpoint -q \"$MNT\" && umount -l \"$MNT\"' EXIT\n";

#[test]
fn mount_t_fuse_chainfs_mounts_the_leaf_and_umount_unmounts() {
    if !require_fuse()
        || !require(
            "unshare and mount.fuse3",
            have("unshare") && Path::new("/sbin/mount.fuse3").exists(),
        )
    {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (leaf, flat) = chain(t.path());
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let usrlocal = t.path().join("usrlocal");
    std::fs::create_dir(&usrlocal).unwrap();
    let script = format!(
        "MNT={mnt}\n{TRAP}\
         mount -t fuse.chainfs {leaf} \"$MNT\" -o ro,allow_other\n\
         grep \" $MNT \" /proc/self/mounts\n\
         cmp \"$MNT/disk.raw\" {flat} && echo SAME\n\
         umount \"$MNT\"\n\
         mountpoint -q \"$MNT\" || echo UNMOUNTED\n\
         # the form mount(8) uses for /sbin/mount.fuse.chainfs\n\
         /usr/local/sbin/mount.fuse.chainfs {leaf} \"$MNT\" -n -o ro -t fuse.chainfs\n\
         grep \" $MNT \" /proc/self/mounts | sed 's/^/HELPER /'\n\
         cmp \"$MNT/disk.raw\" {flat} && echo SAME2\n\
         umount \"$MNT\"\n",
        mnt = p(&mnt),
        leaf = p(&leaf),
        flat = p(&flat),
    );
    let (ok, out) = in_namespace(&usrlocal, &script);
    assert!(ok, "{out}");
    let line = out.lines().next().unwrap_or_default();
    let f: Vec<&str> = line.split(' ').collect();
    assert_eq!(
        f[..3],
        [p(&leaf), p(&mnt), "fuse.chainfs"],
        "/proc/mounts: {line}"
    );
    assert!(
        f[3].starts_with("ro,") || f[3].contains(",ro,") || f[3].starts_with("rw,"),
        "{line}"
    );
    assert!(f[3].contains("allow_other"), "{line}");
    for s in ["SAME", "UNMOUNTED", "SAME2"] {
        assert!(out.lines().any(|l| l == s), "no {s}:\n{out}");
    }
    assert!(
        out.lines().any(|l| l.starts_with(&format!(
            "HELPER {} {} fuse.chainfs ",
            p(&leaf),
            p(&mnt)
        ))),
        "{out}"
    );
    assert!(!is_mounted(&mnt), "the namespace's mount leaked out");
}

#[test]
fn fstab_line_with_generic_options_mounts_with_mount_big_t() {
    if !require_fuse()
        || !require(
            "unshare and mount.fuse3",
            have("unshare") && Path::new("/sbin/mount.fuse3").exists(),
        )
    {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (leaf, flat) = chain(t.path());
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let usrlocal = t.path().join("usrlocal");
    std::fs::create_dir(&usrlocal).unwrap();
    let fstab = t.path().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# chainfs test\n{} {} fuse.chainfs ro,noauto,nofail,_netdev,x-systemd.automount,defaults,nodev,nosuid,noexec 0 0\n",
            p(&leaf),
            p(&mnt)
        ),
    )
    .unwrap();
    let script = format!(
        "MNT={mnt}\n{TRAP}\
         mount -T {fstab} \"$MNT\"\n\
         grep \" $MNT \" /proc/self/mounts\n\
         cmp \"$MNT/disk.raw\" {flat} && echo SAME\n\
         umount \"$MNT\"\n\
         mountpoint -q \"$MNT\" || echo UNMOUNTED\n",
        mnt = p(&mnt),
        fstab = p(&fstab),
        flat = p(&flat),
    );
    let (ok, out) = in_namespace(&usrlocal, &script);
    assert!(ok, "{out}");
    let line = out.lines().next().unwrap_or_default();
    let f: Vec<&str> = line.split(' ').collect();
    assert_eq!(
        f[..3],
        [p(&leaf), p(&mnt), "fuse.chainfs"],
        "/proc/mounts: {line}"
    );
    let flags: Vec<&str> = f[3].split(',').collect();
    for fl in ["nosuid", "nodev", "noexec"] {
        assert!(flags.contains(&fl), "{fl} not passed to the kernel: {line}");
    }
    for s in ["SAME", "UNMOUNTED"] {
        assert!(out.lines().any(|l| l == s), "no {s}:\n{out}");
    }
    assert!(!is_mounted(&mnt), "the namespace's mount leaked out");
}

#[test]
fn helper_form_takes_the_generic_mount_options_that_mount8_and_fstab_use() {
    if !require_fuse() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (leaf, flat) = chain(t.path());
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    // The argv form mount.fuse3 uses, with every generic option at once:
    // the fstab-only ones are ignored, `users` implies noexec,nosuid,nodev
    // and the later `exec` overrides its noexec.
    let o = Command::new(bin())
        .args([
            p(&leaf),
            p(&mnt),
            "-o",
            "ro,defaults,auto,noauto,nofail,_netdev,x-systemd.automount,comment=x,users,exec,noatime",
        ])
        .current_dir(t.path())
        .output()
        .unwrap();
    let _g = MountGuard::new(&mnt);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.split(' ').nth(1) == Some(p(&mnt)))
        .expect("the mount is in /proc/mounts");
    let f: Vec<&str> = line.split(' ').collect();
    assert_eq!(f[..3], [p(&leaf), p(&mnt), "fuse.chainfs"], "{line}");
    let flags: Vec<&str> = f[3].split(',').collect();
    for fl in ["nosuid", "nodev", "noatime"] {
        assert!(flags.contains(&fl), "{fl} missing: {line}");
    }
    assert!(!flags.contains(&"noexec"), "exec came last: {line}");
    assert_eq!(
        std::fs::read(mnt.join("disk.raw")).unwrap(),
        std::fs::read(&flat).unwrap()
    );
    // Read-only despite `defaults`.
    assert!(std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("disk.raw"))
        .is_err());
    chainfs_ok(&["umount", p(&mnt)]);
    assert!(!is_mounted(&mnt));
}
