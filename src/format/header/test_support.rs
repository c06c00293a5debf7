//! Shared by the header tests: raw header bytes to poke at, and the checks
//! of what decoding them gives, for one buffer or for a table of cases.

use crate::format::consts::QCOW2_MAGIC;
use crate::format::header::Header;
use crate::format::{put_be_u32, put_be_u64, FormatError, FormatErrorKind};

/// The cluster size of [`base_v3`].
pub(super) const CS: u64 = 65536;

/// A valid v3 header (64 KiB clusters, 64 MiB disk), 112 bytes; the rest of
/// cluster 0 reads as zero, i.e. an end marker.
pub(super) fn base_v3() -> Vec<u8> {
    let mut b = vec![0u8; 112];
    put_be_u32(&mut b, 0, QCOW2_MAGIC);
    put_be_u32(&mut b, 4, 3);
    put_be_u32(&mut b, 20, 16);
    put_be_u64(&mut b, 24, 64 << 20);
    put_be_u32(&mut b, 36, 1);
    put_be_u64(&mut b, 40, 0x30000);
    put_be_u64(&mut b, 48, 0x10000);
    put_be_u32(&mut b, 56, 1);
    put_be_u32(&mut b, 96, 4);
    put_be_u32(&mut b, 100, 112);
    b
}

pub(super) fn base_v2() -> Vec<u8> {
    let mut b = base_v3();
    b.truncate(72);
    put_be_u32(&mut b, 4, 2);
    b
}

pub(super) fn set32(b: &mut Vec<u8>, pos: usize, v: u32) {
    if b.len() < pos + 4 {
        b.resize(pos + 4, 0);
    }
    put_be_u32(b, pos, v);
}

pub(super) fn set64(b: &mut Vec<u8>, pos: usize, v: u64) {
    if b.len() < pos + 8 {
        b.resize(pos + 8, 0);
    }
    put_be_u64(b, pos, v);
}

pub(super) fn ext(ext_type: u32, data: &[u8]) -> Vec<u8> {
    let mut e = ext_type.to_be_bytes().to_vec();
    e.extend_from_slice(&(data.len() as u32).to_be_bytes());
    e.extend_from_slice(data);
    e.resize(e.len().next_multiple_of(8), 0);
    e
}

/// `hdr` followed by the given extensions and an end marker.
pub(super) fn with_exts(mut hdr: Vec<u8>, exts: &[Vec<u8>]) -> Vec<u8> {
    add_exts(&mut hdr, exts);
    hdr
}

/// Appends the given extensions and an end marker to `hdr`.
pub(super) fn add_exts(hdr: &mut Vec<u8>, exts: &[Vec<u8>]) {
    for e in exts {
        hdr.extend_from_slice(e);
    }
    hdr.extend_from_slice(&[0; 8]);
}

#[track_caller]
pub(super) fn assert_rejects(buf: &[u8], kind: FormatErrorKind, msg: &str) {
    let err = Header::decode(buf).expect_err("decode should fail");
    assert_eq!(err.reason, msg);
    assert_eq!(err.kind, kind, "kind for {msg:?}");
    assert_eq!(err.to_string(), msg);
}

/// What [`Header::decode`] should make of a table row's buffer: `Ok(())` if it
/// decodes, else the error's kind and message.
pub(super) type Expect = Result<(), (FormatErrorKind, &'static str)>;

/// A table row: its name (for assert messages), a change to [`base_v3`], and
/// the expected outcome.
pub(super) type Case = (&'static str, fn(&mut Vec<u8>), Expect);

/// Applies each case's change to a fresh [`base_v3`] and decodes the result.
#[track_caller]
pub(super) fn check_cases(cases: &[Case]) {
    for &(name, change, expect) in cases {
        let mut b = base_v3();
        change(&mut b);
        assert_outcome(name, Header::decode(&b), expect);
    }
}

/// Checks a decode result against a table row's expectation; a rejection
/// must match in kind, reason and `Display` text.
#[track_caller]
pub(super) fn assert_outcome(name: &str, got: Result<Header, FormatError>, expect: Expect) {
    match (got, expect) {
        (Ok(_), Ok(())) => {}
        (Err(err), Err((kind, msg))) => {
            assert_eq!(err.reason, msg, "case {name:?}");
            assert_eq!(err.kind, kind, "case {name:?}: kind for {msg:?}");
            assert_eq!(err.to_string(), msg, "case {name:?}");
        }
        (got, _) => panic!("case {name:?}: expected {expect:?}, got {got:?}"),
    }
}
