#!/usr/bin/env bash
# Runs one cargo-fuzz target for a while, then prints executions per second
# and libFuzzer's coverage counters.
#
# Usage: scripts/fuzz.sh TARGET SECONDS [extra libFuzzer flags...]
#   TARGET: header | open_read | write_ops | options | check_repair (see FUZZING.md)
#
# * Installs cargo-fuzz if it is missing.
# * The toolchain here is stable: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its
#   nightly flags. AddressSanitizer works with it (the default); set
#   FUZZ_SANITIZER=none to build without it (faster, catches less).
# * Builds optimised with debug assertions and overflow checks (-O -a), so an
#   arithmetic overflow on an untrusted value is a finding too.
# * Corpus: fuzz/corpus/TARGET (new inputs, not committed) plus the committed
#   seeds in fuzz/seeds/TARGET; for open_read also images with 16 KiB
#   clusters made by fuzz/make_seeds.sh --large (when qemu-img is installed).
# * One fuzzer process (-jobs=1 -workers=1: the machine is shared), with
#   -rss_limit_mb=1024 -timeout=10 -max_total_time=SECONDS.
# * FUZZ_QEMU_CHECK=1 (write_ops): qemu-img check must also find every image
#   clean at the end of an input (slower: one qemu-img process per input).
# * Crashes, hangs and OOMs land in fuzz/artifacts/TARGET/. Minimise with
#   `RUSTC_BOOTSTRAP=1 cargo fuzz tmin -O -a TARGET ARTIFACT` (from fuzz/) and
#   keep the result in fuzz/regressions/TARGET/ (replayed by `cargo test`).
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 TARGET SECONDS [libFuzzer flags...]" >&2
    exit 2
fi
target=$1
seconds=$2
shift 2
cd "$(dirname "$0")/../fuzz"

case $target in
header) dict=qcow2.dict max_len=8192 ;;
open_read) dict=qcow2.dict max_len=65536 ;;
check_repair) dict=qcow2.dict max_len=65536 ;;
write_ops) dict= max_len=8192 ;;
options) dict=options.dict max_len=4096 ;;
*)
    echo "unknown target '$target' (header, open_read, write_ops, options, check_repair)" >&2
    exit 2
    ;;
esac

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "cargo-fuzz not found: installing it" >&2
    cargo install cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1
sanitizer=${FUZZ_SANITIZER:-address}

corpora=("corpus/$target" "seeds/$target")
mkdir -p "corpus/$target" "artifacts/$target"
if [ "$target" = open_read ] && command -v qemu-img >/dev/null 2>&1; then
    if [ ! -d corpus/open_read_large ]; then
        ./make_seeds.sh --large corpus/open_read_large >/dev/null
    fi
    corpora+=("corpus/open_read_large")
fi

flags=(
    -rss_limit_mb=1024
    -timeout=10
    -max_total_time="$seconds"
    -max_len="$max_len"
    -jobs=1
    -workers=1
    -print_final_stats=1
)
if [ -n "$dict" ]; then
    flags+=(-dict="$dict")
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! cargo fuzz build -O -a -s "$sanitizer" "$target" >"$log" 2>&1; then
    cat "$log" >&2
    exit 1
fi
status=0
# With -jobs=1 libFuzzer runs the fuzzing in one child process that logs to fuzz-0.log.
rm -f fuzz-0.log
cargo fuzz run -O -a -s "$sanitizer" "$target" "${corpora[@]}" -- "${flags[@]}" "$@" >"$log" 2>&1 ||
    status=$?
cat "$log" fuzz-0.log 2>/dev/null >"$log.all" || true
mv "$log.all" "$log"
rm -f fuzz-0.log

echo "==== $target: ${seconds}s, sanitizer $sanitizer ===="
last=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
echo "last status line: ${last:-none}"
runs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}' | tail -n 1)
rate=$(grep -E '^stat::average_exec_per_sec' "$log" | awk '{print $2}' | tail -n 1)
rss=$(grep -E '^stat::peak_rss_mb' "$log" | awk '{print $2}' | tail -n 1)
cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
slowest=$(grep -E '^stat::slowest_unit_time_sec' "$log" | awk '{print $2}' | tail -n 1)
echo "executions: ${runs:-?}  exec/s: ${rate:-?}  cov: ${cov:-?}  ft: ${ft:-?}  peak RSS: ${rss:-?} MB  slowest input: ${slowest:-?} s"
if [ "$status" -ne 0 ]; then
    echo "---- the fuzzer stopped with status $status; its report:" >&2
    grep -E -A40 'ERROR: libFuzzer|panicked at|ERROR: AddressSanitizer|==ERROR' "$log" |
        cut -c1-300 | head -n 60 >&2 || true
    ls -t "artifacts/$target" | head -n 3 | sed "s|^|artifact: fuzz/artifacts/$target/|" >&2
fi
exit "$status"
