//! Benchmarks of image I/O (placeholder).
fn main() {}
