//! The lookups behind `map()`: L1 entry, L2 slice (through the shared
//! metadata cache), entry decode, and the decoding of compressed clusters.
//!
//! `map()` answers for one unit (a cluster, or a subcluster with extended
//! L2) and extends the run over following units of the same kind (data
//! only where the host offsets continue), so a large read or an export of
//! a contiguous image costs one extent per run, not per cluster. An L1
//! entry of 0 answers for the whole L2 table's span at once. Compressed
//! clusters are never joined: each is decoded on its own.

use std::io::ErrorKind as IoKind;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use crate::cache::Key;
use crate::error::{Error, IoContext, Result};
use crate::format::Extent;

use super::{Cluster, Compression, ExtendedL2Entry, L1Entry, Qcow2Layer, Subcluster};

/// Bytes of an L2 table read (and cached) at once.
const SLICE_BYTES: u64 = 4096;

/// What one unit at a guest offset is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unit {
    /// Stored at this host offset (of the guest offset asked for).
    Data(u64),
    Zero,
    /// Not in this layer (the backing file, or zeros without one).
    Unallocated,
    /// In a compressed cluster.
    Compressed,
}

impl Qcow2Layer {
    pub(super) fn slice_bytes(&self) -> u64 {
        self.layout.cluster_size().min(SLICE_BYTES)
    }

    /// The L1 entry for L1 index `i` (in range: the caller's offset is
    /// below the virtual size).
    pub(super) fn l1_entry(&self, i: u64) -> Result<L1Entry> {
        let raw = self.l1.read()[i as usize];
        let at = self.header.read().l1_table_offset + i * 8;
        L1Entry::decode(raw, at, &self.layout).map_err(|e| super::in_file(e, &self.path))
    }

    /// The cache key of the L2 slice at file offset `at`: keyed by place,
    /// so a table a writer moves (copy on write, a new table) never meets
    /// a stale slice (a writer only appends: a place is never reused while
    /// the layer is open).
    pub(super) fn slice_key(&self, at: u64) -> Key {
        Key::detail(self.key, at / self.slice_bytes())
    }

    /// The raw L2 entry words (second word 0 without extended L2) for L2
    /// index `l2i` of the table at `l2_offset`, and its file offset.
    pub(super) fn l2_words(&self, l1i: u64, l2_offset: u64, l2i: u64) -> Result<(u64, u64, u64)> {
        let es = self.layout.l2_entry_size();
        let sb = self.slice_bytes();
        let byte = l2i * es;
        let s = byte / sb;
        let slice_at = l2_offset + s * sb;
        // A waiting entry first, then the cache: a flush writes the entry
        // and refreshes the cached slice before it forgets the waiting one.
        if let Some((a, b)) = self.pending.entry(l2_offset + byte) {
            return Ok((a, b, l2_offset + byte));
        }
        let buf = self
            .cache
            .get_or_load(self.slice_key(slice_at), &self.meta, || {
                let mut b = vec![0u8; sb as usize];
                self.file.read_exact_at(&mut b, slice_at).map_err(|e| {
                    if e.kind() == IoKind::UnexpectedEof {
                        Error::corrupt(
                            &self.path,
                            slice_at,
                            format!(
                                "the L2 table at {l2_offset:#x} (L1 entry {l1i}) runs past the end of the file"
                            ),
                        )
                    } else {
                        Error::io(&self.path, "cannot read an L2 table", Some(slice_at), e)
                    }
                })?;
                Ok(b)
            })?;
        let i = (byte % sb) as usize;
        let w = |o: usize| u64::from_be_bytes(buf[o..o + 8].try_into().expect("8 bytes"));
        let second = if es == 16 { w(i + 8) } else { 0 };
        Ok((w(i), second, slice_at + (byte % sb)))
    }

    /// The cluster-level entry for guest offset `at` (`None`: no L2 table).
    pub(super) fn entry(&self, at: u64) -> Result<Option<ExtendedL2Entry>> {
        let (l1i, l2i) = self.layout.indices(at);
        let l1 = self.l1_entry(l1i)?;
        if l1.l2_offset == 0 {
            return Ok(None);
        }
        let (a, b, file_at) = self.l2_words(l1i, l1.l2_offset, l2i)?;
        let fix = |e| super::in_file(e, &self.path);
        Ok(Some(if self.layout.extended_l2 {
            ExtendedL2Entry::decode(a, b, file_at, &self.layout).map_err(fix)?
        } else {
            ExtendedL2Entry {
                cluster: Cluster::decode(a, file_at, &self.layout).map_err(fix)?,
                allocated: 0,
                zero: 0,
            }
        }))
    }

