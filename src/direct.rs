//! Direct I/O: reading a layer's file around the page cache, into memory
//! that the disk can fill in few, large pieces.
//!
//! The mount's read-ahead (`crate::staging`) reads the next MiBs of a
//! sequential reader into its own memory. Through the page cache each
//! piece would land in pages allocated one by one, scattered in memory: a
//! 1 MiB read then becomes a request of up to 256 separate segments, and a
//! virtio disk without indirect descriptors (this machine's) holds only a
//! few such requests in its ring at once. With `O_DIRECT` into a buffer
//! backed by huge pages a 1 MiB read is one segment (see `crate::staging`
//! for the numbers).
//!
//! `chainfs export` reads and writes the same way (`crate::export`), for
//! the same reason.
//!
//! [`DirectFile`] reopens a file the process already has open (through
//! `/proc/self/fd`, so a layer renamed or retired since keeps its bytes)
//! with `O_DIRECT`, and reads or writes only what the file system's
//! alignment rules allow (`statx` `STATX_DIOALIGN`); everything else the
//! caller reads or writes the ordinary way. It also tells whether the page
//! cache holds a range already (`cachestat`), which a reader then takes
//! from memory instead. [`Buffer`] is an anonymous mapping aligned to, and
//! advised into, huge pages.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

/// A file reopened for direct reads or writes, with its alignment rules.
#[derive(Debug)]
pub struct DirectFile {
    file: File,
    /// Buffer addresses must be multiples of this.
    mem_align: usize,
    /// File offsets and lengths must be multiples of this.
    offset_align: u64,
}

impl DirectFile {
    /// `file` reopened with `O_DIRECT`; `None` where its file system takes
    /// no direct I/O or says nothing of its alignment (kernels before 6.1),
    /// or the reopen fails. Never an error: the caller reads the ordinary
    /// way then.
    pub fn open(file: &File) -> Option<DirectFile> {
        DirectFile::reopen(file, libc::O_RDONLY)
    }

    /// `file` reopened for direct writes (and nothing else), as
    /// [`open`](Self::open) does for reads. The reopen of a block device
    /// claims nothing: `file` holds whatever claim (`O_EXCL`) it took.
    pub fn open_write(file: &File) -> Option<DirectFile> {
        DirectFile::reopen(file, libc::O_WRONLY)
    }

