#!/usr/bin/env bash
# Checks that the test helpers (storage::FaultyStorage, storage::replay) are
# public only with the `testing` feature. `cargo test` cannot show this: our
# own tests enable the feature through a self dev-dependency, so the library
# every test and doctest links is built with it. This builds a throw-away
# crate that depends on qcow2kit as an embedder would (default features),
# expects the import to fail, then expects it to work with `testing`.
# Shares this repository's target directory, so only qcow2kit is rechecked.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
mkdir -p "$tmp/src"
cat >"$tmp/src/main.rs" <<'RS'
use qcow2kit::storage::{replay, FaultyStorage, MemStorage};
fn main() {
    let _ = FaultyStorage::new(MemStorage::new());
    let _ = replay;
}
RS
manifest() {
    cat >"$tmp/Cargo.toml" <<TOML
[package]
name = "testing-gate-probe"
version = "0.0.0"
edition = "2021"
publish = false
[dependencies]
qcow2kit = { path = "$repo"$1 }
[workspace]
TOML
}
manifest ""
if cargo check -q --offline --manifest-path "$tmp/Cargo.toml" 2>"$tmp/err"; then
    echo "FAIL: FaultyStorage/replay are public without the testing feature" >&2
    exit 1
fi
if ! grep -q 'no `FaultyStorage` in `storage`' "$tmp/err"; then
    echo "FAIL: the probe failed for another reason:" >&2
    cat "$tmp/err" >&2
    exit 1
fi
manifest ', features = ["testing"]'
cargo check -q --offline --manifest-path "$tmp/Cargo.toml"
echo "ok: FaultyStorage and replay are public only with the testing feature"
