//! `qcow2-img create` (`cli.md` §2).

use crate::common::{parse_args, wants_help, CmdResult, Fail};
use clap::Parser;
use qcow2kit::cli_support::check_option_list;
use qcow2kit::options::{parse_image_size, CreateOptions};
use qcow2kit::storage::{FileStorage, Storage};
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
    #[arg(short = 'o', long = "options")]
    options: Vec<String>,
    #[arg(short = 'b', long = "backing")]
    backing: Option<String>,
    #[arg(short = 'F', long = "backing-format")]
    backing_format: Option<String>,
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    #[arg(short = 'u', long = "backing-unsafe")]
    unsafe_backing: bool,
    #[arg(num_args = 0..)]
    rest: Vec<String>,
}

const SUB: &str = "create";

/// Runs `create`.
pub fn run(argv: &[String]) -> CmdResult {
    let a: Args = parse_args(SUB, argv)?;
    if a.help {
        crate::help::print(crate::help::CREATE);
        return Ok(());
    }
    for o in &a.options {
        check_option_list(o).map_err(|e| Fail::Msg(e.to_string()))?;
    }
    match a.format.as_deref() {
        Some("qcow2") => {}
        None => return Err(Fail::Usage(
            "Image format must be specified with -f qcow2 (qcow2-img creates qcow2 images only)"
                .into(),
            SUB,
        )),
        Some("raw") => {
            return Err(Fail::Msg(
                "Format 'raw' is not supported: qcow2-img creates qcow2 images only".into(),
            ))
        }
        Some(other) => return Err(Fail::Msg(format!("Unknown file format '{other}'"))),
    }
    if wants_help(&a.options) {
        crate::common::print_create_options_help();
        return Ok(());
    }
    let Some(filename) = a.rest.first().cloned() else {
        return Err(Fail::Usage("Expecting image file name".into(), SUB));
    };
    let mut img_size = None;
    if let Some(s) = a.rest.get(1) {
        img_size =
            Some(parse_image_size(s).map_err(|e| Fail::Msg(e.qemu_img_message("image size")))?);
    }
    if let Some(extra) = a.rest.get(2) {
        return Err(Fail::Usage(format!("Unexpected argument: {extra}"), SUB));
    }
    let fail = |m: String| Fail::Msg(format!("{filename}: {m}"));

    // Parse -o (errors before the Formatting line).
    let mut opts = CreateOptions::new().secrets(crate::common::secrets());
    for o in &a.options {
        opts.apply_qemu_str(o).map_err(|e| fail(e.to_string()))?;
    }
    if let Some(size) = img_size {
        opts.set_positional_size(size)
            .map_err(|e| fail(e.to_string()))?;
    }
    if let Some(b) = &a.backing {
        opts.backing_file = Some(b.clone());
    }
    if let Some(f) = &a.backing_format {
        opts.backing_fmt = Some(f.clone());
    }

    // Open the backing file like qemu-img: for its format and size.
    if let (Some(backing), false) = (opts.backing_file.clone(), a.unsafe_backing) {
        if backing == filename {
            return Err(fail(
                "Error: Trying to create an image with the same filename as the backing file"
                    .into(),
            ));
        }
        if backing.is_empty() {
            return Err(fail("Expected backing file name, got empty string".into()));
        }
        let full = qcow2kit::info::path_combine(&filename, &backing);
        let (detected, size) = probe_backing(&full, opts.backing_fmt.as_deref())
            .map_err(|m| fail(format!("{m}\nCould not open backing image.")))?;
        if opts.backing_fmt.is_none() {
            return Err(fail(format!(
                "Backing file specified without backing format\nDetected format of {detected}."
            )));
        }
        if opts.size.is_none() {
            opts.size = Some(size);
        }
    }
    let size = opts.require_size().map_err(|e| fail(e.to_string()))?;

    if !a.quiet {
        println!("{}", opts.formatting_line(&filename));
    }
    opts.validate().map_err(|e| fail(e.to_string()))?;
    let path = Path::new(&filename);
    if let Err(e) = qcow2kit::create::create(path, &opts, size) {
        let created = path.exists();
        // A file another process holds was left untouched: it stays.
        if created && !matches!(e, Error::Lock(_)) {
            let _ = std::fs::remove_file(path);
        }
        let msg = match &e {
            Error::Io { .. } if !created => {
                format!("Could not create '{filename}': {}", e.qemu_message())
            }
            _ => e.qemu_message(),
        };
        return Err(fail(msg));
    }
    Ok(())
}

/// Opens the backing file read-only (with its own chain, as QEMU does):
/// the detected format and the virtual size (`raw`: the file length).
fn probe_backing(full: &str, fmt: Option<&str>) -> Result<(&'static str, u64), String> {
    let file = FileStorage::open(Path::new(full), false).map_err(|e| {
        format!(
            "Could not open '{full}': {}",
            Error::io(qcow2kit::error::IoOp::Read, 0, e).qemu_message()
        )
    })?;
    let mut magic = [0u8; 4];
    file.read_at(&mut magic, 0)
        .map_err(|e| format!("Could not read '{full}': {e}"))?;
    let is_qcow2 = magic == *b"QFI\xfb";
    let as_qcow2 = match fmt {
        Some("qcow2") => true,
        Some("raw") => false,
        Some(other) => return Err(format!("Unknown driver '{other}'")),
        None => is_qcow2,
    };
    if as_qcow2 {
        // As qemu-img create: the backing file is opened with force-share,
        // so an image in use by another process can still be a backing file,
        // and without I/O (BDRV_O_NO_IO), so an encrypted chain needs no key.
        let img = Image::open_no_io(full, &OpenOptions::new().read_only(true).force_share(true))
            .map_err(|e| crate::common::open_error_text(full, &e))?;
        Ok(("qcow2", img.size()))
    } else {
        let len = file
            .len()
            .map_err(|e| format!("Could not open '{full}': {e}"))?;
        // QEMU's lengths are whole sectors (bdrv_getlength).
        Ok(("raw", len.div_ceil(512) * 512))
    }
}
