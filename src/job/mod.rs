//! Block jobs: long-running operations over open images (QEMU's block
//! jobs), each on its own thread.
//!
//! A job works on `Arc<Image>`s that the embedder keeps using. The
//! [`Job`] handle it returns reports progress ([`JobInfo::offset`] out of
//! [`JobInfo::len`] bytes), changes the rate limit while the job runs
//! ([`Job::set_speed`]), pauses, resumes, cancels and, for jobs that wait
//! in the ready state (an active commit, later a mirror), completes it
//! ([`Job::complete`]). Jobs emit QEMU's events as [`Event`]s:
//! `BLOCK_JOB_READY`, `BLOCK_JOB_COMPLETED`, `BLOCK_JOB_CANCELLED` and
//! `BLOCK_JOB_ERROR`, with `on-error` policies `report | ignore | enospc |
//! stop` ([`ErrorPolicy`]).
//!
//! The framework (this module) knows nothing about what a job copies: a
//! job type is a function run on the job thread with a [`JobCtx`], through
//! which it reports progress, takes its rate-limit share, stops at pause and
//! cancel points, applies the error policy and enters the ready state.
//! [`commit()`], [`stream()`] and [`mirror()`] are job types built this
//! way; a mirror works on a [`Drive`], the embedder's switchable handle.

pub mod commit;
pub mod mirror;
mod replace;
pub mod stream;

use crate::error::{IoOp, Result};
use crate::events::{Event, EventSink};
use crate::options::{ErrorAction, ErrorPolicy};
use crate::Error;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use commit::{commit, CommitOptions};
pub use mirror::{mirror, Drive, DriveNode, MirrorOptions, MirrorSync, MirrorTarget};
pub use stream::{stream, StreamOptions};

/// The kind of a block job (QEMU's `JobType`, the `type` of its events).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum JobType {
    /// `block-commit`.
    Commit,
    /// `block-stream`.
    Stream,
    /// `drive-mirror`.
    Mirror,
}

impl fmt::Display for JobType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JobType::Commit => "commit",
            JobType::Stream => "stream",
            JobType::Mirror => "mirror",
        })
    }
}

/// Where a job is in its life (a subset of QEMU's `JobStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum JobStatus {
    /// Working.
    Running,
    /// Paused by [`Job::pause`] or by an error with the `stop` policy.
    Paused,
    /// Caught up; waiting for [`Job::complete`] (or [`Job::cancel`]).
    Ready,
    /// Ended: completed, failed or cancelled (see [`Job::wait`]).
    Concluded,
}

/// Why a job could not be started or driven. The texts are QEMU's where
/// QEMU has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// The `top` image is not in the device's backing chain.
    #[error("Top image file {0} not found")]
    TopNotFound(String),
    /// The `base` image is not in the backing chain below `top`.
    #[error("Base '{0}' not found")]
    BaseNotFound(String),
    /// `top` and `base` are the same image.
    #[error("cannot commit an image into itself")]
    IntoItself,
    /// The `base` of a stream is not in the device's backing chain.
    #[error("Can't find '{0}' in the backing chain")]
    BaseNotInChain(String),
    /// A stream of the whole chain was given a `backing-file`.
    #[error("backing file specified, but streaming the entire chain")]
    BackingFileWithoutBase,
    /// The top image has no backing file to commit into.
    #[error("Image does not have a backing file")]
    NoBacking,
    /// `backing-file` was given, but `top` is the active layer.
    #[error("'backing-file' specified, but 'top' is the active layer")]
    BackingFileForActive,
    /// A command the job's state does not allow (`complete` before ready,
    /// ...).
    #[error("Job '{id}' in state '{state}' cannot accept command verb '{verb}'")]
    BadState {
        /// The job's id.
        id: String,
        /// Its state, QEMU's name.
        state: &'static str,
        /// The command.
        verb: &'static str,
    },
    /// The job was cancelled.
    #[error("Job '{0}' was cancelled")]
    Cancelled(String),
    /// The job thread ended without a result (it panicked).
    #[error("Job '{0}' ended abnormally")]
    Aborted(String),
}

