//! nbdkit plugin: a chain of differencing disks served flattened over NBD.
//!
//! chainfs does not speak NBD itself: nbdkit owns the protocol, listening,
//! TLS, export names and connection limits, and calls this plugin for the
//! data. `nbdkit chainfs leaf=/vms/leaf.vhdx [parent_dir=DIR]...
//! [parent=CHILD=PATH]... [readonly=true]` (docs/NBD.md).
//!
//! Design:
//! - The chain is opened once, in `get_ready` (before nbdkit forks and
//!   changes directory), with the same [`chainfs::Chain::open`] a mount uses:
//!   the same parent search, identity checks and `flock` locks (shared on
//!   every layer when `readonly=true` or nbdkit runs with `-r`, exclusive
//!   on the leaf otherwise). The
//!   locks stay held by the serving process until it exits, so a chain
//!   served writable cannot be mounted, written or merged elsewhere, and a
//!   problem with the chain stops nbdkit at start-up with chainfs's message
//!   instead of failing the first client.
//! - Every connection shares that one [`chainfs::FlatImage`]. It is `Sync`
//!   and its reads run in parallel, so the thread model is `Parallel`. Since
//!   all connections see one image, a write is visible to every connection
//!   as soon as it is acknowledged and a flush on any connection flushes the
//!   leaf for all: multi-conn is advertised in both modes.
//! - Extents come from the chain's own allocation (the resolver's runs):
//!   data stored in some layer is reported allocated; runs no layer stores,
//!   or a layer declares zero, are reported as holes that read as zeros, so
//!   `nbdcopy` and `qemu-img convert` skip them without reading.
//! - Zero and trim both make the range read as zeros through the leaf's
//!   discard; FUA is emulated by nbdkit with a flush after the request.
//! - Read-ahead as the mount does it (`chainfs::readahead`): each
//!   connection keeps its read pattern, and a sequential reader's next MiBs
//!   are resolved and their layer files asked to start reading by one
//!   worker thread. It is started at the first read, in the serving
//!   process (threads do not survive nbdkit's fork into the background).

mod config;

use std::ffi::CString;
use std::sync::{Arc, Mutex, OnceLock};

use chainfs::image::Source;
use chainfs::readahead::{Fetcher, Stream, Streams};
use chainfs::{Chain, FlatImage};
use nbdkit::{plugin, ExtentHandle, ExtentType, Flags, FuaFlags, Result, Server, ThreadModel};

use config::Config;

/// The parsed `key=value` parameters (filled by `config`).
static CONFIG: Mutex<Option<Config>> = Mutex::new(None);
/// The open chain, shared by every connection.
static IMAGE: OnceLock<Served> = OnceLock::new();
/// The read-ahead worker, started at the first read (`None`: it could not
/// be started).
static FETCHER: OnceLock<Option<Fetcher>> = OnceLock::new();
/// The connections' streams, which share how far ahead it fetches.
static STREAMS: OnceLock<Streams> = OnceLock::new();

struct Served {
    image: Arc<FlatImage>,
    /// Opened for writing (the leaf is locked exclusively).
    writable: bool,
}

/// A chainfs error as nbdkit wants it: errno from the one mapping in
/// `chainfs::error`, and the message naming the file and offset.
fn nbd_err(e: chainfs::Error) -> nbdkit::Error {
    nbdkit::Error::new(e.to_errno(), e.to_string())
}

fn served() -> Result<&'static Served> {
    IMAGE
        .get()
        .ok_or_else(|| nbdkit::Error::new(libc::EIO, "chainfs: the chain is not open"))
}

/// One client connection.
struct Conn {
    image: Arc<FlatImage>,
    writable: bool,
    /// This connection's read pattern (`chainfs::readahead`).
    stream: Mutex<Stream>,
}

