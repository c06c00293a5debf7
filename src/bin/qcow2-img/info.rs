//! `qcow2-img info` (`cli.md` §3).

use crate::common::{check_format, open_fail, parse_args, parse_output, CmdResult, Fail, Output};
use clap::Parser;
use qcow2kit::image::MAX_BACKING_DEPTH;
use qcow2kit::info::{path_combine, to_json_pretty, ImageInfo};
use qcow2kit::storage::FileStorage;
use qcow2kit::storage::Storage;
use qcow2kit::{Image, OpenOptions};
use std::path::Path;

/// Whether the file starts with the qcow2 magic (an unreadable file counts
/// as qcow2, so that opening it reports the error).
fn is_qcow2(name: &str) -> bool {
    let Ok(f) = FileStorage::open(Path::new(name), false) else {
        return true;
    };
    let mut magic = [0u8; 4];
    f.read_at(&mut magic, 0).is_err() || magic == *b"QFI\xfb"
}

/// Device and inode of a file, when it can be stat'ed.
fn file_id(name: &str) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(name).ok().map(|m| (m.dev(), m.ino()))
}

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
    #[arg(long = "output")]
    output: Option<String>,
    #[arg(long = "image-opts")]
    image_opts: bool,
    #[arg(long = "backing-chain")]
    backing_chain: bool,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[arg(num_args = 0..)]
    rest: Vec<String>,
}

const SUB: &str = "info";

/// Runs `info`.
pub fn run(argv: &[String]) -> CmdResult {
    let a: Args = parse_args(SUB, argv)?;
    if a.help {
        crate::help::print(crate::help::INFO);
        return Ok(());
    }
    let output = parse_output(a.output.as_deref(), SUB)?;
    if a.rest.len() != 1 {
        return Err(Fail::Usage("Expecting one image file name".into(), SUB));
    }
    let filename = a.rest[0].clone();
    let base_opts = crate::common::open_options()
        .read_only(true)
        .force_share(a.force_share);
    // With --image-opts the first image comes from an option string; it is
    // named as QEMU names it: its file, or a `json:` name when the string
    // sets a key secret (QEMU's only strong qcow2 option supported here).
    let mut top: Option<(OpenOptions, String)> = None;
    let mut name = if a.image_opts {
        if a.format.is_some() {
            return Err(Fail::Msg(
                "--image-opts and --format are mutually exclusive".into(),
            ));
        }
        let mut o = base_opts.clone();
        o.apply_qemu_str(&filename)
            .map_err(|e| Fail::Msg(format!("Could not open '{filename}': {e}")))?;
        let file = o
            .filename()
            .map(|p| p.to_string_lossy().into_owned())
            .ok_or_else(|| {
                Fail::Msg(format!(
                    "Could not open '{filename}': A block device must be specified for \"file\""
                ))
            })?;
        let shown = match o.get_key_secret() {
            Some(id) => format!(
                "json:{{\"encrypt.key-secret\": {}, \"driver\": \"qcow2\", \"file\": {{\"driver\": \"file\", \"filename\": {}}}}}",
                json_str(id),
                json_str(&file)
            ),
            None => file.clone(),
        };
        top = Some((o, shown));
        file
    } else {
        check_format(a.format.as_deref(), &filename)?;
        filename.clone()
    };

    let mut infos = Vec::new();
    let mut fmt: Option<String> = None;
    // Files already in the chain, by device and inode (QEMU compares names).
    let mut seen: Vec<(u64, u64)> = Vec::new();
    loop {
        if let Some(id) = file_id(&name) {
            if seen.contains(&id) {
                return Err(Fail::Msg(format!(
                    "Backing file '{name}' creates an infinite loop."
                )));
            }
            seen.push(id);
        }
        if infos.len() > MAX_BACKING_DEPTH {
            return Err(Fail::Msg(
                qcow2kit::Error::BackingChainTooDeep {
                    path: name.into(),
                    max: MAX_BACKING_DEPTH,
                }
                .to_string(),
            ));
        }
        // Without a recorded format, probe like QEMU: qcow2 by its magic, else raw.
        if fmt.is_none() && !infos.is_empty() && !is_qcow2(&name) {
            fmt = Some("raw".into());
        }
        let info = if fmt.as_deref() == Some("raw") {
            let f = FileStorage::open(Path::new(&name), false).map_err(|e| {
                open_fail(
                    &name,
                    &qcow2kit::Error::io(qcow2kit::error::IoOp::Read, 0, e),
                )
            })?;
            ImageInfo::raw(&f, &name).map_err(|e| Fail::Msg(e.qemu_message()))?
        } else {
            let (opts, shown) = match top.take() {
                Some(t) => t,
                None => (base_opts.clone(), name.clone()),
            };
            let img = Image::open_for_info(&name, &opts).map_err(|e| {
                if a.image_opts && infos.is_empty() {
                    Fail::Msg(format!(
                        "Could not open '{filename}': {}",
                        crate::common::open_error_text(&name, &e)
                    ))
                } else {
                    open_fail(&name, &e)
                }
            })?;
            let mut info =
                ImageInfo::from_image(&img, &name).map_err(|e| Fail::Msg(e.qemu_message()))?;
            info.filename = shown;
            info
        };
        let next = info.backing_filename.clone();
        let next_fmt = info.backing_filename_format.clone();
        infos.push(info);
        if !a.backing_chain {
            break;
        }
        let Some(next) = next else { break };
        name = path_combine(&name, &next);
        fmt = next_fmt;
    }

    match output {
        Output::Human => {
            for (i, info) in infos.iter().enumerate() {
                if i > 0 {
                    println!();
                }
                print!("{}", info.to_human());
            }
        }
        Output::Json => {
            let text = if a.backing_chain {
                to_json_pretty(&infos)
            } else {
                to_json_pretty(&infos[0])
            }
            .map_err(|e| Fail::Msg(e.to_string()))?;
            println!("{text}");
        }
    }
    Ok(())
}

/// `s` as a JSON string (QEMU's `json:` file names).
fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}
