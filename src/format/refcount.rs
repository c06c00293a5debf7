//! Refcount cells of every width inside a refcount block (spec §3.3).
//!
//! 8/16/32/64-bit cells are big-endian integers; 1/2/4-bit cells are packed
//! from the least significant bit of each byte (verified against QEMU: a
//! fresh 1-bit image has refblock byte 0 = `0x0f`).

/// Reads cell `index` of width `1 << order` bits from `block`.
/// Returns `None` if the cell lies outside `block`.
pub fn get(block: &[u8], order: u32, index: usize) -> Option<u64> {
    match order {
        0..=2 => {
            let w = 1usize << order;
            let per_byte = 8 / w;
            let byte = *block.get(index / per_byte)?;
            let shift = (index % per_byte) * w;
            Some(u64::from((byte >> shift) & ((1u8 << w) - 1)))
        }
        3 => block.get(index).map(|&b| u64::from(b)),
        4 => {
            let p = index.checked_mul(2)?;
            super::be_u16(block, p).map(u64::from)
        }
        5 => {
            let p = index.checked_mul(4)?;
            super::be_u32(block, p).map(u64::from)
        }
        6 => {
            let p = index.checked_mul(8)?;
            super::be_u64(block, p)
        }
        _ => None,
    }
}

/// The largest refcount representable with `1 << order` bits.
pub fn max_value(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    }
}

/// Writes `value` into cell `index`. Returns `false` (changing nothing) if the
/// cell lies outside `block` or `value` does not fit the width.
#[expect(
    clippy::cast_possible_truncation,
    reason = "`value` was checked against the width's maximum above, so each narrowing is exact"
)]
pub fn set(block: &mut [u8], order: u32, index: usize, value: u64) -> bool {
    if value > max_value(order) {
        return false;
    }
    match order {
        0..=2 => {
            let w = 1usize << order;
            let per_byte = 8 / w;
            let Some(byte) = block.get_mut(index / per_byte) else {
                return false;
            };
            let shift = (index % per_byte) * w;
            let mask = ((1u8 << w) - 1) << shift;
            *byte = (*byte & !mask) | ((value as u8) << shift);
            true
        }
        3 => match block.get_mut(index) {
            Some(b) => {
                *b = value as u8;
                true
            }
            None => false,
        },
        4 => index
            .checked_mul(2)
            .is_some_and(|p| super::put_be_u16(block, p, value as u16)),
        5 => index
            .checked_mul(4)
            .is_some_and(|p| super::put_be_u32(block, p, value as u32)),
        6 => index
            .checked_mul(8)
            .is_some_and(|p| super::put_be_u64(block, p, value)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn qemu_sub_byte_layout() {
        for (order, first) in [(0u32, 0x0fu8), (1, 0x55), (2, 0x11)] {
            let mut b = vec![0u8; 16];
            for i in 0..4 {
                assert!(set(&mut b, order, i, 1));
            }
            assert_eq!(b[0], first, "order {order}");
        }
    }

    #[test]
    fn overflow_refused() {
        let mut b = vec![0u8; 8];
        assert!(!set(&mut b, 0, 0, 2));
        assert!(!set(&mut b, 3, 0, 256));
        assert!(!set(&mut b, 4, 4, 1), "cell outside the block");
        assert_eq!(get(&b, 4, 4), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn round_trip(order in 0u32..=6, index in 0usize..512, v in any::<u64>(), fill in any::<u8>()) {
            let mut b = vec![fill; 4096];
            let v = v & max_value(order);
            let before: Vec<u64> = (0..64).map(|i| get(&b, order, i).unwrap()).collect();
            prop_assert!(set(&mut b, order, index, v));
            prop_assert_eq!(get(&b, order, index), Some(v));
            for (i, old) in before.iter().enumerate() {
                if i != index {
                    prop_assert_eq!(get(&b, order, i), Some(*old));
                }
            }
        }
    }
}
