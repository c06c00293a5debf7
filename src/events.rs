//! Events reported to the embedder (QEMU's `BLOCK_IMAGE_CORRUPTED` and
//! `BLOCK_IO_ERROR` from an image; `BLOCK_JOB_READY`, `BLOCK_JOB_COMPLETED`,
//! `BLOCK_JOB_CANCELLED` and `BLOCK_JOB_ERROR` from a [`crate::job`]; the
//! quorum storage's `QUORUM_REPORT_BAD` and `QUORUM_FAILURE`).

use std::fmt;
use std::sync::Arc;

use crate::error::IoOp;
pub use crate::job::JobType;

pub use crate::options::ErrorAction;

/// An event of an open image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "event", content = "data", rename_all = "SCREAMING_SNAKE_CASE")]
#[non_exhaustive]
pub enum Event {
    /// Corruption was detected (`BLOCK_IMAGE_CORRUPTED`).
    #[serde(rename = "BLOCK_IMAGE_CORRUPTED")]
    ImageCorrupted {
        /// The node name given at open, if any.
        #[serde(rename = "node-name", skip_serializing_if = "Option::is_none")]
        node_name: Option<String>,
        /// What happened, in QEMU's words.
        msg: String,
        /// Host offset of the offending write or entry, when known.
        #[serde(skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
        /// Length of the offending write, when known.
        #[serde(skip_serializing_if = "Option::is_none")]
        size: Option<u64>,
        /// The image was marked corrupt and this handle disabled.
        fatal: bool,
    },
    /// A storage I/O error (`BLOCK_IO_ERROR`).
    #[serde(rename = "BLOCK_IO_ERROR")]
    IoError {
        /// The node name given at open, if any.
        #[serde(rename = "node-name", skip_serializing_if = "Option::is_none")]
        node_name: Option<String>,
        /// [`IoOp::Read`] or [`IoOp::Write`] (flush, discard and write-zeroes
        /// report `Write`, as QEMU's `IoOperationType` does).
        operation: IoOp,
        /// The action the configured policy (`rerror`/`werror`) asks for.
        action: ErrorAction,
        /// The error was ENOSPC.
        nospace: bool,
        /// `strerror` text, for humans.
        reason: String,
    },
    /// A block job is ready to be completed (`BLOCK_JOB_READY`): an active
    /// commit or a mirror has caught up with its source.
    #[serde(rename = "BLOCK_JOB_READY")]
    BlockJobReady {
        /// The kind of job.
        #[serde(rename = "type")]
        job_type: JobType,
        /// The job's id (QEMU's `device`).
        device: String,
        /// Bytes of work in total, as estimated now.
        len: u64,
        /// Bytes of work done.
        offset: u64,
        /// The rate limit, bytes per second (0: none).
        speed: u64,
    },
    /// A block job ended (`BLOCK_JOB_COMPLETED`), successfully or with `error`.
    #[serde(rename = "BLOCK_JOB_COMPLETED")]
    BlockJobCompleted {
        /// The kind of job.
        #[serde(rename = "type")]
        job_type: JobType,
        /// The job's id (QEMU's `device`).
        device: String,
        /// Bytes of work in total.
        len: u64,
        /// Bytes of work done.
        offset: u64,
        /// The rate limit, bytes per second (0: none).
        speed: u64,
        /// Why the job failed; absent on success.
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A block job was cancelled (`BLOCK_JOB_CANCELLED`).
    #[serde(rename = "BLOCK_JOB_CANCELLED")]
    BlockJobCancelled {
        /// The kind of job.
        #[serde(rename = "type")]
        job_type: JobType,
        /// The job's id (QEMU's `device`).
        device: String,
        /// Bytes of work in total.
        len: u64,
        /// Bytes of work done.
        offset: u64,
        /// The rate limit, bytes per second (0: none).
        speed: u64,
    },
    /// A block job met an I/O error (`BLOCK_JOB_ERROR`); `action` is what its
    /// `on-error` policy made of it.
    #[serde(rename = "BLOCK_JOB_ERROR")]
    BlockJobError {
        /// The job's id (QEMU's `device`).
        device: String,
        /// [`IoOp::Read`] or [`IoOp::Write`].
        operation: IoOp,
        /// `report` (the job ends), `ignore` (the request is retried) or
        /// `stop` (the job pauses; resuming retries the request).
        action: ErrorAction,
    },
    /// A quorum child failed a request or its data lost the vote
    /// (`QUORUM_REPORT_BAD`), raised by [`crate::storage::QuorumStorage`].
    #[serde(rename = "QUORUM_REPORT_BAD")]
    QuorumReportBad {
        /// The operation (QEMU's `type`).
        #[serde(rename = "type")]
        kind: QuorumOpType,
        /// The child's error (`strerror` text); absent when its data lost the vote.
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        /// The child's node name (`children.N.node-name`, or the generated one, see
        /// [`crate::storage::QuorumStorage`]).
        #[serde(rename = "node-name")]
        node_name: String,
        /// First 512-byte sector of the request (0 for a flush).
        #[serde(rename = "sector-num")]
        sector_num: u64,
        /// Sectors the request touches (0 for a flush).
        #[serde(rename = "sectors-count")]
        sectors_count: u64,
    },
    /// No quorum could be reached (`QUORUM_FAILURE`): fewer than `vote-threshold`
    /// children succeeded, or fewer agreed on a read's data. The request fails.
    #[serde(rename = "QUORUM_FAILURE")]
    QuorumFailure {
        /// The quorum node's name (`node-name`, or the generated one).
        reference: String,
        /// First 512-byte sector of the request.
        #[serde(rename = "sector-num")]
        sector_num: u64,
        /// Sectors the request touches.
        #[serde(rename = "sectors-count")]
        sectors_count: u64,
    },
}

/// The operation of a [`Event::QuorumReportBad`] (QEMU's `QuorumOpType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QuorumOpType {
    /// A read.
    Read,
    /// A write (also write-zeroes, discard and resize).
    Write,
    /// A flush.
    Flush,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::ImageCorrupted { msg, fatal: true, .. } => write!(
                f,
                "qcow2: Marking image as corrupt: {msg}; further corruption events will be suppressed"
            ),
            Event::ImageCorrupted { msg, fatal: false, .. } => write!(
                f,
                "qcow2: Image is corrupt: {msg}; further non-fatal corruption events will be suppressed"
            ),
            Event::IoError { operation, action, reason, .. } => {
                write!(f, "I/O error on {operation:?} ({action:?}): {reason}")
            }
            Event::BlockJobReady { job_type, device, .. } => {
                write!(f, "{job_type} job '{device}' is ready")
            }
            Event::BlockJobCompleted {
                job_type,
                device,
                error: None,
                ..
            } => write!(f, "{job_type} job '{device}' completed"),
            Event::BlockJobCompleted {
                job_type,
                device,
                error: Some(e),
                ..
            } => write!(f, "{job_type} job '{device}' failed: {e}"),
            Event::BlockJobCancelled { job_type, device, .. } => {
                write!(f, "{job_type} job '{device}' cancelled")
            }
            Event::BlockJobError {
                device,
                operation,
                action,
            } => write!(f, "block job '{device}': I/O error on {operation} ({action})"),
            Event::QuorumReportBad {
                kind,
                error,
                node_name,
                sector_num,
                sectors_count,
            } => {
                write!(
                    f,
                    "quorum: {kind:?} on child '{node_name}' bad at sector {sector_num} (+{sectors_count})"
                )?;
                match error {
                    Some(e) => write!(f, ": {e}"),
                    None => f.write_str(": lost the vote"),
                }
            }
            Event::QuorumFailure {
                reference,
                sector_num,
                sectors_count,
            } => write!(
                f,
                "quorum '{reference}': no quorum at sector {sector_num} (+{sectors_count})"
            ),
        }
    }
}

/// A callback receiving events; called on the thread that hit the condition,
/// possibly with the image's metadata lock held, so it must not call back
/// into the same image.
pub type EventSink = Arc<dyn Fn(&Event) + Send + Sync>;

/// An optional [`EventSink`] carried by [`crate::OpenOptions`], so that events
/// raised while an image opens (the repair of a dirty image, corruption found
/// while loading it) reach the embedder. Two handlers are equal when they are
/// the same callback.
#[derive(Clone, Default)]
pub(crate) struct EventHandler(pub(crate) Option<EventSink>);

impl fmt::Debug for EventHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Some(<event sink>)"
        } else {
            "None"
        })
    }
}

impl PartialEq for EventHandler {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }
}

impl Eq for EventHandler {}
