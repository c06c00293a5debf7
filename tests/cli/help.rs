//! `--help` and `--version` of `qcow2-img` and `qcow2-check`: every
//! subcommand's help exits 0 on stdout, names every option its argument
//! parser accepts (and no other), and lists the exit codes.
//!
//! The option tables are written by hand from the clap `Args` structs of
//! `src/bin/qcow2-img/*.rs` and the `Command` of `src/check/cli.rs`: a new
//! option there needs a line here and in the help text.

use crate::support::{run_cmd, Run, QCOW2_CHECK as CHECK, QCOW2_IMG as IMG};
use std::process::Command;

fn run(bin: &str, args: &[&str]) -> Run {
    run_cmd(Command::new(bin).args(args))
}

/// One help text to test.
struct Case {
    /// How the help is asked for (program, then the arguments before `--help`).
    bin: &'static str,
    sub: &'static [&'static str],
    /// Every spelling the command's parser accepts.
    options: &'static [&'static str],
    /// Its exit codes.
    codes: &'static [u8],
    /// Words that look like options but are not (sizes, abbreviations).
    not_options: &'static [&'static str],
}

const CHECK_OPTIONS: &[&str] = &[
    "-h",
    "--help",
    "-f",
    "--format",
    "-r",
    "--repair",
    "--output",
    "-q",
    "--quiet",
    "-U",
    "--force-share",
    "-T",
    "--cache",
    "--image-opts",
    "--object",
];

