//! Command classification on arbitrary argument lists: `route`, `resolve`,
//! `lookup` and `key_positions`.
//!
//! Input layout: one command per line, arguments separated by single spaces
//! (two spaces make an empty argument), so seeds read like redis-cli input:
//! `MSET a 1 b 2`. Arguments may hold any other byte.
//!
//! Checked: no panic; every key position lies inside argv and is never the
//! command name; `has_unknown_keys` agrees with `key_positions`; a command
//! `resolve` does not know is forwarded; every command routed as blocking is
//! one `may_block` (the input loop's cheaper test) stops at.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use nearcache::command::{self, keys};
use nearcache::server::route::{Route, may_block, route};

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    for line in data.split(|&b| b == b'\n').take(64) {
        let argv: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
        // `route` is only ever called with a non-empty argv (the parser never
        // yields an empty command); `split` always yields at least one item.
        let owned: Vec<Bytes> = argv.iter().map(|a| Bytes::copy_from_slice(a)).collect();
        let r = route(&owned);
        if matches!(r, Route::Blocking | Route::Wait) {
            assert!(
                may_block(argv[0], argv[1..].iter().copied()),
                "routed {r:?} but may_block says no: {:?}",
                String::from_utf8_lossy(line)
            );
        }

        for a in &argv {
            let _ = command::lookup(a);
        }
        let Some(spec) = command::resolve(&argv) else {
            // WAITAOF is newer than the table, and blocks like WAIT.
            let expected = if argv[0].eq_ignore_ascii_case(b"waitaof") {
                Route::Wait
            } else {
                Route::Forward
            };
            assert_eq!(r, expected, "unknown command not forwarded");
            continue;
        };
        out.clear();
        let ext = keys::key_positions(spec, &argv, &mut out);
        for &(pos, _) in &out {
            assert!(
                pos >= 1 && pos < argv.len(),
                "{}: key position {pos} outside argv of {} ({:?})",
                spec.name,
                argv.len(),
                String::from_utf8_lossy(line)
            );
        }
        assert_eq!(
            keys::has_unknown_keys(spec, &argv),
            !ext.is_complete(),
            "{}: has_unknown_keys disagrees with key_positions",
            spec.name
        );
    }
});
