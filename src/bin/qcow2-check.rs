//! `qcow2-check`: checks a qcow2 image and optionally repairs it, with
//! `qemu-img check`'s options, output and exit codes.

fn main() {
    let code = qcow2kit::check::cli::run_check_cli(
        qcow2kit::check::cli::CliName::QCOW2_CHECK,
        std::env::args_os().skip(1),
    );
    std::process::exit(code);
}
