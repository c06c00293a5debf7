//! Format-level blkdebug events fired by the engine, QEMU iotests-style: the same
//! `[inject-error]` rules under `qemu-io` and `qcow2-img io` on twin images, then
//! `qemu-img check` on both files.

use super::support::*;
use std::path::Path;

/// What the twin runs must agree on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Everything: stdout (timing by shape), stderr, exit code, and the `qemu-img
    /// check` output of both files afterwards.
    Same,
    /// The request that meets the error fails the same way (the first output line
    /// and the exit code agree), but the runs part afterwards: QEMU keeps a dirty
    /// cache entry whose write-back failed and writes it again later (with `once`
    /// the retry succeeds), while our handle is poisoned by the failed metadata
    /// write (`Error::PreviousIoFailed` until reopened, README "Faults"), so later
    /// requests fail and what was not written stays unwritten. The invariant both
    /// keep: `qemu-img check` finds no corruption (exit 0, or 3 for leaks only).
    Poisoned,
    /// The requests' outputs and the exit code agree, and `qemu-img check` finds no
    /// corruption in either file, but the files' ends differ: QEMU allocates the L2
    /// table of a new cluster before writing the cluster's data, ours after it, so
    /// when that data write fails QEMU's file keeps a new (empty, referenced) L2
    /// table and ours has none.
    SameIo,
}

/// One scenario: inline rules (below `file.`), `qemu-img create` options and size,
/// `qemu-io` commands that prepare the image, and the commands run under blkdebug.
struct Scenario {
    rules: &'static str,
    create: &'static str,
    size: &'static str,
    setup: &'static [&'static str],
    cmds: &'static [&'static str],
    expect: Expect,
}

const ALLOC: &[&str] = &[
    "write -P 0x33 128k 4k",
    "read -P 0x11 0 4k",
    "write -P 0x33 0 4k",
    "read -P 0x33 128k 4k",
];

/// With 512-byte clusters a refcount block covers 128 KiB of the file and an L2
/// table 32 KiB of the guest, so 256 KiB of new data need new L2 tables, new
/// refcount blocks and a larger refcount table.
const REFBLOCK: &[&str] = &[
    "write -P 0x33 1M 256k",
    "read -P 0x11 0 4k",
    "write -P 0x33 6M 4k",
    "read -P 0x33 1M 4k",
];

