//! `qcow2-check`: checks a qcow2 image and optionally repairs it, with
//! `qemu-img check`'s options, output and exit codes.

#[path = "shared/check_cli.rs"]
mod check_cli;

fn main() {
    let mut args = std::env::args_os().skip(1).peekable();
    // `-V`/`--version` as the first argument, like qemu-img's.
    if args.peek().is_some_and(|a| a == "-V" || a == "--version") {
        println!("qcow2-check version {}", env!("CARGO_PKG_VERSION"));
        println!(
            "part of qcow2kit {}: {}",
            env!("CARGO_PKG_VERSION"),
            env!("CARGO_PKG_DESCRIPTION")
        );
        return;
    }
    let code = check_cli::run_check_cli(check_cli::CliName::QCOW2_CHECK, args);
    std::process::exit(code);
}
