#!/usr/bin/env bash
# Runs every test of qcow2kit. Installs qemu-utils (the reference
# implementation the interop tests compare against) when qemu-img is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# QCOW2KIT_NO_INSTALL=1 skips the install (tests needing QEMU then skip).
if [ -z "${QCOW2KIT_NO_INSTALL:-}" ] && { ! command -v qemu-img >/dev/null 2>&1 || ! command -v qemu-io >/dev/null 2>&1; }; then
    echo "qemu-img not found: installing qemu-utils" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-utils >/dev/null
fi
# Keep CI bounded: proptest case counts are capped in the tests themselves,
# this caps any test that reads PROPTEST_CASES.
export PROPTEST_CASES="${PROPTEST_CASES:-64}"
# Unit tests, the six integration-test binaries (tests/cli, tests/check,
# tests/engine, tests/interop, tests/backends, tests/fuzz_regressions.rs; few binaries keep
# the link step short), the examples and the benches (run once as tests),
# then the doctests (README's snippets included).
cargo test --all-targets "$@"
cargo test --doc
# The C ABI (capi/): its unit tests and the C demo, compiled and run.
cargo test -p qcow2kit-capi
# The test helpers stay behind the `testing` feature for embedders.
bash scripts/check_testing_gate.sh
