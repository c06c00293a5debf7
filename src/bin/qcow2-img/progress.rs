//! qemu-img's `-p` progress indicator (`cli.md` §15): on stdout, whether
//! or not it is a terminal, each update is `    (%.2f/100%)` followed by
//! `\r`; one `\n` closes the indicator when the command ends, successfully
//! or not, before any error is printed. `-q` silences it.

use std::io::Write;

/// A progress indicator, started where qemu-img calls `qemu_progress_init`;
/// dropping it writes the closing newline (qemu-img's `qemu_progress_end`).
#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    /// The last value printed, in hundredths of a percent.
    last: Option<u32>,
}

impl Progress {
    /// An indicator that prints only when `enabled` (`-p` without `-q`).
    pub fn new(enabled: bool) -> Progress {
        Progress {
            enabled,
            last: None,
        }
    }

    /// Prints `done` out of `total` as a percentage, if it differs from
    /// the last value printed. Values never go backwards.
    pub fn set(&mut self, done: u64, total: u64) {
        let hundredths = if total == 0 {
            10_000
        } else {
            let v = u128::from(done.min(total)) * 10_000 / u128::from(total);
            u32::try_from(v).unwrap_or(10_000)
        };
        self.print(hundredths, false);
    }

    /// Prints `0.00` (the first update qemu-img prints).
    pub fn start(&mut self) {
        self.print(0, true);
    }

    /// Prints `100.00` (the update qemu-img prints when the work is done).
    pub fn finish(&mut self) {
        self.print(10_000, true);
    }

    fn print(&mut self, hundredths: u32, always: bool) {
        if !self.enabled {
            return;
        }
        let v = hundredths.max(self.last.unwrap_or(0));
        if !always && self.last == Some(v) {
            return;
        }
        self.last = Some(v);
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "    ({}.{:02}/100%)\r", v / 100, v % 100);
        let _ = out.flush();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if self.enabled {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(b"\n");
            let _ = out.flush();
        }
    }
}
