//! `chainfs mount` and `chainfs umount`: option parsing, mount-point checks,
//! going to the background once the mount is live, and a clean unmount on
//! SIGINT/SIGTERM/SIGHUP or an external `fusermount3 -u`.
//!
//! Start-up order: check the mount point, open the chain (taking the layer
//! locks), fork (before any thread exists), and in the child create the FUSE
//! session (the mount is live when that returns); only then does the parent
//! exit 0. Every failure up to that point reaches the parent through a pipe
//! and becomes its error message and exit status.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::chain::{Chain, ChainOptions};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::fs::{ChainFs, MountConfig};
use crate::image::FlatImage;
use crate::paths::canonical;
use crate::perms::Overrides;
use crate::size::parse_size;

pub mod generic;
mod own;

/// What `-o a,b=c,...` asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    pub writable: bool,
    pub allow_other: bool,
    pub allow_root: bool,
    pub cache_bytes: Option<u64>,
    /// Memory for staging sequential readers' next MiBs
    /// (`crate::staging`); 0: the page cache's read-ahead instead.
    pub readahead_bytes: u64,
    pub threads: usize,
    pub copy_on_read: bool,
    /// Where a background daemon writes its log (RUST_LOG).
    pub log: Option<PathBuf>,
    /// With `rw`: mount a leaf writable even though other disks have it as
    /// their parent (`crate::dependents`; they break).
    pub force: bool,
    /// `uid=`, `gid=`, `umask=` (see `crate::perms`).
    pub perms: Overrides,
    /// The generic mount(8) options: kernel flags (dev, suid, ...), and
    /// fstab-only words (noauto, nofail, ...) accepted and ignored.
    pub kernel: generic::KernelFlags,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            writable: false,
            allow_other: false,
            allow_root: false,
            cache_bytes: None,
            readahead_bytes: crate::staging::DEFAULT_BYTES,
            threads: 4,
            copy_on_read: false,
            log: None,
            force: false,
            perms: Overrides::default(),
            kernel: generic::KernelFlags::default(),
        }
    }
}

impl MountOptions {
    /// Parse a `mount(8)`-style comma list; later options win.
    pub fn parse(list: &[String]) -> Result<MountOptions> {
        let mut o = MountOptions::default();
        for item in list
            .iter()
            .flat_map(|s| s.split(','))
            .filter(|s| !s.is_empty())
        {
            if o.kernel.accept(item) {
                continue;
            }
            let (k, v) = match item.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (item, None),
            };
            match (k, v) {
                ("ro", None) => o.writable = false,
                ("rw", None) => o.writable = true,
                ("allow_other", None) => o.allow_other = true,
                ("allow_root", None) => o.allow_root = true,
                ("copy_on_read", None) => o.copy_on_read = true,
                ("force", None) => o.force = true,
                ("cache", Some(v)) => o.cache_bytes = Some(parse_size(v)?),
                ("readahead", Some(v)) => {
                    o.readahead_bytes = parse_size(v)?;
                    if o.readahead_bytes > crate::staging::MAX_BYTES {
                        return Err(Error::invalid(format!(
                            "readahead={v}: at most {} MiB",
                            crate::staging::MAX_BYTES >> 20
                        )));
                    }
                }
                ("uid", Some(v)) => o.perms.uid = Some(parse_id(k, v)?),
                ("gid", Some(v)) => o.perms.gid = Some(parse_id(k, v)?),
                ("umask", Some(v)) => {
                    o.perms.umask = Some(
                        u32::from_str_radix(v, 8)
                            .ok()
                            .filter(|m| *m <= 0o777)
                            .ok_or_else(|| {
                                Error::invalid(format!(
                                    "umask={v}: expected octal digits, 0 to 777"
                                ))
                            })?,
                    )
                }
                ("log", Some(v)) => o.log = Some(PathBuf::from(v)),
                ("threads", Some(v)) => {
                    o.threads = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=64).contains(n))
                        .ok_or_else(|| Error::invalid(format!("threads={v}: expected 1 to 64")))?
                }
                _ => {
                    return Err(Error::invalid(format!(
                        "unknown mount option `{item}` (known: ro, rw, force, allow_other, allow_root, uid=N, gid=N, umask=OOO, copy_on_read, cache=SIZE, readahead=SIZE, threads=N, log=FILE)"
                    )))
                }
            }
        }
        if o.copy_on_read && !o.writable {
            return Err(Error::invalid(
                "copy_on_read needs a writable mount (-o rw,copy_on_read)",
            ));
        }
        if o.allow_other && o.allow_root {
            return Err(Error::invalid(
                "allow_other and allow_root exclude each other",
            ));
        }
        Ok(o)
    }
}