fn s(rules: &'static str, cmds: &'static [&'static str], expect: Expect) -> Scenario {
    Scenario {
        rules,
        create: "cluster_size=64k",
        size: "1M",
        setup: &["write -P 0x11 0 64k"],
        cmds,
        expect,
    }
}

fn small(rules: &'static str, expect: Expect) -> Scenario {
    Scenario {
        rules,
        create: "cluster_size=512",
        size: "8M",
        setup: &["write -P 0x11 0 4k"],
        cmds: REFBLOCK,
        expect,
    }
}

/// Refcount table growth: with 64-bit refcounts a 512-byte refcount block covers
/// 32 KiB and the one-cluster table 2 MiB, so 3 MiB of new data outgrow it. Our
/// allocator grows the table at a different moment of the write than QEMU's (the
/// area it builds covers different clusters), so only the invariant is common.
fn grow(rules: &'static str) -> Scenario {
    Scenario {
        rules,
        create: "cluster_size=512,refcount_bits=64",
        size: "8M",
        setup: &["write -P 0x11 0 4k"],
        cmds: &["write -P 0x33 1M 3M", "read -P 0x11 0 4k"],
        expect: Expect::Poisoned,
    }
}

/// A partial write into a cluster the image does not have and its backing file
/// does: the head and tail of the new cluster are copied from the backing file
/// (`cow_read` before reading them, `cow_write` before writing them with the
/// guest data).
const COW: &[&str] = &[
    "write -P 0x33 4k 4k",
    "read -P 0x11 0 4k",
    "read -P 0x11 8k 4k",
    "write -P 0x33 132k 4k",
    "read -P 0x33 4k 4k",
    "read -P 0x11 128k 4k",
];

/// `F.qcow2` over `B.qcow2` (1 MiB of 0x11, see [`prepare`]), nothing allocated.
fn cow(rules: &'static str, expect: Expect) -> Scenario {
    Scenario {
        rules,
        create: "cluster_size=64k,backing_file=B.qcow2,backing_fmt=qcow2",
        size: "1M",
        setup: &[],
        cmds: COW,
        expect,
    }
}

fn scenarios() -> Vec<Scenario> {
    use Expect::*;
    vec![
        // The iotests classic: a failed L2 update during an allocating write
        // leaks the new cluster, nothing worse (cli.md §25, D.conf).
        s("inject-error.0.event=l2_update", ALLOC, Same),
        s(
            "inject-error.0.event=l2_update,inject-error.0.immediately=on",
            ALLOC,
            Same,
        ),
        s(
            "inject-error.0.event=l2_update,inject-error.0.once=on",
            ALLOC,
            Poisoned,
        ),
        s("inject-error.0.event=cluster_alloc", ALLOC, Same),
        s(
            "inject-error.0.event=cluster_alloc,inject-error.0.once=on,inject-error.0.errno=28",
            ALLOC,
            Same,
        ),
        s(
            "inject-error.0.event=cluster_alloc,inject-error.0.once=on,inject-error.0.immediately=on",
            ALLOC,
            Same,
        ),
        s("inject-error.0.event=refblock_alloc", ALLOC, Same),
        s("inject-error.0.event=refblock_alloc,inject-error.0.once=on", ALLOC, Same),
        s("inject-error.0.event=refblock_load", ALLOC, Same),
        s(
            "inject-error.0.event=refblock_update_part,inject-error.0.once=on",
            ALLOC,
            Poisoned,
        ),
        s("inject-error.0.event=flush_to_os", ALLOC, Same),
        // l2_load during reads: the first read loads the L2 table and fails.
        s(
            "inject-error.0.event=l2_load,inject-error.0.once=on",
            &["read -P 0x11 0 4k", "read -P 0x11 4k 4k"],
            Same,
        ),
        s(
            "inject-error.0.event=l2_load",
            &["read -P 0x11 0 4k", "read -P 0x11 4k 4k", "write -P 0x22 0 4k"],
            Same,
        ),
        s("inject-error.0.event=l2_load,inject-error.0.once=on", ALLOC, Same),
        // New L2 tables (an L2 table covers 32 KiB), new refcount blocks and
        // refcount table growth.
        small("inject-error.0.event=l1_update", Poisoned),
        small("inject-error.0.event=l1_update,inject-error.0.once=on", Poisoned),
        small("inject-error.0.event=refblock_alloc_write", Poisoned),
        small(
            "inject-error.0.event=refblock_alloc_hookup,inject-error.0.once=on",
            Poisoned,
        ),
        grow("inject-error.0.event=reftable_grow,inject-error.0.once=on"),
        grow("inject-error.0.event=refblock_alloc_write_blocks"),
        grow("inject-error.0.event=refblock_alloc_write_table,inject-error.0.once=on"),
        grow("inject-error.0.event=refblock_alloc_switch_table"),
        small("inject-error.0.event=l2_alloc_write,inject-error.0.once=on", Poisoned),
        small("inject-error.0.event=cluster_alloc,inject-error.0.once=on", Same),
        // Copy-on-write from the backing file: the rule switches on before the
        // copy is read or written and fails the write of the new cluster.
        cow("inject-error.0.event=cow_read", SameIo),
        cow("inject-error.0.event=cow_read,inject-error.0.once=on", SameIo),
        cow("inject-error.0.event=cow_write", SameIo),
        cow("inject-error.0.event=cow_write,inject-error.0.once=on,inject-error.0.errno=28", SameIo),
    ]
}

fn prepare(d: &Path, sc: &Scenario) {
    if sc.create.contains("backing_file=B.qcow2") {
        qemu_create(d, "B.qcow2", "1M");
        qemu_ok(d, "qemu-io", &["-c", "write -P 0x11 0 1M", "B.qcow2"]);
    }
    qemu_ok(
        d,
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-o", sc.create, "F.qcow2", sc.size,
        ],
    );
    for c in sc.setup {
        qemu_ok(d, "qemu-io", &["-c", c, "F.qcow2"]);
    }
}

fn opts(rules: &str) -> String {
    let rules: Vec<String> = rules.split(',').map(|r| format!("file.{r}")).collect();
    format!(
        "driver=qcow2,file.driver=blkdebug,file.image.filename=F.qcow2,file.inject-error.0.errno=5,{}",
        rules.join(",")
    )
}

