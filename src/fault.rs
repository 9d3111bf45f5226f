//! Fault injection for crash tests. With `CHAINFS_FAULT_AFTER=k` in the
//! environment, the process dies (as if killed) at the k-th write or sync
//! point of a modifying operation: every `point()` call sits just before one
//! write or `fsync` of a layer file or merge record. Unset, it costs one
//! relaxed atomic load. Test-only; documented in docs/MERGE.md.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::error::Result;

static COUNT: AtomicU64 = AtomicU64::new(0);

fn limit() -> u64 {
    static LIMIT: OnceLock<u64> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var("CHAINFS_FAULT_AFTER")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    })
}

/// Exit status of a process stopped by fault injection.
pub const FAULT_EXIT: i32 = 86;

/// Count one write/sync point; die at the configured one.
pub fn point() -> Result<()> {
    let l = limit();
    if l != 0 && COUNT.fetch_add(1, Ordering::Relaxed) + 1 >= l {
        // SAFETY: _exit ends the process without running anything else,
        // like a crash (no destructors, no buffered flushes).
        unsafe { libc::_exit(FAULT_EXIT) };
    }
    Ok(())
}