const CASES: &[Case] = &[
    Case {
        bin: IMG,
        sub: &["measure"],
        options: &[
            "-h",
            "--help",
            "--object",
            "--output",
            "-O",
            "-o",
            "--options",
            "--size",
            "-f",
            "--format",
            "--image-opts",
            "-U",
            "--force-share",
        ],
        codes: &[0, 1],
        not_options: &[],
    },
    Case {
        bin: IMG,
        sub: &["compare"],
        options: &[
            "-h",
            "--help",
            "--object",
            "-f",
            "-F",
            "--image-opts",
            "-T",
            "-s",
            "-p",
            "-q",
            "-U",
            "--force-share",
        ],
        codes: &[0, 1, 2, 3, 4],
        not_options: &[],
    },
    Case {
        bin: IMG,
        sub: &["create"],
        options: &[
            "-h",
            "--help",
            "--object",
            "-f",
            "--format",
            "-o",
            "--options",
            "-b",
            "--backing",
            "-F",
            "--backing-format",
            "-q",
            "--quiet",
            "-u",
            "--backing-unsafe",
        ],
        codes: &[0, 1],
        not_options: &[],
    },
    Case {
        bin: IMG,
        sub: &["info"],
        options: &[
            "-h",
            "--help",
            "--object",
            "-f",
            "--format",
            "--image-opts",
            "--output",
            "--backing-chain",
            "-U",
            "--force-share",
        ],
        codes: &[0, 1],
        not_options: &[],
    },
    Case {
        bin: IMG,
        sub: &["map"],
        options: &[
            "-h",
            "--help",
            "--object",
            "-f",
            "--format",
            "--image-opts",
            "--output",
            "-s",
            "--start-offset",
            "-l",
            "--max-length",
            "-U",
            "--force-share",
            "-B",
            "--bitmap",
        ],
        codes: &[0, 1],
        not_options: &[],
    },
    Case {
        bin: IMG,
        sub: &["check"],
        options: CHECK_OPTIONS,
        codes: &[0, 1, 2, 3, 63],
        not_options: &["--rep"],
    },
    Case {
        bin: IMG,
        sub: &["convert"],
        options: &[
            "-h",
            "--help",
            "--image-opts",
            "--object",
            "-f",
            "--format",
            "-O",
            "-o",
            "--options",
            "-c",
            "--compress",
            "-q",
            "--quiet",
            "-p",
            "--progress",
            "-U",
            "--force-share",
            "-t",
            "-T",
            "-m",
            "-W",
            "--bitmaps",
            "--skip-broken-bitmaps",
        ],
        codes: &[0, 1],
        not_options: &[],
    },
    Case {
        bin: IMG,
        sub: &["resize"],
        options: &[
            "-h",
            "--help",
            "--object",
            "-f",
            "--format",
            "--image-opts",
            "-q",
            "--quiet",
            "--preallocation",
            "--shrink",
        ],
        codes: &[0, 1],
        not_options: &[],
    },
    Case {
        bin: IMG,
        sub: &["amend"],
        options: &[
            "-h",
            "--help",
            "--object",
            "-f",
            "--format",
            "--image-opts",
            "-q",
            "--quiet",
            "-p",
            "--progress",
            "-o",
        ],
        codes: &[0, 1],
        not_options: &[],
    },
    Case {
        bin: IMG,
        sub: &["commit"],
        options: &[
            "-h",
            "--help",
            "-f",
            "--format",
            "-q",
            "--quiet",
            "-d",
            "-p",
            "--progress",
            "-b",
            "-r",
        ],
        codes: &[0, 1],
        not_options: &[],
    },
    Case {
        bin: IMG,
        sub: &["bench"],
        options: &[
            "-h",
            "--help",
            "--object",
            "-c",
            "--count",
            "-d",
            "--depth",
            "-f",
            "--format",
            "-n",
            "--native",
            "-i",
            "--aio",
            "-o",
            "--offset",
            "-q",
            "--quiet",
            "-s",
            "--buffer-size",
            "-S",
            "--step-size",
            "-t",
            "--cache",
            "-w",
            "--write",
            "-U",
            "--force-share",
            "--pattern",
            "--flush-interval",
            "--no-drain",
            "--image-opts",
        ],
        codes: &[0, 1],
        not_options: &[],
    },
    Case {
        bin: IMG,
        sub: &["rebase"],
        options: &[
            "-h",
            "--help",
            "-f",
            "--format",
            "-q",
            "--quiet",
            "-p",
            "--progress",
            "-U",
            "--force-share",
            "-u",
            "-b",
            "-F",
        ],
        codes: &[0, 1],
        not_options: &[],
    },
    Case {
        bin: IMG,
        sub: &["stream"],
        options: &[
            "-h",
            "--help",
            "-f",
            "--format",
            "-q",
            "--quiet",
            "-p",
            "--progress",
            "-b",
            "--backing-file",
            "-r",
        ],
        codes: &[0, 1],
        not_options: &[],
    },
    Case {
        bin: IMG,
        sub: &["mirror"],
        options: &[
            "-h",
            "--help",
            "-q",
            "--quiet",
            "-p",
            "--progress",
            "-O",
            "--on-source-error",
            "--on-target-error",
        ],
        codes: &[0, 1],
        not_options: &[],
    },
    Case {
        bin: IMG,
        sub: &["bitmap"],
        options: &[
            "-h",
            "--help",
            "--object",
            "-f",
            "--format",
            "--image-opts",
            "--add",
            "-g",
            "--granularity",
            "--remove",
            "--clear",
            "--enable",
            "--disable",
            "--merge",
            "-b",
            "--source-file",
            "-F",
            "--source-format",
        ],
        codes: &[0, 1],
        not_options: &[],
    },
];

/// The words of a help text that look like options (`-x`, `--long`), with
/// `=VALUE`, brackets, quotes and punctuation taken off.
fn option_words(text: &str) -> Vec<String> {
    text.split(|c: char| c.is_whitespace() || "[](),|=;:'\"".contains(c))
        .filter(|w| {
            let body = w.strip_prefix("--").or_else(|| w.strip_prefix('-'));
            body.and_then(|b| b.chars().next())
                .is_some_and(|c| c.is_ascii_alphabetic())
        })
        .map(|w| w.trim_end_matches('.').to_owned())
        .collect()
}

/// The help of `case`, asked with `flag`, checked for the common shape.
fn help_of(case: &Case, flag: &str) -> Run {
    let mut args = case.sub.to_vec();
    args.push(flag);
    let r = run(case.bin, &args);
    assert_eq!(r.code, 0, "{args:?}: {r:?}");
    assert!(r.err.is_empty(), "{args:?} printed on stderr: {r:?}");
    r
}

