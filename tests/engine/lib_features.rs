//! The library without its default `cli` feature does not pull in the
//! command-line crates (issue 15, item 10): `cargo tree` of the library's
//! normal dependencies with `--no-default-features` lists neither clap nor
//! indicatif, and with the default features it does (so the test is not
//! vacuous). CI also builds that configuration (`cargo clippy
//! --no-default-features --lib` in `.ci/run`).

use std::process::Command;

/// The crate names in `cargo tree -e normal` of this package, offline.
fn dependency_names(extra: &[&str]) -> Vec<String> {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let out = Command::new(env!("CARGO"))
        .args(["tree", "--offline", "-e", "normal", "--prefix", "none"])
        .args(["--format", "{p}", "--manifest-path", manifest])
        .args(extra)
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[test]
fn no_default_features_has_no_cli_dependencies() {
    let lib_only = dependency_names(&["--no-default-features"]);
    assert!(lib_only.iter().any(|n| n == "qcow2kit"), "{lib_only:?}");
    assert!(lib_only.iter().any(|n| n == "libc"), "{lib_only:?}");
    for cli_dep in ["clap", "clap_builder", "indicatif"] {
        assert!(
            !lib_only.iter().any(|n| n == cli_dep),
            "{cli_dep} is a dependency without the cli feature: {lib_only:?}"
        );
    }
    let default = dependency_names(&[]);
    for cli_dep in ["clap", "indicatif"] {
        assert!(
            default.iter().any(|n| n == cli_dep),
            "{cli_dep} missing with the default features: {default:?}"
        );
    }
}
