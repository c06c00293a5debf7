//! A write into a new cluster that reuses freed space inside the file: the
//! parts of the cluster outside the guest data read as zero (the storage
//! zeroes them, `FALLOC_FL_ZERO_RANGE` on a file, instead of a buffer of
//! zeroes being written), never as the stale data the freed cluster held;
//! QEMU reads the same and `qemu-img check` is clean.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use crate::support;
use qcow2kit::{CreateOptions, Image, OpenOptions};

const C: u64 = 64 * 1024;

#[test]
fn a_small_write_into_reused_space_reads_zero_around_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reuse.qcow2");
    qcow2kit::create::create(&path, &CreateOptions::new(), 16 * C).unwrap();
    let img = Image::open(&path, &OpenOptions::new()).unwrap();
    img.write_at(&vec![0x5a; 4 * C as usize], 0).unwrap();
    // Freed host clusters keep their bytes (no discard is passed down by
    // default), so a reused one still holds 0x5a until it is zeroed.
    img.discard(C, 2 * C).unwrap();
    img.flush().unwrap();
    let len_before = std::fs::metadata(&path).unwrap().len();
    // 4 KiB into fresh guest clusters, at 4 KiB in the first (60 KiB of
    // zeroes around it) and at the end of the second (head of 60 KiB).
    img.write_at(&[0x11; 4096], 8 * C + 4096).unwrap();
    img.write_at(&[0x22; 4096], 10 * C - 4096).unwrap();
    img.flush().unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        len_before,
        "the writes should have reused the freed clusters inside the file"
    );
    let mut want = vec![0u8; 2 * C as usize];
    want[4096..8192].fill(0x11);
    want[2 * C as usize - 4096..].fill(0x22);
    let mut got = vec![0xffu8; 2 * C as usize];
    img.read_at(&mut got, 8 * C).unwrap();
    assert!(got == want, "guest view of the new clusters");
    drop(img);

    // The same bytes through a fresh handle, and through QEMU.
    let img = Image::open(&path, &OpenOptions::new().read_only(true)).unwrap();
    let mut again = vec![0xffu8; 2 * C as usize];
    img.read_at(&mut again, 8 * C).unwrap();
    assert!(again == want, "guest view after reopening");
    drop(img);
    if !support::have_qemu() {
        return;
    }
    support::image::assert_check_clean(&path, "after writes into reused clusters");
    let cmds: Vec<String> = [
        format!("read -P 0 {} 4096", 8 * C),
        format!("read -P 0x11 {} 4096", 8 * C + 4096),
        format!("read -P 0 {} {}", 8 * C + 8192, 2 * C - 8192 - 4096),
        format!("read -P 0x22 {} 4096", 10 * C - 4096),
    ]
    .into();
    support::image::qemu_io(&path, &cmds);
}
