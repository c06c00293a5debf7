//! Scalar option values (sizes, numbers, booleans, node names) and QemuOpts option lists.

use super::cnum::{c_strtoull, qemu_strtosz, NumErr};
use super::error::{OptionError, SizeError};

/// Maximum length of a node name, exclusive (QEMU's `sizeof(bs->node_name)`).
const NODE_NAME_MAX: usize = 32;

// ---------------------------------------------------------------------------------------------
// Scalars
// ---------------------------------------------------------------------------------------------

/// Parses a size the way qemu-img does (`qemu_strtosz`): a byte count with an optional
/// fraction and an optional suffix `b k m g t p e` in either case (1024-based, `b` = bytes).
///
/// `1536`, `1536b`, `512k`, `1.5G` (= 1610612736), `1.k`, `.5k` and hexadecimal `0x10` are
/// accepted; a fraction needs a suffix other than `b` (`1.5` is invalid); leading whitespace and
/// `+` are accepted (as by C's `strtoull`), trailing characters are not.
///
/// # Errors
/// [`SizeError::Invalid`] for bad syntax, [`SizeError::OutOfRange`] for a negative number or a
/// value of 2^64 or more (QEMU's `-ERANGE` cases: `-1024`, `16E`).
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    qemu_strtosz(s.as_bytes()).map_err(|e| match e {
        NumErr::Inval => SizeError::Invalid {
            input: s.to_owned(),
        },
        NumErr::Range => SizeError::OutOfRange {
            input: s.to_owned(),
        },
    })
}

/// Parses a positional image size for qemu-img (`cvtnum`): [`parse_size`] limited to
/// `0..=i64::MAX`.
///
/// # Errors
/// As [`parse_size`]; sizes above `i64::MAX` give [`SizeError::OutOfRange`]. Print them with
/// [`SizeError::qemu_img_message`].
pub fn parse_image_size(s: &str) -> Result<u64, SizeError> {
    let size = parse_size(s)?;
    if size > i64::MAX as u64 {
        return Err(SizeError::OutOfRange {
            input: s.to_owned(),
        });
    }
    Ok(size)
}

/// Parses a QemuOpts number option (C `strtoull` with base 0: decimal, `0x` hex, `0` octal;
/// a leading `-` wraps around like in C, so `-1` is `u64::MAX`).
///
/// # Errors
/// [`OptionError::BadNumber`] for bad syntax or trailing characters,
/// [`OptionError::NumberTooLarge`] for values of 2^64 or more.
pub fn parse_number(option: &str, value: &str) -> Result<u64, OptionError> {
    let s = value.as_bytes();
    let r = c_strtoull(s, 0);
    if !r.converted || r.end < s.len() {
        return Err(OptionError::BadNumber {
            option: option.to_owned(),
        });
    }
    if r.overflow {
        return Err(OptionError::NumberTooLarge {
            option: option.to_owned(),
            value: value.to_owned(),
        });
    }
    Ok(r.value)
}

/// Parses a QemuOpts boolean: `on`, `yes`, `true`, `y` or `off`, `no`, `false`, `n`
/// (case-sensitive, as QEMU's `qapi_bool_parse`).
///
/// # Errors
/// [`OptionError::BadBool`]: `Parameter 'KEY' expects 'on' or 'off'`.
pub fn parse_bool_onoff(key: &str, value: &str) -> Result<bool, OptionError> {
    match value {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(OptionError::BadBool {
            option: key.to_owned(),
        }),
    }
}

/// Parses a size-valued option, with QemuOpts' error messages.
pub(crate) fn parse_size_option(key: &str, value: &str) -> Result<u64, OptionError> {
    parse_size(value).map_err(|e| e.into_option_error(key))
}

