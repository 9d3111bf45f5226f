//! `MemLayer`: an in-memory [`Layer`] for unit tests of the core (resolver,
//! `fs`, merge) without a disk format or a mount.
//!
//! Each logical sector is in one of three states ([`Sector`]): `Data`
//! (held here), `Zero` (reads as zeros, hiding the parent) or `Absent`
//! (ask the parent), so tests can build `Data`, `Zero` and `Parent`
//! extents of any shape. Data lives per block, in a buffer allocated on
//! first write; blocks get file slots in allocation order, the way dynamic
//! formats append blocks, so the file offset `map()` returns is
//! `HEADER + slot * block_size + offset in block`. A resolver that passed
//! a virtual offset to [`Layer::read_data`], or read one layer's data run
//! across a block boundary as if the file were contiguous, reads the wrong
//! bytes. `map()` never returns a run that crosses a block boundary.
//!
//! [`MemLayer::set_encoded`] makes the layer report its data as
//! `Extent::Encoded` (read through [`Layer::read_encoded`] at the virtual
//! offset), the way qcow2 reports compressed clusters: a resolver that
//! `read_data`s such a run, or skips it, gets caught.
//!
//! The layer has a path (tests put a real, empty file there when the code
//! under test touches it: merge records, deletes, permissions) and
//! [`Calls`] counters to assert that a flush happened or a layer was not
//! read (and the `will_need` advice it got). [`Layer::relink`] only records the new link and counts the change.
//! The format is `mem`, registered in test builds only ([`DRIVER`]): a
//! `mem` child may have a `mem` parent; nothing probes, opens or creates
//! one from a file.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;

use super::registry::Driver;
use super::{Extent, Layer, LayerInfo, LockMode, ParentChange, ParentHint, ParentLink};
use crate::error::{Error, ErrorKind, Result};

/// Where slot 0 starts in the invented file layout (a "header" before it).
pub const HEADER: u64 = 1 << 20;

/// The state of one logical sector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sector {
    Absent,
    Zero,
    Data,
}

/// How often each operation was called.
#[derive(Debug, Default)]
pub struct Calls {
    pub map: AtomicU64,
    pub read_data: AtomicU64,
    pub write_sectors: AtomicU64,
    pub discard: AtomicU64,
    pub flush: AtomicU64,
    /// `relink(Set)`, `relink(Detach)`, `relink(Expect)`.
    pub set_parent: AtomicU64,
    pub detach: AtomicU64,
    pub expect: AtomicU64,
    /// `will_need` calls: (file offset, length), in order.
    pub advised: Mutex<Vec<(u64, u64)>>,
}

impl Calls {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

struct State {
    sectors: Vec<Sector>,
    /// Block index -> (file slot, block bytes).
    blocks: std::collections::HashMap<u64, (u64, Vec<u8>)>,
    /// Slot -> block index.
    slots: Vec<u64>,
    parent: Option<ParentLink>,
    lock: LockMode,
}

pub struct MemLayer {
    path: PathBuf,
    id: uuid::Uuid,
    size: u64,
    block: u64,
    sector: u32,
    writable: bool,
    /// Data sectors map as `Extent::Encoded`.
    encoded: AtomicBool,
    state: Mutex<State>,
    pub calls: Calls,
    /// Run at the start of every `map` (tests that stop a reader's walk
    /// half-way, to race something against it).
    pub on_map: Mutex<Option<MapHook>>,
}

pub type MapHook = Box<dyn Fn() + Send + Sync>;

fn bug(path: &Path, msg: String) -> Error {
    Error::new(
        ErrorKind::InvalidArgument,
        format!("{}: {msg}", path.display()),
    )
}

impl MemLayer {
    /// A base layer of `size` bytes (a multiple of `sector`), every sector
    /// `Absent`. `block` is a multiple of `sector`.
    pub fn new(path: impl Into<PathBuf>, size: u64, block: u64, sector: u32) -> MemLayer {
        assert!(size % sector as u64 == 0 && block % sector as u64 == 0);
        MemLayer {
            path: path.into(),
            id: uuid::Uuid::new_v4(),
            size,
            block,
            sector,
            writable: false,
            encoded: AtomicBool::new(false),
            state: Mutex::new(State {
                sectors: vec![Sector::Absent; (size / sector as u64) as usize],
                blocks: Default::default(),
                slots: Vec::new(),
                parent: None,
                lock: LockMode::Shared,
            }),
            calls: Calls::default(),
            on_map: Mutex::new(None),
        }
    }

