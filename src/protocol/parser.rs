//! Bounded, incremental parser for client commands.
//!
//! Clients only ever send flat arrays of bulk strings (`*2\r\n$3\r\nGET\r\n$1\r\nk\r\n`)
//! or inline text (`GET k\r\n`, what telnet/nc users type). Parsing that shape
//! ourselves, instead of with the redis-protocol crate, gives us three things
//! the crate lacks: limits on every length (a `$2000000000` header must not make
//! us buffer forever), no recursion (a nested `*1\r\n*1\r\n…` is simply an
//! error, not a stack overflow), and resumption: an incomplete command keeps its
//! progress, so a big pipeline arriving in small reads costs O(n), not O(n²).
//!
//! The parser works on offsets into the caller's buffer and never copies RESP
//! arguments; the session later slices them out of one frozen `Bytes`.

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

use super::{ProtocolError, find_crlf};

/// Input limits, checked while parsing (before any byte is buffered beyond them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest number of arguments in one command.
    pub max_args: usize,
    /// Largest single argument (bulk string), in bytes.
    pub max_bulk: usize,
    /// Largest inline command line, in bytes.
    pub max_inline: usize,
    /// Largest whole command (all arguments and framing), in bytes.
    pub max_request: usize,
}

impl Default for Limits {
    fn default() -> Self {
        // Redis's own defaults: proto-max-bulk-len 512 MiB, inline 64 KiB.
        Self {
            max_args: 1024 * 1024,
            max_bulk: 512 * 1024 * 1024,
            max_inline: 64 * 1024,
            max_request: 512 * 1024 * 1024,
        }
    }
}

/// Longest `*<n>` / `$<n>` header line we accept; Redis uses the same bound.
const MAX_HEADER_LINE: usize = 64 * 1024;

/// One complete command found in the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A RESP array of bulk strings: `frame` is its byte range in the buffer and
    /// the argument ranges are in [`Parser::args`].
    Resp {
        /// The whole frame, header included.
        frame: Range<usize>,
    },
    /// An inline command, already split into owned arguments (quotes and
    /// escapes make them differ from the raw bytes). `frame` is the line's range.
    Inline {
        /// The line, terminator included.
        frame: Range<usize>,
        /// The arguments.
        args: Vec<Bytes>,
    },
    /// An empty command (`*0`, `*-1` or a blank line): Redis ignores these
    /// without replying, and so do we.
    Empty {
        /// The bytes to skip.
        frame: Range<usize>,
    },
}

impl Parsed {
    /// The byte range this command occupied.
    pub fn frame(&self) -> Range<usize> {
        match self {
            Parsed::Resp { frame } | Parsed::Inline { frame, .. } | Parsed::Empty { frame } => {
                frame.clone()
            }
        }
    }
}

/// Where the parser stands inside an incomplete multibulk command.
#[derive(Debug, Clone, Copy)]
struct Partial {
    /// Offset of the `*`.
    start: usize,
    /// Arguments the header announced.
    argc: usize,
    /// Length of the bulk whose header has been read but whose data has not
    /// fully arrived yet.
    bulk: Option<usize>,
}

/// Incremental parser; one per client connection.
#[derive(Debug)]
pub struct Parser {
    limits: Limits,
    /// Offset at which the next byte will be examined.
    pos: usize,
    partial: Option<Partial>,
    args: Vec<Range<usize>>,
}

