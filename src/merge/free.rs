//! Giving back the space of the layers a merge deleted.
//!
//! A merge unlinks SOURCE and the layers between only after DESTINATION is
//! durable and the children point at it (the step order in `merge`); from
//! then on the chain on disk is final. The space is another matter: the
//! file system frees an unlinked file's blocks at its last close, and for a
//! large layer that takes it a while (measured here, ext4 mounted with
//! `discard`: about 0.3 s for 770 MiB of two layers, against 5 ms for the
//! unlinks themselves). Who waits for that is the caller's choice
//! ([`FreeSpace`]):
//!
//! - [`FreeSpace::Wait`]: the merge closes them before it returns (a few
//!   threads at once), so the space is free when it reports Completed.
//! - [`FreeSpace::OnThread`]: a daemon that outlives the merge (the mount)
//!   closes them on a thread of its own after the job completed.
//! - [`FreeSpace::InHelper`]: a command that exits when the merge is done
//!   (`chainfs merge`): before unlinking, it forks a small process
//!   ([`Holder`], named `chainfs-free`) that opens nothing itself but keeps
//!   its own descriptors of the layer files; the command's closes are then
//!   not the last ones, and the helper's exit, once the command let go, is
//!   where the file system frees the blocks. Nothing on disk waits for it:
//!   if it is killed, the kernel closes its files just the same, and a
//!   crash while it runs leaves unlinked inodes that the file system's own
//!   recovery frees (the ext4 orphan list, or fsck), as a crash during any
//!   last close would. While it runs, that file system cannot be unmounted
//!   (`EBUSY`) and does not count the space as free; `--wait-free` is for
//!   scripts that need either right away.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use crate::format::Layer;

/// Who waits for the file system to free the deleted layers' blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreeSpace {
    /// The merge, before it returns.
    Wait,
    /// A thread of this process, after the merge returned.
    OnThread,
    /// A helper process, after this one let go of the files.
    InHelper,
}

/// Close the plan's layers (dropping the last references this merge holds)
/// the way `how` says. A layer a reader still holds is closed by that
/// reader's last reference instead.
pub(super) fn close(layers: Vec<Arc<dyn Layer>>, how: FreeSpace, holder: Option<Holder>) {
    match how {
        FreeSpace::OnThread => {
            let spawned = std::thread::Builder::new()
                .name("merge-free".into())
                .spawn(move || close_side_by_side(layers));
            if let Err(e) = spawned {
                log::warn!("merge: no thread to free the merged layers ({e}); freeing them now");
            }
        }
        FreeSpace::Wait | FreeSpace::InHelper => {
            // With a holder these closes are not the last ones: fast.
            close_side_by_side(layers);
            if let Some(h) = holder {
                log::info!(
                    "merge: done; chainfs-free (pid {}) frees the merged layers",
                    h.pid
                );
            }
        }
    }
}

/// Drop `layers` on a few threads at once: one after the other, the last
/// closes of large unlinked files take most of the time a merge spends
/// after its data is durable.
fn close_side_by_side(layers: Vec<Arc<dyn Layer>>) {
    const THREADS: usize = 4;
    let mut shares: Vec<Vec<Arc<dyn Layer>>> = (0..THREADS).map(|_| Vec::new()).collect();
    for (i, l) in layers.into_iter().enumerate() {
        shares[i % THREADS].push(l);
    }
    std::thread::scope(|scope| {
        for share in shares.into_iter().filter(|s| !s.is_empty()) {
            scope.spawn(move || drop(share));
        }
    });
}

/// A helper process holding descriptors of some files until this value is
/// dropped; then it exits, and its closes are the last ones.
#[derive(Debug)]
pub(super) struct Holder {
    /// The helper's process id.
    pub(super) pid: libc::pid_t,
    /// The write end of the pipe the helper waits on; closing it (the
    /// drop) is the signal to exit.
    _go: OwnedFd,
}

impl Holder {
    /// Open `paths` and hand the descriptors to a new process, which by the
    /// time this returns holds nothing else of ours (not our locks, our
    /// standard output, or the folder we run in).
    pub(super) fn start(paths: &[&Path]) -> io::Result<Holder> {
        let files = paths
            .iter()
            .map(File::open)
            .collect::<io::Result<Vec<File>>>()?;
        let (go_r, go_w) = pipe()?;
        let (ready_r, ready_w) = pipe()?;
        let mut keep: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        keep.push(go_r.as_raw_fd());
        keep.push(ready_w.as_raw_fd());
        keep.sort_unstable();
        let open_max = open_max();
        // SAFETY: fork() in a process that may have other threads; the child
        // runs only `helper`, which makes async-signal-safe system calls on
        // memory prepared before the fork (`keep`) and never returns.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            helper(&keep, open_max, go_r.as_raw_fd(), ready_w.as_raw_fd());
        }
        drop((go_r, ready_w, files));
        // The first child forks the helper and exits at once; reap it.
        let mut status = 0;
        // SAFETY: waitpid on our own child, with a valid status pointer.
        while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
            return Err(io::Error::other("the helper process did not start"));
        }
        // The helper's pid, from the first child; end of file once the
        // helper closed everything else of ours.
        let mut said = Vec::new();
        io::Read::read_to_end(&mut File::from(ready_r), &mut said)?;
        let pid = <[u8; 4]>::try_from(said.as_slice())
            .map(libc::pid_t::from_ne_bytes)
            .map_err(|_| io::Error::other("the helper process did not start"))?;
        log::debug!(
            "merge: chainfs-free (pid {pid}) holds {} files",
            paths.len()
        );
        Ok(Holder { pid, _go: go_w })
    }
}

