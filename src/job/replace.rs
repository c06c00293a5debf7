//! A mirror that replaces a quorum child (QAPI `drive-mirror` with
//! `replaces`): rebuilds one child of the quorum an image's file is on,
//! for instance a damaged or lost replica, while the embedder keeps using
//! the image.
//!
//! The quorum is the image file's storage (`file.driver=quorum`), found
//! with [`crate::storage::Storage::as_quorum`]; `replaces` names one of its
//! children (`children.N.node-name`, or the generated name, see
//! [`QuorumStorage`]). The target is the new child's storage. The job
//! attaches it to the quorum as a spare ([`QuorumStorage::begin_replace`]:
//! from then on every write of the image reaches it too), copies the
//! quorum's voted content into it a chunk at a time
//! ([`QuorumStorage::copy_to_spare`], writes held off for each chunk so a
//! racing write is never overwritten with older data), emits
//! `BLOCK_JOB_READY`, and on [`super::Job::complete`] swaps the spare in for
//! the child ([`QuorumStorage::finish_replace`]). The drive stays on the
//! image; cancelling (or failing) drops the spare and leaves the quorum as
//! it was.
//!
//! Reads are the quorum's votes throughout, so a damaged child never shows.

use super::mirror::{Drive, DriveNode, MirrorOptions};
use super::{Job, JobCtx, JobType, Stop};
use crate::error::{IoOp, Result};
use crate::options::ErrorPolicy;
use crate::storage::{QuorumStorage, SpareError};
use crate::{Error, Image};
use std::sync::Arc;

/// Bytes copied per step (holding the quorum's writes off meanwhile).
const CHUNK: usize = 1 << 20;

/// QEMU's error for a `replaces` that names no node.
fn not_found(name: &str) -> Error {
    Error::InvalidArgument(format!("Failed to find node with node-name='{name}'"))
}

/// The quorum `drive`'s image file is on, if any.
fn quorum_of(image: &Image) -> Option<&QuorumStorage> {
    image.storage().as_quorum()
}

/// Starts a mirror of `drive` into `target` that replaces the quorum child
/// `name` (see the module docs). The target must be a storage
/// ([`DriveNode::Raw`]): it becomes a child of the quorum.
///
/// # Errors
/// QEMU's `Failed to find node with node-name='NAME'` when the drive's
/// image is not on a quorum or the quorum has no child of that name;
/// [`Error::InvalidArgument`] for a qcow2 target; the target's error when
/// it cannot be sized; another replace of the same quorum unfinished.
pub(super) fn mirror_replacing(
    drive: Arc<Drive>,
    target: DriveNode,
    name: &str,
    opts: MirrorOptions,
) -> Result<Job> {
    let image = drive.image().ok_or_else(|| not_found(name))?;
    let quorum = quorum_of(&image).ok_or_else(|| not_found(name))?;
    let index = quorum.child_index(name).ok_or_else(|| not_found(name))?;
    let DriveNode::Raw(spare) = target else {
        return Err(Error::InvalidArgument(format!(
            "the target replacing '{name}' must be a storage (the new quorum child), not a qcow2 image"
        )));
    };
    quorum
        .begin_replace(index, spare)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => Error::InvalidArgument(format!(
                "a replace of a child of the quorum under '{}' is already running",
                image
                    .path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            )),
            _ => Error::io(IoOp::Write, 0, e),
        })?;
    let source = opts.on_source_error.unwrap_or(opts.job.on_error);
    let target = opts.on_target_error.unwrap_or(opts.job.on_error);
    let job_opts = opts.job.or_device_sink(&image);
    Job::spawn(JobType::Mirror, job_opts, {
        let image = image.clone();
        move |ctx| {
            let r = match quorum_of(&image) {
                Some(q) => run(ctx, q, (source, target)),
                None => Err(Stop::Failed(Error::Internal(
                    "the quorum under the drive went away".into(),
                ))),
            };
            if r.is_err() {
                if let Some(q) = quorum_of(&image) {
                    q.abort_replace();
                }
            }
            r
        }
    })
    .inspect_err(|_| quorum.abort_replace())
}

/// The job's work: copy, wait for completion, swap.
fn run(
    ctx: &JobCtx,
    q: &QuorumStorage,
    (on_source, on_target): (ErrorPolicy, ErrorPolicy),
) -> std::result::Result<(), Stop> {
    use crate::storage::Storage;
    let len = q
        .len()
        .map_err(|e| Stop::Failed(Error::io(IoOp::Read, 0, e)))?;
    ctx.set_len(len);
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < len {
        ctx.checkpoint()?;
        match q.copy_to_spare(&mut buf, off) {
            Ok(0) => break,
            Ok(n) => {
                let n = n as u64;
                ctx.processed(n);
                ctx.progress(n);
                off += n;
            }
            // A failed vote is the source's error, the spare's write
            // errors the target's.
            Err(SpareError::Read(e)) => {
                ctx.handle_error_with(on_source, IoOp::Read, Error::io(IoOp::Read, off, e))?;
            }
            Err(SpareError::Write(e)) => {
                ctx.handle_error_with(on_target, IoOp::Write, Error::io(IoOp::Write, off, e))?;
            }
        }
    }
    ctx.ready()?;
    if let Err(e) = q.finish_replace() {
        return Err(Stop::Failed(Error::io(IoOp::Write, 0, e)));
    }
    Ok(())
}