impl Parser {
    /// A parser enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            pos: 0,
            partial: None,
            args: Vec::with_capacity(8),
        }
    }

    /// Argument ranges of the last [`Parsed::Resp`] command.
    pub fn args(&self) -> &[Range<usize>] {
        &self.args
    }

    /// How many more bytes the command in progress needs at least, so the
    /// caller can reserve once for a large bulk instead of growing repeatedly.
    pub fn bytes_wanted(&self, buffered: usize) -> usize {
        match self.partial {
            Some(Partial {
                bulk: Some(len), ..
            }) => (self.pos + len + 2).saturating_sub(buffered),
            _ => 0,
        }
    }

    /// Hands back the command just parsed, whose frame began at `start`: the
    /// next call to [`next`](Self::next) parses it again. (For a caller that
    /// must not run it yet.)
    pub fn unread(&mut self, start: usize) {
        debug_assert!(self.partial.is_none() && start <= self.pos);
        self.pos = start;
    }

    /// Tells the parser the caller removed the first `n` bytes of the buffer.
    /// `n` must not exceed the end of the last complete command.
    pub fn consume(&mut self, n: usize) {
        self.pos -= n;
        if let Some(p) = &mut self.partial {
            p.start -= n;
        }
        for r in &mut self.args {
            r.start = r.start.saturating_sub(n);
            r.end = r.end.saturating_sub(n);
        }
    }

    /// Parses the next complete command from `buf` (which must hold every byte
    /// given before, minus what was [`consume`](Self::consume)d).
    ///
    /// Returns `Ok(None)` when more input is needed. An error is final: the
    /// connection must be answered with it and closed, as Redis does.
    pub fn next(&mut self, buf: &[u8]) -> Result<Option<Parsed>, ProtocolError> {
        if self.partial.is_none() {
            let Some(&first) = buf.get(self.pos) else {
                return Ok(None);
            };
            if first != b'*' {
                return self.inline(buf);
            }
            let start = self.pos;
            let Some((n, after)) =
                self.header(buf, start, ProtocolError::InvalidMultibulkLength)?
            else {
                return Ok(None);
            };
            if n <= 0 {
                self.pos = after;
                return Ok(Some(Parsed::Empty {
                    frame: start..after,
                }));
            }
            let argc = usize::try_from(n).map_err(|_| ProtocolError::InvalidMultibulkLength)?;
            if argc > self.limits.max_args {
                return Err(ProtocolError::InvalidMultibulkLength);
            }
            self.pos = after;
            self.args.clear();
            self.partial = Some(Partial {
                start,
                argc,
                bulk: None,
            });
        }
        self.bulk_args(buf)
    }

    /// Continues reading the bulk arguments of the command in progress.
    fn bulk_args(&mut self, buf: &[u8]) -> Result<Option<Parsed>, ProtocolError> {
        let Some(mut partial) = self.partial else {
            return Ok(None);
        };
        while self.args.len() < partial.argc {
            let len = match partial.bulk {
                Some(len) => len,
                None => {
                    let Some(&tag) = buf.get(self.pos) else {
                        break;
                    };
                    if tag != b'$' {
                        return Err(ProtocolError::ExpectedBulk(tag));
                    }
                    let Some((n, after)) =
                        self.header(buf, self.pos, ProtocolError::InvalidBulkLength)?
                    else {
                        break;
                    };
                    let len = usize::try_from(n).map_err(|_| ProtocolError::InvalidBulkLength)?;
                    if len > self.limits.max_bulk {
                        return Err(ProtocolError::InvalidBulkLength);
                    }
                    if after - partial.start + len > self.limits.max_request {
                        return Err(ProtocolError::RequestTooLarge);
                    }
                    self.pos = after;
                    partial.bulk = Some(len);
                    len
                }
            };
            let end = self.pos + len;
            if buf.len() < end + 2 {
                break;
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(ProtocolError::BadTerminator);
            }
            self.args.push(self.pos..end);
            self.pos = end + 2;
            partial.bulk = None;
        }
        if self.args.len() < partial.argc {
            self.partial = Some(partial);
            return Ok(None);
        }
        self.partial = None;
        Ok(Some(Parsed::Resp {
            frame: partial.start..self.pos,
        }))
    }

    /// Reads a `*<n>\r\n` or `$<n>\r\n` header at `at`; returns the number and
    /// the offset after the line, or `None` if the line is incomplete.
    fn header(
        &self,
        buf: &[u8],
        at: usize,
        invalid: ProtocolError,
    ) -> Result<Option<(i64, usize)>, ProtocolError> {
        let Some(nl) = find_crlf(&buf[at..]) else {
            if buf.len() - at > MAX_HEADER_LINE {
                return Err(match invalid {
                    ProtocolError::InvalidBulkLength => ProtocolError::BulkHeaderTooLong,
                    _ => ProtocolError::MultibulkHeaderTooLong,
                });
            }
            return Ok(None);
        };
        let digits = &buf[at + 1..at + nl];
        let n = parse_i64(digits).ok_or(invalid)?;
        Ok(Some((n, at + nl + 2)))
    }

    /// Parses one inline command line starting at `self.pos`.
    fn inline(&mut self, buf: &[u8]) -> Result<Option<Parsed>, ProtocolError> {
        let start = self.pos;
        let rest = &buf[start..];
        let Some(nl) = memchr(b'\n', rest) else {
            if rest.len() > self.limits.max_inline {
                return Err(ProtocolError::InlineTooLong);
            }
            return Ok(None);
        };
        if nl > self.limits.max_inline {
            return Err(ProtocolError::InlineTooLong);
        }
        let mut line = &rest[..nl];
        if let [head @ .., b'\r'] = line {
            line = head;
        }
        let args = split_inline(line)?;
        self.pos = start + nl + 1;
        let frame = start..self.pos;
        if args.is_empty() {
            return Ok(Some(Parsed::Empty { frame }));
        }
        if args.len() > self.limits.max_args {
            return Err(ProtocolError::InvalidMultibulkLength);
        }
        Ok(Some(Parsed::Inline { frame, args }))
    }
}

