//! qemu-img's `-p` progress indicator (`cli.md` §15): on stdout, whether
//! or not it is a terminal, each update is `    (%.2f/100%)` followed by
//! `\r`; one `\n` closes the indicator when the command ends, successfully
//! or not, before any error is printed. `-q` silences it.

use std::io::Write;

/// qemu-img's `min_skip` for convert and amend (`qemu_progress_init(progress,
/// 1.0)`): an update is printed when it moved by more than this (rebase
/// uses 2.0, see [`Progress::with_min_skip`]).
const MIN_SKIP: f32 = 1.0;

/// A progress indicator, started where qemu-img calls `qemu_progress_init`;
/// dropping it writes the closing newline (qemu-img's `qemu_progress_end`).
#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    /// The last value printed, in hundredths of a percent.
    last: Option<u32>,
    /// qemu-progress.c's `state.last_print` (a C `float`), for [`Progress::update`].
    last_print: f32,
    /// qemu-progress.c's `state.current`, for [`Progress::add`].
    current: f32,
    /// qemu-progress.c's `state.min_skip` (`qemu_progress_init`'s second
    /// argument).
    min_skip: f32,
}

impl Progress {
    /// An indicator that prints only when `enabled` (`-p` without `-q`).
    pub fn new(enabled: bool) -> Progress {
        Progress {
            enabled,
            last: None,
            last_print: 0.0,
            current: 0.0,
            min_skip: MIN_SKIP,
        }
    }

    /// The same indicator with qemu-img's `min_skip` of a command other
    /// than convert and amend (rebase: 2.0).
    pub fn with_min_skip(mut self, min_skip: f32) -> Progress {
        self.min_skip = min_skip;
        self
    }

    /// qemu-img's `qemu_progress_print(delta, 100)` exactly: adds `delta`
    /// percent (C `float` arithmetic, capped at 100) and prints as
    /// [`Progress::update`] does.
    pub fn add(&mut self, delta: f32) {
        let current = (self.current + delta / 100.0 * 100.0).min(100.0);
        self.update(current);
    }

    /// qemu-img's `qemu_progress_print(percent, 0)` exactly: the value
    /// (a C `float`) is printed when it moved by more than 1.0 since the last
    /// print, or is 0 or 100; so 100 is printed again each time it is
    /// reached (convert prints it for its last chunk and once more when it
    /// is done).
    pub fn update(&mut self, percent: f32) {
        let current = percent.min(100.0);
        self.current = current;
        if current > self.last_print + self.min_skip
            || current < self.last_print - self.min_skip
            || current == 100.0
            || current == 0.0
        {
            self.last_print = current;
            self.last = Some(hundredths(current));
            // printf("%3.2f") of the float promoted to double.
            self.emit(&format!("{:.2}", f64::from(current)));
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
        let v = hundredths.max(self.last.unwrap_or(0));
        if !always && self.last == Some(v) {
            return;
        }
        self.last = Some(v);
        // Exact for the values printed here (k / 100).
        self.last_print = v as f32 / 100.0;
        self.emit(&format!("{}.{:02}", v / 100, v % 100));
    }

    /// Writes one update, `    (VALUE/100%)` and `\r`.
    fn emit(&self, value: &str) {
        if !self.enabled {
            return;
        }
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "    ({value}/100%)\r");
        let _ = out.flush();
    }
}

/// `percent` (0..=100) in whole hundredths, rounded down.
fn hundredths(percent: f32) -> u32 {
    // In 0..=10_000 after the clamp, so the conversion is exact.
    (f64::from(percent.clamp(0.0, 100.0)) * 100.0) as u32
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