/// The forked child. Only async-signal-safe calls: no allocation, no locks.
fn helper(keep: &[RawFd], open_max: RawFd, go: RawFd, ready: RawFd) -> ! {
    // SAFETY: plain system calls on descriptors and static strings; every
    // path ends in _exit.
    unsafe {
        let mut from = 0;
        for &fd in keep {
            if fd > from {
                close_range(from, fd - 1, open_max);
            }
            from = fd + 1;
        }
        close_range(from, RawFd::MAX, open_max);
        libc::setsid();
        libc::chdir(c"/".as_ptr());
        // The forking thread may have had signals blocked; `kill` must work.
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        match libc::fork() {
            0 => {}
            -1 => libc::_exit(1),
            pid => {
                let b = pid.to_ne_bytes();
                let ok = libc::write(ready, b.as_ptr().cast(), b.len()) == b.len() as isize;
                libc::_exit(if ok { 0 } else { 1 })
            }
        }
        libc::prctl(libc::PR_SET_NAME, c"chainfs-free".as_ptr());
        libc::close(ready);
        let mut b = 0u8;
        while libc::read(go, (&mut b as *mut u8).cast(), 1) < 0
            && *libc::__errno_location() == libc::EINTR
        {}
        libc::_exit(0)
    }
}

/// Close descriptors `lo..=hi`; where the kernel lacks close_range(2), one
/// by one below `limit` (no descriptor is numbered that high). Only for
/// the forked child, where nothing uses those descriptors afterwards.
fn close_range(lo: RawFd, hi: RawFd, limit: RawFd) {
    // SAFETY: system calls on descriptor numbers; in the forked child no
    // Rust object goes on to use them.
    unsafe {
        if libc::syscall(libc::SYS_close_range, lo as u32, hi as u32, 0u32) == 0 {
            return;
        }
        let mut fd = lo;
        while fd <= hi && fd < limit {
            libc::close(fd);
            fd += 1;
        }
    }
}

/// One more than the highest descriptor number this process may open,
/// read before the fork (so that the child asks nothing).
fn open_max() -> RawFd {
    // SAFETY: sysconf reads a limit.
    let n = unsafe { libc::sysconf(libc::_SC_OPEN_MAX) };
    RawFd::try_from(n).unwrap_or(1 << 20).max(3)
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`, which we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both were just opened and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use super::Holder;

    fn fds_of(pid: libc::pid_t) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            return Vec::new();
        };
        rd.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .map(|p| p.display().to_string())
            .collect()
    }

    #[test]
    fn the_helper_holds_only_the_given_files_and_keeps_them_alive_after_the_unlink_until_dropped() {
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("a.vhd");
        std::fs::write(&a, vec![7u8; 1 << 20]).unwrap();
        // A file this process holds locked, as a merge holds its layers.
        let locked_path = t.path().join("locked");
        let locked = std::fs::File::create(&locked_path).unwrap();
        // SAFETY: flock on a descriptor we own.
        let lock = |f: &std::fs::File| unsafe {
            libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB)
        };
        assert_eq!(lock(&locked), 0);

        let holder = Holder::start(&[a.as_path()]).unwrap();
        let pid = holder.pid;
        // SAFETY: getpid has no preconditions.
        assert_ne!(pid, unsafe { libc::getpid() });
        let fds = fds_of(pid);
        assert_eq!(
            fds.len(),
            2,
            "the helper holds more than its file and pipe: {fds:?}"
        );
        assert!(fds.contains(&a.display().to_string()), "{fds:?}");
        assert!(fds.iter().any(|f| f.starts_with("pipe:")), "{fds:?}");
        assert_eq!(
            std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
            PathBuf::from("/")
        );
        assert_eq!(
            std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap(),
            "chainfs-free\n"
        );
        // Our lock went with our descriptor: the helper kept no copy of it.
        drop(locked);
        assert_eq!(lock(&std::fs::File::open(&locked_path).unwrap()), 0);

        // Unlinked, the file lives on in the helper ...
        std::fs::remove_file(&a).unwrap();
        let deleted = format!("{} (deleted)", a.display());
        assert!(fds_of(pid).contains(&deleted), "{:?}", fds_of(pid));
        // ... until it is let go.
        drop(holder);
        let t0 = Instant::now();
        while !fds_of(pid).is_empty() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the helper never let go"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
