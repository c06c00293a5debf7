//! Times allocating 4 KiB writes (one per 64 KiB cluster) for profiling.
use qcow2kit::{CreateOptions, Image, OpenOptions};
use std::time::Instant;
fn main() {
    let dir = std::env::temp_dir().join("allocbench.qcow2");
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20000);
    qcow2kit::create::create(&dir, &CreateOptions::new(), n << 16).expect("create");
    let img = Image::open(&dir, &OpenOptions::new()).expect("open");
    let data = vec![0xa5u8; 4096];
    let t = Instant::now();
    for i in 0..n {
        img.write_at(&data, i << 16).expect("write");
    }
    let el = t.elapsed();
    println!(
        "{n} allocating writes: {:.2} us each",
        el.as_secs_f64() * 1e6 / n as f64
    );
    img.close().expect("close");
}
