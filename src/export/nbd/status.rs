//! Block status of the export (the guest view of the whole backing chain),
//! as the metadata contexts report it, built on [`Image::block_status`];
//! and the dirty runs of a persistent bitmap ([`Image::dirty_extents`]) for
//! `qemu:dirty-bitmap:NAME`.

use super::proto::{alloc, push_extent, MetaContext, StatusExtent, DIRTY, MAX_EXTENTS};
use crate::image::Backing;
use crate::mapping::Extent;
use crate::{Image, Result};

/// What the chain says about a run of guest bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainStatus {
    /// Length of the run in bytes (at least 1).
    pub len: u64,
    /// The run has data (allocated data or compressed in some layer).
    pub data: bool,
    /// The run reads as zeroes.
    pub zero: bool,
    /// Layer that allocates it: 0 nowhere, 1 the image itself, 2 its
    /// backing file, and so on (`qemu:allocation-depth`).
    pub depth: u32,
}

impl ChainStatus {
    /// `base:allocation` flags: a hole unless data, zero when zero.
    pub fn base_flags(&self) -> u32 {
        let hole = if self.data { 0 } else { alloc::HOLE };
        let zero = if self.zero { alloc::ZERO } else { 0 };
        hole | zero
    }
}

/// Status of `[offset, offset+len)` (`len > 0`, inside the image), walking
/// down the backing chain until a layer allocates the start of the range
/// (QEMU's `bdrv_block_status_above`). The returned run is the longest
/// prefix with one answer, as the layers report it.
///
/// # Errors
/// Errors of the layers' metadata.
pub fn chain_status(img: &Image, offset: u64, len: u64) -> Result<ChainStatus> {
    let mut layer = img;
    let mut depth = 1u32;
    let mut len = len;
    loop {
        let st = layer.block_status(offset, len)?;
        len = st.len.max(1).min(len);
        match st.extent {
            Extent::Data { .. } | Extent::Compressed { .. } => {
                return Ok(ChainStatus {
                    len,
                    data: true,
                    zero: false,
                    depth,
                })
            }
            Extent::Zero { .. } => {
                return Ok(ChainStatus {
                    len,
                    data: false,
                    zero: true,
                    depth,
                })
            }
            Extent::Unallocated => {}
        }
        let unallocated = ChainStatus {
            len,
            data: false,
            zero: true,
            depth: 0,
        };
        let next_depth = depth.saturating_add(1);
        match layer.backing() {
            None => return Ok(unallocated),
            Some(b) => {
                let size = b.size();
                if offset >= size {
                    // Past the end of a shorter backing file: zeroes.
                    return Ok(unallocated);
                }
                len = len.min(size - offset);
                match b {
                    Backing::Qcow2(next) => {
                        layer = next;
                        depth = next_depth;
                    }
                    Backing::Raw { .. } => {
                        return Ok(ChainStatus {
                            len,
                            data: true,
                            zero: false,
                            depth: next_depth,
                        })
                    }
                }
            }
        }
    }
}

/// Extents of `[offset, offset+len)` for context `ctx` (of an export of the
/// persistent bitmaps `bitmaps`), merged, at most [`MAX_EXTENTS`] (the last
/// may then end before the range does), or only the first with `one`
/// (`NBD_CMD_FLAG_REQ_ONE`). `len` is clipped to the image size by the
/// caller.
///
/// # Errors
/// Errors of the layers' metadata; for a bitmap context, the errors of
/// [`Image::dirty_extents`] (a bitmap removed or gone inconsistent).
pub fn extents(
    img: &Image,
    offset: u64,
    len: u32,
    one: bool,
    ctx: MetaContext,
    bitmaps: &[String],
) -> Result<Vec<StatusExtent>> {
    if let MetaContext::DirtyBitmap(i) = ctx {
        let name = usize::try_from(i)
            .ok()
            .and_then(|i| bitmaps.get(i))
            .ok_or_else(|| crate::Error::Internal("unknown bitmap context".into()))?;
        return dirty_extents(img, name, offset, len, one);
    }
    let mut v: Vec<StatusExtent> = Vec::new();
    let end = offset + u64::from(len);
    let mut pos = offset;
    while pos < end {
        let st = chain_status(img, pos, end - pos)?;
        let e = StatusExtent {
            // st.len <= end - pos <= u32::MAX.
            len: u32::try_from(st.len).unwrap_or(u32::MAX),
            flags: match ctx {
                MetaContext::BaseAllocation => st.base_flags(),
                MetaContext::AllocationDepth => st.depth,
                MetaContext::DirtyBitmap(_) => 0,
            },
        };
        if one && v.first().is_some_and(|f| f.flags != e.flags) {
            break;
        }
        push_extent(&mut v, e);
        if v.len() > MAX_EXTENTS {
            v.truncate(MAX_EXTENTS);
            break;
        }
        pos += st.len;
    }
    Ok(v)
}