#[inline]
fn memchr(needle: u8, haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|&b| b == needle)
}

/// The value `table` gives `word`, a command argument matched without
/// regard to ASCII case (`TYPE pubsub`, `CLIENT REPLY off`).
pub(crate) fn keyword<T: Copy>(word: &[u8], table: &[(&str, T)]) -> Option<T> {
    table
        .iter()
        .find(|(name, _)| word.eq_ignore_ascii_case(name.as_bytes()))
        .map(|&(_, value)| value)
}

/// Parses a decimal integer the way Redis does for lengths: optional `-`,
/// digits only, no overflow.
pub(crate) fn parse_i64(digits: &[u8]) -> Option<i64> {
    let (neg, digits) = match digits {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(i64::from(d - b'0'))?;
    }
    Some(if neg { -n } else { n })
}

/// Splits an inline line into arguments with Redis's `sdssplitargs` rules:
/// whitespace separates, `"…"` allows `\n \r \t \b \a \\ \" \xHH` escapes,
/// `'…'` allows `\'`, and a closing quote must be followed by a space or the end.
pub fn split_inline(line: &[u8]) -> Result<Vec<Bytes>, ProtocolError> {
    let mut args = Vec::new();
    let mut i = 0;
    while i < line.len() {
        while i < line.len() && is_separator(line[i]) {
            i += 1;
        }
        if i == line.len() {
            break;
        }
        let mut cur = BytesMut::new();
        let mut in_dq = false;
        let mut in_sq = false;
        loop {
            let Some(&c) = line.get(i) else {
                if in_dq || in_sq {
                    return Err(ProtocolError::UnbalancedQuotes);
                }
                break;
            };
            if in_dq {
                if c == b'\\' && i + 3 < line.len() && line[i + 1] == b'x' {
                    if let (Some(h), Some(l)) = (hex(line[i + 2]), hex(line[i + 3])) {
                        cur.put_u8(h * 16 + l);
                        i += 4;
                        continue;
                    }
                }
                if c == b'\\' && i + 1 < line.len() {
                    let e = match line[i + 1] {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    };
                    cur.put_u8(e);
                    i += 2;
                    continue;
                }
                if c == b'"' {
                    if line.get(i + 1).is_some_and(|&n| !is_separator(n)) {
                        return Err(ProtocolError::UnbalancedQuotes);
                    }
                    i += 1;
                    break;
                }
                cur.put_u8(c);
                i += 1;
            } else if in_sq {
                if c == b'\\' && line.get(i + 1) == Some(&b'\'') {
                    cur.put_u8(b'\'');
                    i += 2;
                    continue;
                }
                if c == b'\'' {
                    if line.get(i + 1).is_some_and(|&n| !is_separator(n)) {
                        return Err(ProtocolError::UnbalancedQuotes);
                    }
                    i += 1;
                    break;
                }
                cur.put_u8(c);
                i += 1;
            } else {
                match c {
                    c if is_separator(c) => break,
                    b'"' => in_dq = true,
                    b'\'' => in_sq = true,
                    _ => cur.put_u8(c),
                }
                i += 1;
            }
        }
        args.push(cur.freeze());
    }
    Ok(args)
}

