//! `qcow2-img bitmap` (`cli.md` §17, ≙ `qemu-img bitmap`): add, remove,
//! clear, enable, disable and merge persistent dirty bitmaps. The actions
//! run in command-line order; the first that fails stops the rest, but what
//! ran before it is kept (the image is closed, which stores the bitmaps,
//! either way), as with qemu-img.

use crate::common::{check_format, open_fail, parse_args, CmdResult, Fail};
use clap::{ArgAction, Parser};
use qcow2kit::error::BitmapError;
use qcow2kit::options::parse_image_size;
use qcow2kit::{Error, Image, OpenOptions};

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
    #[arg(long = "image-opts")]
    image_opts: bool,
    #[arg(short = 'g', long = "granularity", allow_hyphen_values = true)]
    granularity: Option<String>,
    #[arg(short = 'b', long = "source-file", allow_hyphen_values = true)]
    source_file: Option<String>,
    #[arg(short = 'F', long = "source-format", allow_hyphen_values = true)]
    source_format: Option<String>,
    #[arg(long = "add", action = ArgAction::Count)]
    add: u8,
    #[arg(long = "remove", action = ArgAction::Count)]
    remove: u8,
    #[arg(long = "clear", action = ArgAction::Count)]
    clear: u8,
    #[arg(long = "enable", action = ArgAction::Count)]
    enable: u8,
    #[arg(long = "disable", action = ArgAction::Count)]
    disable: u8,
    #[arg(long = "merge", action = ArgAction::Append, allow_hyphen_values = true)]
    merge: Vec<String>,
    #[arg(num_args = 0..)]
    rest: Vec<String>,
}

const SUB: &str = "bitmap";

/// One action, in command-line order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Action {
    /// The name qemu-img prints in `Operation OP on bitmap ...`.
    fn op(&self) -> &'static str {
        match self {
            Action::Add => "add",
            Action::Remove => "remove",
            Action::Clear => "clear",
            Action::Enable => "enable",
            Action::Disable => "disable",
            Action::Merge(_) => "merge",
        }
    }
}

/// The actions of `argv` in the order given (clap has validated `argv`
/// already; this only recovers the order across the different flags).
fn ordered_actions(argv: &[String]) -> Vec<Action> {
    let mut out = Vec::new();
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--" => break,
            "--add" => out.push(Action::Add),
            "--remove" => out.push(Action::Remove),
            "--clear" => out.push(Action::Clear),
            "--enable" => out.push(Action::Enable),
            "--disable" => out.push(Action::Disable),
            "--merge" => out.extend(it.next().map(|s| Action::Merge(s.clone()))),
            // Options whose value is the next word.
            "-f" | "-g" | "-b" | "-F" | "--format" | "--granularity" | "--source-file"
            | "--source-format" => {
                it.next();
            }
            s => {
                if let Some(src) = s.strip_prefix("--merge=") {
                    out.push(Action::Merge(src.to_owned()));
                }
            }
        }
    }
    out
}

/// Where the bitmaps of the merge source come from.
enum Source {
    /// FILE itself.
    Same,
    /// Another qcow2 image, open read-only.
    Image(Box<Image>),
    /// A raw image: it has no bitmaps.
    Raw,
}

/// Runs `bitmap`.
pub fn run(argv: &[String]) -> CmdResult {
    if argv.iter().any(|a| a == "-h" || a == "--help") {
        crate::help::print(crate::help::BITMAP);
        return Ok(());
    }
    let a: Args = parse_args(SUB, argv)?;
    // qemu-img parses -g as it reads it (cvtnum), before the other checks.
    let granularity = match a.granularity.as_deref() {
        None => 0,
        Some(g) => parse_image_size(g).map_err(|e| Fail::Msg(e.qemu_img_message("granularity")))?,
    };
    let actions = ordered_actions(argv);
    if actions.is_empty() {
        return Err(Fail::Msg(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge".into(),
        ));
    }
    if granularity != 0 && a.add == 0 {
        return Err(Fail::Msg("granularity only supported with --add".into()));
    }
    if a.source_format.is_some() && a.source_file.is_none() {
        return Err(Fail::Msg("-F only supported with -b".into()));
    }
    if a.source_file.is_some() && a.merge.is_empty() {
        return Err(Fail::Msg(
            "Merge bitmap source file only supported with --merge".into(),
        ));
    }
    let [filename, bitmap] = a.rest.as_slice() else {
        return Err(Fail::Msg("Expecting filename and bitmap name".into()));
    };
    if a.format.as_deref() == Some("raw") && !a.image_opts {
        return run_raw(filename, bitmap, &actions);
    }
    // No backing chain: bitmaps do not depend on image contents.
    let img = crate::common::open_image_arg(
        filename,
        a.image_opts,
        a.format.as_deref(),
        crate::common::open_options(),
        false,
    )?;
    let source = match &a.source_file {
        None => Source::Same,
        Some(f) => match open_source(f, a.source_format.as_deref()) {
            Ok(s) => s,
            Err(fail) => {
                let _ = img.close();
                return Err(fail);
            }
        },
    };
    // QEMU's qmp_block_dirty_bitmap_add takes a uint32 granularity: the
    // value is truncated (4G becomes 0 and is refused; 0 means the default).
    let granularity = (granularity != 0).then_some(granularity & u64::from(u32::MAX));
    let mut failed = None;
    for act in &actions {
        let r = match act {
            Action::Add => img.add_bitmap(bitmap, granularity),
            Action::Remove => img.remove_bitmap(bitmap),
            Action::Clear => img.clear_bitmap(bitmap),
            Action::Enable => img.enable_bitmap(bitmap),
            Action::Disable => img.disable_bitmap(bitmap),
            Action::Merge(src) => match &source {
                Source::Same => img.merge_bitmap(bitmap, src),
                Source::Image(from) => img.merge_bitmap_from(bitmap, from, src),
                // The target is looked up first, then the source.
                Source::Raw => check_target(&img, bitmap)
                    .and_then(|()| Err(Error::Bitmap(BitmapError::NotFound { name: src.clone() }))),
            },
        };
        if let Err(e) = r {
            failed = Some(operation_failed(act, bitmap, filename, &e));
            break;
        }
    }
    if let Source::Image(from) = source {
        let _ = from.close();
    }
    // Closing stores what the actions before a failure did.
    let closed = img.close();
    if let Some(f) = failed {
        return Err(f);
    }
    closed.map_err(|e| Fail::Msg(e.qemu_message()))
}

