//! `qcow2-img snapshot` (`cli.md` §8): list, create, apply or delete the
//! internal snapshots of an image, with qemu-img's lookups (`-a` by ID
//! first, then name; `-d` by name, the first match), messages and exit codes.

use crate::common::{parse_args, CmdResult, Fail};
use clap::{ArgAction, Parser};
use qcow2kit::{Error, Image};

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
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[arg(short = 'l', long = "list", action = ArgAction::Count)]
    list: u8,
    #[arg(short = 'c', long = "create", action = ArgAction::Append)]
    create: Vec<String>,
    #[arg(short = 'a', long = "apply", action = ArgAction::Append)]
    apply: Vec<String>,
    #[arg(short = 'd', long = "delete", action = ArgAction::Append)]
    delete: Vec<String>,
    #[arg(num_args = 0..)]
    rest: Vec<String>,
}

const SUB: &str = "snapshot";

/// What `snapshot` does.
enum Action {
    List,
    Create(String),
    Apply(String),
    Delete(String),
}

/// Runs `snapshot`.
pub fn run(argv: &[String]) -> CmdResult {
    if argv.iter().any(|a| a == "-h" || a == "--help") {
        crate::help::print(crate::help::SNAPSHOT);
        return Ok(());
    }
    let a: Args = parse_args(SUB, argv)?;
    let actions = usize::from(a.list) + a.create.len() + a.apply.len() + a.delete.len();
    if actions > 1 {
        return Err(Fail::Usage("Cannot mix '-l', '-a', '-c', '-d'".into(), SUB));
    }
    let action = if let Some(n) = a.create.first() {
        Action::Create(n.clone())
    } else if let Some(n) = a.apply.first() {
        Action::Apply(n.clone())
    } else if let Some(n) = a.delete.first() {
        Action::Delete(n.clone())
    } else {
        Action::List
    };
    if a.rest.len() != 1 {
        return Err(Fail::Usage("Expecting one image file name".into(), SUB));
    }
    let filename = &a.rest[0];
    let read_only = matches!(action, Action::List);
    let opts = crate::common::open_options()
        .read_only(read_only)
        .force_share(a.force_share);
    // qemu-img opens the backing chain too (a missing backing file fails).
    let img =
        crate::common::open_image_arg(filename, a.image_opts, a.format.as_deref(), opts, true)?;
    let result = match &action {
        Action::List => {
            list(&img);
            Ok(())
        }
        Action::Create(name) => img.snapshot_create(name).map(drop).map_err(|e| {
            Fail::Msg(format!(
                "Could not create snapshot '{name}': {}",
                e.errno_text()
            ))
        }),
        Action::Apply(name) => img.snapshot_apply(name).map_err(|e| match e {
            // Refused before the driver is asked: no "Failed to load".
            Error::Bitmap(b) => Fail::Msg(format!("Could not apply snapshot '{name}': {b}")),
            e => Fail::Msg(format!(
                "Could not apply snapshot '{name}': Failed to load snapshot: {}",
                message(&e)
            )),
        }),
        Action::Delete(name) => img.snapshot_delete(name).map_err(|e| match e {
            Error::SnapshotNotFound(_) => Fail::Msg(format!(
                "Could not delete snapshot '{name}': snapshot not found"
            )),
            e => Fail::Msg(format!(
                "Could not delete snapshot '{name}': {}",
                message(&e)
            )),
        }),
    };
    let closed = img.close();
    result?;
    closed.map_err(|e| Fail::Msg(e.qemu_message()))?;
    let _ = a.quiet; // qemu-img's -q silences nothing here: -l still lists
    Ok(())
}

/// The text qemu-img shows for a failed snapshot operation: QEMU's message
/// where it has one, else the errno text.
fn message(e: &Error) -> String {
    match e {
        Error::InvalidArgument(m) => m.clone(),
        Error::Format(f) => f.reason.clone(),
        other => other.errno_text(),
    }
}

/// `Snapshot list:` and the table, or nothing without snapshots.
fn list(img: &Image) {
    let snaps = img.snapshots();
    if snaps.is_empty() {
        return;
    }
    let infos: Vec<qcow2kit::info::SnapshotInfo> = snaps
        .iter()
        .map(qcow2kit::info::SnapshotInfo::from_entry)
        .collect();
    println!("Snapshot list:");
    for line in qcow2kit::cli_support::snapshot_table(&infos) {
        println!("{line}");
    }
}
