//! Replays every committed fuzz input (`fuzz/regressions/<target>/*`, inputs
//! that once crashed or hung a target, and the seeds in `fuzz/seeds/<target>/`)
//! through the same bodies the fuzz targets run. Needs no cargo-fuzz.
#![allow(clippy::expect_used)] // a test fails by panicking

#[allow(dead_code)]
mod fuzz_bodies;

use std::path::Path;

fn replay(dir: &str) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(dir);
    let mut n = 0;
    for (target, run) in fuzz_bodies::TARGETS {
        let Ok(entries) = std::fs::read_dir(root.join(target)) else {
            continue;
        };
        let mut files: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        for path in files.iter().filter(|p| p.is_file()) {
            let data = std::fs::read(path).expect("read input");
            eprintln!("{target}: {}", path.display());
            run(&data);
            n += 1;
        }
    }
    n
}

#[test]
fn regressions() {
    let n = replay("regressions");
    eprintln!("replayed {n} regression inputs");
}

#[test]
fn seeds() {
    let n = replay("seeds");
    assert!(n > 0, "no seeds found under fuzz/seeds");
}

/// Triage helper: `FUZZ_TARGET=write_ops FUZZ_INPUT=path cargo test --test
/// fuzz_regressions one_input -- --nocapture` runs one file through one body
/// (printing what a write_ops input decodes to first). Does nothing without
/// the variables.
#[test]
fn one_input() {
    let (Ok(target), Ok(path)) = (std::env::var("FUZZ_TARGET"), std::env::var("FUZZ_INPUT")) else {
        return;
    };
    let data = std::fs::read(&path).expect("read FUZZ_INPUT");
    if target == "write_ops" {
        eprintln!("{}", fuzz_bodies::write_ops::describe(&data));
    }
    let (_, run) = fuzz_bodies::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .expect("FUZZ_TARGET names a target");
    run(&data);
}