/// A snapshot of a job's state (QEMU's `BlockJobInfo`, in part).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct JobInfo {
    /// The job's id (QEMU's `device`).
    pub id: String,
    /// The kind of job.
    pub job_type: JobType,
    /// Where it is.
    pub status: JobStatus,
    /// Bytes of work done.
    pub offset: u64,
    /// Bytes of work in total, as estimated now (it may grow).
    pub len: u64,
    /// Rate limit in bytes per second; 0 means none.
    pub speed: u64,
    /// Bytes that went through the rate limiter (data actually copied).
    pub throttled_bytes: u64,
    /// How many times the job waited for the rate limit.
    pub throttle_waits: u64,
    /// Total time the job was held back by the rate limit (the delays it
    /// asked for, whether or not a pause or speed change cut them short).
    pub throttle_delay: Duration,
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum JobOutcome {
    /// The job did all its work (and was completed, if it had a ready state).
    Completed,
    /// The job was cancelled.
    Cancelled,
}

/// Length of a rate-limit slice (QEMU's `BLOCK_JOB_SLICE_TIME`, 100 ms).
const SLICE: Duration = Duration::from_millis(100);

/// QEMU's `RateLimit`: a quota of bytes per slice; a request that goes over
/// the quota extends the slice by as many slices as it used, and the next
/// request waits for the extended slice to end.
#[derive(Debug)]
struct RateLimit {
    slice_start: Instant,
    slice_end: Instant,
    dispatched: u64,
}

impl RateLimit {
    fn new(now: Instant) -> Self {
        RateLimit {
            slice_start: now,
            slice_end: now,
            dispatched: 0,
        }
    }

    /// The quota of one slice at `speed` bytes per second (at least 1).
    fn quota(speed: u64) -> u64 {
        let q = u128::from(speed) * SLICE.as_nanos() / 1_000_000_000;
        u64::try_from(q).unwrap_or(u64::MAX).max(1)
    }

    /// How long to wait before the next request may go (QEMU's
    /// `ratelimit_calculate_delay` with `n` = 0, after the bytes were
    /// accounted with [`RateLimit::processed`]).
    fn delay(&mut self, speed: u64, now: Instant) -> Duration {
        if speed == 0 {
            return Duration::ZERO;
        }
        if self.slice_end < now {
            self.slice_start = now;
            self.slice_end = now + SLICE;
            self.dispatched = 0;
        }
        let quota = Self::quota(speed);
        if self.dispatched < quota {
            return Duration::ZERO;
        }
        // The slice stretches to as many slices (fractions included) as
        // the bytes dispatched use up.
        let ns = SLICE.as_nanos() * u128::from(self.dispatched) / u128::from(quota);
        let extend = Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX));
        self.slice_end = self
            .slice_start
            .checked_add(extend)
            .unwrap_or(self.slice_end);
        self.slice_end.saturating_duration_since(now)
    }

    fn processed(&mut self, n: u64) {
        self.dispatched = self.dispatched.saturating_add(n);
    }
}

/// What the job thread is asked to do, and what it reports.
#[derive(Debug)]
struct State {
    status: JobStatus,
    offset: u64,
    len: u64,
    speed: u64,
    paused: bool,
    cancelled: bool,
    completed: bool,
    /// `BLOCK_JOB_READY` was emitted (waiters of the ready state see the
    /// event first).
    ready_announced: bool,
    limit: RateLimit,
    throttled_bytes: u64,
    throttle_waits: u64,
    throttle_delay: Duration,
    result: Option<std::result::Result<JobOutcome, Error>>,
}