#[test]
fn format_level_events_fail_the_next_io_as_in_qemu_io() {
    if !have_qemu() {
        return;
    }
    for sc in scenarios() {
        let (qd, od) = twin_dirs(|d| prepare(d, &sc));
        let o = opts(sc.rules);
        let args = io_args(&["--image-opts"], sc.cmds, &[&o]);
        let q = qemu(qd.path(), "qemu-io", &args);
        let mut full = vec!["io"];
        full.extend_from_slice(&args);
        let ours_run = ours(od.path(), &full);
        let qc = qemu(qd.path(), "qemu-img", &["check", "F.qcow2"]);
        let oc = qemu(od.path(), "qemu-img", &["check", "F.qcow2"]);
        let what = format!("{} ({:?})", sc.rules, sc.cmds);
        // Both runs meet the error (no scenario is vacuous).
        assert_eq!(q.code, 1, "qemu-io did not fail: {what}: {q:?}");
        assert_eq!(ours_run.code, q.code, "exit code: {what}");
        match sc.expect {
            Expect::Same => {
                assert_eq!(untime(&ours_run.out), untime(&q.out), "stdout: {what}");
                assert_eq!(ours_run.err, q.err, "stderr: {what}");
                assert_eq!(
                    (oc.out, oc.err, oc.code),
                    (qc.out, qc.err, qc.code),
                    "check: {what}"
                );
            }
            Expect::SameIo => {
                assert_eq!(untime(&ours_run.out), untime(&q.out), "stdout: {what}");
                assert_eq!(ours_run.err, q.err, "stderr: {what}");
                for c in [&qc, &oc] {
                    assert!(c.code == 0 || c.code == 3, "corruption: {what}: {c:?}");
                }
            }
            Expect::Poisoned => {
                assert_eq!(
                    ours_run.out.lines().next(),
                    q.out.lines().next(),
                    "first request: {what}"
                );
                for c in [&qc, &oc] {
                    assert!(c.code == 0 || c.code == 3, "corruption: {what}: {c:?}");
                }
            }
        }
    }
}

/// An event that fires while opening fails the open, as in qemu-io (cli.md §25).
#[test]
fn reftable_load_fails_the_open() {
    if !have_qemu() {
        return;
    }
    let (qd, od) = twin_dirs(|d| qemu_create(d, "F.qcow2", "1M"));
    let o = ours(
        od.path(),
        &[
            "io",
            "--image-opts",
            "-c",
            "read 0 512",
            &opts("inject-error.0.event=reftable_load"),
        ],
    );
    let q = qemu(
        qd.path(),
        "qemu-io",
        &[
            "--image-opts",
            "-c",
            "read 0 512",
            &opts("inject-error.0.event=reftable_load"),
        ],
    );
    assert_eq!(o.code, q.code, "{o:?} {q:?}");
    assert!(o.err.contains("Input/output error"), "{o:?}");
}

/// The config files of the engine's blkdebug fault matrix (`tests/engine/faults.rs`:
/// a `[set-state]` chain counting an event's occurrences, an `[inject-error]` rule
/// for the k-th, `once = "on"`) under qemu-io and ours: the same request fails the
/// same way, and `qemu-img check` finds no corruption in either file.
#[test]
fn kth_occurrence_config_files_match_qemu_io() {
    if !have_qemu() {
        return;
    }
    const WRITES: &[&str] = &[
        "write -P 0x33 128k 4k",
        "write -P 0x33 256k 4k",
        "write -P 0x33 384k 4k",
        "read -P 0x33 128k 4k",
        "read -P 0x11 0 4k",
    ];
    // Events that fire as often here as in QEMU for these commands (`cow_read` and
    // `cow_write` do not: see the README's differences) and whose failure does not
    // poison our handle (a metadata write's would: `Expect::Poisoned`).
    let cases: [(&str, u64, i32, &[&str], Scenario); 3] = [
        ("cluster_alloc", 2, 5, WRITES, s("", WRITES, Expect::Same)),
        ("cluster_alloc", 3, 28, WRITES, s("", WRITES, Expect::Same)),
        ("cow_read", 1, 28, COW, cow("", Expect::Same)),
    ];
    for (event, k, errno, cmds, sc) in cases {
        let (qd, od) = twin_dirs(|d| {
            prepare(d, &sc);
            std::fs::write(d.join("K.conf"), kth_occurrence_config(event, k, errno)).unwrap();
        });
        let o = "driver=qcow2,file.driver=blkdebug,file.config=K.conf,file.image.filename=F.qcow2";
        let r = io_twin(qd.path(), od.path(), &["--image-opts"], cmds, &[o]);
        assert_eq!(r.code, 1, "{event} #{k}: no request failed: {r:?}");
        // No corruption on either side. The layouts may differ: a cluster freed by
        // the failed write is reused by QEMU's next allocation, by ours only after
        // the next flush; and see `Expect::SameIo`.
        for d in [qd.path(), od.path()] {
            let c = qemu(d, "qemu-img", &["check", "F.qcow2"]);
            assert!(c.code == 0 || c.code == 3, "{event} #{k}: {c:?}");
        }
    }
}
