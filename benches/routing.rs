//! Classification micro-benchmarks: `route` (every command goes through it),
//! key extraction, and the permission check of a user (`[[users]]`), on the
//! commands `scripts/bench.sh` drives.
//!
//! Run: `cargo bench --bench routing` (add `-- --quick` for a short run).

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use nearcache::command::{self, keys::key_positions};
use nearcache::server::route::route;

fn argv(args: &[&str]) -> Vec<Bytes> {
    args.iter()
        .map(|a| Bytes::copy_from_slice(a.as_bytes()))
        .collect()
}

fn routing(c: &mut Criterion) {
    let mut g = c.benchmark_group("route");
    for (name, args) in [
        ("get", argv(&["GET", "key:000000012345"])),
        ("set", argv(&["SET", "key:000000012345", "value"])),
        // A container command: resolved to its subcommand, then routed to
        // the proxy's own handler.
        ("client_setname", argv(&["CLIENT", "SETNAME", "worker-1"])),
    ] {
        g.bench_function(name, |b| b.iter(|| route(black_box(&args))));
    }
    g.finish();
}

fn keys(c: &mut Criterion) {
    let mut g = c.benchmark_group("keys");
    let mut mset = vec!["MSET".to_owned()];
    for i in 0..10 {
        mset.push(format!("key:{i:012}"));
        mset.push(format!("value-{i}"));
    }
    let args: Vec<Bytes> = mset.iter().map(|a| Bytes::from(a.clone())).collect();
    let Some(spec) = command::resolve(&args) else {
        panic!("MSET missing from the command table");
    };
    let mut out = Vec::with_capacity(16);
    g.bench_function("mset_10_keys", |b| {
        b.iter(|| {
            out.clear();
            key_positions(spec, black_box(&args), &mut out)
        })
    });
    g.bench_function("mset_10_keys_with_resolve", |b| {
        b.iter(|| {
            out.clear();
            let spec = command::resolve(black_box(&args))?;
            Some(key_positions(spec, &args, &mut out))
        })
    });
    g.finish();
}

/// What admission adds for a user with a dozen key patterns, the one that
/// matches last (the worst case short of a refusal).
fn acl(c: &mut Criterion) {
    let mut g = c.benchmark_group("acl");
    let keys: String = [
        "ticker", "book", "candles", "signal", "orders", "fills", "pos", "risk", "funding", "oi",
        "liq",
    ]
    .iter()
    .map(|p| format!("%R~{p}:* "))
    .chain(["~key:*".to_owned()])
    .collect();
    let Ok(user) = nearcache::acl::Permissions::parse("+@all -@dangerous", &keys, "") else {
        panic!("the bench's rules parse");
    };
    let mut scratch = Vec::with_capacity(16);
    for (name, args) in [
        ("get_12_patterns", argv(&["GET", "key:000000012345"])),
        (
            "set_12_patterns",
            argv(&["SET", "key:000000012345", "value"]),
        ),
    ] {
        let (_, spec) = nearcache::server::route::route_spec(&args);
        g.bench_function(name, |b| {
            b.iter(|| user.check(black_box(spec), black_box(&args), &mut scratch))
        });
    }
    g.finish();
}

criterion_group!(benches, routing, keys, acl);
criterion_main!(benches);
