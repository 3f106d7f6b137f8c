//! Replies the proxy writes itself (errors, HELLO, PROXY …), encoded for the
//! client's protocol. Forwarded replies never pass through here.

use bytes::{BufMut, Bytes, BytesMut};

/// The RESP version a client speaks (chosen with `HELLO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    /// RESP2, the default for every new connection.
    #[default]
    Resp2,
    /// RESP3.
    Resp3,
}

impl Protocol {
    /// The protocol version number as HELLO takes it.
    pub fn version(self) -> i64 {
        match self {
            Protocol::Resp2 => 2,
            Protocol::Resp3 => 3,
        }
    }
}

/// `+OK`.
pub const OK: &[u8] = b"+OK\r\n";

/// A RESP error reply `-<msg>\r\n`. Line breaks in `msg` would end the frame
/// early, so they become spaces (Redis does the same).
pub fn error(msg: &str) -> Bytes {
    let mut buf = BytesMut::with_capacity(msg.len() + 3);
    buf.put_u8(b'-');
    buf.extend(
        msg.bytes()
            .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    buf.put_slice(b"\r\n");
    buf.freeze()
}

/// Builder for a reply in a given protocol.
#[derive(Debug)]
pub struct Reply {
    buf: BytesMut,
    proto: Protocol,
}

impl Reply {
    /// An empty reply buffer for `proto`.
    pub fn new(proto: Protocol) -> Self {
        Self {
            buf: BytesMut::with_capacity(64),
            proto,
        }
    }

    /// Simple string `+s`.
    pub fn simple(&mut self, s: &str) -> &mut Self {
        self.line(b'+', s.as_bytes())
    }

    /// Bulk string.
    pub fn bulk(&mut self, data: &[u8]) -> &mut Self {
        self.line(b'$', itoa(data.len() as i64).as_bytes());
        self.buf.put_slice(data);
        self.buf.put_slice(b"\r\n");
        self
    }

    /// Plain text: a verbatim string of format `txt` in RESP3, as Redis
    /// answers `CLIENT LIST` or `INFO`; a bulk string in RESP2.
    pub fn text(&mut self, text: &[u8]) -> &mut Self {
        match self.proto {
            Protocol::Resp2 => self.bulk(text),
            Protocol::Resp3 => {
                self.line(b'=', itoa(text.len() as i64 + 4).as_bytes());
                self.buf.put_slice(b"txt:");
                self.buf.put_slice(text);
                self.buf.put_slice(b"\r\n");
                self
            }
        }
    }

    /// Integer.
    pub fn int(&mut self, n: i64) -> &mut Self {
        self.line(b':', itoa(n).as_bytes())
    }

    /// A double: RESP3's `,`; in RESP2 a bulk string, as Redis sends
    /// `ZSCORE`'s. Written with at most four decimals (ratios, for people).
    pub fn double(&mut self, v: f64) -> &mut Self {
        let rounded = (v * 10_000.0).round() / 10_000.0;
        let text = rounded.to_string();
        match self.proto {
            Protocol::Resp2 => self.bulk(text.as_bytes()),
            Protocol::Resp3 => self.line(b',', text.as_bytes()),
        }
    }

    /// `hits / (hits + misses)` as a [`Reply::double`], or null before any
    /// read.
    pub fn ratio(&mut self, hits: u64, misses: u64) -> &mut Self {
        match hits + misses {
            0 => self.null(),
            total => self.double(hits as f64 / total as f64),
        }
    }

    /// Null (`$-1` in RESP2, `_` in RESP3).
    pub fn null(&mut self) -> &mut Self {
        match self.proto {
            Protocol::Resp2 => self.buf.put_slice(b"$-1\r\n"),
            Protocol::Resp3 => self.buf.put_slice(b"_\r\n"),
        }
        self
    }

    /// Array header for `n` elements.
    pub fn array(&mut self, n: usize) -> &mut Self {
        self.line(b'*', itoa(n as i64).as_bytes())
    }

    /// Map header for `n` pairs (a flat array of 2n elements in RESP2).
    pub fn map(&mut self, n: usize) -> &mut Self {
        match self.proto {
            Protocol::Resp2 => self.array(n * 2),
            Protocol::Resp3 => self.line(b'%', itoa(n as i64).as_bytes()),
        }
    }

    /// The encoded reply.
    pub fn finish(self) -> Bytes {
        self.buf.freeze()
    }

    fn line(&mut self, tag: u8, body: &[u8]) -> &mut Self {
        self.buf.put_u8(tag);
        self.buf.put_slice(body);
        self.buf.put_slice(b"\r\n");
        self
    }
}

fn itoa(n: i64) -> String {
    n.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_cannot_break_framing() {
        assert_eq!(&error("ERR a\r\nb")[..], b"-ERR a  b\r\n");
    }

    #[test]
    fn maps_and_nulls_follow_the_protocol() {
        let mut r2 = Reply::new(Protocol::Resp2);
        r2.map(1).bulk(b"k").null();
        assert_eq!(&r2.finish()[..], b"*2\r\n$1\r\nk\r\n$-1\r\n");
        let mut r3 = Reply::new(Protocol::Resp3);
        r3.map(1).bulk(b"k").null();
        assert_eq!(&r3.finish()[..], b"%1\r\n$1\r\nk\r\n_\r\n");
    }

    #[test]
    fn doubles_are_bulk_strings_in_resp2() {
        let mut r2 = Reply::new(Protocol::Resp2);
        r2.ratio(2, 1).ratio(0, 0);
        assert_eq!(&r2.finish()[..], b"$6\r\n0.6667\r\n$-1\r\n");
        let mut r3 = Reply::new(Protocol::Resp3);
        r3.ratio(1, 1).ratio(0, 0);
        assert_eq!(&r3.finish()[..], b",0.5\r\n_\r\n");
    }

    #[test]
    fn text_is_verbatim_in_resp3_only() {
        let mut r2 = Reply::new(Protocol::Resp2);
        r2.text(b"a=1\n");
        assert_eq!(&r2.finish()[..], b"$4\r\na=1\n\r\n");
        let mut r3 = Reply::new(Protocol::Resp3);
        r3.text(b"a=1\n");
        assert_eq!(&r3.finish()[..], b"=8\r\ntxt:a=1\n\r\n");
    }
}
