//! `qcow2-check`: qemu-img check for qcow2 images (not implemented yet).
fn main() {}
