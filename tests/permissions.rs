//! Who may see the mounted disk: real mounts under `-o allow_other` read
//! (and written) by other local users (`nobody`, an unnamed uid 4242) run
//! through `setpriv`, against layer files and folders of various modes;
//! the `uid=`, `gid=`, `umask=` overrides; and their option parsing.
//! The rules: docs/SEMANTICS.md "Who can see what", src/perms.rs.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use chainfs::mount::MountOptions;
use chainfs::ErrorKind;
use common::*;

const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;
/// A uid and gid no account has: a plain "other" user.
const STRANGER: u32 = 4242;

/// The root tools this file needs: FUSE, root (chown, setpriv to any uid).
fn ready() -> bool {
    require_fuse() && require("root and setpriv", is_root() && have("setpriv"))
}

/// A scratch folder under /tmp that every user may enter (a tempdir is 0700:
/// it alone would keep `nobody` out, whatever the mount shows).
fn open_scratch() -> tempfile::TempDir {
    let t = tempfile::Builder::new()
        .prefix("chainfs-perms")
        .tempdir_in("/tmp")
        .unwrap();
    chmod(t.path(), 0o755);
    t
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
}

/// base.vhd (in `base_dir`) <- leaf.vhd (in `dir`), 4 MiB, data in both.
fn two_layers(dir: &Path, base_dir: &Path) -> (PathBuf, PathBuf) {
    let base = base_dir.join("base.vhd");
    let leaf = dir.join("leaf.vhd");
    let staged = dir.join("staged");
    chainfs_ok(&["create", p(&base), "--size", "4M"]);
    chainfs_write(&base, 0, &Rng(1).bytes(300_000), &staged);
    chainfs_ok(&["create", p(&leaf), "--parent", p(&base)]);
    chainfs_write(&leaf, 1 << 20, &Rng(2).bytes(200_000), &staged);
    std::fs::remove_file(&staged).unwrap();
    (leaf, base)
}

/// `args` run as uid:gid with no supplementary groups, from `/`.
fn as_user(uid: u32, gid: u32, args: &[&str]) -> Output {
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .args(args)
        .current_dir("/")
        .output()
        .expect("setpriv")
}

/// Can uid:gid read all of `file`? Returns what it read, or its error.
fn read_as(uid: u32, gid: u32, file: &Path) -> Result<Vec<u8>, String> {
    let o = as_user(uid, gid, &["cat", p(file)]);
    if o.status.success() {
        Ok(o.stdout)
    } else {
        Err(String::from_utf8_lossy(&o.stderr).into_owned())
    }
}

fn assert_denied(uid: u32, gid: u32, file: &Path) {
    match read_as(uid, gid, file) {
        Ok(b) => panic!(
            "uid {uid} gid {gid} read {} bytes of {}",
            b.len(),
            file.display()
        ),
        Err(e) => assert!(e.contains("Permission denied"), "{}: {e}", file.display()),
    }
}

/// Write `data` at `off` into `file` as uid:gid (dd, no truncation).
fn write_as(uid: u32, gid: u32, file: &Path, off: u64, data: &str) -> Output {
    let script = format!(
        "printf %s '{data}' | dd of='{}' bs=1 seek={off} conv=notrunc status=none",
        p(file)
    );
    as_user(uid, gid, &["sh", "-c", &script])
}

/// (permission bits, uid, gid) as `stat` shows them.
fn stat(path: &Path) -> (u32, u32, u32) {
    let m = std::fs::metadata(path).unwrap();
    (m.mode() & 0o7777, m.uid(), m.gid())
}

fn flat(leaf: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("flat.raw");
    chainfs_ok(&["export", p(leaf), p(&out), "--force"]);
    let b = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    b
}

/// [`mount`] with `-o OPTS` on a folder everyone may enter.
fn mount_o(leaf: &Path, mnt: &Path, opts: &str) -> MountGuard {
    std::fs::create_dir_all(mnt).unwrap();
    chmod(mnt, 0o755);
    mount(leaf, mnt, &["-o", opts])
}

#[test]
fn others_cannot_read_a_disk_whose_layers_are_private() {
    if !ready() {
        return;
    }
    let t = open_scratch();
    let (leaf, base) = two_layers(t.path(), t.path());
    chmod(&leaf, 0o600);
    chmod(&base, 0o600);
    let want = flat(&leaf, t.path());
    let mnt = t.path().join("mnt");
    let _g = mount_o(&leaf, &mnt, "allow_other");

    assert_eq!(stat(&mnt.join("disk.raw")), (0o400, 0, 0));
    assert_eq!(stat(&mnt.join("chain")).0, 0o400);
    assert_eq!(stat(&mnt).0, 0o500);
    assert_eq!(stat(&mnt.join("jobs")).0, 0o500);
    assert_denied(NOBODY, NOGROUP, &mnt.join("disk.raw"));
    assert_denied(NOBODY, NOGROUP, &mnt.join("chain"));
    assert_denied(STRANGER, STRANGER, &mnt.join("disk.raw"));
    // The owner (root here) still reads the whole disk.
    assert!(std::fs::read(mnt.join("disk.raw")).unwrap() == want);
}

