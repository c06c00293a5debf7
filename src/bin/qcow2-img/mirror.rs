//! `qcow2-img mirror [-q] [-p] [-O qcow2|raw] [--on-source-error=P]
//! [--on-target-error=P] SRC TARGET`: the library's mirror job (QAPI
//! `drive-mirror`, `sync=full`, `mode=absolute-paths`) offline. TARGET is created (qcow2 with default options, or a raw file)
//! with SRC's virtual size and receives SRC's guest data through its whole
//! backing chain; it has no backing file. qemu-img has no such command:
//! silent on success, qemu-img's progress indicator. The error policies are
//! QAPI's `BlockdevOnError` per side; offline nobody can resume a job that
//! stopped on an error, so the command cancels it and fails.

use crate::common::{open_fail, parse_args, CmdResult, Fail};
use crate::progress::Progress;
use clap::Parser;
use qcow2kit::error::IoOp;
use qcow2kit::events::EventSink;
use qcow2kit::job::{mirror, Drive, JobOptions, JobStatus, MirrorOptions, MirrorTarget};
use qcow2kit::options::{ErrorAction, ErrorPolicy};
use qcow2kit::storage::{FileStorage, Storage};
use qcow2kit::{CreateOptions, Event, Image, OpenOptions};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    no_binary_name = true,
    disable_help_flag = true,
    disable_version_flag = true
)]
struct Args {
    #[arg(short = 'h', long = "help")]
    help: bool,
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    #[arg(short = 'O')]
    output_format: Option<String>,
    #[arg(long = "on-source-error")]
    on_source_error: Option<String>,
    #[arg(long = "on-target-error")]
    on_target_error: Option<String>,
    #[arg(num_args = 0..)]
    rest: Vec<String>,
}

const SUB: &str = "mirror";

/// A QAPI `BlockdevOnError` value for the parameter `name` (`enospc` is
/// valid for reads too, as for QEMU's jobs); QAPI's text otherwise.
fn parse_policy(name: &str, value: Option<&str>) -> Result<Option<ErrorPolicy>, Fail> {
    let Some(v) = value else {
        return Ok(None);
    };
    match v {
        "report" => Ok(Some(ErrorPolicy::Report)),
        "ignore" => Ok(Some(ErrorPolicy::Ignore)),
        "stop" => Ok(Some(ErrorPolicy::Stop)),
        "enospc" => Ok(Some(ErrorPolicy::Enospc)),
        _ => Err(Fail::Msg(format!(
            "Parameter '{name}' does not accept value '{v}'"
        ))),
    }
}

/// Runs `mirror`.
pub fn run(argv: &[String]) -> CmdResult {
    let a: Args = parse_args(SUB, argv)?;
    if a.help {
        crate::help::print(crate::help::MIRROR);
        return Ok(());
    }
    let on_source_error = parse_policy("on-source-error", a.on_source_error.as_deref())?;
    let on_target_error = parse_policy("on-target-error", a.on_target_error.as_deref())?;
    let [src, dst] = a.rest.as_slice() else {
        return Err(Fail::Usage("Expecting two image file names".into(), SUB));
    };
    let raw = match a.output_format.as_deref() {
        None | Some("qcow2") => false,
        Some("raw") => true,
        Some(other) => {
            return Err(Fail::Msg(format!(
                "Unknown file format '{other}' (qcow2 and raw are supported)"
            )))
        }
    };
    let source =
        Image::open(src, &OpenOptions::new().read_only(true)).map_err(|e| open_fail(src, &e))?;
    let size = source.size();
    let create_fail = |e: String| Fail::Msg(format!("{dst}: {e}"));
    let target = if raw {
        let f =
            FileStorage::create(Path::new(dst), false).map_err(|e| create_fail(e.to_string()))?;
        f.set_len(size).map_err(|e| create_fail(e.to_string()))?;
        MirrorTarget::Raw(Arc::new(f))
    } else {
        qcow2kit::create::create(Path::new(dst), &CreateOptions::new(), size)
            .map_err(|e| create_fail(e.qemu_message()))?;
        let t = Image::open_without_backing(dst, &OpenOptions::new())
            .map_err(|e| open_fail(dst, &e))?;
        MirrorTarget::Image(Arc::new(t))
    };
    let mut progress = Progress::new(a.progress && !a.quiet);
    progress.start();
    let drive = Drive::new(Arc::new(source));
    // The operation of the last error the job stopped on.
    let stopped: Arc<Mutex<Option<IoOp>>> = Arc::default();
    let events: EventSink = {
        let stopped = stopped.clone();
        Arc::new(move |e: &Event| {
            if let Event::BlockJobError {
                operation,
                action: ErrorAction::Stop,
                ..
            } = e
            {
                *stopped.lock().unwrap_or_else(|p| p.into_inner()) = Some(*operation);
            }
        })
    };
    let job = mirror(
        drive.clone(),
        target.clone(),
        MirrorOptions {
            job: JobOptions {
                id: "mirror".into(),
                events: Some(events),
                ..Default::default()
            },
            on_source_error,
            on_target_error,
            ..Default::default()
        },
    )
    .map_err(|e| Fail::Msg(e.qemu_message()))?;
    loop {
        let info = job.info();
        progress.set(info.offset, info.len);
        match info.status {
            JobStatus::Ready => {
                job.complete().map_err(|e| Fail::Msg(e.qemu_message()))?;
                break;
            }
            JobStatus::Concluded => break,
            // Only an error with the stop policy pauses this job.
            JobStatus::Paused => {
                let op = *stopped.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(op) = op {
                    job.cancel();
                    let _ = job.wait();
                    let (side, what) = match op {
                        IoOp::Read => ("on-source-error", "reading SRC"),
                        _ => ("on-target-error", "writing TARGET"),
                    };
                    return Err(Fail::Msg(format!(
                        "the mirror stopped on an error {what} ({side}); {dst} is incomplete"
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    job.wait().map_err(|e| Fail::Msg(e.qemu_message()))?;
    progress.finish();
    match target {
        MirrorTarget::Image(t) => {
            drop(drive);
            t.shutdown().map_err(|e| Fail::Msg(e.qemu_message()))?
        }
        MirrorTarget::Raw(s) => s.flush().map_err(|e| Fail::Msg(format!("{dst}: {e}")))?,
        _ => {}
    }
    Ok(())
}
