//! A tour of qcow2kit: create an image, write through the library, read back,
//! and show what `qemu-img check` thinks of the result.
//!
//! Run with `cargo run --release --example tour [DIR]`; without `DIR` the
//! image is made in a temporary directory that is removed at the end.

use qcow2kit::{CreateOptions, Image, OpenOptions};
use std::path::PathBuf;
use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Without a directory argument the image lives in a fresh temporary
    // directory that is removed when `scratch` is dropped.
    let scratch;
    let dir = match std::env::args().nth(1) {
        Some(d) => PathBuf::from(d),
        None => {
            scratch = tempfile::Builder::new().prefix("qcow2kit-tour").tempdir()?;
            scratch.path().to_path_buf()
        }
    };
    let path = dir.join("qcow2kit-tour.qcow2");
    let size = 1 << 30;

    qcow2kit::create::create(&path, &CreateOptions::new(), size)?;
    println!(
        "created {} ({} GiB virtual, 64 KiB clusters)",
        path.display(),
        size >> 30
    );

    let img = Image::open(&path, &OpenOptions::new())?;
    let pattern: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
    img.write_at(&pattern, 512 << 20)?; // 4 MiB at 512 MiB: crosses into the second L2 table
    img.write_at(b"hello, qcow2", 12345)?; // unaligned, inside one cluster (copy-on-write of zeroes)
    img.write_zeroes(0x10_0000, 0x10_0000, false)?;
    img.flush()?;
    let (l2, rc) = img.cache_stats();
    println!(
        "wrote 4 MiB + 12 bytes; L2 cache {}/{} hits/misses, refcount cache {}/{}",
        l2.hits, l2.misses, rc.hits, rc.misses
    );
    img.close()?;

    let img = Image::open(&path, &OpenOptions::new().read_only(true))?;
    let mut back = vec![0u8; pattern.len()];
    img.read_at(&mut back, 512 << 20)?;
    assert_eq!(back, pattern, "data read back differs");
    let mut hello = [0u8; 12];
    img.read_at(&mut hello, 12345)?;
    println!(
        "read back: {:?} and 4 MiB of pattern: identical",
        String::from_utf8_lossy(&hello)
    );

    match Command::new("qemu-img")
        .args(["check", "--output", "json"])
        .arg(&path)
        .output()
    {
        Ok(out) => println!(
            "qemu-img check (exit {}):\n{}",
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout)
        ),
        Err(_) => println!("(qemu-img not installed: skipping the cross-check)"),
    }
    Ok(())
}