/// The checks of a merge target (it exists and is consistent), for a
/// source that turns out to have no bitmaps.
fn check_target(img: &Image, bitmap: &str) -> Result<(), Error> {
    match img.bitmaps()?.into_iter().find(|b| b.name == bitmap) {
        None => Err(Error::Bitmap(BitmapError::NotFound {
            name: bitmap.to_owned(),
        })),
        Some(b) if b.inconsistent => Err(Error::Bitmap(BitmapError::Inconsistent {
            name: bitmap.to_owned(),
        })),
        Some(_) => Ok(()),
    }
}

/// `open(2)` of `file` failed: the error qemu-img reports for it.
fn open_error(file: &str, source: std::io::Error) -> Error {
    Error::Open {
        path: file.into(),
        source,
    }
}

/// qemu-img's report of a failed action: `Operation OP on bitmap NAME
/// failed: MESSAGE`, and QEMU's hint line when it has one.
fn operation_failed(act: &Action, bitmap: &str, filename: &str, e: &Error) -> Fail {
    let (msg, hint) = match e.inner() {
        Error::Bitmap(b) => (b.qemu_message_for(filename), b.hint()),
        other => (other.qemu_message(), None),
    };
    let mut text = format!("Operation {} on bitmap {bitmap} failed: {msg}", act.op());
    if let Some(h) = hint {
        text.push('\n');
        text.push_str(h);
    }
    Fail::Msg(text)
}

/// Opens the `-b` source: read-only, without its backing chain; the format
/// is probed unless `-F` names it (a raw image has no bitmaps).
fn open_source(file: &str, format: Option<&str>) -> Result<Source, Fail> {
    let raw = match format {
        Some("raw") => true,
        Some(f) => {
            check_format(Some(f), file)?;
            false
        }
        None => !has_qcow2_magic(file).map_err(|e| open_fail(file, &e))?,
    };
    if raw {
        std::fs::File::open(file).map_err(|e| open_fail(file, &open_error(file, e)))?;
        return Ok(Source::Raw);
    }
    let opts = OpenOptions::new().read_only(true);
    Image::open_without_backing(file, &opts)
        .map(|i| Source::Image(Box::new(i)))
        .map_err(|e| open_fail(file, &e))
}

/// Whether `file` starts with the qcow2 magic (QEMU's format probe).
fn has_qcow2_magic(file: &str) -> Result<bool, Error> {
    use std::io::Read;
    let mut f = std::fs::File::open(file).map_err(|e| open_error(file, e))?;
    let mut magic = [0u8; 4];
    match f.read_exact(&mut magic) {
        Ok(()) => Ok(&magic == b"QFI\xfb"),
        Err(_) => Ok(false),
    }
}

/// `-f raw`: the file opens, but a raw image holds no bitmaps: `--add`
/// fails as QEMU's raw driver refuses persistent bitmaps, every other
/// action finds no bitmap.
fn run_raw(filename: &str, bitmap: &str, actions: &[Action]) -> CmdResult {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(filename)
        .map_err(|e| open_fail(filename, &open_error(filename, e)))?;
    let Some(act) = actions.first() else {
        return Ok(());
    };
    let msg = match act {
        Action::Add => {
            format!("Can't store persistent bitmaps to {filename}: Operation not supported")
        }
        _ => format!("Dirty bitmap '{bitmap}' not found"),
    };
    Err(Fail::Msg(format!(
        "Operation {} on bitmap {bitmap} failed: {msg}",
        act.op()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn actions_keep_their_order() {
        let argv = v(&[
            "--disable",
            "-g",
            "--add",
            "--add",
            "-b",
            "--clear",
            "f",
            "--merge",
            "s",
            "b",
            "--merge=t",
            "--enable",
            "--remove",
        ]);
        assert_eq!(
            ordered_actions(&argv),
            vec![
                Action::Disable,
                Action::Add,
                Action::Merge("s".into()),
                Action::Merge("t".into()),
                Action::Enable,
                Action::Remove
            ]
        );
        assert!(ordered_actions(&v(&["--", "--add"])).is_empty());
    }
}
