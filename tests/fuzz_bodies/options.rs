//! `options`: arbitrary strings into the option parsers.
//!
//! * `OpenOptions::from_qemu_str`, then `cache_config` for a few geometries
//!   and `check_image_version`;
//! * `CreateOptions::from_qemu_str`, `validate`, `formatting_line`; options
//!   that validate with a known size whose L1 table takes at most
//!   `MAX_CREATE_L1` bytes (4 GiB with 512-byte clusters; any valid size with
//!   2 MiB ones) and no external data file must create an image on `MemStorage` whose header decodes and,
//!   without a backing file, that opens with the requested size (rounded up
//!   to whole 512-byte sectors, as `qemu-img create` does);
//! * `AmendOptions::from_qemu_str` and its checks;
//! * `parse_size`, `parse_image_size`, `parse_number`, `parse_bool_onoff`;
//! * `split_option_string`: rebuilding the list from its pairs (values
//!   escaped with `escape_option_value`) gives the same pairs, and any string
//!   escaped as a value comes back unchanged.
//!
//! Every error is formatted (`Display`, `hint`), since messages are API here.

use qcow2kit::cli_support::{
    escape_option_value, parse_bool_onoff, parse_number, split_option_string,
};
use qcow2kit::create::create_on;
use qcow2kit::format::header::Header;
use qcow2kit::options::{
    parse_image_size, parse_size, AmendImageState, AmendOptions, Compat, OptionError,
};
use qcow2kit::storage::{MemStorage, Storage};
use qcow2kit::{CreateOptions, Image, OpenOptions};
use std::sync::Arc;

/// Largest L1 table of an image the target creates: big enough for images
/// whose L1 table does not fit next to the first refcount block (created by
/// growing an empty image, as QEMU does), small enough to stay fast.
const MAX_CREATE_L1: u64 = 1 << 20;

pub fn run(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    let s = s.as_ref();
    open_options(s);
    create_options(s);
    amend_options(s);
    numbers(s);
    option_lists(s);
}

fn show(e: &OptionError) {
    let _ = e.to_string();
    let _ = e.option();
    let _ = e.hint();
}

fn open_options(s: &str) {
    let o = match OpenOptions::from_qemu_str(s) {
        Ok(o) => o,
        Err(e) => return show(&e),
    };
    for (size, cs, entry) in [
        (1u64 << 30, 65536u64, 8u64),
        (0, 512, 8),
        (i64::MAX as u64, 2 << 20, 16),
        (u64::MAX, 16384, 16),
    ] {
        if let Err(e) = o.cache_config(size, cs, entry) {
            show(&e);
        }
    }
    for v in [2, 3] {
        if let Err(e) = o.check_image_version(v) {
            show(&e);
        }
    }
}

fn create_options(s: &str) {
    let c = match CreateOptions::from_qemu_str(s) {
        Ok(c) => c,
        Err(e) => return show(&e),
    };
    let _ = c.formatting_line("fuzz.qcow2");
    let _ = c.effective_preallocation();
    if let Err(e) = c.validate() {
        return show(&e);
    }
    let l2_entry: u64 = if c.extended_l2 { 16 } else { 8 };
    let per_l1 = u128::from(c.cluster_size) * u128::from(c.cluster_size / l2_entry);
    let Some(size) = c
        .size
        .filter(|s| u128::from(*s).div_ceil(per_l1) * 8 <= u128::from(MAX_CREATE_L1))
    else {
        return;
    };
    if c.data_file.is_some() {
        return; // creating would open the data file by name
    }
    let file = Arc::new(MemStorage::with_limit(Vec::new(), 256 << 20));
    if create_on(file.clone() as Arc<dyn Storage>, &c, size).is_err() {
        // e.g. a backing file name the header cannot hold: an error is fine.
        return;
    }
    let bytes = file.to_vec();
    let header = Header::decode(&bytes)
        .unwrap_or_else(|e| panic!("created image's header does not decode: {e}\n{c:?}"));
    assert_eq!(header.version == 2, c.compat == Compat::V2);
    assert_eq!(header.cluster_size(), c.cluster_size);
    if header.backing_file.is_some() {
        return;
    }
    let img = Image::open_storage(
        file as Arc<dyn Storage>,
        &OpenOptions::new().read_only(true),
    )
    .unwrap_or_else(|e| panic!("created image does not open: {e}\n{c:?}"));
    // qemu-img create rounds the size up to whole 512-byte sectors.
    assert_eq!(
        img.size(),
        size.next_multiple_of(512),
        "created image has the wrong size"
    );
}

fn amend_options(s: &str) {
    let a = match AmendOptions::from_qemu_str(s) {
        Ok(a) => a,
        Err(e) => return show(&e),
    };
    let _ = a.is_empty();
    if let Err(e) = a.target_compat() {
        show(&e);
    }
    for compat in [Compat::V2, Compat::V3] {
        let state = AmendImageState {
            compat,
            refcount_bits: 16,
            lazy_refcounts: false,
            has_data_file: compat == Compat::V3,
            data_file_raw: false,
            backing_file: Some("base.qcow2".into()),
            backing_fmt: Some("qcow2".into()),
        };
        if let Err(e) = a.check(&state) {
            show(&e);
        }
    }
}

fn numbers(s: &str) {
    match parse_size(s) {
        Ok(n) => {
            // Bytes spelled as decimal parse back exactly.
            assert_eq!(parse_size(&n.to_string()).ok(), Some(n));
            let image = parse_image_size(s);
            assert_eq!(image.is_ok(), n <= i64::MAX as u64, "{image:?}");
        }
        Err(e) => {
            let _ = e.to_string();
            let _ = e.qemu_img_message("image size");
            let _ = e.qemu_io_message();
            assert!(parse_image_size(s).is_err());
        }
    }
    match parse_number("n", s) {
        Ok(n) => assert!(parse_number("n", &n.to_string()).ok() == Some(n)),
        Err(e) => show(&e),
    }
    if let Err(e) = parse_bool_onoff("b", s) {
        show(&e);
    }
}

fn option_lists(s: &str) {
    if let Ok(pairs) = split_option_string(s) {
        let rebuilt = pairs
            .iter()
            .map(|(k, v)| format!("{k}={}", escape_option_value(v)))
            .collect::<Vec<_>>()
            .join(",");
        let again = split_option_string(&rebuilt)
            .unwrap_or_else(|e| panic!("rebuilt list {rebuilt:?} does not split: {e}"));
        assert_eq!(again, pairs, "rebuilt list {rebuilt:?}");
    }
    let escaped = format!("key={}", escape_option_value(s));
    let pairs = split_option_string(&escaped)
        .unwrap_or_else(|e| panic!("escaped value {escaped:?} does not split: {e}"));
    assert_eq!(pairs, [("key".to_owned(), s.to_owned())]);
}