/// A numeric user or group id (names are not looked up: `uid=$(id -u alice)`).
fn parse_id(key: &str, v: &str) -> Result<u32> {
    v.parse::<u32>()
        .ok()
        .filter(|n| *n != u32::MAX)
        .ok_or_else(|| {
            Error::invalid(format!(
                "{key}={v}: expected a numeric id (e.g. {key}=$(id -{} NAME))",
                if key == "uid" { "u" } else { "g" }
            ))
        })
}

/// Refuse a mount point that is missing, not a folder, not empty or already
/// a mount.
pub fn check_mountpoint(mnt: &Path) -> Result<()> {
    let md = std::fs::metadata(mnt).ctx(mnt, "mount point", None)?;
    if !md.is_dir() {
        return Err(Error::invalid(format!(
            "{}: mount point is not a directory",
            mnt.display()
        )));
    }
    if is_mountpoint(mnt) {
        return Err(Error::new(
            ErrorKind::Busy,
            format!("{}: is already a mount point", mnt.display()),
        ));
    }
    let mut entries = std::fs::read_dir(mnt).ctx(mnt, "cannot list mount point", None)?;
    if entries.next().is_some() {
        return Err(Error::invalid(format!(
            "{}: mount point is not empty",
            mnt.display()
        )));
    }
    Ok(())
}

/// `(major:minor, mount point, fstype)` of every mount, from
/// /proc/self/mountinfo.
fn mounts() -> Vec<(String, PathBuf, String)> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let unescaped = f.get(4)?.replace("\\040", " ").replace("\\011", "\t");
            // After the " - " separator: fstype, source.
            let dash = f.iter().position(|x| *x == "-")?;
            let fstype = f.get(dash + 1).unwrap_or(&"").to_string();
            Some((f.get(2)?.to_string(), PathBuf::from(unescaped), fstype))
        })
        .collect()
}

/// `(major:minor, fstype)` of the mount on top at `c` (a canonical path):
/// the last of the mounts there in /proc/self/mountinfo.
fn top_mount(c: &Path) -> Option<(String, String)> {
    mounts()
        .into_iter()
        .rev()
        .find(|(_, m, _)| m == c)
        .map(|(dev, _, fstype)| (dev, fstype))
}

pub fn is_mountpoint(p: &Path) -> bool {
    let c = canonical(p);
    mounts().iter().any(|(_, m, _)| *m == c)
}

/// Mount `leaf`'s chain at `mnt`. Returns when the mount is gone (with
/// `foreground`) or, in the parent, once it is live.
pub fn mount(
    leaf: &Path,
    mnt: &Path,
    mo: &MountOptions,
    co: &ChainOptions,
    foreground: bool,
) -> Result<()> {
    check_mountpoint(mnt)?;
    let mnt = canonical(mnt);
    let leaf = canonical(leaf);
    let co = ChainOptions {
        writable: mo.writable,
        cache_bytes: mo.cache_bytes.map_or(co.cache_bytes, |c| c as usize),
        force: mo.force,
        force_hint: "-o rw,force",
        ..co.clone()
    };
    let chain = Chain::open(&leaf, &co)?;
    if foreground {
        return serve(chain, &mnt, mo, &co, None);
    }
    let mut fds = [0; 2];
    // SAFETY: `fds` is a live, writable array of two c_ints, which is what
    // pipe() writes; no other memory is touched.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(Error::io(
            mnt.as_path(),
            "pipe",
            None,
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: pipe() succeeded, so both fds are open, distinct and new to
    // this process; nothing else holds them, so each gets exactly one owner
    // (closed once, on drop).
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the child goes on to allocate, lock and spawn threads, which
    // is sound only if the parent had no other thread at fork time (no lock
    // can be held by a thread that does not exist in the child). It has
    // none: `chainfs mount` calls this from `main` before starting any
    // thread, and `Chain::open` above starts none.
    match unsafe { libc::fork() } {
        -1 => Err(Error::io(
            mnt.as_path(),
            "fork",
            None,
            std::io::Error::last_os_error(),
        )),
        0 => {
            drop(rd);
            // SAFETY: setsid() takes no arguments and touches no memory; a
            // fresh fork child is never a group leader, so it cannot fail.
            unsafe { libc::setsid() };
            let code = match serve(chain, &mnt, mo, &co, Some(wr)) {
                Ok(()) => 0,
                Err(e) => {
                    log::error!("{e}");
                    1
                }
            };
            std::process::exit(code);
        }
        _child => {
            drop(wr);
            drop(chain);
            let mut status = String::new();
            let _ = std::fs::File::from(rd).read_to_string(&mut status);
            match status.strip_prefix("ok") {
                Some(_) => Ok(()),
                None if status.is_empty() => Err(Error::new(
                    ErrorKind::Io,
                    format!(
                        "{}: the mount daemon died before the mount was live",
                        mnt.display()
                    ),
                )),
                None => {
                    let (code, msg) = status.split_once(' ').unwrap_or(("1", &status));
                    Err(Error::new(
                        kind_of_exit(code.parse().unwrap_or(1)),
                        msg.to_string(),
                    ))
                }
            }
        }
    }
}