#[test]
fn others_read_a_disk_whose_layers_and_folders_are_open() {
    if !ready() {
        return;
    }
    let t = open_scratch();
    let (leaf, _) = two_layers(t.path(), t.path());
    let want = flat(&leaf, t.path());
    let mnt = t.path().join("mnt");
    let _g = mount_o(&leaf, &mnt, "allow_other");

    assert_eq!(stat(&mnt.join("disk.raw")), (0o444, 0, 0));
    assert_eq!(stat(&mnt.join("control")).0, 0o644);
    assert_eq!(stat(&mnt).0, 0o555);
    let got = read_as(NOBODY, NOGROUP, &mnt.join("disk.raw")).unwrap();
    assert!(got == want, "nobody read other bytes than export wrote");
    let chain = read_as(STRANGER, STRANGER, &mnt.join("chain")).unwrap();
    assert!(String::from_utf8_lossy(&chain).contains("leaf.vhd"));
}

#[test]
fn one_closed_parent_or_folder_keeps_others_out() {
    if !ready() {
        return;
    }
    // The leaf is open to all, its parent only to its group.
    let t = open_scratch();
    let (leaf, base) = two_layers(t.path(), t.path());
    chmod(&base, 0o640);
    let mnt = t.path().join("mnt");
    let g = mount_o(&leaf, &mnt, "allow_other");
    assert_eq!(stat(&mnt.join("disk.raw")).0, 0o440);
    assert_denied(NOBODY, NOGROUP, &mnt.join("disk.raw"));
    umount(g);

    // Every file 0644, but the parent sits in a folder others cannot enter.
    let t = open_scratch();
    let sub = t.path().join("private");
    std::fs::create_dir(&sub).unwrap();
    let (leaf, _) = two_layers(t.path(), &sub);
    chmod(&sub, 0o700);
    let mnt = t.path().join("mnt");
    let _g = mount_o(&leaf, &mnt, "allow_other");
    assert_eq!(stat(&mnt.join("disk.raw")).0, 0o400);
    assert_denied(NOBODY, NOGROUP, &mnt.join("disk.raw"));
}

#[test]
fn the_view_belongs_to_the_leafs_owner_and_group() {
    if !ready() {
        return;
    }
    let t = open_scratch();
    let (leaf, base) = two_layers(t.path(), t.path());
    for f in [&leaf, &base] {
        chown(f, NOBODY, NOGROUP);
        chmod(f, 0o600);
    }
    let want = flat(&leaf, t.path());
    let mnt = t.path().join("mnt");
    let _g = mount_o(&leaf, &mnt, "allow_other");

    assert_eq!(stat(&mnt.join("disk.raw")), (0o400, NOBODY, NOGROUP));
    assert!(read_as(NOBODY, NOGROUP, &mnt.join("disk.raw")).unwrap() == want);
    assert_denied(STRANGER, NOGROUP, &mnt.join("disk.raw"));
}

#[test]
fn writes_need_rw_and_the_leafs_write_permission() {
    if !ready() {
        return;
    }
    let t = open_scratch();
    let (leaf, _) = two_layers(t.path(), t.path());
    chown(&leaf, NOBODY, NOGROUP);
    let mnt = t.path().join("mnt");
    let disk = mnt.join("disk.raw");
    let g = mount_o(&leaf, &mnt, "allow_other");
    assert_eq!(stat(&disk), (0o444, NOBODY, NOGROUP));
    let o = write_as(NOBODY, NOGROUP, &disk, 4096, "HELLO");
    assert!(!o.status.success(), "nobody wrote a read-only mount");
    umount(g);
    let _g = mount_o(&leaf, &mnt, "allow_other,rw");
    assert_eq!(stat(&disk), (0o644, NOBODY, NOGROUP));
    let o = write_as(NOBODY, NOGROUP, &disk, 4096, "HELLO");
    assert!(o.status.success(), "the leaf's owner: {}", text(&o));
    let o = write_as(STRANGER, STRANGER, &disk, 8192, "NOPE!");
    assert!(!o.status.success(), "uid {STRANGER} wrote the disk");
    assert!(text(&o).contains("Permission denied"), "{}", text(&o));
    let got = std::fs::read(&disk).unwrap();
    assert_eq!(&got[4096..4101], b"HELLO");
    assert_ne!(&got[8192..8197], b"NOPE!");
}

