//! What nearcache logged, checked when a test's proxy ends: a WARN or ERROR
//! line from nearcache that the test did not declare fails the test, as a
//! warning nobody looks at is a bug nobody sees.
//!
//! An in-process proxy ([`super::TestProxy`]) runs on a tokio runtime of its
//! own whose every thread logs into a [`Capture`]; the built binary
//! ([`super::ProxyProcess`]) logs to a file, read back with
//! [`parse_fmt_line`]. Either way the lines go through [`Expectations`].

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt as _};

// What nearcache logs, WARN, when a test provokes it: for tests to declare.

/// A pool connection to Redis went (Redis killed, stopped, restarted).
pub const UPSTREAM_LOST: &str = "upstream connection lost; reconnecting";
/// A pool connection could not be (re)made while Redis is away.
pub const UPSTREAM_CONNECT_FAILED: &str = "upstream connect failed";
/// The instance lost NATS (killed, or cut off).
pub const BUS_LOST: &str = "coherence bus disconnected; L1 follows the loss policy";
/// A peer stopped being heard (`peer=…` follows).
pub const PEER_SILENT: &str = "peer silent past peer_timeout; flushing L1";
/// A peer's sequence skipped (`peer=…` follows).
pub const GAP: &str = "invalidation gap; flushing L1";

/// One log event, rendered the way tracing-subscriber's fmt prints it
/// (without the timestamp): `WARN nearcache::upstream::pool: upstream
/// connection lost; reconnecting db=0`.
#[derive(Debug, Clone)]
pub struct LogLine {
    /// Its level.
    pub level: Level,
    /// Its target (the module path for nearcache's own events).
    pub target: String,
    /// Level, target, message and fields: what expectations match.
    pub text: String,
}

impl LogLine {
    /// A WARN or ERROR event of nearcache's own: what the check is about.
    fn checked(&self) -> bool {
        self.level <= Level::WARN && from_nearcache(&self.target)
    }
}

fn from_nearcache(target: &str) -> bool {
    target.starts_with("nearcache")
}

/// Captures the events of one proxy. Installed as the default dispatcher of
/// every thread of the proxy's runtime, so it sees what every task the proxy
/// spawns logs — and nothing another proxy or the test itself logs.
#[derive(Clone)]
pub struct Capture {
    started: Instant,
    /// Each line with the time since the capture began; a watch so a test can
    /// wait for a line ([`Capture::wait_for`]).
    lines: Arc<tokio::sync::watch::Sender<Vec<(Duration, LogLine)>>>,
}

impl Default for Capture {
    fn default() -> Self {
        Capture {
            started: Instant::now(),
            lines: Arc::new(tokio::sync::watch::Sender::new(Vec::new())),
        }
    }
}

impl Capture {
    /// A dispatcher that records into this capture.
    pub fn dispatch(&self) -> tracing::Dispatch {
        tracing::Dispatch::new(tracing_subscriber::registry().with(self.clone()))
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<LogLine> {
        self.lines.borrow().iter().map(|(_, l)| l.clone()).collect()
    }

    /// The whole log so far, one line an event, each with its time.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for (at, line) in self.lines.borrow().iter() {
            let _ = writeln!(out, "+{:.3}s {}", at.as_secs_f64(), line.text);
        }
        out
    }

    /// Waits until a line matching `pattern` ([`matches`]) is captured; fails
    /// the test after `limit`.
    pub async fn wait_for(&self, pattern: &str, limit: Duration) {
        let mut changed = self.lines.subscribe();
        let found = tokio::time::timeout(limit, async {
            loop {
                if changed
                    .borrow_and_update()
                    .iter()
                    .any(|(_, l)| matches(&l.text, pattern))
                {
                    return;
                }
                changed
                    .changed()
                    .await
                    .expect("the capture outlives its waiters");
            }
        })
        .await;
        assert!(
            found.is_ok(),
            "no log line matching {pattern:?} within {limit:?}; the log:\n{}",
            self.text()
        );
    }
}

/// Whether an event or span is worth recording: nearcache's own from DEBUG
/// up (shown when a test fails), anyone else's only from WARN up (async-nats
/// and friends are chatty below that).
fn wanted(meta: &Metadata<'_>) -> bool {
    meta.is_event()
        && if from_nearcache(meta.target()) {
            *meta.level() <= Level::DEBUG
        } else {
            *meta.level() <= Level::WARN
        }
}

impl<S: Subscriber> Layer<S> for Capture {
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        if wanted(meta) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, meta: &Metadata<'_>, _: Context<'_, S>) -> bool {
        wanted(meta)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::DEBUG)
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let meta = event.metadata();
        let mut render = Render::default();
        event.record(&mut render);
        let line = LogLine {
            level: *meta.level(),
            target: meta.target().to_owned(),
            text: format!(
                "{} {}: {}{}",
                meta.level(),
                meta.target(),
                render.message,
                render.fields
            ),
        };
        let at = self.started.elapsed();
        self.lines.send_modify(|lines| lines.push((at, line)));
    }
}

/// The message, then ` name=value` for each field, as fmt writes them.
#[derive(Default)]
struct Render {
    message: String,
    fields: String,
}

