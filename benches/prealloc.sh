#!/usr/bin/env bash
# Times `qemu-img create -o preallocation=metadata` of a 1 TiB image with
# 64 KiB clusters next to `qcow2-img create`, and checks both images agree
# (README, "Performance"). Not run in CI.
#
#   bash benches/prealloc.sh [SIZE] [OPTS]     (defaults: 1T, cluster_size=64k)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE="${1:-1T}"
OPTS="preallocation=metadata,${2:-cluster_size=64k}"
command -v qemu-img >/dev/null || { echo "qemu-img not found" >&2; exit 1; }

DIR="$(mktemp -d "${TMPDIR:-/tmp}/qcow2kit-prealloc.XXXXXX")"
trap 'rm -rf "$DIR"' EXIT

cargo build --release --quiet --bin qcow2-img
OURS=("${CARGO_TARGET_DIR:-target}/release/qcow2-img" create -q -f qcow2)
echo "ours: ${OURS[*]}"

now() { date +%s.%N; }

t0=$(now)
qemu-img create -q -f qcow2 -o "$OPTS" "$DIR/qemu.qcow2" "$SIZE"
t1=$(now)
if ! "${OURS[@]}" -o "$OPTS" "$DIR/ours.qcow2" "$SIZE" >/dev/null 2>"$DIR/err"; then
    cat "$DIR/err" >&2
    exit 1
fi
t2=$(now)

printf 'qemu-img create -o %s %s: %8.3f s\n' "$OPTS" "$SIZE" "$(echo "$t1 - $t0" | bc)"
printf 'qcow2kit create -o %s %s: %8.3f s\n' "$OPTS" "$SIZE" "$(echo "$t2 - $t1" | bc)"

# Same file size and the same allocated ranges (the files are sparse: compare
# what `qemu-img check` and `qemu-img map` say rather than reading them whole).
sq=$(stat -c %s "$DIR/qemu.qcow2"); so=$(stat -c %s "$DIR/ours.qcow2")
cq=$(qemu-img check --output json "$DIR/qemu.qcow2" | grep -v filename)
co=$(qemu-img check --output json "$DIR/ours.qcow2" | grep -v filename)
if [ "$sq" = "$so" ] && [ "$cq" = "$co" ]; then
    echo "images agree: $so bytes, $(echo "$co" | grep allocated-clusters | tr -dc 0-9) clusters allocated"
else
    echo "images DIFFER: sizes $sq vs $so" >&2
    exit 1
fi