fn kind_of_exit(code: i32) -> ErrorKind {
    [
        ErrorKind::Io,
        ErrorKind::Corrupt,
        ErrorKind::NotFound,
        ErrorKind::IdMismatch,
        ErrorKind::Unsupported,
        ErrorKind::Busy,
        ErrorKind::AccessDenied,
        ErrorKind::InvalidArgument,
        ErrorKind::InvalidState,
        ErrorKind::ReadOnly,
    ]
    .into_iter()
    .find(|k| Error::new(*k, "").exit_code() == code)
    .unwrap_or(ErrorKind::Io)
}

/// Report to the waiting parent, if any.
fn tell(parent: &mut Option<OwnedFd>, msg: &str) {
    if let Some(fd) = parent.take() {
        let _ = std::fs::File::from(fd).write_all(msg.as_bytes());
    }
}

fn serve(
    chain: Chain,
    mnt: &Path,
    mo: &MountOptions,
    co: &ChainOptions,
    mut parent: Option<OwnedFd>,
) -> Result<()> {
    // A daemon must not die because whoever started it closed its stderr.
    // SAFETY: setting a signal disposition; no handler code runs.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let r = serve_inner(chain, mnt, mo, co, &mut parent);
    if let Err(e) = &r {
        tell(&mut parent, &format!("{} {e}", e.exit_code()));
    }
    r
}

