//! C number parsing: glibc's `strtoull` and `strtod` as QEMU uses them, and QEMU 10's
//! `qemu_strtosz`.

/// Failure kinds of QEMU's string-to-number helpers (`-EINVAL`, `-ERANGE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NumErr {
    Inval,
    Range,
}

/// C `isspace` in the C locale.
const fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// The byte at `i`, or NUL past the end (C string semantics).
fn byte_at(s: &[u8], i: usize) -> u8 {
    s.get(i).copied().unwrap_or(0)
}

/// What glibc's `strtoull` makes of `s`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Strtoull {
    /// The value (wrapped for a leading `-`, `u64::MAX` on overflow).
    pub(super) value: u64,
    /// Index just past the number; 0 when nothing was converted.
    pub(super) end: usize,
    /// Whether anything was converted.
    pub(super) converted: bool,
    /// Whether the magnitude overflowed (errno `ERANGE`).
    pub(super) overflow: bool,
}

/// glibc `strtoull(s, &end, base)` for `base` 0, 10 or 16.
pub(super) fn c_strtoull(s: &[u8], base: u32) -> Strtoull {
    let mut i = 0;
    while is_c_space(byte_at(s, i)) {
        i += 1;
    }
    let mut negative = false;
    match byte_at(s, i) {
        b'+' => i += 1,
        b'-' => {
            negative = true;
            i += 1;
        }
        _ => {}
    }
    let mut base = base;
    if (base == 0 || base == 16)
        && byte_at(s, i) == b'0'
        && (byte_at(s, i + 1) | 0x20) == b'x'
        && byte_at(s, i + 2).is_ascii_hexdigit()
    {
        // "0x" only counts as a prefix before a hex digit; otherwise "0" is the number and
        // the end points at the 'x' (glibc behaviour).
        i += 2;
        base = 16;
    } else if base == 0 {
        base = if byte_at(s, i) == b'0' { 8 } else { 10 };
    }
    let start = i;
    let mut value: u64 = 0;
    let mut overflow = false;
    while let Some(d) = char::from(byte_at(s, i)).to_digit(base) {
        match value
            .checked_mul(u64::from(base))
            .and_then(|v| v.checked_add(u64::from(d)))
        {
            Some(v) => value = v,
            None => overflow = true,
        }
        i += 1;
    }
    if i == start {
        return Strtoull {
            value: 0,
            end: 0,
            converted: false,
            overflow: false,
        };
    }
    if overflow {
        value = u64::MAX;
    } else if negative {
        value = value.wrapping_neg();
    }
    Strtoull {
        value,
        end: i,
        converted: true,
        overflow,
    }
}

/// QEMU's `parse_uint(s, &end, 10)`: rejects negative numbers with `-ERANGE`.
fn parse_uint10(s: &[u8]) -> (Result<(), NumErr>, u64, usize) {
    let r = c_strtoull(s, 10);
    if r.overflow {
        return (Err(NumErr::Range), u64::MAX, r.end);
    }
    if !r.converted {
        return (Err(NumErr::Inval), 0, 0);
    }
    let mut i = 0;
    while is_c_space(byte_at(s, i)) {
        i += 1;
    }
    if byte_at(s, i) == b'-' {
        return (Err(NumErr::Range), 0, r.end);
    }
    (Ok(()), r.value, r.end)
}

/// What glibc's `strtod` makes of the fraction part that QEMU's `do_strtosz` hands it (the
/// exponent letters were already cut off, and hexadecimal input cannot get here).
enum Strtod {
    /// Nothing converted.
    NoConversion,
    /// `inf`/`nan`: rejected by `qemu_strtod_finite`.
    NonFinite,
    /// A finite number.
    Value {
        /// Bytes consumed.
        len: usize,
        /// The magnitude.
        value: f64,
        /// A `-` sign was present (`signbit`, also for `-0.0`).
        negative: bool,
        /// Some digit was not `0` (to detect underflow to zero).
        nonzero: bool,
    },
}

fn c_strtod(s: &[u8]) -> Strtod {
    let mut i = 0;
    while is_c_space(byte_at(s, i)) {
        i += 1;
    }
    let mut negative = false;
    match byte_at(s, i) {
        b'+' => i += 1,
        b'-' => {
            negative = true;
            i += 1;
        }
        _ => {}
    }
    let rest = s.get(i..).unwrap_or(&[]);
    let starts_with_ci =
        |word: &[u8]| rest.len() >= word.len() && rest[..word.len()].eq_ignore_ascii_case(word);
    if starts_with_ci(b"inf") || starts_with_ci(b"nan") {
        return Strtod::NonFinite;
    }
    let int_start = i;
    while byte_at(s, i).is_ascii_digit() {
        i += 1;
    }
    let int_digits = s.get(int_start..i).unwrap_or(&[]);
    let mut frac_digits: &[u8] = &[];
    if byte_at(s, i) == b'.' {
        let frac_start = i + 1;
        let mut j = frac_start;
        while byte_at(s, j).is_ascii_digit() {
            j += 1;
        }
        if !int_digits.is_empty() || j > frac_start {
            frac_digits = s.get(frac_start..j).unwrap_or(&[]);
            i = j;
        }
    }
    if int_digits.is_empty() && frac_digits.is_empty() {
        return Strtod::NoConversion;
    }
    let nonzero = int_digits
        .iter()
        .chain(frac_digits.iter())
        .any(|&d| d != b'0');
    let text = format!(
        "{}.{}",
        if int_digits.is_empty() {
            "0"
        } else {
            std::str::from_utf8(int_digits).unwrap_or("0")
        },
        if frac_digits.is_empty() {
            "0"
        } else {
            std::str::from_utf8(frac_digits).unwrap_or("0")
        }
    );
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() => Strtod::Value {
            len: i,
            value,
            negative,
            nonzero,
        },
        _ => Strtod::NonFinite,
    }
}

