//! `qcow2-img measure` (`cli.md` §18.1, qemu-img's `img_measure`): how
//! large a new raw or qcow2 image would be, for a size or for converting an
//! existing image. The arithmetic is the library's (`qcow2kit::measure`);
//! this module parses, walks the source's allocation and prints.

use crate::common::{parse_args, parse_output, CmdResult, Fail, Output};
use crate::convert_src::Src;
use clap::Parser;
use qcow2kit::cli_support::{check_option_list, split_option_string};
use qcow2kit::info::{FormatSpecific, ImageInfo};
use qcow2kit::measure;
use qcow2kit::options::{parse_image_size, parse_size, CreateOptions, OptionError};

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
    #[arg(short = 'O')]
    out_format: Option<String>,
    #[arg(short = 'o', long = "options")]
    options: Vec<String>,
    #[arg(long = "size", allow_hyphen_values = true)]
    size: Option<String>,
    #[arg(long = "output")]
    output: Option<String>,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[arg(long = "image-opts")]
    image_opts: bool,
    #[arg(num_args = 0..)]
    rest: Vec<String>,
}

const SUB: &str = "measure";

/// Runs `measure`.
pub fn run(argv: &[String]) -> CmdResult {
    let a: Args = parse_args(SUB, argv)?;
    if a.help {
        crate::help::print(crate::help::MEASURE);
        return Ok(());
    }
    let output = parse_output(a.output.as_deref(), SUB)?;
    let size = match &a.size {
        Some(s) => {
            Some(parse_image_size(s).map_err(|e| Fail::Msg(e.qemu_img_message("image size")))?)
        }
        None => None,
    };
    match (&size, a.rest.len()) {
        (None, 0) => {
            return Err(Fail::Msg(
                "Either --size N or one filename must be specified.".into(),
            ))
        }
        (Some(_), n) if n > 0 => {
            return Err(Fail::Msg(
                "--size N cannot be used together with a filename.".into(),
            ))
        }
        (_, n) if n > 1 => {
            return Err(Fail::Msg(
                "At most one filename argument is allowed.".into(),
            ))
        }
        _ => {}
    }
    for o in &a.options {
        check_option_list(o).map_err(|e| Fail::Msg(e.to_string()))?;
    }
    let src = match a.rest.first() {
        None => None,
        Some(name) => Some((
            name.as_str(),
            open(name, a.format.as_deref(), a.force_share, a.image_opts)?,
        )),
    };
    let out_fmt = a.out_format.as_deref().unwrap_or("raw");
    let lines = match out_fmt {
        "raw" => measure_raw(&a.options, size, src.as_ref().map(|(_, s)| s))?,
        "qcow2" => measure_qcow2(&a.options, size, src.as_ref())?,
        other => return Err(Fail::Msg(format!("Unknown file format '{other}'"))),
    };
    print(output, lines);
    Ok(())
}

/// `(required, fully allocated, bitmaps)`.
type Sizes = (u64, u64, Option<u64>);

fn open(name: &str, fmt: Option<&str>, force_share: bool, image_opts: bool) -> Result<Src, Fail> {
    match fmt {
        // An option string (`driver=qcow2,file.filename=F,
        // encrypt.key-secret=ID,...`), as qemu-img takes it.
        _ if image_opts => {
            let opts = crate::common::open_options()
                .read_only(true)
                .force_share(force_share);
            Ok(Src::Qcow2(Box::new(crate::common::open_image_arg(
                name, true, fmt, opts, true,
            )?)))
        }
        Some("raw") => Src::open_raw(name, false),
        f => {
            crate::common::check_format(f, name)?;
            let opts = crate::common::open_options()
                .read_only(true)
                .force_share(force_share);
            Ok(Src::Qcow2(Box::new(crate::common::open_ro_with(
                name, opts,
            )?)))
        }
    }
}

/// qemu-img's message for an option list the target format refuses.
fn invalid_options(e: &OptionError, fmt: &str) -> Fail {
    match e {
        OptionError::InvalidParameter { .. }
        | OptionError::BadSize { .. }
        | OptionError::BadNumber { .. }
        | OptionError::BadBool { .. }
        | OptionError::NumberTooLarge { .. }
        | OptionError::SizeOutOfRange { .. } => Fail::Msg(format!(
            "{e}\nqcow2-img: Invalid options for file format '{fmt}'"
        )),
        _ => Fail::Msg(e.to_string()),
    }
}

