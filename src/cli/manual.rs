//! Man pages and shell completions, generated from the clap definition in
//! `cli.rs`, so they never drift from `--help`.
//!
//! `chainfs manpages DIR` writes `chainfs.1` and one `chainfs-COMMAND.1` per
//! command: clap_mangen renders NAME, SYNOPSIS, DESCRIPTION and OPTIONS;
//! the sections clap has no slot for (EXIT STATUS, ENVIRONMENT, FILES,
//! EXAMPLES, SEE ALSO) are written here as plain roff. `chainfs completions
//! SHELL` prints a completion script (clap_complete).

use std::io::Write;
use std::path::{Path, PathBuf};

use chainfs::error::{IoContext, Result};

/// Exit statuses, as `chainfs::error::Error::exit_code` maps error kinds.
const EXIT_STATUS: &[(&str, &str)] = &[
    ("0", "Success."),
    ("1", "I/O error."),
    ("2", "Usage error (unknown option, missing argument)."),
    (
        "3",
        "Corrupt image; `check` found problems; `merge --status` found an interrupted merge.",
    ),
    ("4", "File or parent not found."),
    (
        "5",
        "Broken chain: a parent's unique id differs, a loop, too deep, sizes differ.",
    ),
    ("6", "Unsupported image or feature."),
    (
        "7",
        "In use: another process holds the layer, or the mount point is busy.",
    ),
    ("8", "Access denied."),
    ("9", "Invalid argument (including no space left)."),
    (
        "10",
        "Invalid state: read-only, other disks depend on the layer, a merge to finish.",
    ),
];

const ENVIRONMENT: &[(&str, &str)] = &[(
    "RUST_LOG",
    "Log level on standard error: error, warn (default), info, debug or trace; \
     debug traces which parents are opened and why. A background mount daemon \
     writes its log to the file given by -o log=FILE.",
)];

const FILES: &[(&str, &str)] = &[
    (
        "MOUNTPOINT/disk.raw",
        "The flattened chain, one raw disk image.",
    ),
    (
        "MOUNTPOINT/chain",
        "The layers of the mounted chain, leaf first.",
    ),
    (
        "MOUNTPOINT/control",
        "Write a command (merge SOURCE DESTINATION, cancel JOB, help); read the reply.",
    ),
    (
        "MOUNTPOINT/jobs/",
        "One file per merge job started through control.",
    ),
    (
        "/etc/fstab",
        "Lines of type fuse.chainfs mount a chain with mount(8); see chainfs-mount(1).",
    ),
];

/// `(command, [(what, shell line)])`; the root page uses "chainfs".
const EXAMPLES: &[(&str, &[(&str, &str)])] = &[
    (
        "chainfs",
        &[
            (
                "Make a base disk and a child, write into the child, look at the chain:",
                "chainfs create base.vhdx --size 10G\n\
                 chainfs create leaf.vhdx --parent base.vhdx\n\
                 chainfs write leaf.vhdx --offset 1M --input data.bin\n\
                 chainfs info leaf.vhdx",
            ),
            (
                "Mount the chain read-only, copy the flat disk out, unmount:",
                "chainfs mount leaf.vhdx /mnt/chain\n\
                 cp --sparse=always /mnt/chain/disk.raw /tmp/disk.raw\n\
                 chainfs umount /mnt/chain",
            ),
            (
                "Merge the leaf into its parent:",
                "chainfs merge leaf.vhdx base.vhdx",
            ),
        ],
    ),
    (
        "mount",
        &[
            (
                "Mount read-only, readable by every user:",
                "chainfs mount /vms/leaf.vhdx /mnt/chain -o allow_other",
            ),
            (
                "The same through mount(8) (mount.fuse3 runs chainfs, found on the default PATH):",
                "mount -t fuse.chainfs /vms/leaf.vhdx /mnt/chain -o ro,allow_other",
            ),
            (
                "An /etc/fstab line, mounted on first access by systemd:",
                "/vms/leaf.vhdx /mnt/chain fuse.chainfs ro,allow_other,noauto,nofail,x-systemd.automount 0 0",
            ),
            (
                "Writable, with a log file for the background daemon:",
                "RUST_LOG=info chainfs mount leaf.vhdx /mnt/chain -o rw,log=/var/log/chainfs.log",
            ),
        ],
    ),
    (
        "export",
        &[
            (
                "Write the flattened chain to a sparse raw file:",
                "chainfs export leaf.vhdx disk.raw",
            ),
            (
                "Convert a Hyper-V checkpoint chain into one standalone VHD (the extension names the format):",
                "chainfs export vm_1234.avhdx vm.vhd",
            ),
        ],
    ),
    (
        "check",
        &[(
            "Check a chain; exit status 3 lists one problem per line:",
            "chainfs check leaf.vhdx || echo damaged",
        )],
    ),
    (
        "completions",
        &[(
            "Install bash completions for the current user:",
            "chainfs completions bash > ~/.local/share/bash-completion/completions/chainfs",
        )],
    ),
    (
        "manpages",
        &[(
            "Write the man pages and read one:",
            "chainfs manpages /tmp/man && man -l /tmp/man/chainfs-mount.1",
        )],
    ),
];

