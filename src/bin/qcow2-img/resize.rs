//! `qcow2-img resize` (`cli.md` §6). The size is always the last argument
//! and is taken out before option parsing, so `-1M` is not an option.

use crate::common::{lib_fail, parse_args, CmdResult, Fail};
use clap::Parser;
use qcow2kit::options::{parse_size, Preallocation};

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
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    #[arg(long = "preallocation")]
    preallocation: Option<String>,
    #[arg(long = "shrink")]
    shrink: bool,
    #[arg(num_args = 0..)]
    rest: Vec<String>,
}

const SUB: &str = "resize";

/// Runs `resize`.
pub fn run(argv: &[String]) -> CmdResult {
    if argv.iter().any(|a| a == "-h" || a == "--help") {
        crate::help::print(crate::help::RESIZE);
        return Ok(());
    }
    if argv.len() < 2 {
        return Err(Fail::Usage(
            "Expecting image file name and size".into(),
            SUB,
        ));
    }
    let (size_arg, opts) = argv.split_last().unwrap_or((&argv[0], &[]));
    let a: Args = parse_args(SUB, opts)?;
    let prealloc = match a.preallocation.as_deref() {
        None => Preallocation::Off,
        Some(p) => p
            .parse::<Preallocation>()
            .map_err(|e| Fail::Msg(e.to_string()))?,
    };
    if a.rest.len() != 1 {
        return Err(Fail::Usage(
            "Expecting image file name and size".into(),
            SUB,
        ));
    }
    let filename = &a.rest[0];
    let (relative, digits) = match size_arg.as_bytes().first() {
        Some(b'+') => (1i128, &size_arg[1..]),
        Some(b'-') => (-1i128, &size_arg[1..]),
        _ => (0i128, size_arg.as_str()),
    };
    let n = parse_size(digits).map_err(|e| Fail::Msg(e.into_option_error("size").to_string()))?;
    let img = crate::common::open_image_arg(
        filename,
        a.image_opts,
        a.format.as_deref(),
        crate::common::open_options(),
        true,
    )?;
    let current = i128::from(img.size());
    let total = if relative != 0 {
        current + i128::from(n) * relative
    } else {
        i128::from(n)
    };
    if total <= 0 {
        return Err(Fail::Msg("New image size must be positive".into()));
    }
    if total <= current && prealloc != Preallocation::Off {
        return Err(Fail::Msg(
            "Preallocation can only be used for growing images".into(),
        ));
    }
    if total < current && !a.shrink {
        return Err(Fail::Msg(
            "Use the --shrink option to perform a shrink operation.\n\
             qcow2-img: warning: Shrinking an image will delete all data beyond the shrunken \
             image's end. Before performing such an operation, make sure there is no important \
             data there."
                .into(),
        ));
    }
    let total = u64::try_from(total).unwrap_or(u64::MAX);
    if total != img.size() {
        img.resize_with(total, prealloc, a.shrink)
            .map_err(|e| lib_fail(&e))?;
    }
    img.close().map_err(|e| Fail::Msg(e.qemu_message()))?;
    if !a.quiet {
        println!("Image resized.");
    }
    Ok(())
}