struct Shared {
    id: String,
    job_type: JobType,
    on_error: ErrorPolicy,
    events: Option<EventSink>,
    state: Mutex<State>,
    cond: Condvar,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("id", &self.id)
            .field("job_type", &self.job_type)
            .field("on_error", &self.on_error)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, ev: &Event) {
        if let Some(sink) = &self.events {
            sink(ev);
        }
    }
}

/// The settings every job takes (QEMU's common block-job arguments).
#[derive(Clone, Default)]
pub struct JobOptions {
    /// The job's id, QEMU's `job-id`/`device` (the `device` of its events).
    pub id: String,
    /// Initial rate limit, bytes per second (0: none).
    pub speed: u64,
    /// What an I/O error does (`on-error`).
    pub on_error: ErrorPolicy,
    /// Where the job's events go; none: to the device image's event
    /// callback ([`crate::Image::on_event`]) as it is when the job starts,
    /// so that an embedder (the C API's callback, say) sees job events
    /// beside the image's own.
    pub events: Option<EventSink>,
}

impl JobOptions {
    /// These options with the event sink defaulted to `device`'s.
    pub(crate) fn or_device_sink(mut self, device: &crate::Image) -> JobOptions {
        if self.events.is_none() {
            self.events = device.event_sink();
        }
        self
    }
}

impl fmt::Debug for JobOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobOptions")
            .field("id", &self.id)
            .field("speed", &self.speed)
            .field("on_error", &self.on_error)
            .field("events", &self.events.as_ref().map(|_| "<sink>"))
            .finish()
    }
}

/// A running block job. Dropping the handle does not stop the job: call
/// [`Job::cancel`] and [`Job::wait`] for that.
#[derive(Debug)]
pub struct Job {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Control passed to a job's work function on the job thread.
#[derive(Debug)]
pub struct JobCtx {
    shared: Arc<Shared>,
}

/// Why a job's work stopped early: cancelled, or an error the policy
/// reports.
#[derive(Debug)]
pub enum Stop {
    /// The job was cancelled.
    Cancelled,
    /// The job failed.
    Failed(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Failed(e)
    }
}

/// What a failed request should do next, after the `on-error` policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Try the request again (after `ignore`, or after a `stop` was resumed).
    Again,
}

impl Job {
    /// Starts a job of `job_type` running `work` on a new thread.
    ///
    /// `work` returns `Ok(())` when all the work is done, or [`Stop`].
    /// Job types call this; embedders start jobs through their functions
    /// (such as [`commit()`]).
    ///
    /// # Errors
    /// The thread could not be spawned.
    pub fn spawn(
        job_type: JobType,
        opts: JobOptions,
        work: impl FnOnce(&JobCtx) -> std::result::Result<(), Stop> + Send + 'static,
    ) -> Result<Job> {
        let now = Instant::now();
        let shared = Arc::new(Shared {
            id: opts.id,
            job_type,
            on_error: opts.on_error,
            events: opts.events,
            state: Mutex::new(State {
                status: JobStatus::Running,
                offset: 0,
                len: 0,
                speed: opts.speed,
                paused: false,
                cancelled: false,
                completed: false,
                ready_announced: false,
                limit: RateLimit::new(now),
                throttled_bytes: 0,
                throttle_waits: 0,
                throttle_delay: Duration::ZERO,
                result: None,
            }),
            cond: Condvar::new(),
        });
        let ctx = JobCtx {
            shared: shared.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("job-{}", shared.id))
            .spawn(move || {
                // A broken invariant in the work must still conclude the
                // job, or waiters would wait forever.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&ctx)))
                    .unwrap_or_else(|_| {
                        Err(Stop::Failed(Error::Internal(
                            "the job's work panicked".into(),
                        )))
                    });
                ctx.conclude(r);
            })
            .map_err(|e| Error::io(IoOp::Write, 0, e))?;
        Ok(Job {
            shared,
            thread: Some(thread),
        })
    }

