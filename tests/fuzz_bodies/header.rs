//! `header`: arbitrary bytes into `Header::decode`. A header that decodes
//! must normalize and encode, and (when the encoding fits in its cluster, as
//! the header of an image must) decode back to itself.

use qcow2kit::format::header::Header;

pub fn run(data: &[u8]) {
    let Ok(header) = Header::decode(data) else {
        return;
    };
    let mut normal = header.clone();
    normal
        .normalize()
        .unwrap_or_else(|e| panic!("decoded header does not normalize: {e}\n{header:#?}"));
    let bytes = normal
        .encode()
        .unwrap_or_else(|e| panic!("normalized header does not encode: {e}\n{normal:#?}"));
    if bytes.len() as u64 > normal.cluster_size() {
        // An extension area that ended at the backing file name without an end
        // marker grows by the marker: it may no longer fit in cluster 0.
        assert!(
            normal.encode_into_cluster(normal.cluster_size()).is_err(),
            "encode_into_cluster accepted {} bytes for a {}-byte cluster",
            bytes.len(),
            normal.cluster_size()
        );
        return;
    }
    let back = Header::decode(&bytes)
        .unwrap_or_else(|e| panic!("encoded header does not decode: {e}\n{normal:#?}"));
    assert_eq!(back, normal, "decode(encode(h)) != h");
    // Encoding is deterministic: a second round gives the same bytes.
    assert_eq!(back.encode().ok().as_deref(), Some(&bytes[..]));
}