/// The raw driver's measure: the disk size, rounded to sectors without a
/// source.
fn measure_raw(options: &[String], size: Option<u64>, src: Option<&Src>) -> Result<Sizes, Fail> {
    for o in options {
        for (k, v) in split_option_string(o).map_err(|e| Fail::Msg(e.to_string()))? {
            match k.as_str() {
                "size" => {
                    parse_size(&v)
                        .map_err(|e| Fail::Msg(e.into_option_error("size").to_string()))?;
                }
                "preallocation" | "nocow" | "extent_size_hint" => {}
                _ => {
                    return Err(Fail::Msg(format!(
                        "Invalid parameter '{k}'\nqcow2-img: Invalid options for file format 'raw'"
                    )))
                }
            }
        }
    }
    let n = match src {
        Some(s) => s.size(),
        None => size
            .unwrap_or(0)
            .checked_next_multiple_of(512)
            .unwrap_or(u64::MAX),
    };
    Ok((n, n, None))
}

fn measure_qcow2(
    options: &[String],
    size: Option<u64>,
    src: Option<&(&str, Src)>,
) -> Result<Sizes, Fail> {
    let mut opts = CreateOptions::new().secrets(crate::common::secrets());
    for o in options {
        opts.apply_qemu_str(o)
            .map_err(|e| invalid_options(&e, "qcow2"))?;
    }
    let cs = opts.cluster_size;
    let (virtual_size, data) = match src {
        None => (size.unwrap_or(0), None),
        Some((name, s)) => (s.size(), Some(data_bytes(s, name, cs)?)),
    };
    let m = measure::qcow2(&opts, virtual_size, data).map_err(|e| match e {
        qcow2kit::Error::InvalidArgument(m) => Fail::Msg(m),
        e @ (qcow2kit::Error::Crypto(_) | qcow2kit::Error::EncryptionKeyRequired) => {
            Fail::Msg(e.qemu_message())
        }
        e => Fail::Msg(e.to_string()),
    })?;
    let bitmaps = match src {
        Some((name, Src::Qcow2(img)))
            if opts.compat == qcow2kit::options::Compat::V3 && img.header().version >= 3 =>
        {
            let info = ImageInfo::from_image(img, name).map_err(|e| Fail::Msg(e.to_string()))?;
            let list: Vec<(usize, u64)> = match info.format_specific {
                Some(FormatSpecific::Qcow2(q)) => q
                    .bitmaps
                    .unwrap_or_default()
                    .iter()
                    .map(|b| (b.name.len(), b.granularity))
                    .collect(),
                _ => Vec::new(),
            };
            Some(measure::bitmaps_size(img.size(), cs, &list))
        }
        _ => None,
    };
    Ok((m.required, m.fully_allocated, bitmaps))
}

/// The bytes of the source that hold data, each run extended to the end
/// of its target cluster (QEMU's walk: zero runs are skipped).
fn data_bytes(src: &Src, name: &str, cs: u64) -> Result<u64, Fail> {
    let ext = src.extents(name).map_err(|e| Fail::Msg(e.qemu_message()))?;
    let size = src.size();
    let mut required = 0u64;
    let mut offset = 0u64;
    let err =
        |e: qcow2kit::Error| Fail::Msg(format!("Unable to get block status: {}", e.errno_text()));
    while offset < size {
        let (st, mut pnum) = ext.status(offset, size - offset).map_err(err)?;
        if !st.zero && st.data && st.allocated {
            let end = (offset + pnum)
                .checked_next_multiple_of(cs)
                .unwrap_or(u64::MAX);
            pnum = end - offset;
            required = required.saturating_add(offset % cs + pnum);
        }
        offset = offset.saturating_add(pnum);
    }
    Ok(required)
}

fn print(output: Output, (required, fully, bitmaps): Sizes) {
    match output {
        Output::Human => {
            println!("required size: {required}");
            println!("fully allocated size: {fully}");
            if let Some(b) = bitmaps {
                println!("bitmaps size: {b}");
            }
        }
        Output::Json => {
            println!("{{");
            if let Some(b) = bitmaps {
                println!("    \"bitmaps\": {b},");
            }
            println!("    \"required\": {required},");
            println!("    \"fully-allocated\": {fully}");
            println!("}}");
        }
    }
}