/// The dirty ([`DIRTY`]) and clean runs of bitmap `name` over `[offset,
/// offset + len)`, as [`extents`] returns them.
fn dirty_extents(
    img: &Image,
    name: &str,
    offset: u64,
    len: u32,
    one: bool,
) -> Result<Vec<StatusExtent>> {
    let end = offset + u64::from(len);
    let dirty = img.dirty_extents(name, offset, u64::from(len))?;
    let mut v: Vec<StatusExtent> = Vec::new();
    let mut pos = offset;
    // Every run is within the request, so its length fits in a u32.
    let run = |len: u64, flags: u32| StatusExtent {
        len: u32::try_from(len).unwrap_or(u32::MAX),
        flags,
    };
    for (o, l) in dirty {
        if o > pos {
            push_extent(&mut v, run(o - pos, 0));
        }
        push_extent(&mut v, run(l, DIRTY));
        pos = o + l;
        if v.len() >= MAX_EXTENTS {
            break;
        }
    }
    if pos < end && v.len() < MAX_EXTENTS {
        push_extent(&mut v, run(end - pos, 0));
    }
    v.truncate(if one { 1 } else { MAX_EXTENTS });
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{MemStorage, Storage};
    use crate::{CreateOptions, OpenOptions};
    use std::sync::Arc;

    fn image() -> Image {
        let file: Arc<dyn Storage> = Arc::new(MemStorage::new());
        crate::create::create_on(file.clone(), &CreateOptions::new(), 1 << 20).expect("create");
        let img = Image::open_storage(file, &OpenOptions::new()).expect("open");
        img.write_at(&[0x11; 65536], 0).expect("write");
        img.write_zeroes(128 << 10, 64 << 10, false).expect("zero");
        img.write_at(&[0x22; 128 << 10], 512 << 10).expect("write");
        img
    }

    #[test]
    fn base_allocation_merges_zero_and_unallocated() {
        let img = image();
        let base =
            extents(&img, 0, 1 << 20, false, MetaContext::BaseAllocation, &[]).expect("base");
        let depth =
            extents(&img, 0, 1 << 20, false, MetaContext::AllocationDepth, &[]).expect("depth");
        let e = |len: u32, flags: u32| StatusExtent { len, flags };
        // cli.md §24: data, hole+zero, data, hole+zero.
        assert_eq!(
            base,
            vec![e(65536, 0), e(458752, 3), e(131072, 0), e(393216, 3)]
        );
        // The zero cluster is local (1), unallocated ones absent (0).
        assert_eq!(
            depth,
            vec![
                e(65536, 1),
                e(65536, 0),
                e(65536, 1),
                e(327680, 0),
                e(131072, 1),
                e(393216, 0)
            ]
        );
    }

    #[test]
    fn req_one_gives_one_extent_each() {
        let img = image();
        let base =
            extents(&img, 65536, 1 << 19, true, MetaContext::BaseAllocation, &[]).expect("b");
        let depth = extents(
            &img,
            65536,
            1 << 19,
            true,
            MetaContext::AllocationDepth,
            &[],
        )
        .expect("d");
        assert_eq!(
            base,
            vec![StatusExtent {
                len: 458752,
                flags: 3
            }]
        );
        assert_eq!(
            depth,
            vec![StatusExtent {
                len: 65536,
                flags: 0
            }]
        );
        let base = extents(&img, 4096, 4096, true, MetaContext::BaseAllocation, &[]).expect("b");
        let depth = extents(&img, 4096, 4096, true, MetaContext::AllocationDepth, &[]).expect("d");
        assert_eq!(
            base,
            vec![StatusExtent {
                len: 4096,
                flags: 0
            }]
        );
        assert_eq!(
            depth,
            vec![StatusExtent {
                len: 4096,
                flags: 1
            }]
        );
    }

    #[test]
    fn dirty_bitmap_runs_alternate_and_clip() {
        let img = image();
        img.add_bitmap("b", Some(4096)).expect("add");
        img.write_at(&[1; 100], 70_000).expect("write");
        img.write_zeroes(200_000, 10_000, false).expect("zero");
        let b = vec!["b".to_string()];
        let e = |len: u32, flags: u32| StatusExtent { len, flags };
        let ctx = MetaContext::DirtyBitmap(0);
        assert_eq!(
            extents(&img, 0, 1 << 20, false, ctx, &b).expect("map"),
            vec![
                e(69632, 0),
                e(4096, DIRTY),
                e(122880, 0),
                e(16384, DIRTY),
                e(835584, 0)
            ]
        );
        // Clipped to the request, and only the first with REQ_ONE.
        assert_eq!(
            extents(&img, 72_000, 1000, false, ctx, &b).expect("map"),
            vec![e(1000, DIRTY)]
        );
        assert_eq!(
            extents(&img, 0, 1 << 20, true, ctx, &b).expect("map"),
            vec![e(69632, 0)]
        );
        assert!(extents(&img, 0, 4096, false, MetaContext::DirtyBitmap(1), &b).is_err());
    }
}