    /// The job's current state and progress.
    pub fn info(&self) -> JobInfo {
        let s = self.shared.lock();
        JobInfo {
            id: self.shared.id.clone(),
            job_type: self.shared.job_type,
            status: s.status,
            offset: s.offset,
            len: s.len,
            speed: s.speed,
            throttled_bytes: s.throttled_bytes,
            throttle_waits: s.throttle_waits,
            throttle_delay: s.throttle_delay,
        }
    }

    /// Changes the rate limit (bytes per second, 0 for none), effective at
    /// once: a job waiting for the old limit re-evaluates its wait.
    pub fn set_speed(&self, speed: u64) {
        let mut s = self.shared.lock();
        s.speed = speed;
        self.shared.cond.notify_all();
    }

    /// Pauses the job at its next pause point (between two requests).
    pub fn pause(&self) {
        let mut s = self.shared.lock();
        if s.status != JobStatus::Concluded {
            s.paused = true;
        }
        self.shared.cond.notify_all();
    }

    /// Resumes a paused job (also one that an error with the `stop` policy
    /// paused: the failed request is retried).
    pub fn resume(&self) {
        let mut s = self.shared.lock();
        s.paused = false;
        self.shared.cond.notify_all();
    }

    /// Cancels the job: it stops at its next pause point (also while paused
    /// or ready) and emits `BLOCK_JOB_CANCELLED`. Images stay consistent:
    /// what was copied stays, shadowed by the layers above it.
    pub fn cancel(&self) {
        let mut s = self.shared.lock();
        s.cancelled = true;
        self.shared.cond.notify_all();
    }

    /// Completes a job in the ready state (QEMU's `job-complete`).
    ///
    /// # Errors
    /// [`JobError::BadState`] when the job is not ready.
    pub fn complete(&self) -> Result<()> {
        let mut s = self.shared.lock();
        if s.status != JobStatus::Ready || s.cancelled {
            return Err(JobError::BadState {
                id: self.shared.id.clone(),
                state: qemu_state(&s),
                verb: "complete",
            }
            .into());
        }
        s.completed = true;
        self.shared.cond.notify_all();
        Ok(())
    }

    /// Blocks until the job is in the ready state (its `BLOCK_JOB_READY`
    /// emitted) or has concluded; returns the status it found.
    pub fn wait_ready(&self) -> JobStatus {
        let mut s = self.shared.lock();
        while !(s.status == JobStatus::Ready && s.ready_announced)
            && s.status != JobStatus::Concluded
        {
            s = self.shared.cond.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.status
    }

    /// Waits for the job to end and returns how it ended.
    ///
    /// # Errors
    /// The error that ended the job (the one its `BLOCK_JOB_COMPLETED`
    /// event carried).
    pub fn wait(mut self) -> Result<JobOutcome> {
        let joined = self.thread.take().map(JoinHandle::join);
        let mut s = self.shared.lock();
        match (s.result.take(), joined) {
            (Some(r), _) => r,
            (None, _) => Err(JobError::Aborted(self.shared.id.clone()).into()),
        }
    }
}

/// QEMU's name of the state, for [`JobError::BadState`].
fn qemu_state(s: &State) -> &'static str {
    match s.status {
        JobStatus::Running if s.paused => "paused",
        JobStatus::Running => "running",
        JobStatus::Paused => "paused",
        JobStatus::Ready => "ready",
        JobStatus::Concluded => "concluded",
    }
}

impl JobCtx {
    /// The job's id.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// Sets the total amount of work, in bytes.
    pub fn set_len(&self, len: u64) {
        self.shared.lock().len = len;
    }

    /// Adds to the total amount of work (work found while running).
    pub fn add_len(&self, n: u64) {
        let mut s = self.shared.lock();
        s.len = s.len.saturating_add(n);
    }

    /// Bytes of work done so far.
    pub fn offset(&self) -> u64 {
        self.shared.lock().offset
    }

