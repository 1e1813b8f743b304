//! Whole-line console output.
//!
//! Rust's stderr is unbuffered, so `eprintln!` issues one write(2) per piece of its format string. Under
//! Slurm, slurmstepd writes to the same output file, and its messages landed inside mgrun's lines
//! ("requeued Slurm job slurmstepd-n1: error: ... 4"). Formatting the line first and writing it in one
//! call keeps every line whole.

use std::io::Write;

/// `eprintln!` that writes the formatted line, newline included, in one call.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::console::stderr_line(&format!($($arg)*))
    };
}
pub(crate) use say;

/// Writes `line` and a newline to stderr in one call; console errors (a closed pipe) are ignored,
/// as they must not stop a job.
pub fn stderr_line(line: &str) {
    crate::progress_display::above_bar(|| {
        let _ = std::io::stderr().lock().write_all(with_newline(line).as_bytes());
    });
}

/// Writes `line` and a newline to stdout in one call, flushed, so that it cannot interleave either.
pub fn stdout_line(line: &str) {
    crate::progress_display::above_bar(|| {
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(with_newline(line).as_bytes());
        let _ = stdout.flush();
    });
}

fn with_newline(line: &str) -> String {
    let mut whole = String::with_capacity(line.len() + 1);
    whole.push_str(line);
    whole.push('\n');
    whole
}
