//! Polling a device register (or anything else) with a time limit.

use std::time::{Duration, Instant};

/// Calls `f` until it returns `Some`, sleeping `interval` between calls, for at most
/// `timeout`. Returns what `f` found, or `Err(waited)` once `timeout` has passed without it
/// (`f` is called at least once, and once more after the last sleep); an error of `f` ends
/// the wait at once and is returned as the outer error.
pub(crate) fn poll_until<T, E>(
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> Result<Option<T>, E>,
) -> Result<Result<T, Duration>, E> {
    let start = Instant::now();
    loop {
        if let Some(v) = f()? {
            return Ok(Ok(v));
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return Ok(Err(waited));
        }
        std::thread::sleep(interval);
    }
}