    fn reopen(file: &File, access: libc::c_int) -> Option<DirectFile> {
        let (mem_align, offset_align) = dio_align(file)?;
        let path = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()?;
        // SAFETY: a NUL-terminated path; the descriptor returned is ours
        // alone and wrapped at once.
        let fd = unsafe { libc::open(path.as_ptr(), access | libc::O_DIRECT | libc::O_CLOEXEC) };
        if fd < 0 {
            log::debug!(
                "no direct reads of fd {}: {}",
                file.as_raw_fd(),
                std::io::Error::last_os_error()
            );
            return None;
        }
        // SAFETY: `fd` was just opened and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        Some(DirectFile {
            file,
            mem_align: mem_align as usize,
            offset_align: u64::from(offset_align),
        })
    }

    /// Can `buf` be read at `offset` directly?
    pub fn fits(&self, offset: u64, buf: &[u8]) -> bool {
        offset % self.offset_align == 0
            && buf.len() as u64 % self.offset_align == 0
            && (buf.as_ptr() as usize) % self.mem_align == 0
    }

    /// Read into `buf` at `offset` (which must [`fits`](Self::fits));
    /// returns the bytes read, short only at the end of the file.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                // A short direct read ends at the file's end; what follows
                // is no longer aligned, so the caller reads it.
                Ok(n) if n % self.offset_align as usize != 0 => return Ok(done + n),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// Does the page cache hold most of `[offset, offset + len)` already?
    /// Then a buffered read copies it from memory, where a direct read
    /// would fetch it from the disk again (and would first write back what
    /// is dirty there). `cachestat(2)` (Linux 6.5); where the kernel has
    /// none, `false`: the range is read directly.
    pub fn mostly_cached(&self, offset: u64, len: u64) -> bool {
        cached_bytes(&self.file, offset, len).is_some_and(|c| c * 2 >= len)
    }

    /// Write all of `buf` at `offset` (which must [`fits`](Self::fits)).
    /// A short write (the disk full part-way) is an error, so the caller
    /// can write the whole piece again the ordinary way, where the real
    /// error is reported.
    pub fn write(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.write_at(&buf[done..], offset + done as u64) {
                Ok(n) if n > 0 && n as u64 % self.offset_align == 0 => done += n,
                Ok(n) => {
                    return Err(std::io::Error::other(format!(
                        "a direct write of {} bytes wrote {n}",
                        buf.len() - done
                    )))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// `cachestat(2)`: the same number on every architecture (after 424 the
/// numbers were unified); the libc crate has no wrapper for it yet.
const SYS_CACHESTAT: libc::c_long = 451;

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Bytes of `file`'s `[offset, offset + len)` in the page cache, or `None`
/// if the kernel cannot say (before 6.5: `ENOSYS`).
fn cached_bytes(file: &File, offset: u64, len: u64) -> Option<u64> {
    if len == 0 {
        return Some(0);
    }
    let range = CachestatRange { off: offset, len };
    let mut st = Cachestat::default();
    // SAFETY: both pointers are to live values of the layout the kernel
    // reads and writes (include/uapi/linux/mman.h); flags must be 0.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const CachestatRange,
            &mut st as *mut Cachestat,
            0u32,
        )
    };
    // Pages are the kernel's unit; the range's ends may cut its first and
    // last page, so the count can exceed `len` by a little.
    (r == 0).then(|| (st.nr_cache * page_size()).min(len))
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// `(memory, offset)` alignment of direct I/O on `file`, if it takes any.
fn dio_align(file: &File) -> Option<(u32, u32)> {
    // SAFETY: an all-zero `statx` is a valid value for the kernel to fill.
    let mut sx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `sx` is a valid, writable statx; the empty path with
    // AT_EMPTY_PATH names the descriptor itself.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut sx,
        )
    };
    if r != 0 || sx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    let (m, o) = (sx.stx_dio_mem_align, sx.stx_dio_offset_align);
    (m.is_power_of_two() && o.is_power_of_two()).then_some((m, o))
}

/// Huge pages, the unit [`Buffer`] is aligned to.
const HUGE: usize = 2 << 20;

