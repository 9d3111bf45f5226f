//! Small wrappers over the file calls the drivers share: read-ahead advice,
//! write-behind and hole punching.

use std::fs::File;

/// Ask the kernel to start reading `len` bytes of `file` at `off`.
pub fn will_need(file: &File, off: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: advice on a descriptor we own; no memory is involved.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            off as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_WILLNEED,
        )
    };
}

/// Start writing `file`'s dirty pages back to disk without waiting for
/// them (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so that a later
/// `fsync` finds little left to do.
pub fn write_behind(file: &File) {
    write_behind_range(file, 0, 0);
}

/// [`write_behind`] for the `len` bytes at `off` only (`len` 0: to the
/// end of the file).
pub fn write_behind_range(file: &File, off: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a writeback request on a descriptor we own; no memory is
    // involved.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            off as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

/// Deallocate `len` bytes of `file` at `off` (they read as zeros after).
pub fn punch_hole(file: &File, off: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on a descriptor we own; no memory is involved.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
