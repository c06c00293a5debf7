//! Times 4 KiB random reads of an allocated image (for profiling).
use qcow2kit::{CreateOptions, Image, OpenOptions};
use std::time::Instant;
fn main() {
    let p = std::env::temp_dir().join("readbench.qcow2");
    let size: u64 = 256 << 20;
    qcow2kit::create::create(&p, &CreateOptions::new(), size).expect("create");
    let img = Image::open(&p, &OpenOptions::new()).expect("open");
    let chunk = vec![0x5au8; 1 << 20];
    for off in (0..size).step_by(chunk.len()) {
        img.write_at(&chunk, off).expect("fill");
    }
    img.flush().expect("flush");
    let n = 2_000_000u64;
    let mut buf = vec![0u8; 4096];
    let mut x = 88172645463325252u64;
    let t = Instant::now();
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        img.read_at(&mut buf, (x % (size / 4096)) * 4096)
            .expect("read");
    }
    println!(
        "{:.3} us per read",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );
}
