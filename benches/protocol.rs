//! Codec micro-benchmarks: the client command parser and the upstream reply
//! scanner, on the shapes the proxy sees most (one small command, a pipeline,
//! a large value; simple, bulk and array replies).
//!
//! Run: `cargo bench --bench protocol` (add `-- --quick` for a short run).
//! Whole-system figures, beside direct Redis, come from `scripts/bench.sh`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use nearcache::protocol::{Limits, Parsed, Parser, ReplyScanner};

/// `args` as one RESP array of bulk strings, as a client sends it.
fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Parses every command in `buf`, then rewinds the parser as a session does
/// after cutting the parsed bytes off its buffer; returns the command count.
/// The parser is reused across iterations, as it is across a session's reads.
fn parse_all(parser: &mut Parser, buf: &[u8]) -> usize {
    let mut n = 0;
    let mut end = 0;
    while let Ok(Some(parsed)) = parser.next(buf) {
        if let Parsed::Resp { .. } = parsed {
            n += parser.args().len();
        }
        end = parsed.frame().end;
    }
    parser.consume(end);
    n
}

fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse");

    let get = command(&[b"GET", b"key:000000012345"]);
    g.throughput(Throughput::Elements(1));
    let mut parser = Parser::new(Limits::default());
    g.bench_function("get", |b| {
        b.iter(|| parse_all(&mut parser, black_box(&get)))
    });

    // What `redis-benchmark -P 16` sends: 16 commands in one read.
    let mut pipeline = Vec::new();
    for i in 0..16 {
        let key = format!("key:{i:012}");
        if i % 2 == 0 {
            pipeline.extend(command(&[b"GET", key.as_bytes()]));
        } else {
            pipeline.extend(command(&[b"SET", key.as_bytes(), &[b'x'; 64]]));
        }
    }
    g.throughput(Throughput::Elements(16));
    let mut parser = Parser::new(Limits::default());
    g.bench_function("pipeline_16", |b| {
        b.iter(|| parse_all(&mut parser, black_box(&pipeline)))
    });

    // A 1 MiB SET, all in the buffer, and arriving in 16 KiB reads (each read
    // resumes where the last stopped, so the cost stays linear). The parser
    // never reads the value's bytes, so this is per command, not per byte.
    let value = vec![b'v'; 1 << 20];
    let set = command(&[b"SET", b"big", &value]);
    g.throughput(Throughput::Elements(1));
    let mut parser = Parser::new(Limits::default());
    g.bench_function("set_1mib", |b| {
        b.iter(|| parse_all(&mut parser, black_box(&set)))
    });
    let mut parser = Parser::new(Limits::default());
    g.bench_function("set_1mib_16k_reads", |b| {
        b.iter(|| {
            let mut end = 0;
            let mut got = None;
            while got.is_none() {
                end = (end + 16 * 1024).min(set.len());
                got = parser.next(black_box(&set[..end])).ok().flatten();
            }
            parser.consume(end);
            got
        })
    });
    g.finish();
}

fn scan(c: &mut Criterion) {
    let mut g = c.benchmark_group("scan");
    g.throughput(Throughput::Elements(1));

    let simple = b"+OK\r\n".to_vec();
    let mut bulk = b"$64\r\n".to_vec();
    bulk.extend_from_slice(&[b'x'; 64]);
    bulk.extend_from_slice(b"\r\n");
    let mut array = b"*100\r\n".to_vec();
    for i in 0..100 {
        array.extend_from_slice(format!("$16\r\nvalue:{i:010}\r\n").as_bytes());
    }

    for (name, reply) in [
        ("simple", &simple),
        ("bulk_64", &bulk),
        ("array_100", &array),
    ] {
        let mut scanner = ReplyScanner::new();
        g.bench_function(name, |b| b.iter(|| scanner.scan(black_box(reply))));
    }
    g.finish();
}

criterion_group!(benches, parse, scan);
criterion_main!(benches);