    /// Make this a child of `parent` (its id, hinted by its path).
    pub fn child_of(self, parent: &dyn Layer) -> MemLayer {
        self.state.lock().parent = Some(link_to(parent));
        self
    }

    pub fn writable(mut self, on: bool) -> MemLayer {
        self.writable = on;
        self
    }

    /// Report data sectors as `Extent::Encoded` from now on (or not).
    pub fn set_encoded(&self, on: bool) {
        self.encoded.store(on, Ordering::Relaxed);
    }

    pub fn id(&self) -> uuid::Uuid {
        self.id
    }

    /// Set up content regardless of `writable`: `data` (whole sectors) at
    /// `offset` becomes `Data`.
    pub fn put(&self, offset: u64, data: &[u8]) {
        self.store(offset, data).unwrap();
    }

    /// Set sectors `[offset, offset+len)` to `s` (whole sectors); `Data`
    /// stores zeros (an allocated block of zeros).
    pub fn set(&self, offset: u64, len: u64, s: Sector) {
        if s == Sector::Data {
            return self.put(offset, &vec![0; len as usize]);
        }
        let ss = self.sector as u64;
        let mut st = self.state.lock();
        for i in offset / ss..(offset + len) / ss {
            st.sectors[i as usize] = s;
        }
    }

    pub fn lock_mode(&self) -> LockMode {
        self.state.lock().lock
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let ss = self.sector as u64;
        if offset % ss != 0 || len % ss != 0 || offset + len > self.size {
            return Err(bug(
                &self.path,
                format!("{len} bytes at {offset} are not whole sectors inside the disk"),
            ));
        }
        Ok(())
    }

    fn store(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_range(offset, data.len() as u64)?;
        let (bs, ss) = (self.block, self.sector as u64);
        let mut st = self.state.lock();
        let mut done = 0u64;
        while done < data.len() as u64 {
            let off = offset + done;
            let (b, within) = (off / bs, off % bs);
            let n = (bs - within).min(data.len() as u64 - done);
            let slot = st.slots.len() as u64;
            if !st.blocks.contains_key(&b) {
                st.slots.push(b);
                st.blocks.insert(b, (slot, vec![0; bs as usize]));
            }
            let buf = &mut st.blocks.get_mut(&b).unwrap().1;
            buf[within as usize..(within + n) as usize]
                .copy_from_slice(&data[done as usize..(done + n) as usize]);
            for i in off / ss..(off + n) / ss {
                st.sectors[i as usize] = Sector::Data;
            }
            done += n;
        }
        Ok(())
    }
}

/// The registry entry (test builds only): nothing on disk is a `mem` file.
pub static DRIVER: Driver = Driver {
    name: "mem",
    extensions: &[],
    parents: &["mem"],
    probe: |_, _| Ok(false),
    open: |_, path, _| Err(bug(path, "a mem layer cannot be opened from a file".into())),
    create: |path, _, _| Err(bug(path, "a mem layer cannot be created as a file".into())),
    peek: |_| None,
    create_versions: &[],
    create_subblocks: false,
};

/// The link a child of `parent` records: its id, and its path as the name.
pub fn link_to(parent: &dyn Layer) -> ParentLink {
    ParentLink {
        ids: parent.info().unique_id.into_iter().collect(),
        hints: vec![ParentHint {
            source: "mem".into(),
            stored: parent.path().display().to_string(),
        }],
        detached: false,
        format: None,
    }
}

impl Layer for MemLayer {
    fn path(&self) -> &Path {
        &self.path
    }

    fn info(&self) -> LayerInfo {
        let child = self.state.lock().parent.is_some();
        LayerInfo {
            format: "mem",
            disk_type: if child { "differencing" } else { "dynamic" },
            virtual_size: self.size,
            block_size: Some(self.block),
            sector_size: self.sector,
            unique_id: Some(self.id),
            id_follows_data: false,
            creator: "mem".into(),
        }
    }

