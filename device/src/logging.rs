//! The server's log output: rate-limited per call site, and written by a thread of its own
//! so that logging can never block the device.
//!
//! Guests and clients choose how often the server warns (a guest that rings a doorbell
//! with a bad descriptor a million times, a client that sends malformed messages in a
//! loop). [`RateLimit`] lets through at most [`BURST`] events per call site in each
//! [`WINDOW`]; the first event of a later window from a site that was cut is preceded by
//! one line that says how many were suppressed there. Debug and trace events, which a user
//! asks for explicitly, are not limited.
//!
//! Lines go through `tracing-appender`'s non-blocking writer: a bounded in-memory queue
//! drained to stderr by a worker thread. When stderr blocks (a pipe nobody reads) the
//! queue fills and further lines are dropped, counted by [`dropped_lines`]; the device and
//! the server carry on.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use std::io::Write;
use tracing::callsite::Identifier;
use tracing::{Event, Level, Subscriber};
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Events let through per call site in one window.
pub const BURST: u32 = 10;
/// The rate-limiting window.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Lines queued for the log writer before new ones are dropped.
const QUEUED_LINES: usize = 16_384;

#[derive(Debug)]
struct Site {
    window_start: Instant,
    passed: u32,
    suppressed: u64,
}

/// A layer that rate-limits info, warn and error events per call site (see the module
/// docs). The line about suppressed events is written straight to `writer` (the same one
/// the formatting layer uses): an event emitted from inside a layer would be dropped by
/// `tracing`'s re-entrancy guard.
#[derive(Debug)]
pub struct RateLimit<W> {
    burst: u32,
    window: Duration,
    sites: Mutex<HashMap<Identifier, Site>>,
    writer: W,
}

impl<W> RateLimit<W> {
    /// At most `burst` events per call site per `window`; reports go to `writer`.
    pub fn new(burst: u32, window: Duration, writer: W) -> Self {
        Self {
            burst,
            window,
            sites: Mutex::new(HashMap::new()),
            writer,
        }
    }

    /// Whether an event of `site` passes now; `Some(n)` when it passes after `n` were
    /// suppressed in earlier windows.
    fn admit(&self, site: Identifier) -> (bool, u64) {
        let now = Instant::now();
        let mut sites = self.sites.lock().unwrap_or_else(PoisonError::into_inner);
        let s = sites.entry(site).or_insert(Site {
            window_start: now,
            passed: 0,
            suppressed: 0,
        });
        if now.duration_since(s.window_start) >= self.window {
            s.window_start = now;
            s.passed = 0;
        }
        if s.passed < self.burst {
            s.passed += 1;
            let reported = std::mem::take(&mut s.suppressed);
            (true, reported)
        } else {
            s.suppressed += 1;
            (false, 0)
        }
    }
}

impl<S, W> Layer<S> for RateLimit<W>
where
    S: Subscriber,
    W: for<'w> MakeWriter<'w> + 'static,
{
    fn event_enabled(&self, event: &Event<'_>, _ctx: Context<'_, S>) -> bool {
        let meta = event.metadata();
        if *meta.level() > Level::INFO {
            return true;
        }
        let (pass, suppressed) = self.admit(meta.callsite());
        if pass && suppressed > 0 {
            let line = format!(
                "{}  WARN {}: {suppressed} similar messages from {}:{} were suppressed (at most {} per {} s)\n",
                humantime_now(),
                module_path!(),
                meta.file().unwrap_or("?"),
                meta.line().unwrap_or(0),
                self.burst,
                self.window.as_secs()
            );
            let _ = self.writer.make_writer().write_all(line.as_bytes());
        }
        pass
    }
}

/// The time now as the formatting layer prints it (its own timer).
fn humantime_now() -> String {
    use tracing_subscriber::fmt::format::Writer;
    use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
    let mut t = String::new();
    let _ = SystemTime.format_time(&mut Writer::new(&mut t));
    t
}

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Log lines dropped because the writer could not keep up (stderr blocked).
pub fn dropped_lines() -> usize {
    DROPPED.get().map_or(0, ErrorCounter::dropped_lines)
}

/// Set up the binary's logging: `DOMDMA_LOG` or `RUST_LOG` (env-filter syntax, default
/// `info`), rate-limited, to stderr through the non-blocking writer. Keep the guard until
/// exit: dropping it flushes what is queued.
pub fn init() -> WorkerGuard {
    let (var, spec) = match (std::env::var("DOMDMA_LOG"), std::env::var("RUST_LOG")) {
        (Ok(s), _) => ("DOMDMA_LOG", Some(s)),
        (_, Ok(s)) => ("RUST_LOG", Some(s)),
        _ => ("", None),
    };
    let (filter, bad) = match spec {
        Some(s) => match EnvFilter::try_new(&s) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new("info"), Some((var, s, e))),
        },
        None => (EnvFilter::new("info"), None),
    };
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    let _ = DROPPED.set(writer.error_counter());
    tracing_subscriber::registry()
        .with(filter)
        .with(RateLimit::new(BURST, WINDOW, writer.clone()))
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .init();
    if let Some((var, s, e)) = bad {
        tracing::warn!("ignoring {var}={s:?}: {e}; logging at info");
    }
    guard
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Lines {
        type Writer = Lines;
        fn make_writer(&'a self) -> Lines {
            self.clone()
        }
    }

    fn text(l: &Lines) -> String {
        String::from_utf8(l.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn each_call_site_is_limited_and_the_suppressed_count_is_reported() {
        let out = Lines::default();
        let window = Duration::from_millis(200);
        let sub = tracing_subscriber::registry()
            .with(RateLimit::new(3, window, out.clone()))
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(out.clone())
                    .with_ansi(false),
            );
        let one = |i: u32| tracing::warn!(i, "site one");
        tracing::subscriber::with_default(sub, || {
            for i in 0..100 {
                one(i);
                tracing::warn!(i, "site two");
                tracing::debug!(i, "debug is never limited");
            }
            std::thread::sleep(window + Duration::from_millis(50));
            one(100);
        });
        let t = text(&out);
        assert_eq!(t.matches("site one").count(), 3 + 1, "{t}");
        assert_eq!(t.matches("debug is never limited").count(), 100);
        assert_eq!(t.matches("site two").count(), 3, "{t}");
        assert_eq!(t.matches("similar messages").count(), 1, "{t}");
        assert!(t.contains("97 similar messages from"), "{t}");
    }
}
