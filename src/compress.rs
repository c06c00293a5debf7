//! Compressed clusters: raw deflate (`compression_type` 0) and zstd (1).

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// `compression_type` 0: raw deflate (no zlib header, window bits -12 in QEMU).
pub const ZLIB: u8 = 0;
/// `compression_type` 1: zstd.
pub const ZSTD: u8 = 1;

/// Decompresses one cluster: `input` is the compressed stream (possibly
/// followed by unrelated bytes up to the end of its last sector); the output
/// must be exactly `cluster_size` bytes.
///
/// # Errors
/// A description of what went wrong (corrupt stream, short output, unknown type).
pub fn decompress(ctype: u8, input: &[u8], cluster_size: usize) -> Result<Vec<u8>, String> {
    let mut out = vec![0u8; cluster_size];
    match ctype {
        ZLIB => {
            let mut d = Decompress::new(false);
            match d.decompress(input, &mut out, FlushDecompress::Finish) {
                Ok(_) if d.total_out() as usize == cluster_size => Ok(out),
                Ok(_) => Err(format!(
                    "deflate stream produced {} of {cluster_size} bytes",
                    d.total_out()
                )),
                Err(e) => Err(format!("deflate: {e}")),
            }
        }
        ZSTD => {
            use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
            let mut d = Decoder::new().map_err(|e| format!("zstd: {e}"))?;
            let mut inb = InBuffer::around(input);
            let mut outb = OutBuffer::around(&mut out[..]);
            loop {
                let before = (inb.pos(), outb.pos());
                let hint = d
                    .run(&mut inb, &mut outb)
                    .map_err(|e| format!("zstd: {e}"))?;
                if outb.pos() == cluster_size || hint == 0 {
                    break;
                }
                if (inb.pos(), outb.pos()) == before {
                    break;
                }
            }
            let n = outb.pos();
            if n == cluster_size {
                Ok(out)
            } else {
                Err(format!("zstd stream produced {n} of {cluster_size} bytes"))
            }
        }
        other => Err(format!("unknown compression type {other}")),
    }
}

/// Compresses one cluster; `None` if the result would not be smaller than
/// the cluster (QEMU then writes it uncompressed).
pub fn compress(ctype: u8, data: &[u8]) -> Option<Vec<u8>> {
    match ctype {
        ZLIB => {
            let mut c = Compress::new_with_window_bits(Compression::default(), false, 12);
            let mut out = vec![0u8; data.len()];
            match c.compress(data, &mut out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) => {
                    out.truncate(c.total_out() as usize);
                    (out.len() < data.len()).then_some(out)
                }
                _ => None,
            }
        }
        ZSTD => {
            let out = zstd::bulk::compress(data, 0).ok()?;
            (out.len() < data.len()).then_some(out)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 100) as u8).collect();
        for t in [ZLIB, ZSTD] {
            let mut c = compress(t, &data).unwrap();
            c.extend_from_slice(&[0xaa; 300]); // trailing bytes of the last sector
            assert_eq!(decompress(t, &c, 65536).unwrap(), data);
            assert!(decompress(t, &c[..c.len() / 4], 65536).is_err());
        }
        assert!(decompress(7, &[], 512).is_err());
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let noise: Vec<u8> = (0..512)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(
            compress(ZLIB, &noise).is_none(),
            "incompressible data is not compressed"
        );
    }
}
