//! Small wrappers over the file calls the drivers share: read-ahead advice
//! and hole punching.

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
