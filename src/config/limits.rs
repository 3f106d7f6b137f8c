//! `[[limits]]`: rate limits at admission, as the config file writes them.
//! What they mean at run time is in [`crate::limits`].

use std::fmt;
use std::time::Duration as StdDuration;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

use super::{ByteSize, Duration};

/// One rate limit.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// Named in the error a refused client gets, in `PROXY LIMITS` and in
    /// the counters; unique.
    pub name: String,
    /// How many per period: `"500/s"`, `"100/100ms"`, `"6000/m"`; for
    /// `counts = "upstream_bytes"` a size per period (`"10MiB/s"`).
    pub rate: Rate,
    /// How many may pass at once after a quiet spell; unset = one period's
    /// worth (the rate's count).
    #[serde(default)]
    pub burst: Option<u64>,
    /// One bucket per distinct value of these (none: one bucket for the
    /// instance, or the fleet): `ip`, `name` (`CLIENT SETNAME`), `user`,
    /// `command`, `pattern` (which of `keys` matched).
    #[serde(default)]
    pub per: Vec<Per>,
    /// Only these commands count (empty: every command): names (`KEYS`,
    /// `CLIENT|LIST`) and classes (`@read`, `@write`, `@admin`,
    /// `@dangerous`, `@blocking`, `@pubsub`, `@scripting`).
    #[serde(default)]
    pub commands: Vec<String>,
    /// Only commands whose first key matches one of these globs count
    /// (empty: any command, keyless ones included).
    #[serde(default)]
    pub keys: Vec<String>,
    /// What is counted.
    #[serde(default)]
    pub counts: Counts,
    /// Whose rate it is.
    #[serde(default)]
    pub scope: Scope,
    /// What happens to a command over the rate.
    #[serde(default)]
    pub action: Action,
    /// With `action = "delay"`: the longest a command is held before it is
    /// refused after all.
    #[serde(default = "default_max_wait")]
    pub max_wait: Duration,
}

fn default_max_wait() -> Duration {
    Duration(StdDuration::from_millis(100))
}

/// What a bucket is per.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Per {
    /// The client's IP address.
    Ip,
    /// The client's name (`CLIENT SETNAME`, `HELLO … SETNAME`); unnamed
    /// clients share one bucket.
    Name,
    /// The user the client authenticated as (`default` until it does).
    User,
    /// The command (by its full name: `get`, `client|list`).
    Command,
    /// Which glob of `keys` the command's first key matched.
    Pattern,
}

impl Per {
    /// The word the config and error messages use.
    pub fn name(self) -> &'static str {
        match self {
            Per::Ip => "ip",
            Per::Name => "name",
            Per::User => "user",
            Per::Command => "command",
            Per::Pattern => "pattern",
        }
    }
}

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Counts {
    /// Every command it applies to, answered from L1 or not.
    #[default]
    Commands,
    /// Only commands that go to Redis: L1 hits and what nearcache answers
    /// itself are free.
    Upstream,
    /// The bytes of the commands that go to Redis.
    UpstreamBytes,
}

/// Whose rate a limit is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// This instance's.
    #[default]
    Instance,
    /// All instances' together: each enforces the rate divided by the
    /// number of live instances on the coherence bus.
    Fleet,
}

/// What happens to a command over the rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Refused at once.
    #[default]
    Reject,
    /// Held until the rate allows it (with the commands pipelined behind
    /// it), up to `max_wait`; then refused.
    Delay,
}

impl Counts {
    /// The word the config uses.
    pub fn name(self) -> &'static str {
        match self {
            Counts::Commands => "commands",
            Counts::Upstream => "upstream",
            Counts::UpstreamBytes => "upstream_bytes",
        }
    }
}

impl Scope {
    /// The word the config uses.
    pub fn name(self) -> &'static str {
        match self {
            Scope::Instance => "instance",
            Scope::Fleet => "fleet",
        }
    }
}

impl Action {
    /// The word the config uses.
    pub fn name(self) -> &'static str {
        match self {
            Action::Reject => "reject",
            Action::Delay => "delay",
        }
    }
}

/// `count` per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// How many (commands or bytes).
    pub count: u64,
    /// In how long.
    pub period: StdDuration,
}

impl Rate {
    /// Parses `"500/s"`, `"100/100ms"`, `"6000/m"`, `"10MiB/s"`.
    pub fn parse(s: &str) -> Result<Rate, String> {
        let help = "use e.g. \"500/s\", \"100/100ms\" or \"10MiB/s\"";
        let Some((count, period)) = s.split_once('/') else {
            return Err(format!("'{s}' is not a rate ({help})"));
        };
        let count = ByteSize::parse(count).map_err(|_| format!("'{s}' is not a rate ({help})"))?;
        let period = period.trim();
        // A bare unit ("s") is one of it.
        let period = if period.starts_with(|c: char| c.is_ascii_digit()) {
            Duration::parse(period)
        } else {
            Duration::parse(&format!("1{period}"))
        }
        .map_err(|e| format!("'{s}': {e}"))?;
        if count.0 == 0 || period.0.is_zero() {
            return Err(format!(
                "'{s}': the count and the period must be more than 0"
            ));
        }
        Ok(Rate {
            count: count.0,
            period: period.0,
        })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.period;
        match (p.as_secs(), p.subsec_nanos()) {
            (1, 0) => write!(f, "{}/s", self.count),
            (60, 0) => write!(f, "{}/m", self.count),
            (3600, 0) => write!(f, "{}/h", self.count),
            _ if p.subsec_micros() * 1000 == p.subsec_nanos() && p.as_millis() > 0 => {
                write!(f, "{}/{}ms", self.count, p.as_millis())
            }
            _ => write!(f, "{}/{:?}", self.count, p),
        }
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Rate::parse(&s).map_err(de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_print_as_written() {
        for (text, count, ms) in [
            ("500/s", 500, 1000),
            ("100/100ms", 100, 100),
            ("6000/m", 6000, 60_000),
            ("10MiB/s", 10 << 20, 1000),
            ("3/1h", 3, 3_600_000),
        ] {
            let r = Rate::parse(text).unwrap();
            assert_eq!((r.count, r.period.as_millis()), (count, ms), "{text}");
            assert_eq!(Rate::parse(&r.to_string()).unwrap(), r, "{text} round trip");
        }
        assert_eq!(Rate::parse("500/s").unwrap().to_string(), "500/s");
        for bad in ["500", "0/s", "5/0s", "x/s", "5/fortnight"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }
}
