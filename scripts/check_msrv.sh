#!/usr/bin/env bash
# The MSRV build (issue 15, item 12), run by .ci/run: the workspace (the
# crate, its tests, examples and benches, and the C ABI crate) builds with the
# Rust version both manifests declare as `rust-version`, from the lock file.
# tests/engine/msrv.rs checks the other half: no locked dependency declares a
# newer Rust than that.
#
# Why the MSRV is the same toolchain CI builds with everywhere else: the build
# machine has exactly one stable toolchain (1.95) and cannot fetch another, so
# 1.95 is the oldest Rust this project can actually build and test. An older
# `rust-version` would be a claim nothing checks (1.85, declared before, was
# already wrong: the locked uuid 1.29 needs 1.89, proptest 1.12 needs 1.88).
# The step is still a real check: when the default toolchain moves on, this
# builds with `cargo +MSRV` (that toolchain must then be installed), and when
# `rust-version` is lowered, the build and the dependency check hold it to it.
set -euo pipefail
cd "$(dirname "$0")/.."

declared() { sed -n 's/^rust-version = "\(.*\)"$/\1/p' "$1"; }
msrv=$(declared Cargo.toml)
capi=$(declared capi/Cargo.toml)
if [ -z "$msrv" ] || [ "$msrv" != "$capi" ]; then
    echo "check_msrv: rust-version differs: Cargo.toml '$msrv', capi/Cargo.toml '$capi'" >&2
    exit 1
fi
# rustup names toolchains with three components (1.95 -> 1.95.0).
full=$msrv
[ "${full//[^.]/}" = "." ] && full="$full.0"
active=$(rustc --version | awk '{print $2}')
if [ "$active" = "$full" ]; then
    cargo=(cargo)
elif rustup run "$full" rustc --version >/dev/null 2>&1; then
    cargo=(cargo "+$full")
else
    echo "check_msrv: rustc $active is not the MSRV $msrv and toolchain $full is not installed" >&2
    exit 1
fi
echo "check_msrv: building with Rust $full (rust-version = \"$msrv\")" >&2
"${cargo[@]}" check --workspace --all-targets --locked --quiet