#[test]
fn uid_gid_and_umask_change_what_stat_shows_and_what_is_enforced() {
    if !ready() {
        return;
    }
    let t = open_scratch();
    let (leaf, base) = two_layers(t.path(), t.path());
    chmod(&leaf, 0o600);
    chmod(&base, 0o600);
    let want = flat(&leaf, t.path());
    let mnt = t.path().join("mnt");
    let disk = mnt.join("disk.raw");

    // umask= replaces the narrowed bits: the admin shares the disk.
    let g = mount_o(&leaf, &mnt, "allow_other,umask=0222");
    assert_eq!(stat(&disk), (0o444, 0, 0));
    assert_eq!(stat(&mnt).0, 0o555);
    assert_eq!(stat(&mnt.join("control")).0, 0o444);
    assert!(read_as(NOBODY, NOGROUP, &disk).unwrap() == want);
    umount(g);

    // uid= hands the owner class to nobody, and only to nobody.
    let g = mount_o(&leaf, &mnt, "allow_other,uid=65534,umask=0277");
    assert_eq!(stat(&disk), (0o400, NOBODY, 0));
    assert!(read_as(NOBODY, NOGROUP, &disk).unwrap() == want);
    assert_denied(STRANGER, STRANGER, &disk);
    umount(g);

    // gid= hands the group class to the members of nogroup.
    let g = mount_o(&leaf, &mnt, "allow_other,gid=65534,umask=0227");
    assert_eq!(stat(&disk), (0o440, 0, NOGROUP));
    assert!(read_as(STRANGER, NOGROUP, &disk).unwrap() == want);
    assert_denied(STRANGER, STRANGER, &disk);
    umount(g);

    // Without umask=, uid= alone does not widen: nobody may not read
    // root's 0600 layers, so the view it owns grants it nothing.
    let _g = mount_o(&leaf, &mnt, "allow_other,uid=65534");
    assert_eq!(stat(&disk), (0o000, NOBODY, 0));
    assert_denied(NOBODY, NOGROUP, &disk);
}

/// Write `cmd` to MNT/control and return the reply read on the same handle.
fn control(mnt: &Path, cmd: &str) -> String {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join("control"))
        .unwrap();
    f.write_all(format!("{cmd}\n").as_bytes())
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let mut reply = String::new();
    f.read_to_string(&mut reply).unwrap();
    reply
}

#[test]
fn a_merge_that_removes_the_closed_layer_opens_the_view_at_once() {
    if !ready() {
        return;
    }
    // base 0644 <- mid 0600 <- leaf 0644: only mid keeps others out.
    let t = open_scratch();
    let (mid, _) = two_layers(t.path(), t.path());
    let mid = {
        let m = t.path().join("mid.vhd");
        std::fs::rename(&mid, &m).unwrap();
        m
    };
    let leaf = t.path().join("leaf.vhd");
    chainfs_ok(&["create", p(&leaf), "--parent", p(&mid)]);
    chmod(&mid, 0o600);
    let want = flat(&leaf, t.path());
    let mnt = t.path().join("mnt");
    let disk = mnt.join("disk.raw");
    let _g = mount_o(&leaf, &mnt, "allow_other,rw");
    // The kernel now caches these attributes (for an hour).
    assert_eq!(stat(&disk), (0o600, 0, 0));
    assert_eq!(stat(&mnt).0, 0o500);
    assert_denied(NOBODY, NOGROUP, &disk);

    let reply = control(&mnt, "merge mid.vhd base.vhd");
    assert!(reply.contains("Job=jobs/1"), "{reply}");
    wait_for_within("job 1 to complete", Duration::from_secs(60), || {
        std::fs::read_to_string(mnt.join("jobs/1"))
            .unwrap()
            .contains("JobState=7")
    });
    assert!(!mid.exists(), "the merge deletes mid.vhd");
    wait_for_within("disk.raw to show 0644", Duration::from_secs(5), || {
        stat(&disk).0 == 0o644
    });
    assert_eq!(stat(&mnt).0, 0o555);
    assert!(read_as(NOBODY, NOGROUP, &disk).unwrap() == want);
}

#[test]
fn allow_root_keeps_other_users_out() {
    if !ready() {
        return;
    }
    let t = open_scratch();
    let (leaf, _) = two_layers(t.path(), t.path());
    let mnt = t.path().join("mnt");
    let _g = mount_o(&leaf, &mnt, "allow_root");
    assert_eq!(stat(&mnt.join("disk.raw")).0, 0o444);
    assert!(read_as(NOBODY, NOGROUP, &mnt.join("disk.raw")).is_err());
    assert!(std::fs::read(mnt.join("disk.raw")).is_ok());
}

#[test]
fn uid_gid_umask_options_parse_numbers_and_refuse_the_rest() {
    let o = MountOptions::parse(&["uid=1000,gid=100".into(), "umask=027".into()]).unwrap();
    assert_eq!(o.perms.uid, Some(1000));
    assert_eq!(o.perms.gid, Some(100));
    assert_eq!(o.perms.umask, Some(0o027));
    assert_eq!(
        MountOptions::parse(&["umask=0".into()])
            .unwrap()
            .perms
            .umask,
        Some(0)
    );
    for bad in [
        "uid=alice",
        "gid=-1",
        "uid=",
        "uid=4294967295",
        "umask=999",
        "umask=1000",
        "umask=abc",
        "umask",
    ] {
        let e = MountOptions::parse(&[bad.into()]).expect_err(bad);
        assert_eq!(e.kind, ErrorKind::InvalidArgument, "{bad}");
        let key = bad.split('=').next().unwrap();
        assert!(e.to_string().contains(key), "{bad}: {e}");
    }
}