    fn parent(&self) -> Option<ParentLink> {
        self.state.lock().parent.clone()
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        self.calls.map.fetch_add(1, Ordering::Relaxed);
        if let Some(hook) = self.on_map.lock().as_ref() {
            hook();
        }
        if len == 0 || offset >= self.size {
            return Err(bug(&self.path, format!("map of {len} bytes at {offset}")));
        }
        let (bs, ss) = (self.block, self.sector as u64);
        // One state, within one block, at most `len` bytes.
        let end = (offset + len).min(self.size).min((offset / bs + 1) * bs);
        let st = self.state.lock();
        let s = st.sectors[(offset / ss) as usize];
        let mut at = (offset / ss + 1) * ss;
        while at < end && st.sectors[(at / ss) as usize] == s {
            at += ss;
        }
        let len = at.min(end) - offset;
        Ok(match s {
            Sector::Absent => Extent::Parent { len },
            Sector::Zero => Extent::Zero { len },
            Sector::Data if self.encoded.load(Ordering::Relaxed) => Extent::Encoded { len },
            Sector::Data => Extent::Data {
                file_offset: HEADER + st.blocks[&(offset / bs)].0 * bs + offset % bs,
                len,
            },
        })
    }

    fn read_data(&self, file_offset: u64, buf: &mut [u8]) -> Result<()> {
        self.calls.read_data.fetch_add(1, Ordering::Relaxed);
        let st = self.state.lock();
        let bs = self.block;
        let mut done = 0usize;
        while done < buf.len() {
            let fo = file_offset + done as u64;
            let slot = fo.checked_sub(HEADER).map(|r| r / bs);
            let Some(b) = slot.and_then(|s| st.slots.get(s as usize)) else {
                return Err(bug(
                    &self.path,
                    format!("read at file offset {fo}: no block"),
                ));
            };
            let within = ((fo - HEADER) % bs) as usize;
            let n = (bs as usize - within).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&st.blocks[b].1[within..within + n]);
            done += n;
        }
        Ok(())
    }

    fn read_encoded(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let st = self.state.lock();
        let bs = self.block;
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let Some((_, block)) = st.blocks.get(&(at / bs)) else {
                return Err(bug(&self.path, format!("encoded read at {at}: no block")));
            };
            let within = (at % bs) as usize;
            let n = (bs as usize - within).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&block[within..within + n]);
            done += n;
        }
        Ok(())
    }

    fn will_need(&self, file_offset: u64, len: u64) {
        self.calls.advised.lock().push((file_offset, len));
    }

    fn allocated_bytes(&self) -> Result<u64> {
        Ok(self.state.lock().blocks.len() as u64 * self.block)
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn write_sectors(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.calls.write_sectors.fetch_add(1, Ordering::Relaxed);
        if !self.writable {
            return Err(Error::new(ErrorKind::ReadOnly, "read-only MemLayer"));
        }
        self.store(offset, data)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.calls.discard.fetch_add(1, Ordering::Relaxed);
        if !self.writable {
            return Err(Error::new(ErrorKind::ReadOnly, "read-only MemLayer"));
        }
        self.check_range(offset, len)?;
        self.set(offset, len, Sector::Zero);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.calls.flush.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn check(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    fn set_lock(&self, mode: LockMode) -> Result<()> {
        self.state.lock().lock = mode;
        Ok(())
    }

    fn relink(&self, change: ParentChange<'_>) -> Result<()> {
        let mut st = self.state.lock();
        match change {
            ParentChange::Expect(_) => {
                self.calls.expect.fetch_add(1, Ordering::Relaxed);
            }
            ParentChange::Set(parent) => {
                self.calls.set_parent.fetch_add(1, Ordering::Relaxed);
                st.parent = Some(link_to(parent));
            }
            ParentChange::Detach => {
                self.calls.detach.fetch_add(1, Ordering::Relaxed);
                if let Some(p) = st.parent.as_mut() {
                    p.detached = true;
                }
            }
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