fn serve_inner(
    chain: Chain,
    mnt: &Path,
    mo: &MountOptions,
    co: &ChainOptions,
    parent: &mut Option<OwnedFd>,
) -> Result<()> {
    let image = Arc::new(FlatImage::new(&chain).with_staging(mo.readahead_bytes));
    let flush_image = image.clone();
    let report_image = image.clone();
    let refresh = Box::new(move || {
        let layers = report_image.layers();
        let reports = layers
            .iter()
            .enumerate()
            .map(|(d, l)| {
                let parent = layers.get(d + 1).map(|p| p.path().to_path_buf());
                crate::info::layer_report(d, l.as_ref(), parent)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(crate::info::chain_lines(&reports))
    });
    let cfg = MountConfig {
        writable: mo.writable,
        copy_on_read: mo.copy_on_read,
        perms: mo.perms,
        parent_dirs: co.parent_dirs.clone(),
        overrides: co.overrides.clone(),
    };
    let fs = Arc::new(ChainFs::new(image, cfg, refresh)?);
    let jobs = fs.jobs().clone();
    let leaf = chain.leaf().path().display().to_string();
    drop(chain);

    let mut options = vec![
        // /proc/mounts: `LEAF MNT fuse.chainfs ...`, like any mount.
        fuser::MountOption::FSName(leaf),
        // Type `fuse.chainfs`. As a kernel option, not fuser's Subtype:
        // fuser mounts as root with mount(2) and type "fuse", dropping the
        // subtype; fusermount3 (non-root) gets `-o subtype=chainfs` either way.
        fuser::MountOption::CUSTOM("subtype=chainfs".into()),
        // The kernel checks every access against the modes crate::perms
        // derives from the layers; without this, allow_other would let any
        // local user read the disk whatever the modes say.
        fuser::MountOption::DefaultPermissions,
        // Not `ro` even for read-only mounts: `control` takes writes either
        // way; disk.raw refuses them itself (no write bits, EROFS).
    ];
    options.extend(mo.kernel.fuser_options());
    let mut acl = fuser::SessionACL::Owner;
    if mo.allow_other {
        acl = fuser::SessionACL::All;
    } else if mo.allow_root {
        acl = fuser::SessionACL::RootAndOwner;
    }
    options.push(fuser::MountOption::CUSTOM("max_read=1048576".into()));
    let mut config = fuser::Config::default();
    config.mount_options = options;
    config.acl = acl;
    config.n_threads = Some(mo.threads);
    config.clone_fd = true;

    // Block the stop signals in every thread; the main thread waits for them.
    let sigs = stop_signals();
    // SAFETY: `sigs` is an initialised sigset_t that outlives the call; a
    // null old-set pointer is allowed and means "do not report it".
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &sigs, std::ptr::null_mut()) };

    let watched = Arc::downgrade(&fs);
    let session =
        fuser::Session::new(crate::fuse::Fuse(fs), mnt, &config).ctx(mnt, "cannot mount", None)?;
    // Who we are at MNT (`own`): our super block's device number, unique
    // while our connection lives; also the name of our bdi.
    let ours = own::top_device(mnt);
    let mut perms_watch = crate::fuse::PermsWatch::new(watched, session.notifier());
    if let Some(dev) = &ours {
        raise_readahead(dev);
    }
    // The session runs on fuser's thread; `spawn` moves the mount out of
    // the session into `bg`, which is never dropped (`ManuallyDrop`): fuser
    // would unmount by path on dropping it, even after ours is gone (see
    // `own`). Unmounting is `own::unmount_if_ours`'s alone.
    let bg = std::mem::ManuallyDrop::new(session.spawn().ctx(mnt, "cannot start FUSE", None)?);
    tell(parent, "ok");
    if parent_was_waiting() {
        detach_stdio(mo.log.as_deref());
    }
    // Writes reach the leaf at once, but new blocks' tables wait for a
    // flush; like a file system's writeback, flush dirty state every few
    // seconds so a crash loses at most that much (fsync/close flush now).
    if mo.writable {
        let img = flush_image.clone();
        let ws = std::sync::Arc::downgrade(&img);
        drop(img);
        std::thread::spawn(move || {
            while let Some(img) = ws.upgrade() {
                if let Err(e) = img.flush() {
                    log::error!("periodic flush: {e}");
                }
                drop(img);
                std::thread::sleep(Duration::from_secs(5));
            }
        });
    }
    let unmount = || match &ours {
        Some(dev) => match own::unmount_if_ours(mnt, dev) {
            Ok(true) => {}
            Ok(false) => log::info!("{}: our mount is already gone", mnt.display()),
            Err(e) => log::warn!("unmount {}: {e}", mnt.display()),
        },
        None => log::warn!(
            "{}: not unmounting: our mount was not found in /proc/self/mountinfo",
            mnt.display()
        ),
    };
    loop {
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 200_000_000,
        };
        // SAFETY: `sigs` and `ts` are initialised and outlive the call; a
        // null siginfo pointer is allowed and means "do not report it".
        let sig = unsafe { libc::sigtimedwait(&sigs, std::ptr::null_mut(), &ts) };
        if sig > 0 {
            log::info!("signal {sig}: unmounting {}", mnt.display());
            unmount();
        }
        perms_watch.tick();
        if bg.guard.is_finished() {
            break;
        }
    }
    // A merge still running when the mount goes away is cancelled (its
    // chain stays consistent); wait for it to stop.
    while let Some(j) = jobs.running() {
        j.progress
            .cancel
            .store(true, std::sync::atomic::Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: `bg` is a ManuallyDrop that is neither used nor dropped after
    // this read, so the join handle read out of it has no other owner.
    let worker = unsafe { std::ptr::read(&bg.guard) };
    let result = match worker.join() {
        // The kernel ended the connection (unmounted, lazily unmounted and
        // then released, or aborted): the normal end, however the last
        // read reported it (fuser takes only ENODEV as the end; a read
        // after a lazy unmount was seen to fail with ECONNABORTED).
        Ok(Err(e)) if !own::connection_alive() => {
            log::info!("{}: the session ended: {e}", mnt.display());
            Ok(())
        }
        Ok(r) => r.ctx(mnt, "FUSE session", None),
        Err(_) => Err(Error::new(
            ErrorKind::Io,
            "the FUSE session thread panicked",
        )),
    };
    // A session that failed may leave our mount up with nobody serving it
    // (every access would hang): take it down, if it is still ours.
    if result.is_err() {
        unmount();
    }
    result
}

fn parent_was_waiting() -> bool {
    // A daemon child runs in its own session (setsid), the foreground not.
    // SAFETY: getsid(0) and getpid() only read ids of this process; no
    // pointers are involved.
    unsafe { libc::getsid(0) == libc::getpid() }
}

fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, for which all-zero bytes are a valid
    // value; sigemptyset() then initialises it as POSIX requires before
    // sigaddset(), and both only write through `&mut s`, a live local.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut s, sig);
        }
        s
    }
}