/// Anonymous memory aligned to huge pages (2 MiB) and advised into them
/// (`MADV_HUGEPAGE`; where the kernel has none, ordinary pages). Private
/// to this process, unmapped on drop.
#[derive(Debug)]
pub struct Buffer {
    /// The mapping as made (unaligned), for `munmap`.
    map: *mut libc::c_void,
    map_len: usize,
    /// The aligned start and the usable length.
    start: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; handing it to
// another thread moves nothing the thread could not own. Access to its
// bytes goes through the raw pointer, whose users synchronise themselves.
unsafe impl Send for Buffer {}
// SAFETY: as for `Send`: `&Buffer` only exposes the pointer and length.
unsafe impl Sync for Buffer {}

impl Buffer {
    /// `len` bytes (rounded up to whole huge pages); `None` if the mapping
    /// fails.
    pub fn new(len: usize) -> Option<Buffer> {
        let len = len.checked_next_multiple_of(HUGE)?;
        let map_len = len.checked_add(HUGE)?;
        // SAFETY: a fresh private anonymous mapping; no address given.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            log::debug!("staging buffer: {}", std::io::Error::last_os_error());
            return None;
        }
        let pad = (map as usize).next_multiple_of(HUGE) - map as usize;
        // SAFETY: `pad < HUGE`, so `start..start + len` lies inside the
        // mapping of `len + HUGE` bytes.
        let start = unsafe { (map as *mut u8).add(pad) };
        // SAFETY: advice on memory we mapped; failure only loses speed.
        unsafe { libc::madvise(start.cast(), len, libc::MADV_HUGEPAGE) };
        Some(Buffer {
            map,
            map_len,
            start,
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole buffer, for its one owner.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `start..start + len` is mapped, readable and writable
        // while `self` lives, and `&mut self` excludes every other access.
        unsafe { std::slice::from_raw_parts_mut(self.start, self.len) }
    }

    /// The first byte. Valid for [`len`](Self::len) bytes while `self`
    /// lives; who reads or writes through it must keep accesses apart.
    pub fn as_ptr(&self) -> *mut u8 {
        self.start
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping `new` made; nothing refers to it any
        // more (the owner is being dropped).
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn direct_reads_return_the_files_bytes_and_stop_at_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..(3 << 20) + 4096).map(|i| (i % 251) as u8).collect();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&data)
            .unwrap();
        let f = File::open(&path).unwrap();
        let Some(d) = DirectFile::open(&f) else {
            // CI's work dir is ext4, which takes direct I/O.
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(!ci, "no direct I/O on {}", dir.path().display());
            eprintln!("skipped: no direct I/O on {}", dir.path().display());
            return;
        };
        let buf = Buffer::new(4 << 20).unwrap();
        // SAFETY: the test owns the buffer and nothing else touches it.
        let mem = unsafe { std::slice::from_raw_parts_mut(buf.as_ptr(), buf.len()) };
        assert!(d.fits(1 << 20, &mem[..1 << 20]));
        assert_eq!(d.read(1 << 20, &mut mem[..1 << 20]).unwrap(), 1 << 20);
        assert_eq!(&mem[..1 << 20], &data[1 << 20..2 << 20]);
        // Past the end: short.
        let n = d.read(3 << 20, &mut mem[..1 << 20]).unwrap();
        assert_eq!(n, 4096);
        assert_eq!(&mem[..4096], &data[3 << 20..]);
        // Misaligned: refused, the caller reads it the ordinary way.
        assert!(!d.fits(1, &mem[..4096]));
        assert!(!d.fits(0, &mem[1..4097]));
    }

    #[test]
    fn direct_writes_land_and_the_page_cache_is_asked_what_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        f.set_len(4 << 20).unwrap();
        let Some(d) = DirectFile::open_write(&f) else {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(!ci, "no direct I/O on {}", dir.path().display());
            eprintln!("skipped: no direct I/O on {}", dir.path().display());
            return;
        };
        let mut buf = Buffer::new(2 << 20).unwrap();
        let mem = buf.as_mut_slice();
        for (i, b) in mem.iter_mut().enumerate() {
            *b = (i % 253) as u8;
        }
        assert!(d.fits(1 << 20, &mem[..1 << 20]));
        d.write(1 << 20, &mem[..1 << 20]).unwrap();
        // Written around the page cache: nothing of it is cached, and
        // `cached_bytes` says so (this kernel has cachestat, 6.5+).
        let Some(before) = cached_bytes(&f, 1 << 20, 1 << 20) else {
            eprintln!("skipped: no cachestat");
            return;
        };
        assert_eq!(before, 0);
        assert!(!d.mostly_cached(1 << 20, 1 << 20));
        let mut back = vec![0u8; 1 << 20];
        f.read_exact_at(&mut back, 1 << 20).unwrap();
        assert_eq!(&back[..], &mem[..1 << 20]);
        // Read the ordinary way, it is cached now.
        assert_eq!(cached_bytes(&f, 1 << 20, 1 << 20), Some(1 << 20));
        assert!(d.mostly_cached(1 << 20, 1 << 20));
        assert!(!d.mostly_cached(2 << 20, 1 << 20));
    }
}