/// Separates inline arguments. One set for both skipping and ending an
/// argument: a byte that ends an argument but is not skipped would loop forever.
fn is_separator(c: u8) -> bool {
    matches!(c, b' ' | b'\n' | b'\r' | b'\t' | b'\0' | 0x0b | 0x0c)
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    /// Parses everything in `input`, fed in chunks of `chunk` bytes, the way a
    /// session does, and returns each command's arguments.
    fn parse_chunked(input: &[u8], chunk: usize) -> Result<Vec<Vec<Vec<u8>>>, ProtocolError> {
        let mut parser = Parser::new(Limits::default());
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            buf.extend_from_slice(piece);
            while let Some(parsed) = parser.next(&buf)? {
                match &parsed {
                    Parsed::Resp { .. } => out.push(
                        parser
                            .args()
                            .iter()
                            .map(|r| buf[r.clone()].to_vec())
                            .collect(),
                    ),
                    Parsed::Inline { args, .. } => {
                        out.push(args.iter().map(|a| a.to_vec()).collect())
                    }
                    Parsed::Empty { .. } => {}
                }
                let end = parsed.frame().end;
                let _ = buf.split_to(end);
                parser.consume(end);
            }
        }
        Ok(out)
    }

    fn encode(cmds: &[Vec<Vec<u8>>]) -> Vec<u8> {
        let mut out = Vec::new();
        for cmd in cmds {
            out.extend_from_slice(format!("*{}\r\n", cmd.len()).as_bytes());
            for arg in cmd {
                out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
                out.extend_from_slice(arg);
                out.extend_from_slice(b"\r\n");
            }
        }
        out
    }

    #[test]
    fn parses_a_pipeline_of_bulk_arrays() {
        let got = parse_chunked(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nPING\r\n", 1000);
        assert_eq!(
            got.unwrap(),
            vec![vec![b"GET".to_vec(), b"k".to_vec()], vec![b"PING".to_vec()]]
        );
    }

    #[test]
    fn binary_arguments_keep_crlf_and_nul() {
        let got = parse_chunked(b"*2\r\n$3\r\nGET\r\n$4\r\n\r\n\0x\r\n", 3).unwrap();
        assert_eq!(got, vec![vec![b"GET".to_vec(), b"\r\n\0x".to_vec()]]);
    }

    #[test]
    fn inline_commands_split_like_redis() {
        let got = parse_chunked(b"SET k \"a b\\x41\\n\" 'it\\'s'\r\nPING\n\r\n", 1000).unwrap();
        assert_eq!(
            got,
            vec![
                vec![
                    b"SET".to_vec(),
                    b"k".to_vec(),
                    b"a bA\n".to_vec(),
                    b"it's".to_vec()
                ],
                vec![b"PING".to_vec()],
            ]
        );
    }

    #[test]
    fn unbalanced_quotes_are_a_protocol_error() {
        assert_eq!(
            parse_chunked(b"SET k \"abc\r\n", 100),
            Err(ProtocolError::UnbalancedQuotes)
        );
        assert_eq!(
            parse_chunked(b"SET k \"abc\"x\r\n", 100),
            Err(ProtocolError::UnbalancedQuotes)
        );
    }

    #[test]
    fn inline_nul_and_control_separators_terminate() {
        let got = parse_chunked(b"GET\0\x0bk\x0c\r\n", 100).unwrap();
        assert_eq!(got, vec![vec![b"GET".to_vec(), b"k".to_vec()]]);
    }

    #[test]
    fn empty_arrays_and_blank_lines_are_skipped() {
        assert_eq!(
            parse_chunked(b"*0\r\n*-1\r\n\r\n", 2).unwrap(),
            Vec::<Vec<Vec<u8>>>::new()
        );
    }

    #[test]
    fn nested_arrays_are_rejected_not_recursed() {
        let deep = "*1\r\n".repeat(100_000);
        assert_eq!(
            parse_chunked(deep.as_bytes(), 4096),
            Err(ProtocolError::ExpectedBulk(b'*'))
        );
    }

    #[test]
    fn huge_bulk_length_is_rejected_before_buffering() {
        assert_eq!(
            parse_chunked(b"*1\r\n$1099511627776\r\n", 100),
            Err(ProtocolError::InvalidBulkLength)
        );
    }

    #[test]
    fn bad_lengths_are_rejected() {
        assert_eq!(
            parse_chunked(b"*x\r\n", 100),
            Err(ProtocolError::InvalidMultibulkLength)
        );
        assert_eq!(
            parse_chunked(b"*99999999999\r\n", 100),
            Err(ProtocolError::InvalidMultibulkLength)
        );
        assert_eq!(
            parse_chunked(b"*1\r\n$-5\r\n", 100),
            Err(ProtocolError::InvalidBulkLength)
        );
        assert_eq!(
            parse_chunked(b"*1\r\n$3\r\nGETxx", 100),
            Err(ProtocolError::BadTerminator)
        );
    }

    #[test]
    fn limits_are_enforced() {
        let limits = Limits {
            max_args: 2,
            max_bulk: 4,
            max_inline: 8,
            max_request: 20,
        };
        let run = |input: &[u8]| {
            let mut p = Parser::new(limits);
            p.next(input).map(|_| ())
        };
        assert_eq!(run(b"*3\r\n"), Err(ProtocolError::InvalidMultibulkLength));
        assert_eq!(run(b"*1\r\n$5\r\n"), Err(ProtocolError::InvalidBulkLength));
        assert_eq!(
            run(b"GET aaaaaaaaaaaaa\r\n"),
            Err(ProtocolError::InlineTooLong)
        );
        assert_eq!(
            run(b"GET aaaaaaaaaaaaaaaaaaa"),
            Err(ProtocolError::InlineTooLong)
        );
        assert_eq!(
            run(b"*2\r\n$4\r\naaaa\r\n$4\r\n"),
            Err(ProtocolError::RequestTooLarge)
        );
        let long_header = format!("*{}", "1".repeat(MAX_HEADER_LINE + 1));
        assert_eq!(
            run(long_header.as_bytes()),
            Err(ProtocolError::MultibulkHeaderTooLong)
        );
    }

    #[test]
    fn incomplete_command_waits_and_reports_wanted_bytes() {
        let mut p = Parser::new(Limits::default());
        let buf = b"*1\r\n$10\r\nabc";
        assert_eq!(p.next(buf).unwrap(), None);
        assert_eq!(p.bytes_wanted(buf.len()), 9 + 10 + 2 - buf.len());
    }

    proptest! {
        /// Any split of a valid pipeline into reads parses to the same commands.
        #[test]
        fn short_reads_do_not_change_the_result(
            cmds in prop::collection::vec(
                prop::collection::vec(prop::collection::vec(any::<u8>(), 0..20), 1..5), 1..20),
            chunk in 1usize..64,
        ) {
            let input = encode(&cmds);
            prop_assert_eq!(parse_chunked(&input, chunk).unwrap(), cmds);
        }

        /// Arbitrary bytes never panic the parser.
        #[test]
        fn garbage_never_panics(input in prop::collection::vec(any::<u8>(), 0..512), chunk in 1usize..32) {
            let _ = parse_chunked(&input, chunk);
        }
    }
}
