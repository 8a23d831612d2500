//! Progress on stderr for work that may take more than a second.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A progress line on stderr that no newline has ended yet.
static PROGRESS_OPEN: AtomicBool = AtomicBool::new(false);

/// Ends an open progress line with `suffix` (" done", or nothing); returns
/// whether one was open.
pub(crate) fn end_line(suffix: &str) -> bool {
    let open = PROGRESS_OPEN.swap(false, Ordering::Relaxed);
    if open {
        eprintln!("{suffix}");
    }
    open
}

/// Shows `line` on stderr, replacing the progress line open, if any (a
/// line that starts with `\r`), and leaves it open.
pub(crate) fn show(line: &str) {
    eprint!("{line}");
    PROGRESS_OPEN.store(true, Ordering::Relaxed);
}

/// A line on stderr if the work it guards is still running after a second,
/// ended with "done" when it finishes.
pub(crate) struct Progress {
    finished: Arc<AtomicBool>,
    shown: Arc<AtomicBool>,
}

impl Progress {
    pub(crate) fn after_a_second(what: &str) -> Self {
        let finished = Arc::new(AtomicBool::new(false));
        let shown = Arc::new(AtomicBool::new(false));
        let (f, s, what) = (finished.clone(), shown.clone(), what.to_string());
        std::thread::spawn(move || {
            for _ in 0..10 {
                std::thread::sleep(std::time::Duration::from_millis(100));
                if f.load(Ordering::Relaxed) {
                    return;
                }
            }
            show(&format!("dp-accountant: {what}..."));
            s.store(true, Ordering::Relaxed);
        });
        Self { finished, shown }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finished.store(true, Ordering::Relaxed);
        if self.shown.load(Ordering::Relaxed) {
            end_line(" done");
        }
    }
}
