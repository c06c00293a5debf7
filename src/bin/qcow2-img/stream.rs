//! `qcow2-img stream [-f qcow2] [-q] [-p] [-b BASE] [--backing-file STR]
//! [-r RATE] FILE`: the library's stream job (QAPI `block-stream`) offline.
//! Copies into FILE what its backing chain holds above BASE (or all of
//! it), then names BASE (as given, or STR) with BASE's format as FILE's
//! backing file, or removes it. qemu-img has no such command: the messages
//! are QMP's `block-stream` errors, the progress indicator qemu-img's.
//! Silent on success.

use crate::commit::parse_rate;
use crate::common::{check_format, open_fail, parse_args, CmdResult, Fail};
use crate::progress::Progress;
use clap::Parser;
use qcow2kit::job::{stream, JobOptions, JobStatus, StreamOptions};
use qcow2kit::{Image, OpenOptions};
use std::path::PathBuf;
use std::sync::Arc;
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
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    #[arg(short = 'b', allow_hyphen_values = true)]
    base: Option<String>,
    #[arg(long = "backing-file", allow_hyphen_values = true)]
    backing_file: Option<String>,
    #[arg(short = 'r', allow_hyphen_values = true)]
    rate: Option<String>,
    #[arg(num_args = 0..)]
    rest: Vec<String>,
}

const SUB: &str = "stream";

/// Runs `stream`.
pub fn run(argv: &[String]) -> CmdResult {
    let a: Args = parse_args(SUB, argv)?;
    if a.help {
        crate::help::print(crate::help::STREAM);
        return Ok(());
    }
    let speed = match &a.rate {
        Some(r) => parse_rate(r)?,
        None => 0,
    };
    let [filename] = a.rest.as_slice() else {
        return Err(Fail::Usage("Expecting one image file name".into(), SUB));
    };
    check_format(a.format.as_deref(), filename)?;
    let device =
        Arc::new(Image::open(filename, &OpenOptions::new()).map_err(|e| open_fail(filename, &e))?);
    let mut progress = Progress::new(a.progress && !a.quiet);
    progress.start();
    let job = stream(
        device.clone(),
        StreamOptions {
            job: JobOptions {
                id: "stream".into(),
                speed,
                ..Default::default()
            },
            base: a.base.as_ref().map(PathBuf::from),
            backing_file: a.backing_file.clone(),
        },
    )
    .map_err(|e| Fail::Msg(e.qemu_message()))?;
    loop {
        let info = job.info();
        progress.set(info.offset, info.len);
        if info.status == JobStatus::Concluded {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    job.wait().map_err(|e| Fail::Msg(e.qemu_message()))?;
    progress.finish();
    device.shutdown().map_err(|e| Fail::Msg(e.qemu_message()))?;
    Ok(())
}
