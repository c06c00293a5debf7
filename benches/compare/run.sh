#!/usr/bin/env bash
# Peer comparison: raw file loop, qemu-img bench, imago (sync), qcow2-rs and
# qcow2kit on identical images and offsets, images on a disk file system
# (/var/tmp, page cache) and on tmpfs (/dev/shm). Not run in CI.
#
#   benches/compare/run.sh [--quick] [--only WORKLOAD,...] [--fs DIR,...] [--secs S]
#
# --quick: short runs (smoke test). Without it the tables also go to
# benches/compare/RESULTS.md (with date, machine, versions and load).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
for tool in qemu-img qemu-io; do
    command -v "$tool" >/dev/null || { echo "$tool not found (install qemu-utils)" >&2; exit 1; }
done
cargo build --release --quiet
bin="$here/target/release/qcow2kit-compare"
quick=0
for a in "$@"; do [ "$a" = "--quick" ] && quick=1; done
load_before="$(uptime)"
tmp="$(mktemp)"
trap 'rm -f "$tmp"' EXIT
"$bin" run --out "$tmp" "$@"
load_after="$(uptime)"
echo "load before: $load_before"
echo "load after:  $load_after"
if [ "$quick" = 1 ] || [ $# -gt 0 ]; then
    exit 0
fi
{
    echo "# benches/compare results"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- command: \`benches/compare/run.sh\`"
    echo "- machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(free -g | awk '/Mem:/ {print $2}') GiB RAM, kernel $(uname -r)"
    echo "- versions: qcow2kit $(git -C "$here" rev-parse --short HEAD) ($(git -C "$here" log -1 --format=%s | cut -c1-60)), imago 0.2.6 (feature \`sync\`), qcow2-rs 0.1.6 (\`Qcow2IoSync\`), $(qemu-img --version | head -1), $(rustc --version)"
    echo "- load before: \`$load_before\`"
    echo "- load after: \`$load_after\`"
    echo
    cat "$here/METHOD.md"
    echo
    echo "## Results"
    echo
    cat "$tmp"
} > "$here/RESULTS.md"
echo "wrote $here/RESULTS.md"
