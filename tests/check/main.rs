//! `qcow2-check` and the check/repair library against `qemu-img check` on
//! damaged twins, and crash replay of repairs.
//! One test binary; each module was once a test file of its own.

#[path = "../support/mod.rs"]
mod support;

mod cli;
mod crash;
mod damage;
mod image_opts;
mod repair_protection;