    /// Records `n` more bytes of work done.
    pub fn progress(&self, n: u64) {
        let mut s = self.shared.lock();
        s.offset = s.offset.saturating_add(n);
    }

    /// Accounts `n` bytes of data copied against the rate limit.
    pub fn processed(&self, n: u64) {
        let mut s = self.shared.lock();
        s.limit.processed(n);
        s.throttled_bytes = s.throttled_bytes.saturating_add(n);
    }

    /// A pause point: waits while the job is paused, then waits for the
    /// rate limit (QEMU's `block_job_ratelimit_sleep`).
    ///
    /// # Errors
    /// [`Stop::Cancelled`] when the job was cancelled.
    pub fn checkpoint(&self) -> std::result::Result<(), Stop> {
        let mut s = self.shared.lock();
        loop {
            if s.cancelled {
                return Err(Stop::Cancelled);
            }
            if s.paused {
                s.status = JobStatus::Paused;
                self.shared.cond.notify_all();
                s = self.shared.cond.wait(s).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            if s.status == JobStatus::Paused {
                s.status = JobStatus::Running;
            }
            let speed = s.speed;
            let delay = s.limit.delay(speed, Instant::now());
            if delay.is_zero() {
                return Ok(());
            }
            s.throttle_waits = s.throttle_waits.saturating_add(1);
            s.throttle_delay = s.throttle_delay.saturating_add(delay);
            // Woken early by pause, cancel and speed changes; the loop
            // re-evaluates.
            let (g, _) = self
                .shared
                .cond
                .wait_timeout(s, delay)
                .unwrap_or_else(|p| p.into_inner());
            s = g;
            if s.speed != speed {
                // A new speed starts a new slice.
                s.limit = RateLimit::new(Instant::now());
            }
        }
    }

    /// Applies the `on-error` policy to `err`, met during `op`; emits
    /// `BLOCK_JOB_ERROR`. `report` (and `enospc` for other errors) ends the
    /// job with the error; `ignore` retries the request; `stop` (and
    /// `enospc` for ENOSPC) pauses the job and retries once it is resumed.
    ///
    /// # Errors
    /// [`Stop::Failed`] with `err` for `report`; [`Stop::Cancelled`] when
    /// the job is cancelled while stopped.
    pub fn handle_error(&self, op: IoOp, err: Error) -> std::result::Result<Retry, Stop> {
        self.handle_error_with(self.shared.on_error, op, err)
    }

    /// [`JobCtx::handle_error`] under `policy` instead of the job's
    /// `on-error`: for jobs with a policy per side, such as a mirror's
    /// `on-source-error` (reads) and `on-target-error` (writes).
    ///
    /// # Errors
    /// As for [`JobCtx::handle_error`].
    pub fn handle_error_with(
        &self,
        policy: ErrorPolicy,
        op: IoOp,
        err: Error,
    ) -> std::result::Result<Retry, Stop> {
        let action = match policy {
            ErrorPolicy::Report => ErrorAction::Report,
            ErrorPolicy::Ignore => ErrorAction::Ignore,
            ErrorPolicy::Stop => ErrorAction::Stop,
            ErrorPolicy::Enospc if err.is_nospace() => ErrorAction::Stop,
            ErrorPolicy::Enospc => ErrorAction::Report,
        };
        let op = match op {
            IoOp::Read => IoOp::Read,
            _ => IoOp::Write,
        };
        if action == ErrorAction::Stop {
            // Paused before the event, so that an embedder seeing the event
            // finds the job paused.
            self.shared.lock().paused = true;
        }
        self.shared.emit(&Event::BlockJobError {
            device: self.shared.id.clone(),
            operation: op,
            action,
        });
        match action {
            ErrorAction::Report => Err(Stop::Failed(err)),
            ErrorAction::Ignore => {
                // Still a pause point, so that a job retrying a failing
                // request forever can be cancelled.
                self.checkpoint()?;
                Ok(Retry::Again)
            }
            ErrorAction::Stop => {
                self.checkpoint()?;
                Ok(Retry::Again)
            }
        }
    }

    /// Enters the ready state: emits `BLOCK_JOB_READY` and waits until the
    /// embedder completes the job (`Ok`) or cancels it.
    ///
    /// # Errors
    /// [`Stop::Cancelled`] when the job is cancelled.
    pub fn ready(&self) -> std::result::Result<(), Stop> {
        let ev = {
            let mut s = self.shared.lock();
            if s.cancelled {
                return Err(Stop::Cancelled);
            }
            s.status = JobStatus::Ready;
            self.shared.cond.notify_all();
            self.event(&s, Kind::Ready)
        };
        self.shared.emit(&ev);
        let mut s = self.shared.lock();
        s.ready_announced = true;
        self.shared.cond.notify_all();
        loop {
            if s.cancelled {
                return Err(Stop::Cancelled);
            }
            if s.completed {
                s.status = JobStatus::Running;
                s.ready_announced = false;
                return Ok(());
            }
            s = self.shared.cond.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn event(&self, s: &State, kind: Kind) -> Event {
        let (job_type, device, len, offset, speed) = (
            self.shared.job_type,
            self.shared.id.clone(),
            s.len,
            s.offset,
            s.speed,
        );
        match kind {
            Kind::Ready => Event::BlockJobReady {
                job_type,
                device,
                len,
                offset,
                speed,
            },
            Kind::Completed(error) => Event::BlockJobCompleted {
                job_type,
                device,
                len,
                offset,
                speed,
                error,
            },
            Kind::Cancelled => Event::BlockJobCancelled {
                job_type,
                device,
                len,
                offset,
                speed,
            },
        }
    }

    /// Records the job's result, emits its final event and wakes waiters.
    fn conclude(&self, r: std::result::Result<(), Stop>) {
        let ev = {
            let mut s = self.shared.lock();
            let (result, kind) = match r {
                Ok(()) => (Ok(JobOutcome::Completed), Kind::Completed(None)),
                Err(Stop::Cancelled) => (Ok(JobOutcome::Cancelled), Kind::Cancelled),
                Err(Stop::Failed(e)) => {
                    let msg = e.qemu_message();
                    (Err(e), Kind::Completed(Some(msg)))
                }
            };
            let ev = self.event(&s, kind);
            s.result = Some(result);
            ev
        };
        self.shared.emit(&ev);
        let mut s = self.shared.lock();
        s.status = JobStatus::Concluded;
        self.shared.cond.notify_all();
    }
}

enum Kind {
    Ready,
    Completed(Option<String>),
    Cancelled,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;

    #[test]
    fn rate_limit_lets_a_quota_per_slice_through() {
        let t0 = Instant::now();
        let mut rl = RateLimit::new(t0);
        // 10 MiB/s: 1 MiB per 100 ms slice.
        let speed = 10 << 20;
        assert_eq!(rl.delay(speed, t0), Duration::ZERO);
        rl.processed(1 << 20);
        // One slice used up: wait for its end.
        assert_eq!(rl.delay(speed, t0), SLICE);
        rl.processed(2 << 20);
        // Three slices' worth dispatched: the slice stretches to 300 ms.
        assert_eq!(rl.delay(speed, t0), SLICE * 3);
        // Fractions of a slice count.
        rl.processed(1 << 19);
        assert_eq!(rl.delay(speed, t0), SLICE * 7 / 2);
        // No limit, no wait.
        assert_eq!(rl.delay(0, t0), Duration::ZERO);
    }

    #[test]
    fn quota_is_never_zero() {
        assert_eq!(RateLimit::quota(1), 1);
        assert_eq!(RateLimit::quota(10), 1);
        assert_eq!(RateLimit::quota(1000), 100);
        assert_eq!(RateLimit::quota(u64::MAX), u64::MAX / 10);
    }
}
