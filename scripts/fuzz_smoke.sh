#!/usr/bin/env bash
# CI's fuzz smoke run. The fuzz crate is its own workspace, so `cargo test`
# never builds it (it does run every target body on the seeds and the
# regression corpus, see tests/fuzz_regressions.rs). This builds every
# cargo-fuzz target and fuzzes each for a few seconds from its seeds, so a
# target that no longer builds or dies at once fails CI.
#
# Usage: scripts/fuzz_smoke.sh [SECONDS per target, default 15]
# Built without a sanitizer (FUZZ_SANITIZER=none) to keep CI short; the
# recorded runs in FUZZING.md use AddressSanitizer.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-15}
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "cargo-fuzz not found: installing it" >&2
    cargo install cargo-fuzz --locked
fi
for target in header open_read write_ops options check_repair; do
    FUZZ_SANITIZER=none bash scripts/fuzz.sh "$target" "$seconds"
done