impl Conn {
    /// Fetch ahead of a sequential reader on this connection.
    fn read_ahead(&self, offset: u64, len: u64) {
        let size = self.image.size();
        let ahead = self
            .stream
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .on_read(offset, len, size);
        if let Some((at, n)) = ahead {
            if let Some(f) = FETCHER.get_or_init(Fetcher::start) {
                f.fetch(self.image.layers(), 0, at, n);
            }
        }
    }
}

impl Server for Conn {
    fn name() -> &'static str {
        "chainfs"
    }

    fn longname() -> Option<&'static str> {
        Some("chainfs: chains of differencing virtual disks (VHD, VHDX, qcow2)")
    }

    fn version() -> Option<&'static str> {
        Some(env!("CARGO_PKG_VERSION"))
    }

    fn description() -> Option<&'static str> {
        Some(
            "Serves the flattened content of a chain of differencing disks \
             (any format chainfs opens: VHD, VHDX, qcow2, raw bases): the leaf and every parent, found and checked \
             as `chainfs mount` does. Writes go into the leaf.",
        )
    }

    fn config_help() -> Option<&'static str> {
        Some(config::HELP)
    }

    /// A bare parameter is the leaf: `nbdkit chainfs /vms/leaf.vhdx`.
    fn magic_config_key() -> Option<&'static str> {
        Some("leaf")
    }

    fn load() {
        log_bridge::install();
    }

    fn config(key: &str, value: &str) -> Result<()> {
        let mut c = CONFIG.lock().unwrap_or_else(|p| p.into_inner());
        c.get_or_insert_with(Config::default)
            .set(key, value)
            .map_err(|m| nbdkit::Error::new(libc::EINVAL, m))
    }

    fn config_complete() -> Result<()> {
        let c = CONFIG.lock().unwrap_or_else(|p| p.into_inner());
        match c.as_ref().and_then(|c| c.leaf.as_ref()) {
            Some(_) => Ok(()),
            None => Err(nbdkit::Error::new(
                libc::EINVAL,
                "chainfs: the leaf parameter is missing (leaf=/path/to/leaf.vhdx)",
            )),
        }
    }

    fn get_ready() -> Result<()> {
        let cfg = CONFIG
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default();
        let Some(leaf) = cfg.leaf.clone() else {
            return Err(nbdkit::Error::new(libc::EINVAL, "chainfs: no leaf"));
        };
        let mut opts = cfg.chain_options();
        // nbdkit -r: open the chain read-only too (see `nbdkit_readonly`).
        let args: Vec<String> = std::fs::read("/proc/self/cmdline")
            .map(|b| {
                b.split(|&c| c == 0)
                    .skip(1)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        if config::nbdkit_readonly(&args) {
            opts.writable = false;
        }
        let chain = Chain::open(&leaf, &opts).map_err(nbd_err)?;
        let image = Arc::new(FlatImage::new(&chain));
        drop(chain);
        nbdkit::debug!(
            "chainfs: serving {} ({} bytes, {}) ",
            leaf.display(),
            image.size(),
            if opts.writable {
                "writable"
            } else {
                "read-only"
            }
        );
        let _ = IMAGE.set(Served {
            image,
            writable: opts.writable,
        });
        Ok(())
    }

    fn thread_model() -> Result<ThreadModel> {
        Ok(ThreadModel::Parallel)
    }

    fn open(readonly: bool) -> Result<Box<dyn Server>> {
        let s = served()?;
        Ok(Box::new(Conn {
            image: s.image.clone(),
            writable: s.writable && !readonly,
            stream: Mutex::new(Stream::new(STREAMS.get_or_init(Streams::default))),
        }))
    }

    fn get_size(&self) -> Result<i64> {
        i64::try_from(self.image.size())
            .map_err(|_| nbdkit::Error::new(libc::EFBIG, "chainfs: virtual size too large"))
    }

    fn can_write(&self) -> Result<bool> {
        Ok(self.writable)
    }

    fn can_flush(&self) -> Result<bool> {
        Ok(self.writable)
    }

    fn can_fua(&self) -> Result<FuaFlags> {
        Ok(if self.writable {
            FuaFlags::Emulate
        } else {
            FuaFlags::None
        })
    }

    fn can_trim(&self) -> Result<bool> {
        Ok(self.writable)
    }

    fn can_zero(&self) -> Result<bool> {
        Ok(self.writable)
    }

    fn can_extents(&self) -> Result<bool> {
        Ok(true)
    }

    fn can_multi_conn(&self) -> Result<bool> {
        Ok(true)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_ahead(offset, buf.len() as u64);
        let n = self.image.read_at(offset, buf).map_err(nbd_err)?;
        if n < buf.len() {
            return Err(nbdkit::Error::new(
                libc::EIO,
                format!(
                    "chainfs: read of {} bytes at {offset} ends past the virtual size {}",
                    buf.len(),
                    self.image.size()
                ),
            ));
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, _flags: Flags) -> Result<()> {
        self.image.write_at(offset, buf).map_err(nbd_err)
    }

    fn zero(&self, count: u32, offset: u64, _flags: Flags) -> Result<()> {
        self.image.discard(offset, count.into()).map_err(nbd_err)
    }

    fn trim(&self, count: u32, offset: u64, _flags: Flags) -> Result<()> {
        self.image.discard(offset, count.into()).map_err(nbd_err)
    }

    fn flush(&self) -> Result<()> {
        self.image.flush().map_err(nbd_err)
    }

    fn extents(&self, count: u32, offset: u64, flags: Flags, eh: &mut ExtentHandle) -> Result<()> {
        let end = offset.saturating_add(count.into()).min(self.image.size());
        let mut off = offset;
        while off < end {
            let (src, n) = self.image.resolve(off, end - off).map_err(nbd_err)?;
            if n == 0 {
                return Err(nbdkit::Error::new(
                    libc::EIO,
                    format!("chainfs: the chain maps an empty run at {off}"),
                ));
            }
            let n = n.min(end - off);
            let kind = match src {
                Source::Data { .. } | Source::Encoded { .. } => ExtentType::Allocated,
                Source::Zero => ExtentType::HoleZero,
            };
            eh.add(off, n, kind)?;
            off += n;
            if flags.contains(Flags::REQ_ONE) {
                break;
            }
        }
        Ok(())
    }
}

// longname, version, description and magic_config_key are always taken
// from the trait; the list names the optional callbacks.
plugin!(Conn {
    config_help,
    load,
    config,
    config_complete,
    get_ready,
    thread_model,
    can_write,
    can_flush,
    can_fua,
    can_trim,
    can_zero,
    can_extents,
    can_multi_conn,
    write_at,
    zero,
    trim,
    flush,
    extents
});

/// chainfs reports warnings (an unfinished merge, a parent used despite an
/// identity mismatch) through the `log` crate; inside nbdkit they go to
/// nbdkit's own log: warnings and errors always, the rest with `-v`.
mod log_bridge {
    use super::*;

    extern "C" {
        /// Exported by the nbdkit server binary the plugin is loaded into.
        fn nbdkit_error(fmt: *const libc::c_char, ...);
    }

    struct Bridge;

    impl log::Log for Bridge {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }

        fn log(&self, r: &log::Record) {
            let text = format!("chainfs: {}: {}", r.level(), r.args());
            if r.level() <= log::Level::Warn {
                if let Ok(c) = CString::new(text) {
                    // SAFETY: a "%s" format with one NUL-terminated string.
                    unsafe { nbdkit_error(c"%s".as_ptr(), c.as_ptr()) };
                }
            } else {
                nbdkit::debug!("{text}");
            }
        }

        fn flush(&self) {}
    }

    static BRIDGE: Bridge = Bridge;

    pub fn install() {
        if log::set_logger(&BRIDGE).is_ok() {
            log::set_max_level(log::LevelFilter::Debug);
        }
    }
}
