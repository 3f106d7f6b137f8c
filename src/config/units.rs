//! Human-friendly durations (`"500ms"`, `"2s"`, `"5m"`) and sizes (`"64KiB"`,
//! `"256MiB"`) for the config file. Both also accept a bare integer (seconds,
//! bytes) so generated configs need no string formatting.

use std::fmt;
use std::time::Duration as StdDuration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A duration written as `"<n><unit>"` with unit `ms`, `s`, `m` or `h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Duration(pub StdDuration);

/// A byte count written as `"<n><unit>"` with unit `B`, `KiB`, `MiB`, `GiB`
/// (or `KB`, `MB`, `GB`, also powers of 1024, as Redis reads them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ByteSize(pub u64);

impl Duration {
    /// Parses `"500ms"`, `"2s"`, `"1.5s"`, `"5m"`, `"1h"`; `"0"` is zero.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let value: f64 = num
            .parse()
            .map_err(|_| format!("'{s}' is not a duration (use e.g. \"500ms\", \"2s\", \"5m\")"))?;
        let scale = match unit.trim() {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" if value == 0.0 => 0.0,
            other => {
                return Err(format!(
                    "'{s}': unknown duration unit '{other}' (use ms, s, m or h)"
                ));
            }
        };
        let secs = value * scale;
        if !secs.is_finite() || secs > 1e9 {
            return Err(format!("'{s}' is out of range"));
        }
        Ok(Self(StdDuration::from_secs_f64(secs)))
    }
}

impl ByteSize {
    /// Parses `"512"`, `"64KiB"`, `"256MiB"`, `"1GiB"`, `"10mb"`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let value: u64 = num
            .parse()
            .map_err(|_| format!("'{s}' is not a size (use e.g. \"64KiB\", \"256MiB\")"))?;
        let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            other => {
                return Err(format!(
                    "'{s}': unknown size unit '{other}' (use B, KiB, MiB or GiB)"
                ));
            }
        };
        value
            .checked_mul(scale)
            .map(Self)
            .ok_or_else(|| format!("'{s}' is out of range"))
    }

    /// The size as `usize`, saturating on 32-bit targets.
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms % 1000 == 0 {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
            if n != 0 && n % (1 << shift) == 0 {
                return write!(f, "{}{unit}", n >> shift);
            }
        }
        write!(f, "{n}B")
    }
}

struct UnitVisitor<T> {
    parse: fn(&str) -> Result<T, String>,
    from_int: fn(u64) -> T,
    expecting: &'static str,
}

impl<T> Visitor<'_> for UnitVisitor<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.parse)(v).map_err(E::custom)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        Ok((self.from_int)(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        let v = u64::try_from(v).map_err(|_| E::custom(format!("{v} is negative")))?;
        Ok((self.from_int)(v))
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UnitVisitor {
            parse: Duration::parse,
            from_int: |secs| Duration(StdDuration::from_secs(secs)),
            expecting: "a duration such as \"500ms\", \"2s\" or \"5m\"",
        })
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UnitVisitor {
            parse: ByteSize::parse,
            from_int: ByteSize,
            expecting: "a size such as \"64KiB\" or \"256MiB\"",
        })
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(
            Duration::parse("500ms"),
            Ok(Duration(StdDuration::from_millis(500)))
        );
        assert_eq!(
            Duration::parse("2s"),
            Ok(Duration(StdDuration::from_secs(2)))
        );
        assert_eq!(
            Duration::parse("1.5s"),
            Ok(Duration(StdDuration::from_millis(1500)))
        );
        assert_eq!(
            Duration::parse("5m"),
            Ok(Duration(StdDuration::from_secs(300)))
        );
        assert_eq!(Duration::parse("0"), Ok(Duration(StdDuration::ZERO)));
        assert!(Duration::parse("5").is_err());
        assert!(Duration::parse("fast").is_err());
        assert!(Duration::parse("3days").is_err());
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(ByteSize::parse("64KiB"), Ok(ByteSize(65536)));
        assert_eq!(ByteSize::parse("256MiB"), Ok(ByteSize(256 << 20)));
        assert_eq!(ByteSize::parse("1gb"), Ok(ByteSize(1 << 30)));
        assert_eq!(ByteSize::parse("12"), Ok(ByteSize(12)));
        assert!(ByteSize::parse("12 parsecs").is_err());
        assert!(ByteSize::parse("99999999999999999999GiB").is_err());
    }

    #[test]
    fn display_round_trips() {
        for s in ["500ms", "2s", "64KiB", "256MiB", "7B"] {
            let shown = if s.ends_with('s') {
                Duration::parse(s).map(|d| d.to_string())
            } else {
                ByteSize::parse(s).map(|b| b.to_string())
            };
            assert_eq!(shown.as_deref(), Ok(s));
        }
    }
}
