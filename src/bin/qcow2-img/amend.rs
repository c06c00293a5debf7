//! `qcow2-img amend -o OPTS FILE` (`cli.md` §7): changes header options in
//! place. Silent on success; `-p` prints qemu-img's progress indicator.

use crate::common::{lib_fail, parse_args, CmdResult, Fail};
use crate::progress::Progress;
use clap::Parser;
use qcow2kit::options::AmendOptions;

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
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    #[arg(short = 'o', action = clap::ArgAction::Append)]
    options: Vec<String>,
    #[arg(num_args = 0..)]
    rest: Vec<String>,
}

const SUB: &str = "amend";

/// Runs `amend`.
pub fn run(argv: &[String]) -> CmdResult {
    let a: Args = parse_args(SUB, argv)?;
    if a.help {
        crate::help::print(crate::help::AMEND);
        return Ok(());
    }
    if a.options.is_empty() {
        return Err(Fail::Usage("Must specify options (-o)".into(), SUB));
    }
    let [filename] = a.rest.as_slice() else {
        return Err(Fail::Usage("Expecting one image file name".into(), SUB));
    };
    // From here on qemu-img has started its indicator: whatever fails
    // closes it with a newline first.
    let mut progress = Progress::new(a.progress && !a.quiet);
    let mut opts = AmendOptions::new();
    for o in &a.options {
        opts.apply_qemu_str(o).map_err(|e| {
            let hint = e.hint().map(|h| format!("\n{h}")).unwrap_or_default();
            Fail::Msg(format!("{e}{hint}"))
        })?;
    }
    let img = crate::common::open_image_arg(
        filename,
        a.image_opts,
        a.format.as_deref(),
        crate::common::open_options(),
        true,
    )?;
    progress.start();
    let amended =
        qcow2kit::amend::amend_image_with_progress(&img, &opts, &mut |d, t| progress.set(d, t));
    // qemu-img reports the end of the amendment whether it worked or not.
    progress.finish();
    amended.map_err(|e| lib_fail(&e))?;
    img.close().map_err(|e| Fail::Msg(e.qemu_message()))
}
