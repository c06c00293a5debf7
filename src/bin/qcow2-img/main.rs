//! `qcow2-img`: qemu-img's commands over qcow2kit (`create`, `info`, `map`,
//! `check`, `commit`, `stream`, `mirror`, `rebase`, `convert`, `resize`, `amend`, `bench`, `serve`, `measure`, `compare`, `snapshot`, `bitmap`) and qemu-io as `qcow2-img io`.
//!
//! Outputs, streams, exit codes and messages follow `cli.md` (qemu-img /
//! qemu-io 10.0.2), with `qcow2-img` where QEMU prints its program name.
//! Each subcommand lives in its own module and only parses arguments, calls
//! the library and prints.

mod amend;
mod bench;
mod bitmap;
#[path = "../shared/check_cli.rs"]
mod check_cli;
mod commit;
mod common;
mod compare;
mod convert;
mod convert_src;
mod create;
mod help;
mod info;
mod io;
mod map;
mod measure;
mod mirror;
mod progress;
mod rebase;
mod resize;
mod serve;
mod snapshot;
mod stream;

use common::{Fail, PROG};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let Some(cmd) = args.first() else {
        eprintln!("{PROG}: Not enough arguments");
        eprintln!("Try '{PROG} --help' for more info");
        return ExitCode::from(1);
    };
    // `--object` is taken by every command (qemu-io's and qemu-img's
    // syntax), before the command parses the rest.
    let rest = match cmd.as_str() {
        "check" => args[1..].to_vec(),
        _ => match common::take_objects(&args[1..]) {
            Ok(r) => r,
            Err(f) => return ExitCode::from(f.report()),
        },
    };
    let rest = &rest[..];
    let result = match cmd.as_str() {
        "-h" | "--help" => {
            help::print(help::MAIN);
            Ok(())
        }
        "-V" | "--version" => {
            println!("{PROG} version {}", env!("CARGO_PKG_VERSION"));
            println!(
                "part of qcow2kit {}: {}",
                env!("CARGO_PKG_VERSION"),
                env!("CARGO_PKG_DESCRIPTION")
            );
            Ok(())
        }
        "create" => create::run(rest),
        "info" => info::run(rest),
        "map" => map::run(rest),
        "convert" => convert::run(rest),
        "resize" => resize::run(rest),
        "bench" => bench::run(rest),
        "io" => io::run(rest),
        "amend" => amend::run(rest),
        "commit" => commit::run(rest),
        "rebase" => rebase::run(rest),
        "stream" => stream::run(rest),
        "mirror" => mirror::run(rest),
        "serve" => serve::run(rest),
        "compare" => compare::run(rest),
        "measure" => measure::run(rest),
        "snapshot" => snapshot::run(rest),
        "bitmap" => bitmap::run(rest),
        "check" => {
            let code =
                check_cli::run_check_cli(check_cli::CliName::QCOW2_IMG_CHECK, rest.iter().cloned());
            Err(Fail::Exit(u8::try_from(code).unwrap_or(1)))
        }
        other => Err(Fail::Msg(format!(
            "Command not found: {other}\nTry '{PROG} --help' for more info"
        ))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => ExitCode::from(f.report()),
    }
}
