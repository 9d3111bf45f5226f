//! What OUTPUT of `chainfs export` is, decided once before anything is
//! opened for writing. Each kind has its own write strategy (in
//! `export/mod.rs`); the one rule they share is that nothing but a regular
//! file is ever unlinked or renamed over.
//!
//! ```text
//!   OUTPUT                          target          written how                 needs
//!   ─────────────────────────────── ─────────────── ─────────────────────────── ───────
//!   absent                          NewFile         temp file, linked in place  -
//!   regular file                    ReplaceFile     temp file, renamed over it  --force
//!   block device                    BlockDevice     in place, BLKZEROOUT zeros  --force
//!   FIFO, `-`, /dev/stdout          Stream          in order, zeros included    -
//!   /dev/null                       Null            read, written nowhere       -
//!   other character device, folder,
//!   socket                          refused
//! ```
//!
//! A symlink is followed and its target classified by these rules (the
//! link itself stays). A dangling symlink is followed as far as it goes and
//! the file it names is created, provided that file's folder exists (like
//! `cp` and shell redirection do); otherwise it is refused.

use std::io::IsTerminal;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::paths::folder_of;

/// Where an export writes, and so how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Nothing is there yet (possibly the far end of a dangling symlink).
    NewFile(PathBuf),
    /// An existing regular file, the symlink's target if OUTPUT is a link.
    ReplaceFile(PathBuf),
    /// A block device, written in place: never truncated nor replaced.
    BlockDevice(PathBuf),
    /// A FIFO (opened by its path).
    Fifo(PathBuf),
    /// Standard output (`-`, or a path that is standard output).
    Stdout,
    /// `/dev/null` (or another node of that device).
    Null(PathBuf),
}

impl Target {
    /// The name `--json` reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::NewFile(_) => "new_file",
            Target::ReplaceFile(_) => "replaced_file",
            Target::BlockDevice(_) => "block_device",
            Target::Fifo(_) => "fifo",
            Target::Stdout => "stdout",
            Target::Null(_) => "null",
        }
    }
}

/// Symlinks followed at most (the kernel's own limit is 40).
const MAX_LINKS: usize = 40;

/// Classify `out`; `force` allows overwriting a file or a disk.
pub fn classify(out: &Path, force: bool) -> Result<Target> {
    if out == Path::new("-") {
        return stdout();
    }
    let lmd = match std::fs::symlink_metadata(out) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Target::NewFile(out.to_path_buf()))
        }
        Err(e) => return Err(Error::io(out, "cannot stat", None, e)),
    };
    let (md, path) = if lmd.file_type().is_symlink() {
        match std::fs::metadata(out) {
            // /dev/stdout, /dev/fd/1, /proc/self/fd/1: the same open file
            // as our standard output, whatever that is.
            Ok(md) if is_stdout(&md) => return stdout(),
            // A regular file is replaced at its real path, so the rename
            // keeps the link. Devices and FIFOs are opened through the
            // link, which the kernel follows (also /proc magic links).
            Ok(md) => (md, std::fs::canonicalize(out).unwrap_or(out.to_path_buf())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Target::NewFile(dangling_end(out)?));
            }
            Err(e) => return Err(Error::io(out, "cannot follow the symlink", None, e)),
        }
    } else {
        (lmd, out.to_path_buf())
    };
    let ft = md.file_type();
    if ft.is_file() {
        if !force {
            return Err(Error::invalid(format!(
                "{}: exists (add --force to replace it)",
                out.display()
            )));
        }
        Ok(Target::ReplaceFile(path))
    } else if ft.is_block_device() {
        if !force {
            return Err(Error::invalid(format!(
                "{}: a block device; export writes the image over the whole disk and \
                 destroys what it holds (add --force to do it)",
                out.display()
            )));
        }
        Ok(Target::BlockDevice(out.to_path_buf()))
    } else if ft.is_fifo() {
        Ok(Target::Fifo(out.to_path_buf()))
    } else if ft.is_char_device() && md.rdev() == libc::makedev(1, 3) {
        Ok(Target::Null(out.to_path_buf()))
    } else {
        let what = if ft.is_char_device() {
            "a character device"
        } else if ft.is_dir() {
            "a folder"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a file"
        };
        Err(Error::invalid(format!(
            "{}: {what}; export writes to a new or existing regular file (--force), \
             a block device (--force), a pipe, `-` (standard output) or /dev/null",
            out.display()
        )))
    }
}

fn stdout() -> Result<Target> {
    if std::io::stdout().is_terminal() {
        return Err(Error::invalid(
            "standard output is a terminal; redirect it to a file or a pipe, or name OUTPUT",
        ));
    }
    Ok(Target::Stdout)
}

fn is_stdout(md: &std::fs::Metadata) -> bool {
    use std::os::fd::AsFd;
    let Ok(fd) = std::io::stdout().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(s) = std::fs::File::from(fd).metadata() else {
        return false;
    };
    (s.dev(), s.ino()) == (md.dev(), md.ino())
}

/// The path a dangling symlink finally names, if its folder exists.
fn dangling_end(out: &Path) -> Result<PathBuf> {
    let mut p = out.to_path_buf();
    for _ in 0..MAX_LINKS {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let to = std::fs::read_link(&p).ctx(&p, "cannot read the symlink", None)?;
                p = folder_of(&p).join(to);
            }
            Ok(_) => {
                // It appeared since we looked: classify again rather than guess.
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("{}: changed while export looked at it", out.display()),
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !folder_of(&p).is_dir() {
                    return Err(Error::new(
                        ErrorKind::NotFound,
                        format!(
                            "{}: a symlink to {}, whose folder does not exist",
                            out.display(),
                            p.display()
                        ),
                    ));
                }
                return Ok(p);
            }
            Err(e) => return Err(Error::io(&p, "cannot stat", None, e)),
        }
    }
    Err(Error::invalid(format!(
        "{}: more than {MAX_LINKS} symlinks",
        out.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_folders_links_and_null() {
        let d = tempfile::tempdir().unwrap();
        let p = |n: &str| d.path().join(n);
        assert_eq!(
            classify(&p("new"), false).unwrap(),
            Target::NewFile(p("new"))
        );
        std::fs::write(p("old"), b"x").unwrap();
        let e = classify(&p("old"), false).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("--force"), "{e}");
        assert_eq!(
            classify(&p("old"), true).unwrap(),
            Target::ReplaceFile(std::fs::canonicalize(p("old")).unwrap())
        );
        let e = classify(d.path(), true).unwrap_err();
        assert!(e.to_string().contains("a folder"), "{e}");
        // A link to a file is replaced at the file's real path.
        std::os::unix::fs::symlink("old", p("to-old")).unwrap();
        assert_eq!(
            classify(&p("to-old"), true).unwrap(),
            Target::ReplaceFile(std::fs::canonicalize(p("old")).unwrap())
        );
        // A chain of dangling links ends at the file to create.
        std::os::unix::fs::symlink("l2", p("l1")).unwrap();
        std::os::unix::fs::symlink("made", p("l2")).unwrap();
        assert_eq!(
            classify(&p("l1"), false).unwrap(),
            Target::NewFile(p("made"))
        );
        // A loop of links is refused, not followed forever.
        std::os::unix::fs::symlink("loop-b", p("loop-a")).unwrap();
        std::os::unix::fs::symlink("loop-a", p("loop-b")).unwrap();
        assert!(classify(&p("loop-a"), true).is_err());
        assert_eq!(
            classify(Path::new("/dev/null"), false).unwrap(),
            Target::Null("/dev/null".into())
        );
    }
}
