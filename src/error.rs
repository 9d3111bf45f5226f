//! Errors: one crate error with a small kind plus context, and the one place
//! where a kind becomes an errno (for FUSE) or a Hyper-V style return code
//! (for the control file and the CLI exit status).
//!
//! Parsers of on-disk structures return [`FormatError`] (an offset inside the
//! structure and a message); the layer that read the bytes from a file wraps
//! it into [`Error`] with the file's path and the absolute offset, so every
//! message names the file, the offset and what is wrong.

use std::fmt;
use std::io;
use std::path::Path;

/// A problem found while parsing bytes that came from a file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at offset {offset:#x}: {msg}")]
pub struct FormatError {
    /// Offset relative to the start of the parsed structure.
    pub offset: u64,
    pub msg: String,
}

impl FormatError {
    pub fn new(offset: u64, msg: impl Into<String>) -> Self {
        FormatError {
            offset,
            msg: msg.into(),
        }
    }
}

/// What went wrong, in the few categories callers act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The operating system refused or failed an I/O call.
    Io,
    /// The file's bytes break the format's rules.
    Corrupt,
    /// A valid file that uses a feature chainfs does not handle.
    Unsupported,
    /// A named file (image, parent) does not exist or was not found.
    NotFound,
    /// A parent exists but does not carry the identity the child expects.
    IdMismatch,
    /// The chain links back to itself or is deeper than the cap.
    BadChain,
    /// Arguments that make no sense (bad size, bad path, not an ancestor).
    InvalidArgument,
    /// Another process or job holds the chain.
    Busy,
    /// The caller may not do this.
    AccessDenied,
    /// The image or mount is read-only.
    ReadOnly,
    /// A write past the end of a fixed-size disk.
    NoSpace,
    /// The state does not allow the operation (dependent disks, a merge to
    /// finish, a job that already ended).
    InvalidState,
}

/// The crate error: a kind, a message with its context, and the I/O cause.
#[derive(Debug)]
pub struct Error {
    pub kind: ErrorKind,
    msg: String,
    source: Option<io::Error>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Self {
        Error {
            kind,
            msg: msg.into(),
            source: None,
        }
    }

    /// An I/O failure on `path` at `offset` while doing `what`.
    pub fn io(path: &Path, what: &str, offset: Option<u64>, source: io::Error) -> Self {
        let kind = match source.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::PermissionDenied => ErrorKind::AccessDenied,
            _ => ErrorKind::Io,
        };
        let msg = match offset {
            Some(o) => format!("{}: {what} at offset {o:#x}", path.display()),
            None => format!("{}: {what}", path.display()),
        };
        Error {
            kind,
            msg,
            source: Some(source),
        }
    }

    /// A format violation in `path`; `base` is the absolute file offset of the
    /// structure the parser was looking at.
    pub fn format(path: &Path, base: u64, what: &str, e: FormatError) -> Self {
        Error::new(
            ErrorKind::Corrupt,
            format!(
                "{}: {what} at offset {:#x}: {}",
                path.display(),
                base.saturating_add(e.offset),
                e.msg
            ),
        )
    }

    pub fn corrupt(path: &Path, offset: u64, msg: impl fmt::Display) -> Self {
        Error::new(
            ErrorKind::Corrupt,
            format!("{}: at offset {offset:#x}: {msg}", path.display()),
        )
    }

    pub fn unsupported(path: &Path, msg: impl fmt::Display) -> Self {
        Error::new(ErrorKind::Unsupported, format!("{}: {msg}", path.display()))
    }

    /// An operating-system error number with no kind of its own (ENOTDIR,
    /// EISDIR, EBADF): [`Error::to_errno`] passes it through unchanged.
    pub fn os(errno: i32, msg: impl Into<String>) -> Self {
        Error {
            kind: ErrorKind::Io,
            msg: msg.into(),
            source: Some(io::Error::from_raw_os_error(errno)),
        }
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidArgument, msg)
    }

    pub fn message(&self) -> &str {
        &self.msg
    }

    /// The errno a FUSE reply carries for this error. The only mapping.
    pub fn to_errno(&self) -> i32 {
        match self.kind {
            ErrorKind::Io => self
                .source
                .as_ref()
                .and_then(|e| e.raw_os_error())
                .unwrap_or(libc::EIO),
            ErrorKind::Corrupt | ErrorKind::IdMismatch | ErrorKind::BadChain => libc::EIO,
            ErrorKind::Unsupported => libc::EOPNOTSUPP,
            ErrorKind::NotFound => libc::ENOENT,
            ErrorKind::InvalidArgument => libc::EINVAL,
            ErrorKind::Busy => libc::EBUSY,
            ErrorKind::AccessDenied => libc::EACCES,
            ErrorKind::ReadOnly => libc::EROFS,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::InvalidState => libc::EPERM,
        }
    }

    /// The `Msvm_ImageManagementService` style return value. The only mapping.
    pub fn return_code(&self) -> u32 {
        match self.kind {
            ErrorKind::Io | ErrorKind::Corrupt | ErrorKind::IdMismatch | ErrorKind::BadChain => {
                RC_FAILED
            }
            ErrorKind::Unsupported => RC_NOT_SUPPORTED,
            ErrorKind::NotFound => RC_FILE_NOT_FOUND,
            ErrorKind::InvalidArgument => RC_INVALID_PARAMETER,
            ErrorKind::Busy => RC_IN_USE,
            ErrorKind::AccessDenied => RC_ACCESS_DENIED,
            ErrorKind::ReadOnly | ErrorKind::InvalidState => RC_INVALID_STATE,
            ErrorKind::NoSpace => RC_INVALID_PARAMETER,
        }
    }

    /// The process exit status of the CLI for this error (see docs/CLI.md).
    pub fn exit_code(&self) -> i32 {
        match self.kind {
            ErrorKind::Io => 1,
            ErrorKind::Corrupt => 3,
            ErrorKind::NotFound => 4,
            ErrorKind::IdMismatch | ErrorKind::BadChain => 5,
            ErrorKind::Unsupported => 6,
            ErrorKind::Busy => 7,
            ErrorKind::AccessDenied => 8,
            ErrorKind::InvalidArgument | ErrorKind::NoSpace => 9,
            ErrorKind::ReadOnly | ErrorKind::InvalidState => 10,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)?;
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Attach a path to an `io::Result`.
pub trait IoContext<T> {
    fn ctx(self, path: &Path, what: &str, offset: Option<u64>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, path: &Path, what: &str, offset: Option<u64>) -> Result<T> {
        self.map_err(|e| Error::io(path, what, offset, e))
    }
}

// Hyper-V `Msvm_ImageManagementService` return values.
pub const RC_COMPLETED: u32 = 0;
pub const RC_JOB_STARTED: u32 = 4096;
pub const RC_FAILED: u32 = 32768;
pub const RC_ACCESS_DENIED: u32 = 32769;
pub const RC_NOT_SUPPORTED: u32 = 32770;
pub const RC_UNKNOWN: u32 = 32771;
pub const RC_TIMEOUT: u32 = 32772;
pub const RC_INVALID_PARAMETER: u32 = 32773;
pub const RC_IN_USE: u32 = 32774;
pub const RC_INVALID_STATE: u32 = 32775;
pub const RC_INCORRECT_TYPE: u32 = 32776;
pub const RC_NOT_AVAILABLE: u32 = 32777;
pub const RC_OUT_OF_MEMORY: u32 = 32778;
pub const RC_FILE_NOT_FOUND: u32 = 32779;