/// Multiplier of a size suffix (QEMU's `suffix_mul` with unit 1024), or `None`.
fn suffix_mul(c: u8) -> Option<u64> {
    match c.to_ascii_uppercase() {
        b'B' => Some(1),
        b'K' => Some(1 << 10),
        b'M' => Some(1 << 20),
        b'G' => Some(1 << 30),
        b'T' => Some(1 << 40),
        b'P' => Some(1 << 50),
        b'E' => Some(1 << 60),
        _ => None,
    }
}

/// QEMU 10's `qemu_strtosz(s, NULL, &result)` (`do_strtosz` with default suffix `B` and
/// unit 1024), including its 64.64 fixed-point handling of fractions.
pub(super) fn qemu_strtosz(s: &[u8]) -> Result<u64, NumErr> {
    let (first, mut val, mut end) = parse_uint10(s);
    let mut retval = first;
    let mut valf: u64 = 0;
    let outcome: Result<u64, NumErr> = 'out: {
        if retval == Err(NumErr::Range) {
            break 'out Err(NumErr::Range);
        }
        if retval.is_ok() && val == 0 && matches!(byte_at(s, end), b'x' | b'X') {
            // Hexadecimal: no fraction and no suffix allowed.
            let r = c_strtoull(s, 16);
            end = r.end;
            if !r.converted {
                break 'out Err(NumErr::Inval);
            }
            if r.overflow {
                break 'out Err(NumErr::Range);
            }
            val = r.value;
            let c = byte_at(s, end);
            if c == b'.' || suffix_mul(c).is_some() {
                end = 0;
                break 'out Err(NumErr::Inval);
            }
        } else if byte_at(s, end) == b'.' || (end == 0 && s.contains(&b'.')) {
            let mut fraction = 0.0_f64;
            let mut nonzero = false;
            if retval.is_ok() && byte_at(s, end) == b'.' && !byte_at(s, end + 1).is_ascii_digit() {
                end += 1;
            } else {
                let tail = s.get(end..).unwrap_or(&[]);
                let cut = tail
                    .iter()
                    .position(|&b| b == b'e' || b == b'E')
                    .unwrap_or(tail.len());
                match c_strtod(tail.get(..cut).unwrap_or(&[])) {
                    Strtod::NoConversion | Strtod::NonFinite => retval = Err(NumErr::Inval),
                    Strtod::Value {
                        len,
                        value,
                        negative,
                        nonzero: nz,
                    } => {
                        end += len;
                        if negative {
                            break 'out Err(NumErr::Range);
                        }
                        retval = Ok(());
                        fraction = value;
                        nonzero = nz;
                    }
                }
            }
            if fraction == 1.0 {
                // Rounded up to a whole unit (e.g. ".99999999999999999999").
                match val.checked_add(1) {
                    Some(v) => val = v,
                    None => break 'out Err(NumErr::Range),
                }
            } else if fraction == 0.0 && nonzero {
                // strtod underflow (ERANGE): QEMU keeps a minimal non-zero fraction.
                valf = 1;
            } else {
                // `as` truncates like C's conversion; fraction < 1.0 so it fits.
                valf = (fraction * 18_446_744_073_709_551_616.0) as u64;
                if valf == 0 && fraction > 0.0 {
                    valf = 1;
                }
            }
        }
        if let Err(e) = retval {
            break 'out Err(e);
        }
        let mul = match suffix_mul(byte_at(s, end)) {
            Some(m) => {
                end += 1;
                m
            }
            None => 1,
        };
        if mul == 1 {
            if valf != 0 {
                // A fraction needs a scaling suffix.
                end = 0;
                break 'out Err(NumErr::Inval);
            }
        } else {
            let frac = u128::from(valf) * u128::from(mul);
            let total =
                u128::from(val) * u128::from(mul) + (frac >> 64) + u128::from((frac as u64) >> 63);
            match u64::try_from(total) {
                Ok(v) => val = v,
                Err(_) => break 'out Err(NumErr::Range),
            }
        }
        Ok(val)
    };
    // The whole string must be consumed.
    if end < s.len() {
        return Err(NumErr::Inval);
    }
    outcome
}