/// Write `chainfs.1` and `chainfs-COMMAND.1` into `dir`; returns the files.
pub fn write_manpages(cmd: clap::Command, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).ctx(dir, "cannot create folder", None)?;
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut pages = vec![(cmd.clone(), "chainfs".to_string())];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        pages.push((sub.clone(), sub.get_name().to_string()));
    }
    let mut written = Vec::new();
    for (page, name) in pages {
        let is_root = name == "chainfs";
        let man = clap_mangen::Man::new(page.clone())
            .date("")
            .source(format!("chainfs {}", env!("CARGO_PKG_VERSION")));
        let path = dir.join(man.get_filename());
        let mut out = Vec::new();
        render(&man, &page, &name, is_root, &cmd, &mut out).ctx(&path, "cannot render", None)?;
        std::fs::write(&path, out).ctx(&path, "cannot write", None)?;
        written.push(path);
    }
    Ok(written)
}

fn render(
    man: &clap_mangen::Man,
    page: &clap::Command,
    name: &str,
    is_root: bool,
    root: &clap::Command,
    w: &mut Vec<u8>,
) -> std::io::Result<()> {
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    if page.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(w)?;
    }
    if page.has_subcommands() {
        man.render_subcommands_section(w)?;
    }
    if is_root {
        list(w, "EXIT STATUS", EXIT_STATUS)?;
        list(w, "ENVIRONMENT", ENVIRONMENT)?;
        list(w, "FILES", FILES)?;
    } else {
        writeln!(
            w,
            ".SH \"EXIT STATUS\"\n0 on success; otherwise the status chainfs(1) lists \
             (2 usage error, 3 corrupt, 4 not found, ...)."
        )?;
        list(w, "ENVIRONMENT", ENVIRONMENT)?;
    }
    if let Some((_, examples)) = EXAMPLES.iter().find(|(c, _)| *c == name) {
        writeln!(w, ".SH EXAMPLES")?;
        for (what, lines) in examples.iter() {
            writeln!(w, ".PP\n{}\n.PP\n.RS 4\n.nf", text(what))?;
            for l in lines.lines() {
                writeln!(w, "{}", text(l.trim_start()))?;
            }
            writeln!(w, ".fi\n.RE")?;
        }
    }
    writeln!(w, ".SH \"SEE ALSO\"")?;
    let mut see: Vec<String> = if is_root {
        root.get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(|s| format!("\\fBchainfs\\-{}\\fR(1)", text(s.get_name())))
            .collect()
    } else {
        vec!["\\fBchainfs\\fR(1)".into()]
    };
    if name == "mount" || is_root {
        see.extend(
            [
                "\\fBmount\\fR(8)",
                "\\fBfstab\\fR(5)",
                "\\fBmount.fuse3\\fR(8)",
            ]
            .map(String::from),
        );
    }
    writeln!(w, "{}", see.join(", "))?;
    // Only the root command carries the version (clap_mangen unwraps it).
    if page.get_version().is_some() {
        man.render_version_section(w)?;
    }
    Ok(())
}

fn list(w: &mut Vec<u8>, title: &str, items: &[(&str, &str)]) -> std::io::Result<()> {
    if title.contains(' ') {
        writeln!(w, ".SH \"{title}\"")?;
    } else {
        writeln!(w, ".SH {title}")?;
    }
    for (k, v) in items {
        writeln!(w, ".TP\n\\fB{}\\fR\n{}", text(k), text(v))?;
    }
    Ok(())
}

/// Plain text as roff: backslashes and hyphens escaped, no line taken for
/// a request.
fn text(s: &str) -> String {
    let t = s.replace('\\', "\\e").replace('-', "\\-");
    if t.starts_with('.') || t.starts_with('\'') {
        format!("\\&{t}")
    } else {
        t
    }
}

/// Print the completion script for `shell` on standard output.
pub fn completions(mut cmd: clap::Command, shell: clap_complete::Shell) {
    clap_complete::generate(shell, &mut cmd, "chainfs", &mut std::io::stdout());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roff_text_escapes() {
        assert_eq!(text(".hidden -o a\\b"), "\\&.hidden \\-o a\\eb");
    }

    #[test]
    fn every_exit_code_is_documented() {
        use chainfs::error::{Error, ErrorKind};
        for k in [
            ErrorKind::Io,
            ErrorKind::Corrupt,
            ErrorKind::NotFound,
            ErrorKind::BadChain,
            ErrorKind::Unsupported,
            ErrorKind::Busy,
            ErrorKind::AccessDenied,
            ErrorKind::InvalidArgument,
            ErrorKind::InvalidState,
        ] {
            let c = Error::new(k, "").exit_code().to_string();
            assert!(EXIT_STATUS.iter().any(|(n, _)| *n == c), "{k:?} -> {c}");
        }
    }
}
