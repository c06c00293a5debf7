//! `qcow2-img rebase [-f qcow2] [-q] [-p] [-U] [-u] [-b NEW [-F FMT]] FILE`
//! (`cli.md` §10 and §16): changes FILE's backing file. Safe mode (no `-u`)
//! first copies into FILE every range where the old and the new backing
//! file read differently ([`Image::rebase`]); `-u` only rewrites the header
//! ([`Image::change_backing_file`]). `-b ""` (and `-u` without `-b`) removes
//! the backing file.
//!
//! Where qemu-img copies and only then fails (safe mode without `-F`), this
//! fails before changing anything, as `cli.md` §16 allows.

use crate::common::{check_format, open_error_text, open_fail, parse_args, CmdResult, Fail};
use crate::progress::Progress;
use clap::Parser;
use qcow2kit::image::Backing;
use qcow2kit::{Error, Image, OpenOptions};
use std::path::Path;

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
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[arg(short = 'u')]
    unsafe_mode: bool,
    #[arg(short = 'b', allow_hyphen_values = true)]
    backing: Option<String>,
    #[arg(short = 'F', allow_hyphen_values = true)]
    backing_format: Option<String>,
    #[arg(num_args = 0..)]
    rest: Vec<String>,
}

/// qemu-img's `IO_BUF_SIZE` (the library's rebase compares requests of
/// this size, cut where FILE's allocation changes).
const REBASE_BUF: u64 = 2 << 20;

/// qemu-img rebase's `qemu_progress_init(progress, 2.0)`.
const REBASE_MIN_SKIP: f32 = 2.0;

const SUB: &str = "rebase";

/// Format names QEMU knows (`bdrv_find_format`); only qcow2 and raw can be
/// opened here, the others may still be written with `-u`.
const KNOWN_FORMATS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "host_cdrom",
    "host_device",
    "luks",
    "nbd",
    "null-aio",
    "null-co",
    "nvme",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "snapshot-access",
    "throttle",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

/// `Could not change the backing file to 'NEW': ...`.
fn change_failed(new: &str, e: &Error) -> Fail {
    let why = match e.inner() {
        Error::TooLarge(l) => l.to_string(),
        Error::InvalidArgument(m) if m == "backing format must be specified" => m.clone(),
        _ => e.errno_text(),
    };
    Fail::Msg(format!(
        "Could not change the backing file to '{new}': {why}"
    ))
}

/// Runs `rebase`.
pub fn run(argv: &[String]) -> CmdResult {
    let a: Args = parse_args(SUB, argv)?;
    if a.help {
        crate::help::print(crate::help::REBASE);
        return Ok(());
    }
    let [filename] = a.rest.as_slice() else {
        return Err(Fail::Usage("Expecting one image file name".into(), SUB));
    };
    if !a.unsafe_mode && a.backing.is_none() {
        return Err(Fail::Usage(
            "Must specify backing file (-b) or use unsafe mode (-u)".into(),
            SUB,
        ));
    }
    // `-u` without `-b` is `-u -b ""`.
    let new = a.backing.clone().unwrap_or_default();
    let mut progress = Progress::new(a.progress && !a.quiet).with_min_skip(REBASE_MIN_SKIP);
    progress.start();
    check_format(a.format.as_deref(), filename)?;
    // Unsafe mode never opens the old (or the new) backing file.
    let opts = OpenOptions::new();
    let img = if a.unsafe_mode {
        Image::open_without_backing(filename, &opts)
    } else {
        Image::open(filename, &opts)
    }
    .map_err(|e| open_fail(filename, &e))?;
    if let Some(f) = &a.backing_format {
        if !KNOWN_FORMATS.contains(&f.as_str()) {
            return Err(Fail::Msg(format!("Invalid format name: '{f}'")));
        }
    }
    // The format goes with a backing file only.
    let format = if new.is_empty() {
        None
    } else {
        a.backing_format.as_deref()
    };
    if a.unsafe_mode {
        if !new.is_empty() && format.is_none() {
            return Err(change_failed(
                &new,
                &Error::InvalidArgument("backing format must be specified".into()),
            ));
        }
        img.change_backing_file(&new, format)
            .map_err(|e| change_failed(&new, &e))?;
    } else {
        let new_backing = if new.is_empty() {
            None
        } else {
            let nopts = OpenOptions::new().force_share(a.force_share);
            let b = Backing::open(&new, format, img.path(), &nopts).map_err(|e| {
                let real = match Path::new(filename).parent() {
                    Some(d) if !d.as_os_str().is_empty() && !Path::new(&new).is_absolute() => {
                        d.join(&new).to_string_lossy().into_owned()
                    }
                    _ => new.clone(),
                };
                Fail::Msg(format!(
                    "Could not open new backing file '{new}': {}",
                    open_error_text(&real, &e)
                ))
            })?;
            Some(b)
        };
        // qemu-img's img_rebase: each 2 MiB request it compares (ranges
        // allocated in FILE are skipped and not counted) adds
        // `(float)100 / (size / MIN(size, IO_BUF_SIZE))` percent.
        let size = img.size();
        let step = if size == 0 {
            0.0
        } else {
            100.0 / (size / size.min(REBASE_BUF)) as f32
        };
        img.rebase(new_backing.as_ref(), &new, format, &mut |_, _| {
            progress.add(step);
        })
        .map_err(|e| match e.inner() {
            Error::TooLarge(_) | Error::InvalidArgument(_) => change_failed(&new, &e),
            _ => Fail::Msg(format!(
                "Error while rebasing '{filename}': {}",
                e.errno_text()
            )),
        })?;
    }
    progress.finish();
    img.shutdown().map_err(|e| Fail::Msg(e.qemu_message()))?;
    Ok(())
}