    /// The unit at guest offset `at` and the bytes from `at` to its end.
    pub(super) fn unit(&self, at: u64) -> Result<(Unit, u64)> {
        let l = &self.layout;
        let cs = l.cluster_size();
        let Some(e) = self.entry(at)? else {
            let span = l.l2_coverage();
            return Ok((Unit::Unallocated, span - at % span));
        };
        let in_c = at % cs;
        if l.extended_l2 {
            let sc = l.subcluster_size();
            let i = (in_c / sc) as u32;
            let rest = sc - in_c % sc;
            return Ok(match e.subcluster(i, l) {
                Subcluster::Compressed => (Unit::Compressed, cs - in_c),
                Subcluster::Zero => (Unit::Zero, rest),
                Subcluster::Unallocated => (Unit::Unallocated, rest),
                Subcluster::Data { host_offset } => (Unit::Data(host_offset + in_c % sc), rest),
            });
        }
        let rest = cs - in_c;
        Ok(match e.cluster {
            Cluster::Unallocated => (Unit::Unallocated, rest),
            Cluster::Zero { .. } => (Unit::Zero, rest),
            Cluster::Data { host_offset, .. } => (Unit::Data(host_offset + in_c), rest),
            Cluster::Compressed { .. } => (Unit::Compressed, rest),
        })
    }

    pub(super) fn map_impl(&self, offset: u64, len: u64) -> Result<Extent> {
        let size = self.header.read().size;
        if offset >= size {
            return Ok(Extent::Zero { len });
        }
        let len = len.min(size - offset);
        if len == 0 {
            return Ok(Extent::Zero { len: 0 });
        }
        let (first, n) = self.unit(offset)?;
        let mut run = n.min(len);
        if first != Unit::Compressed {
            while run < len {
                let (u, n) = self.unit(offset + run)?;
                let same = match (first, u) {
                    (Unit::Data(h0), Unit::Data(h)) => h == h0 + run,
                    (Unit::Compressed, _) => false,
                    (a, b) => a == b,
                };
                if !same {
                    break;
                }
                run = (run + n).min(len);
            }
        }
        Ok(match first {
            // Data past the end of the data's file reads as zeros, as in
            // qemu (`check` reports a cluster that starts there).
            Unit::Data(h) => match self.data_end.load(std::sync::atomic::Ordering::Acquire) {
                end if h >= end => Extent::Zero { len: run },
                end => Extent::Data {
                    file_offset: h,
                    len: run.min(end - h),
                },
            },
            Unit::Zero => Extent::Zero { len: run },
            Unit::Unallocated if self.parent.read().is_some() => Extent::Parent { len: run },
            Unit::Unallocated => Extent::Zero { len: run },
            Unit::Compressed => Extent::Encoded { len: run },
        })
    }

    /// Decode the compressed cluster holding guest offset `offset` and copy
    /// `buf.len()` bytes from there (within that cluster).
    pub(super) fn read_encoded_impl(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let cs = self.layout.cluster_size();
        let in_c = offset % cs;
        if in_c + buf.len() as u64 > cs {
            return Err(Error::invalid(format!(
                "{}: a compressed read at {offset} of {} bytes crosses a cluster boundary",
                self.path.display(),
                buf.len()
            )));
        }
        let Some(ExtendedL2Entry {
            cluster:
                Cluster::Compressed {
                    host_offset,
                    compressed_len_bytes_upper_bound: bound,
                },
            ..
        }) = self.entry(offset)?
        else {
            return Err(Error::new(
                crate::error::ErrorKind::InvalidState,
                format!(
                    "{}: guest offset {offset:#x} is not in a compressed cluster (the image changed?)",
                    self.path.display()
                ),
            ));
        };
        let cached = self
            .decoded
            .lock()
            .as_ref()
            .filter(|(h, _)| *h == host_offset)
            .map(|(_, b)| b.clone());
        let bytes = match cached {
            Some(b) => b,
            None => {
                let b: Arc<[u8]> = self.decode_cluster(offset, host_offset, bound)?.into();
                *self.decoded.lock() = Some((host_offset, b.clone()));
                b
            }
        };
        buf.copy_from_slice(&bytes[in_c as usize..in_c as usize + buf.len()]);
        Ok(())
    }

