//! The upstream address as a `redis://[user:password@]host:port[/db]` URL
//! (`rediss://` for TLS).

use std::fmt;

/// A parsed upstream URL.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// ACL user name, if any.
    pub username: Option<String>,
    /// Password, if any (`AUTH`).
    pub password: Option<String>,
    /// Database selected on every upstream connection by default.
    pub db: u32,
    /// `rediss://`: connections make TLS before anything else.
    pub secure: bool,
    /// The TLS settings of a `rediss://` URL, built from `[upstream.tls]`
    /// by [`Config::upstream_url`](super::Config::upstream_url).
    pub tls: Option<crate::tls::UpstreamTls>,
}

impl RedisUrl {
    /// Parses a `redis://` or `rediss://` URL (TLS settings are attached
    /// afterwards, from `[upstream.tls]`).
    pub fn parse(url: &str) -> Result<Self, String> {
        let (rest, secure) = if let Some(rest) = url.strip_prefix("redis://") {
            (rest, false)
        } else if let Some(rest) = url.strip_prefix("rediss://") {
            (rest, true)
        } else {
            return Err(format!("'{url}' is not a redis:// or rediss:// URL"));
        };
        let (auth, hostpart) = match rest.rsplit_once('@') {
            Some((auth, host)) => (Some(auth), host),
            None => (None, rest),
        };
        let (hostport, db) = match hostpart.split_once('/') {
            Some((hp, "")) => (hp, 0),
            Some((hp, db)) => (
                hp,
                db.parse()
                    .map_err(|_| format!("'{url}': database '{db}' is not a number"))?,
            ),
            None => (hostpart, 0),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h,
                p.parse()
                    .map_err(|_| format!("'{url}': port '{p}' is not a number"))?,
            ),
            _ => (hostport, 6379),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("'{url}' has no host"));
        }
        let (username, password) = match auth {
            None => (None, None),
            Some(auth) => match auth.split_once(':') {
                Some((u, p)) => (
                    (!u.is_empty()).then(|| percent_decode(u)),
                    Some(percent_decode(p)),
                ),
                None => (None, Some(percent_decode(auth))),
            },
        };
        Ok(Self {
            host: host.to_owned(),
            port,
            username,
            password,
            db,
            secure,
            tls: None,
        })
    }

    /// `host:port`, ready for `TcpStream::connect`.
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// `url` with any password in it (`scheme://user:password@host`) shown as
/// `***`: for URLs nearcache does not parse itself (NATS), before they are
/// logged or reported.
pub fn redact_url(url: &str) -> std::borrow::Cow<'_, str> {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.into();
    };
    let rest = &url[scheme_end..];
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    // The last '@': a password may hold one.
    let Some(at) = authority.rfind('@') else {
        return url.into();
    };
    let userinfo = &rest[..at];
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end], &rest[at..]).into(),
        // A lone token (`nats://token@host`) is a secret too.
        None => format!("{}***{}", &url[..scheme_end], &rest[at..]).into(),
    }
}

/// `url` without its `user:password@` (or `token@`), and what that was:
/// for clients (async-nats) that take credentials as options and do not
/// read them from the URL.
pub fn split_credentials(url: &str) -> (String, Option<(String, Option<String>)>) {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return (url.to_owned(), None);
    };
    let rest = &url[scheme_end..];
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let Some(at) = authority.rfind('@') else {
        return (url.to_owned(), None);
    };
    let userinfo = &rest[..at];
    let bare = format!("{}{}", &url[..scheme_end], &rest[at + 1..]);
    let creds = match userinfo.split_once(':') {
        Some((user, password)) => (user.to_owned(), Some(password.to_owned())),
        None => (userinfo.to_owned(), None),
    };
    (bare, Some(creds))
}

/// Never prints the password: URLs end up in logs and `PROXY` replies.
impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.secure { "rediss://" } else { "redis://" })?;
        match (&self.username, &self.password) {
            (Some(u), Some(_)) => write!(f, "{u}:***@")?,
            (None, Some(_)) => f.write_str(":***@")?,
            _ => {}
        }
        write!(f, "{}/{}", self.addr(), self.db)
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            // Byte-wise: slicing the str could split a multi-byte character.
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_part() {
        let u = RedisUrl::parse("redis://app:p%40ss@10.0.0.1:6390/3").expect("valid");
        assert_eq!(u.host, "10.0.0.1");
        assert_eq!(u.port, 6390);
        assert_eq!(u.username.as_deref(), Some("app"));
        assert_eq!(u.password.as_deref(), Some("p@ss"));
        assert_eq!(
            redact_url("nats://bot:s3cret@h:4222"),
            "nats://bot:***@h:4222"
        );
        assert_eq!(redact_url("nats://t0ken@h:4222"), "nats://***@h:4222");
        assert_eq!(redact_url("nats://h:4222"), "nats://h:4222");
        assert_eq!(redact_url("nats://u:p@ss@h/x@y"), "nats://u:***@h/x@y");
        assert_eq!(
            split_credentials("nats://u:p@ss@h:4222"),
            (
                "nats://h:4222".to_owned(),
                Some(("u".to_owned(), Some("p@ss".to_owned())))
            )
        );
        assert_eq!(
            split_credentials("nats://tok@h"),
            ("nats://h".to_owned(), Some(("tok".to_owned(), None)))
        );
        assert_eq!(split_credentials("nats://h"), ("nats://h".to_owned(), None));
        assert_eq!(u.db, 3);
        assert_eq!(u.to_string(), "redis://app:***@10.0.0.1:6390/3");
    }

    #[test]
    fn defaults_port_and_db() {
        let u = RedisUrl::parse("redis://localhost").expect("valid");
        assert_eq!((u.port, u.db, u.password), (6379, 0, None));
        let u = RedisUrl::parse("redis://:secret@[::1]:7000/").expect("valid");
        assert_eq!(
            (u.host.as_str(), u.port, u.password.as_deref()),
            ("::1", 7000, Some("secret"))
        );
        assert_eq!(u.addr(), "[::1]:7000");
    }

    #[test]
    fn rejects_what_it_cannot_serve() {
        let tls = RedisUrl::parse("rediss://:pw@h:1").expect("TLS URLs parse");
        assert!(tls.secure && tls.tls.is_none());
        assert_eq!(tls.to_string(), "rediss://:***@h:1/0");
        assert!(RedisUrl::parse("redisss://h:1").is_err());
        assert!(RedisUrl::parse("http://h").is_err());
        assert!(RedisUrl::parse("redis://h:port").is_err());
        assert!(RedisUrl::parse("redis://h:1/x").is_err());
        assert!(RedisUrl::parse("redis://").is_err());
    }
}
