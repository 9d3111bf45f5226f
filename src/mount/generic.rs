//! The generic `mount(8)` options, as they reach a helper from `mount -t
//! fuse.chainfs` or an `/etc/fstab` line, kept apart from chainfs's own
//! options (`MountOptions::parse`).
//!
//! Two kinds. Options for `mount(8)`, `systemd` or the fstab reader, which
//! mean nothing to a file system (`noauto`, `nofail`, `_netdev`, `x-*`,
//! `comment=`, ...): accepted and ignored, so a line that works for other
//! file systems works here. Per-mount kernel flags (`dev`, `suid`, `exec`,
//! `atime` and their `no` forms): passed to the kernel with the FUSE mount.
//! chainfs defaults to `nodev,nosuid` whoever mounts (its files are plain
//! files, so those flags only harden); `mount.fuse3` run by root adds
//! `dev,suid` unless the line says otherwise, which is what `mount(8)`
//! documents for root.
//!
//! `defaults` is accepted as a no-op rather than as `rw,suid,dev,exec`:
//! `mount(8)` resolves it before calling a helper, and a placeholder in
//! an fstab line must not make a disk chain writable.

/// Kernel flags for the FUSE mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelFlags {
    pub dev: bool,
    pub suid: bool,
    pub exec: bool,
    pub atime: bool,
}

impl Default for KernelFlags {
    fn default() -> Self {
        KernelFlags {
            dev: false,
            suid: false,
            exec: true,
            atime: true,
        }
    }
}

/// Options for mount(8), systemd and fstab readers; nothing for chainfs.
const IGNORED: &[&str] = &[
    "defaults", "auto", "noauto", "nofail", "_netdev", "nouser", "owner", "group",
];

impl KernelFlags {
    /// Take `item` if it is a generic mount(8) option; `false` leaves it to
    /// chainfs's own options.
    pub fn accept(&mut self, item: &str) -> bool {
        match item {
            "dev" => self.dev = true,
            "nodev" => self.dev = false,
            "suid" => self.suid = true,
            "nosuid" => self.suid = false,
            "exec" => self.exec = true,
            "noexec" => self.exec = false,
            "atime" => self.atime = true,
            "noatime" => self.atime = false,
            // mount(8): "user ... implies noexec, nosuid, and nodev (unless
            // overridden by subsequent options)"; likewise `users`.
            "user" | "users" => {
                self.dev = false;
                self.suid = false;
                self.exec = false;
            }
            _ if IGNORED.contains(&item)
                || item.starts_with("x-")
                || item.starts_with("comment=")
                || item.starts_with("user=") => {}
            _ => return false,
        }
        true
    }

    /// The flags as fuser mount options.
    pub fn fuser_options(&self) -> Vec<fuser::MountOption> {
        use fuser::MountOption as M;
        vec![
            if self.dev { M::Dev } else { M::NoDev },
            if self.suid { M::Suid } else { M::NoSuid },
            if self.exec { M::Exec } else { M::NoExec },
            if self.atime { M::Atime } else { M::NoAtime },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fstab_and_mount8_options_are_accepted() {
        let mut f = KernelFlags::default();
        for o in [
            "defaults",
            "noauto",
            "auto",
            "nofail",
            "_netdev",
            "x-systemd.automount",
            "x-systemd.idle-timeout=60",
            "comment=systemd.automount",
            "nouser",
        ] {
            assert!(f.accept(o), "{o}");
        }
        assert_eq!(f, KernelFlags::default(), "none of them changes a flag");
        assert!(!f.accept("rw") && !f.accept("cache=64M") && !f.accept("bogus"));
    }

    #[test]
    fn kernel_flags_follow_the_last_word_and_user_implies_the_no_forms() {
        let mut f = KernelFlags::default();
        for o in ["dev", "suid", "noexec", "noatime"] {
            assert!(f.accept(o));
        }
        assert_eq!(
            f,
            KernelFlags {
                dev: true,
                suid: true,
                exec: false,
                atime: false
            }
        );
        for o in ["users", "exec"] {
            assert!(f.accept(o));
        }
        assert_eq!((f.dev, f.suid, f.exec), (false, false, true));
    }
}
