//! Merge jobs as the mount shows them under `jobs/N`, mirroring
//! `CIM_ConcreteJob`: numeric JobState (3 Starting, 4 Running, 7 Completed,
//! 8 Terminated, 10 Exception), PercentComplete that never decreases, and
//! the error as a Hyper-V return code.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

use crate::error::{Error, RC_COMPLETED};
use crate::merge::Progress;

pub const STARTING: u32 = 3;
pub const RUNNING: u32 = 4;
pub const COMPLETED: u32 = 7;
pub const TERMINATED: u32 = 8;
pub const EXCEPTION: u32 = 10;

pub fn state_name(s: u32) -> &'static str {
    match s {
        STARTING => "Starting",
        RUNNING => "Running",
        COMPLETED => "Completed",
        TERMINATED => "Terminated",
        EXCEPTION => "Exception",
        _ => "Unknown",
    }
}

pub struct Job {
    pub id: u64,
    pub command: String,
    pub progress: Arc<Progress>,
    state: AtomicU32,
    error: Mutex<(u32, String)>,
    start: SystemTime,
    started: Instant,
    elapsed: Mutex<Option<Duration>>,
}

impl Job {
    pub fn state(&self) -> u32 {
        self.state.load(Ordering::Acquire)
    }

    pub fn set_running(&self) {
        self.state.store(RUNNING, Ordering::Release);
    }

    /// Record how the job ended.
    pub fn finish(&self, r: &Result<(), Error>) {
        *self.elapsed.lock() = Some(self.started.elapsed());
        let state = match r {
            Ok(()) => COMPLETED,
            Err(_) if self.progress.cancel.load(Ordering::Relaxed) => TERMINATED,
            Err(_) => EXCEPTION,
        };
        if let Err(e) = r {
            *self.error.lock() = (e.return_code(), e.to_string().replace('\n', " "));
        }
        self.state.store(state, Ordering::Release);
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.state(), COMPLETED | TERMINATED | EXCEPTION)
    }

    /// The text of `jobs/N`.
    pub fn render(&self) -> String {
        let state = self.state();
        let (code, desc) = self.error.lock().clone();
        let elapsed = self
            .elapsed
            .lock()
            .unwrap_or_else(|| self.started.elapsed());
        format!(
            "JobId={}\nCommand={}\nJobState={state}\nJobStateName={}\nPercentComplete={}\n\
             BytesDone={}\nBytesTotal={}\nErrorCode={code}\nErrorDescription={desc}\n\
             StartTime={}\nElapsedMs={}\n",
            self.id,
            self.command,
            state_name(state),
            self.progress.percent(),
            self.progress.bytes_done.load(Ordering::Relaxed),
            self.progress.bytes_total.load(Ordering::Relaxed),
            humantime::format_rfc3339_seconds(self.start),
            elapsed.as_millis()
        )
    }
}

#[derive(Default)]
pub struct Jobs {
    next: AtomicU64,
    map: Mutex<BTreeMap<u64, Arc<Job>>>,
}

impl Jobs {
    pub fn start(&self, command: String, progress: Arc<Progress>) -> Arc<Job> {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let job = Arc::new(Job {
            id,
            command,
            progress,
            state: AtomicU32::new(STARTING),
            error: Mutex::new((RC_COMPLETED, String::new())),
            start: SystemTime::now(),
            started: Instant::now(),
            elapsed: Mutex::new(None),
        });
        self.map.lock().insert(id, job.clone());
        job
    }

    pub fn get(&self, id: u64) -> Option<Arc<Job>> {
        self.map.lock().get(&id).cloned()
    }

    pub fn ids(&self) -> Vec<u64> {
        self.map.lock().keys().copied().collect()
    }

    /// A job that has not finished yet, if any.
    pub fn running(&self) -> Option<Arc<Job>> {
        self.map.lock().values().find(|j| !j.is_finished()).cloned()
    }
}