    /// Read (clamped to the file) and decompress one cluster.
    fn decode_cluster(&self, guest: u64, host: u64, bound: u64) -> Result<Vec<u8>> {
        let len = self.file_len()?;
        if host >= len {
            return Err(Error::corrupt(
                &self.path,
                host,
                format!(
                    "the compressed cluster of guest offset {guest:#x} starts past the end of the file"
                ),
            ));
        }
        let n = bound.min(len - host);
        let mut input = vec![0u8; n as usize];
        self.file.read_exact_at(&mut input, host).ctx(
            &self.path,
            "cannot read a compressed cluster",
            Some(host),
        )?;
        let mut out = vec![0u8; self.layout.cluster_size() as usize];
        let compression = self.header.read().compression();
        let done = match compression {
            Compression::Zlib => inflate(&input, &mut out),
            Compression::Zstd => unzstd(&input, &mut out),
        };
        match done {
            Ok(n) if n == out.len() => Ok(out),
            Ok(n) => Err(Error::corrupt(
                &self.path,
                host,
                format!(
                    "the {} compressed cluster of guest offset {guest:#x} decodes to {n} bytes, not {}",
                    name(compression),
                    out.len()
                ),
            )),
            Err(e) => Err(Error::corrupt(
                &self.path,
                host,
                format!(
                    "the {} compressed cluster of guest offset {guest:#x} does not decode: {e}",
                    name(compression)
                ),
            )),
        }
    }

    /// Bytes of data this layer holds: allocated clusters (or subclusters)
    /// and compressed clusters at their stored length.
    pub(super) fn count_allocated(&self) -> Result<u64> {
        let l = self.layout;
        let cs = l.cluster_size();
        let size = self.header.read().size;
        let entries = self.l1.read().len() as u64;
        let mut total = 0;
        for l1i in 0..entries {
            if self.l1_entry(l1i)?.l2_offset == 0 {
                continue;
            }
            let first = l1i * l.l2_coverage();
            let end = (first + l.l2_coverage()).min(size);
            let mut at = first;
            while at < end {
                if let Some(e) = self.entry(at)? {
                    total += match e.cluster {
                        Cluster::Data { .. } if l.extended_l2 => {
                            u64::from(e.allocated.count_ones()) * l.subcluster_size()
                        }
                        Cluster::Data { .. } => cs,
                        Cluster::Compressed {
                            compressed_len_bytes_upper_bound: b,
                            ..
                        } => b,
                        _ => 0,
                    };
                }
                at += cs;
            }
        }
        Ok(total)
    }
}

fn name(c: Compression) -> &'static str {
    match c {
        Compression::Zlib => "zlib",
        Compression::Zstd => "zstd",
    }
}

/// Raw deflate (qemu writes it with window bits 12; any window decodes)
/// into `out`; the bytes produced. Input past the end of the stream is the
/// padding the sector-rounded length leaves.
fn inflate(input: &[u8], out: &mut [u8]) -> std::result::Result<usize, String> {
    let mut d = flate2::Decompress::new(false);
    match d.decompress(input, out, flate2::FlushDecompress::Finish) {
        Ok(_) => Ok(d.total_out() as usize),
        // Output full before the end of the stream: as qemu, that is the
        // cluster.
        Err(_) if d.total_out() as usize == out.len() => Ok(out.len()),
        Err(e) => Err(e.to_string()),
    }
}

/// One zstd frame into `out`; the bytes produced (trailing input is
/// padding).
fn unzstd(input: &[u8], out: &mut [u8]) -> std::result::Result<usize, String> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let mut d = Decoder::new().map_err(|e| e.to_string())?;
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    loop {
        let before = (inb.pos(), outb.pos());
        let hint = d.run(&mut inb, &mut outb).map_err(|e| e.to_string())?;
        if hint == 0 || outb.pos() == outb.capacity() || (inb.pos(), outb.pos()) == before {
            return Ok(outb.pos());
        }
    }
}