/// Checks a `node-name` like QEMU (`Invalid node-name: 'X'`, `Node name too long`).
///
/// # Errors
/// [`OptionError::InvalidNodeName`] unless the name starts with an ASCII letter and continues
/// with letters, digits, `-`, `.`, `_`; [`OptionError::NodeNameTooLong`] for 32 bytes or more.
pub fn validate_node_name(name: &str) -> Result<(), OptionError> {
    let mut bytes = name.bytes();
    let well_formed = bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if !well_formed {
        return Err(OptionError::InvalidNodeName {
            name: name.to_owned(),
        });
    }
    if name.len() >= NODE_NAME_MAX {
        return Err(OptionError::NodeNameTooLong);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Option lists
// ---------------------------------------------------------------------------------------------

/// One element of a QemuOpts list.
struct RawOption {
    name: String,
    value: String,
    /// Given without `=` (a flag: `key` → on, `nokey` → off, `help`/`?`).
    bare: bool,
}

/// QemuOpts' `get_opt_value`: reads up to a single `,`; `,,` is a literal comma. Returns the
/// value and the number of bytes consumed (the terminating `,` is not consumed).
fn get_opt_value(s: &str) -> (String, usize) {
    let mut value = String::new();
    let mut pos = 0;
    loop {
        let rest = s.get(pos..).unwrap_or("");
        match rest.find(',') {
            None => {
                value.push_str(rest);
                return (value, s.len());
            }
            Some(off) => {
                let (head, tail) = rest.split_at(off);
                value.push_str(head);
                if tail.as_bytes().get(1) == Some(&b',') {
                    value.push(',');
                    pos += off + 2;
                } else {
                    return (value, pos + off);
                }
            }
        }
    }
}

/// QemuOpts' parser (`qemu_opts_do_parse` without an implied first name).
fn parse_qemu_opts(s: &str) -> Vec<RawOption> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < s.len() {
        let rest = s.get(pos..).unwrap_or("");
        let name_len = rest.find(['=', ',']).unwrap_or(rest.len());
        let (name, after) = rest.split_at(name_len);
        if let Some(value_part) = after.strip_prefix('=') {
            let (value, consumed) = get_opt_value(value_part);
            out.push(RawOption {
                name: name.to_owned(),
                value,
                bare: false,
            });
            pos += name_len + 1 + consumed;
        } else {
            let (name, value) = match name.strip_prefix("no") {
                Some(stripped) => (stripped, "off"),
                None => (name, "on"),
            };
            out.push(RawOption {
                name: name.to_owned(),
                value: value.to_owned(),
                bare: true,
            });
            pos += name_len;
        }
        if s.as_bytes().get(pos) == Some(&b',') {
            pos += 1;
        }
    }
    out
}

/// Splits a QEMU option list `key=value,key=value` into pairs, in order.
///
/// Exactly QemuOpts' syntax: `,,` inside a value is a literal comma (`data_file=a,,b` gives
/// `a,b`); an element without `=` is a flag, `key` meaning `key=on` and `nokey` meaning
/// `key=off` (so a bare `nocow` is `cow=off`); `a=b=c` gives `a` = `b=c`; keys are not
/// unescaped. An empty string gives an empty list (qemu-img itself refuses an empty `-o`; see
/// [`check_option_list`]).
///
/// # Errors
/// [`OptionError::InvalidOptionList`] for a list starting with `,` or ending with an odd number
/// of `,` (qemu-img's `Invalid option list: ...`).
pub fn split_option_string(s: &str) -> Result<Vec<(String, String)>, OptionError> {
    if s.is_empty() {
        return Ok(Vec::new());
    }
    check_option_list(s)?;
    Ok(parse_qemu_opts(s)
        .into_iter()
        .map(|o| (o.name, o.value))
        .collect())
}

/// qemu-img's check of each `-o` argument (`is_valid_option_list`): not empty, not starting
/// with `,`, not ending with an odd number of `,`.
///
/// # Errors
/// [`OptionError::InvalidOptionList`] naming the list.
pub fn check_option_list(s: &str) -> Result<(), OptionError> {
    let trailing = s.bytes().rev().take_while(|&b| b == b',').count();
    if s.is_empty() || s.starts_with(',') || trailing % 2 == 1 {
        return Err(OptionError::InvalidOptionList { list: s.to_owned() });
    }
    Ok(())
}

/// Whether an option list asks for help (a bare `help` or `?` element, as `-o help`).
pub fn option_string_wants_help(s: &str) -> bool {
    parse_qemu_opts(s)
        .iter()
        .any(|o| o.bare && (o.name == "help" || o.name == "?"))
}

/// Escapes a value for an option list or the `Formatting` line: `,` becomes `,,`.
pub fn escape_option_value(value: &str) -> String {
    value.replace(',', ",,")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::options::testutil::{GIB, MIB, TIB};

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn parse_size_cli_examples() {
        // cli.md §0 and §2.2 (all verified with qemu-img 10.0.2).
        for (input, want) in [
            ("1536", 1536),
            ("1536b", 1536),
            ("1536B", 1536),
            ("512k", 524_288),
            ("512K", 524_288),
            ("1m", MIB),
            ("1g", GIB),
            ("2T", 2 * TIB),
            ("1.5G", 1_610_612_736),
            ("1E", 1 << 60),
            ("1e", 1 << 60),
            ("1p", 1 << 50),
        ] {
            assert_eq!(parse_size(input), Ok(want), "{input}");
        }
    }

    #[test]
    fn parse_size_edge_cases_match_qemu() {
        // Each verified against `qemu-img create -o size=...` 10.0.2.
        for (input, want) in [
            ("0x10", 16),
            ("0X1f", 31),
            ("0x10b", 267),
            ("1.k", 1024),
            (".5k", 512),
            ("+1.5k", 1536),
            (" 1k", 1024),
            ("1.0", 1),
            ("0.5e", 576_460_752_303_423_488),
            ("15.9999999999999999E", u64::MAX - 127),
            ("15.99999E", (-11_529_215_046_016_i64) as u64),
            ("9223372036854775807", i64::MAX as u64),
            ("1.0000000000000000000000000000000000000000000001k", 1024),
            ("0.00000000000000000001k", 0),
            ("0.99999999999999999999k", 1024),
        ] {
            assert_eq!(parse_size(input), Ok(want), "{input}");
        }
        for input in [
            "",
            "10X",
            "1.5",
            "1.5b",
            "-1k",
            "-.5k",
            " 1k ",
            "1k ",
            "0x",
            "0x10k",
            ".k",
            ".",
            "1..5k",
            "1 k",
            "1e3",
            "inf.5k",
            "+-1",
            "99999999999999999999k",
            "1.0000000000000000000000000000000000000000000001",
            "abc",
            "1kb",
            "0x1.8",
            "1,5k",
        ] {
            assert_eq!(
                parse_size(input),
                Err(SizeError::Invalid {
                    input: input.to_owned()
                }),
                "{input}"
            );
        }
        for input in [
            "-1024",
            "-.5",
            "-0",
            "-.0",
            "99999999999999999999",
            "16E",
            "99999999E",
        ] {
            assert_eq!(
                parse_size(input),
                Err(SizeError::OutOfRange {
                    input: input.to_owned()
                }),
                "{input}"
            );
        }
    }

    #[test]
    fn parse_size_agrees_with_plain_multiplication() {
        for n in [
            0_u64,
            1,
            7,
            1023,
            4096,
            123_456_789,
            u64::MAX / 1024,
            u64::MAX,
        ] {
            for (suffix, shift) in [
                ("", 0),
                ("b", 0),
                ("k", 10),
                ("M", 20),
                ("g", 30),
                ("T", 40),
                ("p", 50),
                ("E", 60),
            ] {
                let s = format!("{n}{suffix}");
                let want = n.checked_mul(1 << shift);
                match want {
                    Some(v) => assert_eq!(parse_size(&s), Ok(v), "{s}"),
                    None => assert!(
                        matches!(parse_size(&s), Err(SizeError::OutOfRange { .. })),
                        "{s}"
                    ),
                }
            }
        }
    }

    #[test]
    fn numbers_and_booleans() {
        assert_eq!(parse_number("refcount_bits", "16"), Ok(16));
        assert_eq!(parse_number("refcount_bits", "0x10"), Ok(16));
        assert_eq!(parse_number("refcount_bits", "010"), Ok(8));
        assert_eq!(parse_number("refcount_bits", " 16"), Ok(16));
        assert_eq!(parse_number("x", "-1"), Ok(u64::MAX));
        for bad in ["abc", "1k", "", "08", "0x", "16 "] {
            assert_eq!(
                parse_number("refcount_bits", bad).unwrap_err().to_string(),
                "Parameter 'refcount_bits' expects a number",
                "{bad}"
            );
        }
        assert_eq!(
            parse_number("refcount_bits", "18446744073709551616")
                .unwrap_err()
                .to_string(),
            "Value '18446744073709551616' is too large for parameter 'refcount_bits'"
        );
        for on in ["on", "yes", "true", "y"] {
            assert_eq!(parse_bool_onoff("k", on), Ok(true));
        }
        for off in ["off", "no", "false", "n"] {
            assert_eq!(parse_bool_onoff("k", off), Ok(false));
        }
        for bad in ["ON", "On", "1", "0", "TRUE", "", " on", "maybe", "Y"] {
            assert_eq!(
                parse_bool_onoff("lazy_refcounts", bad)
                    .unwrap_err()
                    .to_string(),
                "Parameter 'lazy_refcounts' expects 'on' or 'off'"
            );
        }
    }

    #[test]
    fn split_escapes_and_flags() {
        assert_eq!(
            split_option_string("data_file=a,,b.data,size=1M").unwrap(),
            pairs(&[("data_file", "a,b.data"), ("size", "1M")])
        );
        assert_eq!(
            split_option_string("a=x,,,b=1").unwrap(),
            pairs(&[("a", "x,"), ("b", "1")])
        );
        assert_eq!(
            split_option_string("a=,,,,").unwrap(),
            pairs(&[("a", ",,")])
        );
        assert_eq!(
            split_option_string("lazy_refcounts,nocow,no").unwrap(),
            pairs(&[("lazy_refcounts", "on"), ("cow", "off"), ("", "off")])
        );
        assert_eq!(
            split_option_string("a=b=c").unwrap(),
            pairs(&[("a", "b=c")])
        );
        assert_eq!(split_option_string("=x").unwrap(), pairs(&[("", "x")]));
        assert_eq!(split_option_string("k=").unwrap(), pairs(&[("k", "")]));
        assert_eq!(split_option_string("").unwrap(), pairs(&[]));
        assert_eq!(
            split_option_string("a,,b=c").unwrap(),
            pairs(&[("a", "on"), ("", "on"), ("b", "c")])
        );
        for bad in [",", ",a=b", "a=b,", "a=b,,,"] {
            assert_eq!(
                split_option_string(bad).unwrap_err().to_string(),
                format!("Invalid option list: {bad}")
            );
        }
        assert!(split_option_string("a=b,,").is_ok());
        assert!(check_option_list("").is_err());
        assert!(check_option_list("a=b").is_ok());
        assert!(option_string_wants_help("help"));
        assert!(option_string_wants_help("size=1M,?"));
        assert!(!option_string_wants_help("help=on"));
        assert_eq!(escape_option_value("a,b,,c"), "a,,b,,,,c");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn escaped_values_round_trip(key in "[a-z_]{1,10}", value in "[a-z,=]{0,12}") {
            let s = format!("{key}={}", escape_option_value(&value));
            // A value ending in commas would be an odd-trailing-comma list only if the
            // escaped form has an odd count, which escaping never produces.
            let parsed = split_option_string(&s).unwrap();
            prop_assert_eq!(parsed, vec![(key, value)]);
        }
    }
}
