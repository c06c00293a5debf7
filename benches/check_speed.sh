#!/usr/bin/env bash
# Times `qemu-img check` and `qcow2-check` on a 100 GiB image with 64 KiB
# clusters and preallocation=metadata (1.6 M allocated clusters, ~16 MiB of
# metadata, a sparse file). Not run in CI.
#
# Usage: benches/check_speed.sh [RUNS]   (default 20 runs of each)
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-20}"
for tool in qemu-img qemu-io; do
    command -v "$tool" >/dev/null || { echo "$tool not found (install qemu-utils)" >&2; exit 1; }
done
cargo build --release --quiet --bin qcow2-check
ours="$(realpath "${CARGO_TARGET_DIR:-target}")/release/qcow2-check"
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
img="$dir/big.qcow2"
qemu-img create -q -f qcow2 -o cluster_size=64k,preallocation=metadata "$img" 100G
# Both tools must agree before we time them.
q="$(qemu-img check --output json "$img")"
o="$("$ours" --output json "$img")"
if [ "$q" != "$o" ]; then
    echo "outputs differ:" >&2; echo "$q" >&2; echo "$o" >&2; exit 1
fi
# Warm the page cache, then time RUNS runs of each.
qemu-img check "$img" >/dev/null; "$ours" "$img" >/dev/null
time_runs() {
    local start end
    start=$(date +%s.%N)
    for _ in $(seq "$runs"); do "$@" >/dev/null; done
    end=$(date +%s.%N)
    echo "($end - $start) / $runs" | bc -l
}
tq=$(time_runs qemu-img check "$img")
to=$(time_runs "$ours" "$img")
printf 'qemu-img check: %.1f ms per run\n' "$(echo "$tq * 1000" | bc -l)"
printf 'qcow2-check:    %.1f ms per run\n' "$(echo "$to * 1000" | bc -l)"
printf 'ratio (qemu-img / qcow2-check): %.2fx\n' "$(echo "$tq / $to" | bc -l)"
