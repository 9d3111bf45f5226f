//! Unmounting only our own mount.
//!
//! A daemon unmounts by path (there is no other way), so before it does it
//! checks that the path still holds *its* mount: the mount on top at MNT
//! has the device number our FUSE super block got (`major:minor` in
//! /proc/self/mountinfo), and our FUSE connection is still alive. While the
//! connection lives, its super block lives and no other mount can have its
//! device number; once it is dead (someone ran `umount`/`fusermount3 -u`,
//! or the connection was aborted), the number may already belong to a file
//! system mounted at the same path since, and the daemon must not unmount
//! anything.
//!
//! fuser 0.18 gets this wrong: when a session's `Mount` is dropped or
//! unmounted it checks that its connection is alive with a `poll` test that
//! is always true (a dead connection reports POLLERR, which it reads as
//! "mounted"; fixed upstream in fuser pull request 703, not released), then
//! unmounts by path. After an external unmount that hit whatever had been
//! mounted at MNT since (measured: mount chainfs, `fusermount3 -u MNT`,
//! `mount -t tmpfs` at MNT at once: the tmpfs was gone in 13 of 30 tries).
//! So `crate::mount` never lets fuser unmount: it runs the session with
//! `Session::spawn`, which moves the `Mount` out of the session, keeps the
//! returned `BackgroundSession` from ever being dropped, and unmounts
//! through [`unmount_if_ours`] alone.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The device number (`major:minor`) of the mount on top at `mnt` (a
/// canonical path), from /proc/self/mountinfo.
pub fn top_device(mnt: &Path) -> Option<String> {
    super::top_mount(mnt).map(|(dev, _)| dev)
}

/// Whether this process's FUSE connection is alive: a descriptor of
/// /dev/fuse it holds polls without POLLERR (the kernel reports POLLERR on
/// every descriptor of a connection once it is unmounted or aborted).
/// Every /dev/fuse descriptor of the daemon belongs to its one connection
/// (fuser's clones of it).
pub fn connection_alive() -> bool {
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return false;
    };
    for e in fds.flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if target.as_os_str().as_bytes() != b"/dev/fuse" {
            continue;
        }
        let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let mut p = libc::pollfd {
            fd,
            events: 0,
            revents: 0,
        };
        // SAFETY: `p` is one live, initialised pollfd and the count is 1;
        // a zero timeout never blocks. If `fd` was closed and reused since
        // the read_link, poll only reports on whatever it is now.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        return n == 0 || (n == 1 && p.revents & libc::POLLERR == 0);
    }
    false
}

/// Unmount `mnt` (canonical) if, and only if, the mount on top there is
/// `ours` (its device number) and our connection is alive (module doc).
/// Root unmounts with umount(2); anyone else through `fusermount3 -u`.
/// Returns whether it unmounted; an error is the unmount's own (busy).
pub fn unmount_if_ours(mnt: &Path, ours: &str) -> io::Result<bool> {
    if !connection_alive() || top_device(mnt).as_deref() != Some(ours) {
        return Ok(false);
    }
    let c = std::ffi::CString::new(mnt.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    if unsafe { libc::umount2(c.as_ptr(), libc::UMOUNT_NOFOLLOW) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EPERM) {
        return Err(e);
    }
    // Not root: fusermount3 (setuid) unmounts FUSE mounts of their owner.
    let out = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg("--")
        .arg(mnt)
        .output()?;
    if out.status.success() {
        Ok(true)
    } else {
        Err(io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}
