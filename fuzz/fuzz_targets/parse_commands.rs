//! Client command parsing, driven exactly as a session drives it.
//!
//! Input layout: byte 0 picks the limits (bit 7: small limits, so the limit
//! checks are reached with short inputs) and the largest read size (bits 0-6;
//! 0 = everything in one read); bytes 1-2 seed the read sizes; the rest is
//! what the client sends.
//!
//! Checked: no panic; every frame and argument lies inside the batch it was
//! parsed from, frames are contiguous and in order; splitting the input into
//! other reads gives the same commands (and an error iff the one-read parse
//! errs); and re-encoding each command's arguments as RESP parses back to the
//! same arguments.

#![no_main]

use std::ops::Range;

use libfuzzer_sys::fuzz_target;
use nearcache::protocol::{Limits, Parsed, Parser};

const SMALL: Limits = Limits {
    max_args: 8,
    max_bulk: 64,
    max_inline: 64,
    max_request: 256,
};

type Args = Vec<Vec<u8>>;

/// Everything one client stream parses to: the commands (empty commands
/// skipped, as the session skips them) and whether it ended in an error.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    cmds: Vec<Args>,
    error: bool,
}

enum Cmd {
    Resp {
        frame: Range<usize>,
        args: Range<usize>,
    },
    Inline(Vec<Vec<u8>>),
}

/// Feeds `input` in reads of the sizes `reads` yields, with the session's
/// loop: parse every complete command in the buffer, cut off what was
/// consumed, tell the parser, then read more.
fn run(limits: Limits, input: &[u8], mut reads: impl FnMut() -> usize) -> Outcome {
    let mut parser = Parser::new(limits);
    let mut rbuf: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    let mut fed = 0;
    while fed < input.len() {
        let n = reads().clamp(1, input.len() - fed);
        rbuf.extend_from_slice(&input[fed..fed + n]);
        fed += n;

        let mut cmds = Vec::new();
        let mut ranges: Vec<Range<usize>> = Vec::new();
        let mut consumed = 0;
        let mut error = false;
        loop {
            match parser.next(&rbuf) {
                Ok(Some(parsed)) => {
                    let frame = parsed.frame();
                    assert_eq!(frame.start, consumed, "frames must be contiguous");
                    assert!(frame.start < frame.end, "empty frame {frame:?}");
                    assert!(
                        frame.end <= rbuf.len(),
                        "frame {frame:?} past {}",
                        rbuf.len()
                    );
                    consumed = frame.end;
                    match parsed {
                        Parsed::Resp { frame } => {
                            let args = parser.args();
                            assert!(!args.is_empty(), "Resp with no arguments");
                            assert!(args.len() <= limits.max_args);
                            let mut prev = frame.start;
                            for r in args {
                                assert!(
                                    prev <= r.start && r.start <= r.end && r.end <= frame.end,
                                    "argument {r:?} outside frame {frame:?}"
                                );
                                assert!(r.len() <= limits.max_bulk);
                                prev = r.end;
                            }
                            assert!(
                                frame.len() <= limits.max_request + 2,
                                "frame of {} bytes passed max_request {}",
                                frame.len(),
                                limits.max_request
                            );
                            let first = ranges.len();
                            ranges.extend_from_slice(args);
                            cmds.push(Cmd::Resp {
                                frame,
                                args: first..ranges.len(),
                            });
                        }
                        Parsed::Inline { frame, args } => {
                            assert!(!args.is_empty(), "Inline with no arguments");
                            assert!(frame.len() <= limits.max_inline + 1);
                            cmds.push(Cmd::Inline(args.iter().map(|a| a.to_vec()).collect()));
                        }
                        Parsed::Empty { .. } => {}
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    error = true;
                    break;
                }
            }
        }
        let chunk: Vec<u8> = rbuf.drain(..consumed).collect();
        parser.consume(consumed);
        for cmd in cmds {
            out.push(match cmd {
                Cmd::Resp { frame, args } => {
                    let frame_bytes = &chunk[frame.clone()];
                    assert_eq!(frame_bytes.first(), Some(&b'*'));
                    ranges[args]
                        .iter()
                        .map(|r| chunk[r.clone()].to_vec())
                        .collect()
                }
                Cmd::Inline(args) => args,
            });
        }
        if error {
            return Outcome {
                cmds: out,
                error: true,
            };
        }
        let _ = parser.bytes_wanted(rbuf.len());
    }
    Outcome {
        cmds: out,
        error: false,
    }
}

fn encode(cmds: &[Args]) -> Vec<u8> {
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

fuzz_target!(|data: &[u8]| {
    let [ctl, s0, s1, input @ ..] = data else {
        return;
    };
    let limits = if ctl & 0x80 != 0 {
        SMALL
    } else {
        Limits::default()
    };
    let max_read = usize::from(ctl & 0x7f);

    let whole = run(limits, input, || usize::MAX);
    if max_read > 0 {
        // xorshift16 seeded from the input: varied, reproducible read sizes.
        let mut x = u16::from_le_bytes([*s0, *s1]) | 1;
        let split = run(limits, input, || {
            x ^= x << 7;
            x ^= x >> 9;
            x ^= x << 8;
            1 + usize::from(x) % max_read
        });
        assert_eq!(whole, split, "read sizes changed the result");
    }

    // Round trip: what the proxy would forward (the arguments, as RESP)
    // parses back to the same arguments.
    let reencoded = encode(&whole.cmds);
    let again = run(Limits::default(), &reencoded, || usize::MAX);
    assert!(!again.error, "re-encoded commands failed to parse");
    assert_eq!(again.cmds, whole.cmds, "round trip changed the arguments");
});
