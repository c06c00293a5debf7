//! The library on memory and fault-injecting storage: crafted bad images,
//! corruption events, crash replay, fault matrices, lazy refcounts, the
//! random-operation model, overlap checks and concurrency.
//! One test binary; each module was once a test file of its own.

mod lib_features;
#[path = "../support/mod.rs"]
mod support;

mod amend;
mod bad_images;
mod bitmap_crash;
mod bitmap_model;
mod bitmap_threads;
mod commit_raw;
mod corruption;
mod crash_replay;
mod faults;
mod jobs;
mod jobs_more;
mod lazy;
mod mapping;
mod mirror;
mod model;
mod multiqueue;
mod overlap;
mod quorum_replace;
mod rebase;
mod snapshot_crash;
mod snapshot_model;
mod threads;
mod vectored;
mod zero_range;