/// A daemon keeps no terminal: stdin/stdout to /dev/null, stderr (the log)
/// to `-o log=FILE` or /dev/null.
fn detach_stdio(log: Option<&Path>) {
    use std::os::fd::AsRawFd;
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..3 {
            // SAFETY: `null` is open for the whole call; dup2() makes 0, 1
            // and 2 copies of it, closing what they were. No `File` or
            // `OwnedFd` of ours is 0, 1 or 2 (std opens /dev/null on any of
            // them that is closed at start-up, so no later open gets one;
            // std's stdio uses them by number), so no owner is left with a
            // closed or reused descriptor.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
    if let Some(p) = log {
        if let Ok(f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
        {
            // SAFETY: as above: `f` is open for the call, and fd 2 is used
            // only by number, so replacing it breaks no owner.
            unsafe { libc::dup2(f.as_raw_fd(), 2) };
        }
    }
    let _ = std::env::set_current_dir("/");
}

/// The kernel offers FUSE only 128 KiB of readahead in INIT; the mount's
/// backing device info takes more (4 MiB here), which keeps several 1 MiB
/// requests in flight for a sequential reader. Best effort (needs root).
/// `dev`: our mount's `major:minor`, which names its bdi.
fn raise_readahead(dev: &str) {
    let p = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    if let Err(e) = std::fs::write(&p, "4096") {
        log::debug!("{p}: {e}");
    }
}

/// `chainfs umount`: unmount, then wait (briefly) until the daemon has let
/// go of the leaf, so the chain can be reopened at once.
pub fn umount(mnt: &Path) -> Result<()> {
    let c = canonical(mnt);
    let Some((_, fstype)) = top_mount(&c) else {
        return Err(Error::invalid(format!("{}: not mounted", mnt.display())));
    };
    if fstype != "fuse.chainfs" {
        return Err(Error::invalid(format!(
            "{}: not a chainfs mount (it is {fstype}); use umount",
            mnt.display()
        )));
    }
    let leaf = std::fs::read_to_string(mnt.join("chain"))
        .ok()
        .and_then(|t| {
            t.lines()
                .next()
                .and_then(|l| l.split('\t').nth(1))
                .map(PathBuf::from)
        });
    let out = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(mnt)
        .output();
    let ok = out.as_ref().is_ok_and(|o| o.status.success());
    if !ok {
        let st = std::process::Command::new("umount").arg(mnt).output();
        if !st.as_ref().is_ok_and(|o| o.status.success()) {
            let stderr =
                |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).trim().to_string();
            let why = [out.as_ref().ok(), st.as_ref().ok()]
                .into_iter()
                .flatten()
                .map(stderr)
                .find(|w| !w.is_empty())
                .unwrap_or_default();
            let disk = c.join("disk.raw");
            let hint = match loop_devices_over(&disk).first() {
                Some(dev) => format!(
                    " ({dev} still uses {}: detach it with `losetup -d {dev}`, \
                     after unmounting what is mounted from it)",
                    disk.display()
                ),
                None => String::new(),
            };
            return Err(Error::new(
                ErrorKind::Busy,
                format!("{}: cannot unmount: {why}{hint}", mnt.display()),
            ));
        }
    }
    if let Some(leaf) = leaf {
        wait_unlocked(&leaf, Duration::from_secs(5));
    }
    Ok(())
}

/// The loop devices (`/dev/loopN`) whose backing file is `file`.
fn loop_devices_over(file: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut devs: Vec<String> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            let backing = backing.trim_end_matches('\n');
            (Path::new(backing.trim_end_matches(" (deleted)")) == file)
                .then(|| format!("/dev/{name}"))
        })
        .collect();
    devs.sort();
    devs
}

fn wait_unlocked(path: &Path, limit: Duration) {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::File::open(path) else {
        return;
    };
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        // SAFETY: flock() on `f`'s descriptor, open while `f` lives (the
        // whole loop); no memory is involved.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            // SAFETY: as above, on the same open descriptor.
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
