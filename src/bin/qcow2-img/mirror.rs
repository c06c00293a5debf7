//! `qcow2-img mirror [-q] [-p] [-O qcow2|raw] SRC TARGET`: the library's
//! mirror job (QAPI `drive-mirror`, `sync=full`, `mode=absolute-paths`)
//! offline. TARGET is created (qcow2 with default options, or a raw file)
//! with SRC's virtual size and receives SRC's guest data through its whole
//! backing chain; it has no backing file. qemu-img has no such command:
//! silent on success, qemu-img's progress indicator.

use crate::common::{open_fail, parse_args, CmdResult, Fail};
use crate::progress::Progress;
use clap::Parser;
use qcow2kit::job::{mirror, Drive, JobOptions, JobStatus, MirrorOptions, MirrorTarget};
use qcow2kit::storage::{FileStorage, Storage};
use qcow2kit::{CreateOptions, Image, OpenOptions};
use std::path::Path;
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
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    #[arg(short = 'O')]
    output_format: Option<String>,
    #[arg(num_args = 0..)]
    rest: Vec<String>,
}

const SUB: &str = "mirror";

/// Runs `mirror`.
pub fn run(argv: &[String]) -> CmdResult {
    let a: Args = parse_args(SUB, argv)?;
    if a.help {
        crate::help::print(crate::help::MIRROR);
        return Ok(());
    }
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
    let job = mirror(
        drive.clone(),
        target.clone(),
        MirrorOptions {
            job: JobOptions {
                id: "mirror".into(),
                ..Default::default()
            },
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
