//! Splits the upstream byte stream into whole reply frames without decoding
//! them.
//!
//! A multiplexed upstream connection carries many clients' replies back to
//! back; all we need to know is where each one ends. The scanner walks RESP2
//! and RESP3 headers iteratively (aggregates just add to a count of elements
//! still expected, so depth costs nothing), and it resumes where it stopped
//! when a reply is split across reads, so a large reply costs O(n).

use super::parser::parse_i64;
use super::{InvalidReply, find_crlf};

/// Resumable scanner for one reply frame at a time.
#[derive(Debug, Default, Clone)]
pub struct ReplyScanner {
    /// Offset of the next header to read, relative to the frame's start.
    pos: usize,
    /// Elements still to read before the frame is complete (0 = not started).
    remaining: usize,
}

/// What a frame's first byte says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A RESP3 push (`>`): out-of-band, not a reply to any command.
    Push,
    /// Anything else.
    Reply,
}

impl ReplyScanner {
    /// A scanner at the start of a frame.
    pub fn new() -> Self {
        Self::default()
    }

    /// Scans `buf`, which begins at the start of a frame; returns the frame's
    /// length once it is complete. Call again with the same (grown) buffer after
    /// `Ok(None)`; after `Ok(Some(_))` the scanner is reset for the next frame.
    pub fn scan(&mut self, buf: &[u8]) -> Result<Option<usize>, InvalidReply> {
        if self.remaining == 0 {
            self.pos = 0;
            self.remaining = 1;
        }
        while self.remaining > 0 {
            let at = self.pos;
            let Some(&tag) = buf.get(at) else {
                return Ok(None);
            };
            let Some(nl) = find_crlf(&buf[at..]) else {
                return Ok(None);
            };
            let bad = InvalidReply {
                byte: tag,
                offset: at,
            };
            // An empty line has no type byte (found by fuzzing: `\r\n`).
            if nl == 0 {
                return Err(bad);
            }
            let line = &buf[at + 1..at + nl];
            let after = at + nl + 2;
            let mut next = after;
            let mut more = 0usize;
            match tag {
                // Simple string, error, integer, double, null, boolean, big number.
                b'+' | b'-' | b':' | b',' | b'_' | b'#' | b'(' => {}
                // Bulk string, blob error, verbatim string.
                b'$' | b'!' | b'=' => {
                    let n = parse_i64(line).ok_or(bad)?;
                    if n >= 0 {
                        let n = usize::try_from(n).map_err(|_| bad)?;
                        let end = after.checked_add(n).ok_or(bad)?;
                        if buf.len() < end + 2 {
                            return Ok(None);
                        }
                        if &buf[end..end + 2] != b"\r\n" {
                            return Err(bad);
                        }
                        next = end + 2;
                    }
                }
                // Array, set, push: n elements; map: n pairs.
                b'*' | b'~' | b'>' | b'%' => {
                    let n = parse_i64(line).ok_or(bad)?;
                    if n > 0 {
                        more = usize::try_from(n).map_err(|_| bad)?;
                        if tag == b'%' {
                            more = more.checked_mul(2).ok_or(bad)?;
                        }
                    }
                }
                // Attribute: n pairs, then the frame it annotates, which is
                // part of the same reply.
                b'|' => {
                    let n = usize::try_from(parse_i64(line).ok_or(bad)?).map_err(|_| bad)?;
                    more = n.checked_mul(2).and_then(|m| m.checked_add(1)).ok_or(bad)?;
                }
                _ => return Err(bad),
            }
            self.pos = next;
            self.remaining = self.remaining - 1 + more;
        }
        Ok(Some(self.pos))
    }
}

/// The kind of the frame starting at `buf[0]`.
#[inline]
pub fn frame_kind(buf: &[u8]) -> FrameKind {
    if buf.first() == Some(&b'>') {
        FrameKind::Push
    } else {
        FrameKind::Reply
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn whole(buf: &[u8]) -> Option<usize> {
        ReplyScanner::new().scan(buf).unwrap()
    }

    /// Each frame is found whole, with another frame after it.
    fn each_is_found_whole(frames: &[&[u8]], next: &[u8]) {
        for frame in frames {
            let mut buf = frame.to_vec();
            buf.extend_from_slice(next);
            assert_eq!(
                whole(&buf),
                Some(frame.len()),
                "{:?}",
                String::from_utf8_lossy(frame)
            );
        }
    }

    #[test]
    fn finds_the_end_of_each_resp2_type() {
        each_is_found_whole(
            &[
                &b"+OK\r\n"[..],
                b"-ERR x\r\n",
                b":12\r\n",
                b"$-1\r\n",
                b"$0\r\n\r\n",
                b"$4\r\na\r\nb\r\n",
                b"*-1\r\n",
                b"*0\r\n",
                b"*2\r\n$1\r\na\r\n*1\r\n:1\r\n",
            ],
            b"+NEXT\r\n",
        );
    }

    #[test]
    fn finds_the_end_of_each_resp3_type() {
        each_is_found_whole(
            &[
                &b"_\r\n"[..],
                b",1.5\r\n",
                b"#t\r\n",
                b"(123456789012345678901234567890\r\n",
                b"!3\r\nerr\r\n",
                b"=7\r\ntxt:abc\r\n",
                b"%2\r\n+a\r\n:1\r\n+b\r\n*1\r\n:2\r\n",
                b"~2\r\n+a\r\n+b\r\n",
                b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$1\r\nx\r\n",
                b"|1\r\n+ttl\r\n:3\r\n$1\r\nv\r\n",
            ],
            b":0\r\n",
        );
    }

    #[test]
    fn deep_nesting_costs_no_stack() {
        let mut buf = b"*1\r\n".repeat(1_000_000);
        buf.extend_from_slice(b":1\r\n");
        assert_eq!(whole(&buf), Some(buf.len()));
    }

    #[test]
    fn invalid_bytes_are_reported() {
        assert!(ReplyScanner::new().scan(b"?x\r\n").is_err());
        assert!(ReplyScanner::new().scan(b"$x\r\n").is_err());
        // Fuzz findings: an empty header line, a bulk without its CRLF.
        assert!(ReplyScanner::new().scan(b"\r\n").is_err());
        assert!(ReplyScanner::new().scan(b"*1\r\n\r\n").is_err());
        assert!(ReplyScanner::new().scan(b"$1\r\nabc\r\n").is_err());
    }

    #[test]
    fn push_frames_are_recognised() {
        assert_eq!(frame_kind(b">2\r\n"), FrameKind::Push);
        assert_eq!(frame_kind(b"*2\r\n"), FrameKind::Reply);
    }

    proptest! {
        /// Feeding a reply byte by byte gives the same end as feeding it whole.
        #[test]
        fn resumes_across_reads(values in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..30), 0..30)) {
            let mut frame = format!("*{}\r\n", values.len()).into_bytes();
            for v in &values {
                frame.extend_from_slice(format!("${}\r\n", v.len()).as_bytes());
                frame.extend_from_slice(v);
                frame.extend_from_slice(b"\r\n");
            }
            let mut scanner = ReplyScanner::new();
            let mut found = None;
            for end in 1..=frame.len() {
                if let Some(n) = scanner.scan(&frame[..end]).unwrap() {
                    found = Some((end, n));
                    break;
                }
            }
            prop_assert_eq!(found, Some((frame.len(), frame.len())));
        }
    }
}
