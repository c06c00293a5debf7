//! The library without its default `cli` feature does not pull in the
//! command-line crates (issue 15, item 10): `cargo tree` of the library's
//! normal dependencies with `--no-default-features` lists neither clap nor
//! indicatif, and with the default features it does (so the test is not
//! vacuous). CI also builds that configuration (`cargo clippy
//! --no-default-features --lib` in `.ci/run`).
//!
//! Also the dependency half of the MSRV check (item 12): no package in the
//! lock file declares a newer Rust than this crate's `rust-version`
//! (`scripts/check_msrv.sh` builds with that version).

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

/// `1.95` or `1.95.0` as comparable numbers (missing components are 0).
fn rust_version(v: &str) -> Vec<u64> {
    let mut parts: Vec<u64> = v.split('.').map(|p| p.parse().unwrap_or(0)).collect();
    parts.resize(3, 0);
    parts
}

#[test]
fn locked_dependencies_fit_the_msrv() {
    let msrv = env!("CARGO_PKG_RUST_VERSION");
    assert!(!msrv.is_empty(), "Cargo.toml declares no rust-version");
    let host = Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("rustc runs");
    let host = String::from_utf8_lossy(&host.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .expect("rustc -vV names the host");
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--offline", "--locked"])
        .args(["--filter-platform", &host, "--manifest-path", manifest])
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata is JSON");
    let packages = meta["packages"].as_array().expect("a package list");
    assert!(packages.len() > 20, "{} packages", packages.len());
    let newer: Vec<String> = packages
        .iter()
        .filter_map(|p| {
            let v = p["rust_version"].as_str()?;
            (rust_version(v) > rust_version(msrv))
                .then(|| format!("{} {} needs {v}", p["name"], p["version"]))
        })
        .collect();
    assert!(
        newer.is_empty(),
        "locked dependencies need a newer Rust than rust-version {msrv}: {newer:?}"
    );
}