impl tracing::field::Visit for Render {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
}

/// A line of the binary's log (tracing-subscriber's fmt format, coloured even
/// into a file: `<timestamp>  WARN nearcache::upstream::pool: message k=v`),
/// or None for a line that is no event's first (a message's continuation).
pub fn parse_fmt_line(raw: &str) -> Option<LogLine> {
    let line = strip_ansi(raw);
    let (_timestamp, rest) = line.split_once(' ')?;
    let rest = rest.trim_start();
    let (level, rest) = rest.split_once(' ')?;
    let level: Level = level.parse().ok()?;
    let (target, _) = rest.split_once(": ")?;
    Some(LogLine {
        level,
        target: target.to_owned(),
        text: format!("{level} {rest}"),
    })
}

/// `s` without ANSI escape sequences (`ESC [ … final-byte`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Whether `text` contains `pattern`: a substring, or several joined by `…`
/// that must appear in that order (`"invalidation gap…expected=1 got="`).
pub fn matches(text: &str, pattern: &str) -> bool {
    let mut rest = text;
    for fragment in pattern.split('…') {
        match rest.find(fragment) {
            Some(at) => rest = &rest[at + fragment.len()..],
            None => return false,
        }
    }
    true
}

/// The WARN/ERROR lines a test declared: those that may appear (what it
/// provokes) and those that must (what it is about), as [`matches`] patterns.
#[derive(Debug, Default)]
pub struct Expectations {
    may: Mutex<Vec<String>>,
    must: Mutex<Vec<String>>,
}

impl Expectations {
    /// Lines matching `pattern` may appear.
    pub fn may(&self, pattern: &str) {
        self.may.lock().unwrap().push(pattern.to_owned());
    }

    /// A line matching `pattern` must appear before the proxy ends.
    pub fn must(&self, pattern: &str) {
        self.must.lock().unwrap().push(pattern.to_owned());
    }

    /// At the end of the proxy called `who`: fails the test if a checked line
    /// matches no expectation or a required one never appeared, showing
    /// `whole` (its log). If the test is failing already, shows `whole` and
    /// nothing more.
    pub fn settle(&self, who: &str, lines: &[LogLine], whole: &str) {
        if std::thread::panicking() {
            eprintln!("--- {who} log ---\n{whole}");
            return;
        }
        let may = self.may.lock().unwrap();
        let must = self.must.lock().unwrap();
        let declared = |line: &LogLine| {
            may.iter()
                .chain(must.iter())
                .any(|p| matches(&line.text, p))
        };
        let unexpected: Vec<&str> = lines
            .iter()
            .filter(|l| l.checked() && !declared(l))
            .map(|l| l.text.as_str())
            .collect();
        let missing: Vec<&str> = must
            .iter()
            .filter(|p| !lines.iter().any(|l| matches(&l.text, p)))
            .map(String::as_str)
            .collect();
        let mut problems = String::new();
        if !unexpected.is_empty() {
            let _ = writeln!(
                problems,
                "{who} logged {} WARN/ERROR line(s) the test did not expect \
                 (declare what the test provokes with expect_log):",
                unexpected.len()
            );
            for line in unexpected {
                let _ = writeln!(problems, "  {line}");
            }
        }
        if !missing.is_empty() {
            let _ = writeln!(problems, "{who} never logged a line the test requires:");
            for pattern in missing {
                let _ = writeln!(problems, "  {pattern:?}");
            }
        }
        assert!(problems.is_empty(), "{problems}--- {who} log ---\n{whole}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_coloured_fmt_line_parses() {
        let raw = "\u{1b}[2m2026-12-03T17:19:27.733104Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m \
                   \u{1b}[2mnearcache::upstream::pool\u{1b}[0m\u{1b}[2m:\u{1b}[0m upstream \
                   connect failed \u{1b}[3mdb\u{1b}[0m\u{1b}[2m=\u{1b}[0m0";
        let line = parse_fmt_line(raw).unwrap();
        assert_eq!(line.level, Level::WARN);
        assert_eq!(line.target, "nearcache::upstream::pool");
        assert_eq!(
            line.text,
            "WARN nearcache::upstream::pool: upstream connect failed db=0"
        );
        assert!(line.checked());
    }

    #[test]
    fn a_pattern_is_a_substring_or_fragments_in_order() {
        let line =
            "WARN nearcache::coherence: invalidation gap; flushing L1 peer=a expected=1 got=8";
        assert!(matches(line, "invalidation gap"));
        assert!(matches(line, "invalidation gap…expected=1 got="));
        assert!(!matches(line, "expected=1 got=…invalidation gap"));
        assert!(!matches(
            "WARN x: invalidation gap peer=a expected=10 got=12",
            "invalidation gap…expected=1 got="
        ));
    }

    #[test]
    fn a_plain_fmt_line_parses_and_a_continuation_does_not() {
        let line =
            parse_fmt_line("2026-12-03T17:19:27.732454Z  INFO nearcache::server: up").unwrap();
        assert_eq!(line.level, Level::INFO);
        assert!(!line.checked());
        assert!(parse_fmt_line("  the rest of a long message").is_none());
        assert!(parse_fmt_line("").is_none());
    }
}