fn program(case: &Case) -> String {
    let name = if case.bin == IMG {
        "qcow2-img"
    } else {
        "qcow2-check"
    };
    std::iter::once(name)
        .chain(case.sub.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

fn check_case(case: &Case) {
    let name = program(case);
    let r = help_of(case, "--help");
    assert_eq!(
        help_of(case, "-h").out,
        r.out,
        "{name}: -h and --help differ"
    );
    let text = &r.out;
    assert!(
        text.starts_with(&format!("Usage: {name} ")),
        "{name}: no synopsis first:\n{text}"
    );
    assert!(text.ends_with('\n'), "{name}: last line not ended");

    // Every option the parser accepts is explained...
    let words = option_words(text);
    for opt in case.options {
        assert!(
            words.iter().any(|w| w == opt),
            "{name} --help does not mention {opt}:\n{text}"
        );
        // ... in the option list (an indented line of its own).
        let listed = text
            .lines()
            .filter(|l| l.starts_with("  -"))
            .any(|l| option_words(l).iter().any(|w| w == opt));
        assert!(
            listed,
            "{name} --help has no option line for {opt}:\n{text}"
        );
    }
    // ... and nothing else is offered as an option.
    for w in &words {
        assert!(
            case.options.contains(&w.as_str())
                || case.not_options.contains(&w.as_str())
                || (case.bin == CHECK && (w == "-V" || w == "--version")),
            "{name} --help mentions {w}, which its parser does not accept:\n{text}"
        );
    }

    // The exit codes, one line each.
    let codes = text
        .split_once("\nExit codes:\n")
        .map(|(_, c)| c)
        .unwrap_or_else(|| panic!("{name} --help has no exit codes:\n{text}"));
    for code in case.codes {
        assert!(
            codes
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{code} "))),
            "{name} --help does not explain exit code {code}:\n{codes}"
        );
    }
    let listed: Vec<&str> = codes
        .lines()
        .filter_map(|l| l.strip_prefix("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.parse::<u8>().is_ok())
        .collect();
    assert_eq!(
        listed.len(),
        case.codes.len(),
        "{name}: exit codes listed {listed:?}, expected {:?}",
        case.codes
    );
}

#[test]
fn img_measure_help() {
    check_case(&CASES[0]);
}

#[test]
fn img_compare_help() {
    check_case(&CASES[1]);
}

#[test]
fn img_create_help() {
    check_case(&CASES[2]);
}

#[test]
fn img_info_help() {
    check_case(&CASES[3]);
}

#[test]
fn img_map_help() {
    check_case(&CASES[4]);
}

#[test]
fn img_check_help() {
    check_case(&CASES[5]);
}

#[test]
fn img_convert_help() {
    check_case(&CASES[6]);
}

#[test]
fn img_resize_help() {
    check_case(&CASES[7]);
}

/// Every command `qcow2-img --help` lists has a `--help` test: a case here,
/// or (for `io` and `serve`, whose help is checked against their own
/// option tables) `io_help.rs` and `nbd_serve.rs::serve_help_and_argument_errors`.
#[test]
fn img_amend_help() {
    check_case(&CASES[8]);
}

#[test]
fn img_commit_help() {
    check_case(&CASES[9]);
}

#[test]
fn img_bench_help() {
    check_case(&CASES[10]);
}

#[test]
fn img_rebase_help() {
    check_case(&CASES[11]);
}

#[test]
fn img_stream_help() {
    check_case(&CASES[12]);
}

#[test]
fn img_mirror_help() {
    check_case(&CASES[13]);
}

#[test]
fn img_bitmap_help() {
    check_case(&CASES[14]);
}

/// Each case is tested by the function named after its command (a case
/// tested under another's name would leave its own untested).
#[test]
fn cases_are_in_the_order_the_tests_index() {
    let subs: Vec<&str> = CASES
        .iter()
        .map(|c| c.sub.first().copied().unwrap_or(""))
        .collect();
    assert_eq!(
        subs,
        [
            "measure", "compare", "create", "info", "map", "check", "convert", "resize", "amend",
            "commit", "bench", "rebase", "stream", "mirror", "bitmap"
        ]
    );
}

/// `snapshot --help` (its own test: the option table above has no case for
/// an operation-selecting flag set like `-l|-c|-a|-d`).
#[test]
fn img_snapshot_help() {
    let r = run(IMG, &["snapshot", "--help"]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(r.out.starts_with("Usage: qcow2-img snapshot "), "{}", r.out);
    for opt in [
        "--object",
        "--format",
        "--image-opts",
        "--quiet",
        "--force-share",
        "--list",
        "--create",
        "--apply",
        "--delete",
    ] {
        assert!(
            r.out.contains(opt),
            "snapshot --help lacks {opt}:\n{}",
            r.out
        );
    }
}

#[test]
fn every_subcommand_has_a_case() {
    let subs: Vec<&str> = CASES.iter().map(|c| c.sub[0]).collect();
    let r = run(IMG, &["--help"]);
    let (_, commands) = r.out.split_once("\nCommands:\n").expect("a command list");
    let listed: Vec<&str> = commands
        .split("\n\n")
        .next()
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(listed.len() >= 10, "{listed:?}");
    for sub in listed {
        assert!(
            subs.contains(&sub) || ["io", "serve", "snapshot"].contains(&sub),
            "no help case for {sub}"
        );
    }
}

#[test]
fn qcow2_check_help() {
    let case = Case {
        bin: CHECK,
        sub: &[],
        options: CHECK_OPTIONS,
        codes: &[0, 1, 2, 3, 63],
        not_options: &["--rep"],
    };
    check_case(&case);
    let text = help_of(&case, "--help").out;
    assert!(text.contains("-V, --version"), "{text}");
}

#[test]
fn check_synopsis_takes_exactly_one_file() {
    for bin in [&[IMG, "check"][..], &[CHECK]] {
        let r = run(bin[0], &[&bin[1..], &["--help"]].concat());
        assert_eq!(r.code, 0, "{r:?}");
        let synopsis: String = r.out.split("\n\n").next().unwrap_or_default().to_owned();
        assert!(synopsis.ends_with(" FILE"), "{synopsis}");
        assert_eq!(synopsis.matches("FILE").count(), 1, "{synopsis}");
        assert!(!synopsis.contains("..."), "{synopsis}");
    }
}

#[test]
fn create_help_explains_backing_unsafe() {
    let r = run(IMG, &["create", "--help"]);
    let (_, after) = r
        .out
        .split_once("-u, --backing-unsafe\n")
        .expect("an option line for -u");
    let explanation = after.lines().next().unwrap_or_default();
    assert!(explanation.contains("do not open BACKING"), "{explanation}");
}

#[test]
fn img_help_lists_each_command_on_one_line() {
    for flag in ["--help", "-h"] {
        let r = run(IMG, &[flag]);
        assert_eq!(r.code, 0, "{r:?}");
        assert!(r.err.is_empty(), "{r:?}");
        let (_, commands) = r.out.split_once("\nCommands:\n").expect("a command list");
        let commands = commands.split("\n\n").next().unwrap_or_default();
        let names: Vec<&str> = commands
            .lines()
            .map(|l| l.split_whitespace().next().unwrap_or_default())
            .collect();
        assert_eq!(
            names,
            [
                "amend", "bench", "bitmap", "check", "commit", "compare", "convert", "create",
                "info", "io", "map", "measure", "mirror", "rebase", "resize", "serve", "snapshot",
                "stream"
            ],
            "{}",
            r.out
        );
        for l in commands.lines() {
            assert!(l.split_whitespace().count() > 2, "no description: {l}");
        }
        for w in ["-h", "--help", "-V", "--version"] {
            assert!(option_words(&r.out).iter().any(|o| o == w), "{w}");
        }
    }
}

#[test]
fn version_on_both_binaries() {
    let version = env!("CARGO_PKG_VERSION");
    for (bin, name) in [(IMG, "qcow2-img"), (CHECK, "qcow2-check")] {
        for flag in ["--version", "-V"] {
            let r = run(bin, &[flag]);
            assert_eq!(r.code, 0, "{name} {flag}: {r:?}");
            assert!(r.err.is_empty(), "{name} {flag}: {r:?}");
            let mut lines = r.out.lines();
            assert_eq!(
                lines.next(),
                Some(format!("{name} version {version}").as_str())
            );
            assert!(
                lines.next().is_some_and(|l| l.contains("qcow2kit")),
                "{name} {flag}: {r:?}"
            );
        }
    }
}
