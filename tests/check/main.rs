//! `qcow2-check` and the check/repair library against `qemu-img check` on
//! damaged twins, and crash replay of repairs.
//! One test binary; each module was once a test file of its own.

#[path = "../check_support/mod.rs"]
mod check_support;
#[path = "../common/mod.rs"]
mod common;

mod cli;
mod crash;
mod damage;
mod repair_protection;
