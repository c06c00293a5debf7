//! `qcow2-img io --help` (issue 15): qemu-io's usage adapted. Its synopsis
//! and the lines of the options both accept are qemu-io's own; every option
//! listed is accepted and every accepted option is listed; it names the
//! `-c help` command list and the exit codes.

use crate::support::*;

/// The options `qcow2-img io` accepts.
const ACCEPTED: &[&str] = &[
    "--object",
    "--image-opts",
    "-c",
    "--cmd",
    "-f",
    "--format",
    "-r",
    "--read-only",
    "-n",
    "--nocache",
    "-C",
    "--copy-on-read",
    "-k",
    "--native-aio",
    "-t",
    "--cache",
    "-d",
    "--discard",
    "-U",
    "--force-share",
    "-h",
    "--help",
];

/// Option-looking words of an option line (`-t, --cache=MODE` gives `-t`
/// and `--cache`).
fn options_of(line: &str) -> Vec<&str> {
    line.split(|c: char| c.is_whitespace() || ",=[]".contains(c))
        .filter(|w| {
            let body = w.strip_prefix("--").or_else(|| w.strip_prefix('-'));
            body.and_then(|b| b.chars().next())
                .is_some_and(|c| c.is_ascii_alphabetic())
        })
        .collect()
}

fn option_lines(text: &str) -> Vec<&str> {
    text.lines().filter(|l| l.starts_with("  -")).collect()
}

#[test]
fn io_help_lists_every_accepted_option_and_the_exit_codes() {
    let d = scratch();
    let long = ours(d.path(), &["io", "--help"]);
    let short = ours(d.path(), &["io", "-h"]);
    assert_eq!(long.code, 0, "{long:?}");
    assert!(long.err.is_empty(), "{long:?}");
    assert_eq!(long, short);
    let text = &long.out;
    assert!(text.starts_with("Usage: qcow2-img io [OPTIONS]... [-c STRING]... [file]\n"));
    let listed: Vec<&str> = option_lines(text)
        .into_iter()
        .flat_map(options_of)
        .collect();
    for opt in ACCEPTED {
        assert!(listed.contains(opt), "{opt} not listed:\n{text}");
    }
    for opt in &listed {
        assert!(
            ACCEPTED.contains(opt),
            "{opt} listed but not accepted:\n{text}"
        );
        // Accepted indeed: the parser does not call it unknown.
        let mut args = vec!["io", opt];
        if [
            "-c",
            "--cmd",
            "-f",
            "--format",
            "-t",
            "--cache",
            "-d",
            "--discard",
            "--object",
        ]
        .contains(opt)
        {
            args.push(match *opt {
                "-f" | "--format" => "qcow2",
                "-t" | "--cache" => "none",
                "-d" | "--discard" => "unmap",
                "--object" => "secret,id=s,data=x",
                _ => "help",
            });
        }
        let r = ours(d.path(), &args);
        assert!(
            !r.err.contains("unrecognized option") && !r.err.contains("invalid option"),
            "{args:?}: {r:?}"
        );
    }
    assert!(text.contains("'qcow2-img io -c help'"), "{text}");
    let (_, codes) = text.split_once("\nExit codes:\n").expect("exit codes");
    for code in ["0 ", "1 ", "134 "] {
        assert!(
            codes.lines().any(|l| l.trim_start().starts_with(code)),
            "{code}\n{codes}"
        );
    }
    // More than one file: the usage on stdout and exit 1, as qemu-io.
    let two = ours(d.path(), &["io", "a", "b"]);
    assert_eq!((two.code, two.out.as_str()), (1, text.as_str()));
}

#[test]
fn io_help_keeps_qemu_io_wording() {
    if !have_qemu() {
        return;
    }
    let d = scratch();
    let q = qemu(d.path(), "qemu-io", &["--help"]);
    assert_eq!(q.code, 0, "{q:?}");
    let o = ours(d.path(), &["io", "--help"]);
    // Synopsis and title (qemu() has put our program name in).
    let head = |t: &str| t.lines().take(3).map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(
        head(&o.out),
        head(
            &q.out
                .replace("qcow2-img [OPTIONS]", "qcow2-img io [OPTIONS]")
        )
    );
    // Each option line both have reads as qemu-io's.
    for line in option_lines(&o.out) {
        let opts = options_of(line);
        let theirs = option_lines(&q.out)
            .into_iter()
            .find(|l| options_of(l) == opts)
            .unwrap_or_else(|| panic!("qemu-io has no line for {opts:?}"));
        // qemu-io writes `--image-opts` and `-f FMT` alike; ours may add
        // continuation lines but the first line is qemu-io's.
        assert_eq!(line, theirs, "{opts:?}");
    }
}
