//! Creates a qcow2 image the way `qemu-img create -f qcow2 [-o OPTS] FILE SIZE`
//! does (same layout), for benchmarks and experiments while `qcow2-img
//! create` is not available:
//!
//! ```sh
//! cargo run --release --example create -- [-o OPTS] FILE SIZE
//! cargo run --release --example create -- -o preallocation=metadata big.qcow2 1T
//! ```
//!
//! Prints the time the library took on stderr.

use qcow2kit::options::{parse_size, CreateOptions};
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut opts = String::new();
    while let Some(i) = args.iter().position(|a| a == "-o") {
        if i + 1 >= args.len() {
            eprintln!("create: -o needs an argument");
            return ExitCode::FAILURE;
        }
        let o = args.remove(i + 1);
        args.remove(i);
        if !opts.is_empty() {
            opts.push(',');
        }
        opts.push_str(&o);
    }
    let [file, size] = args.as_slice() else {
        eprintln!("usage: create [-o OPTS] FILE SIZE");
        return ExitCode::FAILURE;
    };
    let co = match CreateOptions::from_qemu_str(&opts) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("create: {e}");
            return ExitCode::FAILURE;
        }
    };
    let bytes = match parse_size(size) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("create: {e}");
            return ExitCode::FAILURE;
        }
    };
    let t = Instant::now();
    if let Err(e) = qcow2kit::create::create(Path::new(file), &co, bytes) {
        eprintln!("create: {file}: {}", e.qemu_message());
        return ExitCode::FAILURE;
    }
    eprintln!("created {file} in {:.3} s", t.elapsed().as_secs_f64());
    ExitCode::SUCCESS
}
