//! `qcow2-img commit [-f qcow2] [-q] [-d] [-p] [-b BASE] [-r RATE] FILE`
//! (`cli.md` §9 and §15): copies what FILE and the layers down to BASE
//! (default: FILE's backing file) hold into BASE with the library's commit
//! job, then empties FILE unless `-d` or `-b` (which implies `-d`), as
//! qemu-img does.
//! FILE is opened read-write with its chain, as qemu-img opens it; the job
//! opens BASE writable beside the chain's read-only handle. BASE may be the
//! raw file ending the chain.

use crate::common::{check_format, open_fail, parse_args, CmdResult, Fail};
use crate::progress::Progress;
use clap::Parser;
use qcow2kit::image::Backing;
use qcow2kit::job::{commit, CommitOptions, JobOptions, JobStatus};
use qcow2kit::options::{parse_size, SizeError};
use qcow2kit::{Image, OpenOptions};
use std::path::{Path, PathBuf};
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
    #[arg(short = 'd')]
    keep: bool,
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    #[arg(short = 'b', allow_hyphen_values = true)]
    base: Option<String>,
    #[arg(short = 'r', allow_hyphen_values = true)]
    rate: Option<String>,
    #[arg(num_args = 0..)]
    rest: Vec<String>,
}

const SUB: &str = "commit";

/// qemu-img's `cvtnum("rate limit", ...)`.
pub fn parse_rate(s: &str) -> Result<u64, Fail> {
    match parse_size(s) {
        Ok(v) if i64::try_from(v).is_ok() => Ok(v),
        Err(SizeError::Invalid { .. }) => {
            Err(Fail::Msg(format!("Invalid rate limit specified: '{s}'.")))
        }
        _ => Err(Fail::Msg(format!(
            "Invalid rate limit specified. Must be between 0 and {}.",
            i64::MAX
        ))),
    }
}

/// Whether `layer` is the file `name` (by identity, as QEMU's
/// `bdrv_find_backing_image` resolves names).
fn same_file(layer: &Path, name: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(layer), std::fs::metadata(name)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// The paths of the backing chain below `img` (not `img` itself), the
/// raw file that may end it included.
fn chain_paths(img: &Image) -> Vec<PathBuf> {
    let mut v = Vec::new();
    let mut cur = img.backing();
    while let Some(b) = cur {
        match b {
            Backing::Qcow2(i) => {
                v.push(i.path().map(Path::to_path_buf).unwrap_or_default());
                cur = i.backing();
            }
            Backing::Raw { path, .. } => {
                v.push(path.clone());
                cur = None;
            }
        }
    }
    v
}

/// Runs `commit`.
pub fn run(argv: &[String]) -> CmdResult {
    let a: Args = parse_args(SUB, argv)?;
    if a.help {
        crate::help::print(crate::help::COMMIT);
        return Ok(());
    }
    let speed = match &a.rate {
        Some(r) => parse_rate(r)?,
        None => 0,
    };
    // -b implies -d.
    let keep = a.keep || a.base.is_some();
    let [filename] = a.rest.as_slice() else {
        return Err(Fail::Usage("Expecting one image file name".into(), SUB));
    };
    check_format(a.format.as_deref(), filename)?;
    let device =
        Arc::new(Image::open(filename, &OpenOptions::new()).map_err(|e| open_fail(filename, &e))?);
    let mut progress = Progress::new(a.progress && !a.quiet);
    progress.start();

    let chain = chain_paths(&device);
    let base = match &a.base {
        Some(b) => chain
            .iter()
            .find(|p| same_file(p, Path::new(b)))
            .ok_or_else(|| {
                Fail::Msg(format!(
                    "Did not find '{b}' in the backing chain of '{filename}'"
                ))
            })?,
        None => chain
            .first()
            .ok_or_else(|| Fail::Msg("Image does not have a backing file".into()))?,
    };
    let job = commit(
        device.clone(),
        CommitOptions {
            job: JobOptions {
                id: "commit".into(),
                speed,
                ..Default::default()
            },
            base: Some(base.clone()),
            device_quiesced: true,
            ..Default::default()
        },
    )
    .map_err(|e| Fail::Msg(e.qemu_message()))?;
    // qemu-img's run_block_job: print the progress until the job is ready,
    // then complete it.
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
    if !keep {
        device
            .make_empty()
            .map_err(|e| Fail::Msg(format!("Could not empty {filename}: {}", e.errno_text())))?;
    }
    device.shutdown().map_err(|e| Fail::Msg(e.qemu_message()))?;
    drop(progress);
    if !a.quiet {
        println!("Image committed.");
    }
    Ok(())
}
