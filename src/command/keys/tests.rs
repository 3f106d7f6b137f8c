//! Key extraction checked case by case (the integration test compares the
//! whole table with Redis's `COMMAND GETKEYS`).

#![allow(clippy::unwrap_used)]

use super::super::{lookup, resolve};
use super::*;
use key_flag::{ACCESS, DELETE, INSERT, OW, RO, RW, UPDATE};

/// Splits on spaces; `""` stands for an empty argument.
fn argv(line: &str) -> Vec<Vec<u8>> {
    line.split(' ')
        .map(|a| {
            if a == "\"\"" {
                Vec::new()
            } else {
                a.as_bytes().to_vec()
            }
        })
        .collect()
}

/// Resolves the command and returns (positions, flags, complete).
fn run(line: &str) -> (Vec<usize>, Vec<u16>, bool) {
    let args = argv(line);
    let spec = resolve(&args).unwrap_or_else(|| panic!("unknown command in {line:?}"));
    let mut out = Vec::new();
    let ext = key_positions(spec, &args, &mut out);
    assert_eq!(has_unknown_keys(spec, &args), !ext.is_complete());
    (
        out.iter().map(|&(p, _)| p).collect(),
        out.iter().map(|&(_, f)| f).collect(),
        ext.is_complete(),
    )
}

fn pos(line: &str) -> Vec<usize> {
    let (p, _, complete) = run(line);
    assert!(complete, "{line:?} should be complete");
    p
}

#[test]
fn single_key_at_fixed_index() {
    assert_eq!(run("GET k"), (vec![1], vec![RO | ACCESS], true));
    assert_eq!(pos("OBJECT ENCODING k"), [2]);
    assert_eq!(pos("XINFO STREAM s FULL"), [2]);
    assert_eq!(pos("MEMORY USAGE k SAMPLES 5"), [2]);
}

#[test]
fn two_fixed_keys_keep_their_own_flags() {
    let (p, f, c) = run("LMOVE src dst LEFT RIGHT");
    assert_eq!((p, c), (vec![1, 2], true));
    assert_eq!(f, [RW | ACCESS | DELETE, RW | INSERT]);
    assert_eq!(pos("RENAME a b"), [1, 2]);
    assert_eq!(pos("BLMOVE a b LEFT LEFT 0"), [1, 2]);
    assert_eq!(pos("SMOVE a b m"), [1, 2]);
    assert_eq!(pos("COPY a b REPLACE"), [1, 2]);
}

#[test]
fn open_ended_ranges_run_to_the_last_or_second_to_last_argument() {
    assert_eq!(pos("MGET a b c"), [1, 2, 3]);
    assert_eq!(pos("DEL a"), [1]);
    assert_eq!(pos("BLPOP a b c 0"), [1, 2, 3]);
    assert_eq!(pos("PFMERGE d a b"), [1, 2, 3]);
    assert_eq!(pos("BITOP AND d a b"), [2, 3, 4]);
    // An empty optional tail is complete, not malformed.
    assert_eq!(pos("PFMERGE d"), [1]);
    // A range starting past the end is malformed.
    static PAST_END: &[KeySpec] = &[KeySpec {
        flags: RW,
        begin: BeginSearch::Index(3),
        find: FindKeys::Range {
            last_key: -1,
            step: 1,
            limit: 0,
        },
    }];
    assert_eq!(positions(&synthetic(PAST_END), "C a"), (vec![], false));
}

#[test]
fn stepped_range_skips_values() {
    assert_eq!(pos("MSET a 1 b 2 c 3"), [1, 3, 5]);
    // Odd argument count: Redis rejects MSET; the walk stays in bounds.
    assert_eq!(run("MSET a 1 b").0, [1, 3]);
}

#[test]
fn keynum_counts_are_honoured() {
    assert_eq!(pos("EVAL s 2 a b x y"), [3, 4]);
    assert_eq!(pos("EVALSHA sha 1 a x"), [3]);
    assert_eq!(pos("FCALL f 2 a b x"), [3, 4]);
    assert_eq!(pos("EVAL s 0 x y"), Vec::<usize>::new());
    assert_eq!(pos("ZUNION 2 a b WEIGHTS 1 2"), [2, 3]);
    assert_eq!(pos("ZUNIONSTORE d 2 a b"), [1, 3, 4]);
    assert_eq!(pos("SINTERCARD 2 a b LIMIT 1"), [2, 3]);
    assert_eq!(pos("LMPOP 2 a b LEFT"), [2, 3]);
    assert_eq!(pos("BLMPOP 0 2 a b LEFT"), [3, 4]);
    assert_eq!(pos("ZMPOP 1 a MIN"), [2]);
    assert_eq!(pos("BZMPOP 0 1 a MAX COUNT 2"), [3]);
}

#[test]
fn malformed_key_counts_yield_no_keys_and_incomplete() {
    for line in [
        "EVAL s 999999999 a",
        "EVAL s 9223372036854775807 a",
        "EVAL s 99999999999999999999999 a",
        "EVAL s -1 a",
        "EVAL s -9223372036854775808 a",
        "EVAL s x a",
        "EVAL s +1 a",
        "EVAL s 01 a",
        "EVAL s -0 a",
        "EVAL s 1\u{0} a",
        "EVAL s \"\" a",
        "EVAL s 3 a b",
        "EVAL s",
        "ZUNIONSTORE d 5 a",
        "BLMPOP 0 2 a",
    ] {
        let (p, _, complete) = run(line);
        assert!(!complete, "{line:?}");
        // Only fixed-position keys (ZUNIONSTORE's destination) survive.
        assert!(p.iter().all(|&i| i == 1), "{line:?} gave {p:?}");
    }
}

#[test]
fn parse_ll_matches_string2ll() {
    assert_eq!(parse_ll(b"0"), Some(0));
    assert_eq!(parse_ll(b"7"), Some(7));
    assert_eq!(parse_ll(b"-12"), Some(-12));
    assert_eq!(parse_ll(b"9223372036854775807"), Some(i64::MAX));
    assert_eq!(parse_ll(b"-9223372036854775808"), Some(i64::MIN));
    for bad in [
        &b""[..],
        b"-",
        b"+1",
        b"01",
        b"-0",
        b"00",
        b" 1",
        b"1 ",
        b"1.0",
        b"9223372036854775808",
        b"-9223372036854775809",
    ] {
        assert_eq!(parse_ll(bad), None, "{:?}", String::from_utf8_lossy(bad));
    }
}

#[test]
fn keyword_search_finds_optional_store_keys() {
    assert_eq!(pos("GEORADIUS g 0 0 1 km"), [1]);
    assert_eq!(pos("GEORADIUS g 0 0 1 km STORE d"), [1, 7]);
    assert_eq!(pos("GEORADIUS g 0 0 1 km store d"), [1, 7]);
    assert_eq!(pos("GEORADIUS g 0 0 1 km COUNT 3 STOREDIST d"), [1, 9]);
    assert_eq!(pos("GEORADIUSBYMEMBER g m 1 km STORE d"), [1, 6]);
    // A trailing keyword has no key after it, and Redis does not look there.
    assert_eq!(pos("GEORADIUS g 0 0 1 km STORE"), [1]);
}

#[test]
fn limit_takes_the_first_half_after_streams() {
    assert_eq!(pos("XREAD COUNT 1 STREAMS a b 0 0"), [4, 5]);
    assert_eq!(pos("XREAD STREAMS a 0"), [2]);
    assert_eq!(pos("XREAD BLOCK 0 STREAMS a b c 0 0 0"), [4, 5, 6]);
    assert_eq!(pos("XREADGROUP GROUP g c COUNT 1 STREAMS a b > >"), [7, 8]);
    // The group and consumer precede the search start, so they may be
    // called STREAMS.
    assert_eq!(pos("XREADGROUP GROUP streams streams STREAMS a >"), [5]);
    assert_eq!(run("XREAD STREAMS a").0, Vec::<usize>::new());
}

static BACKWARD: &[KeySpec] = &[KeySpec {
    flags: RW,
    begin: BeginSearch::Keyword {
        keyword: "KEYS",
        start_from: -2,
    },
    find: FindKeys::Range {
        last_key: -1,
        step: 1,
        limit: 0,
    },
}];

fn synthetic(key_specs: &'static [KeySpec]) -> CommandSpec {
    CommandSpec {
        name: "synthetic",
        id: 0,
        arity: -1,
        flags: 0,
        acl: 0,
        key_specs,
        subcommands: &[],
    }
}

fn positions(spec: &CommandSpec, line: &str) -> (Vec<usize>, bool) {
    let args = argv(line);
    let mut out = Vec::new();
    let ext = key_positions(spec, &args, &mut out);
    (out.into_iter().map(|(p, _)| p).collect(), ext.is_complete())
}

#[test]
fn backward_keyword_search_takes_the_last_occurrence() {
    let spec = synthetic(BACKWARD);
    assert_eq!(positions(&spec, "C x KEYS a KEYS b c"), (vec![5, 6], true));
    // Index 1 and the last argument are outside the search.
    assert_eq!(positions(&spec, "C KEYS a"), (vec![], true));
    assert_eq!(positions(&spec, "C a KEYS"), (vec![], true));
    assert_eq!(positions(&spec, "C"), (vec![], true));
    assert_eq!(positions(&spec, "C x keys a"), (vec![3], true));
}

#[test]
fn unknown_and_incomplete_specs_make_the_result_incomplete() {
    static SPECS: &[KeySpec] = &[
        KeySpec {
            flags: RO,
            begin: BeginSearch::Index(1),
            find: FindKeys::Range {
                last_key: 0,
                step: 1,
                limit: 0,
            },
        },
        KeySpec {
            flags: RO,
            begin: BeginSearch::Unknown,
            find: FindKeys::Unknown,
        },
        KeySpec {
            flags: RO | key_flag::INCOMPLETE,
            begin: BeginSearch::Index(2),
            find: FindKeys::Range {
                last_key: 0,
                step: 1,
                limit: 0,
            },
        },
        KeySpec {
            flags: RO,
            begin: BeginSearch::Index(3),
            find: FindKeys::Unknown,
        },
        KeySpec {
            flags: RO,
            begin: BeginSearch::Index(1),
            find: FindKeys::Range {
                last_key: 0,
                step: 0,
                limit: 0,
            },
        },
    ];
    let spec = synthetic(SPECS);
    // The incomplete spec still contributes what it found.
    assert_eq!(positions(&spec, "C a b c"), (vec![1, 2], false));
    assert_eq!(positions(&spec, "C"), (vec![], false));
    assert_eq!(positions(&synthetic(&[]), "C a"), (vec![], true));
}

#[test]
fn not_key_arguments_are_not_reported() {
    assert_eq!(pos("SPUBLISH ch msg"), Vec::<usize>::new());
    assert_eq!(pos("SSUBSCRIBE a b"), Vec::<usize>::new());
    assert_eq!(pos("PUBLISH ch msg"), Vec::<usize>::new());
}

#[test]
fn set_and_bitfield_flags_depend_on_options() {
    assert_eq!(run("SET k v").1, [OW | UPDATE]);
    assert_eq!(run("SET k v EX 10 GET").1, [RW | ACCESS | UPDATE]);
    assert_eq!(run("SET k get").1, [OW | UPDATE]);
    assert_eq!(run("BITFIELD k GET u8 0").1, [RO | ACCESS]);
    assert_eq!(run("BITFIELD k").1, [RO | ACCESS]);
    assert_eq!(
        run("BITFIELD k OVERFLOW SAT GET u8 0 INCRBY u8 0 1").1,
        [RW | ACCESS | UPDATE]
    );
    assert_eq!(run("BITFIELD k GET u8").1, [RW | ACCESS | UPDATE]);
    assert_eq!(run("BITFIELD_RO k GET u8 0").1, [RO | ACCESS]);
}

#[test]
fn sort_reports_store_and_flags_patterns_as_unknown() {
    assert_eq!(run("SORT k"), (vec![1], vec![RO | ACCESS], true));
    assert_eq!(
        run("SORT k LIMIT 0 10 ALPHA DESC STORE d"),
        (vec![1, 8], vec![RO | ACCESS, OW | UPDATE], true)
    );
    assert_eq!(pos("SORT k BY nosort GET # STORE d"), [1, 7]);
    assert_eq!(
        run("SORT k BY w_* STORE d"),
        (vec![1, 5], vec![RO | ACCESS, OW | UPDATE], false)
    );
    assert!(!run("SORT k GET o_*->f").2);
    // The last STORE wins; a STORE key may itself read like an option.
    assert_eq!(pos("SORT k STORE a STORE b"), [1, 5]);
    assert_eq!(pos("SORT k STORE by STORE x"), [1, 5]);
    assert_eq!(pos("SORT k STORE limit"), [1, 3]);
    // Options missing their argument end the parse, as in SORT.
    assert_eq!(pos("SORT k STORE"), [1]);
    assert_eq!(pos("SORT k LIMIT 0"), [1]);
    assert_eq!(pos("SORT k BOGUS STORE d"), [1]);
    // SORT_RO has no STORE.
    assert_eq!(pos("SORT_RO k STORE d"), [1]);
    assert!(!run("SORT_RO k BY w_*").2);
    let sort = lookup(b"sort").unwrap();
    let mut out = Vec::new();
    assert!(key_positions(sort, &[b"SORT"], &mut out).is_complete());
    assert!(out.is_empty());
}

#[test]
fn migrate_reports_the_single_key_or_the_keys_list() {
    let f = RW | ACCESS | DELETE;
    assert_eq!(run("MIGRATE h 1 k 0 5000"), (vec![3], vec![f], true));
    assert_eq!(pos("MIGRATE h 1 k 0 5000 COPY REPLACE"), [3]);
    assert_eq!(pos("MIGRATE h 1 \"\" 0 5000 KEYS a b"), [7, 8]);
    assert_eq!(pos("MIGRATE h 1 \"\" 0 5000 COPY AUTH pw KEYS a"), [10]);
    assert_eq!(pos("MIGRATE h 1 \"\" 0 5000 AUTH2 u pw KEYS a b"), [10, 11]);
    // A password that reads KEYS is a password, not the option.
    assert_eq!(pos("MIGRATE h 1 \"\" 0 5000 AUTH KEYS KEYS a"), [9]);
    assert_eq!(pos("MIGRATE h 1 \"\" 0 5000 AUTH2 KEYS KEYS KEYS a"), [10]);
    // KEYS with a non-empty key slot is refused by MIGRATE.
    assert_eq!(pos("MIGRATE h 1 k 0 5000 KEYS a"), Vec::<usize>::new());
    assert_eq!(pos("MIGRATE h 1 \"\" 0 5000 KEYS"), Vec::<usize>::new());
    assert_eq!(pos("MIGRATE h 1 k"), Vec::<usize>::new());
}

#[test]
fn commands_without_keys_report_none() {
    for line in [
        "PING",
        "PING x",
        "INFO server",
        "CLIENT SETNAME x",
        "FLUSHALL",
        "MULTI",
    ] {
        assert_eq!(pos(line), Vec::<usize>::new(), "{line:?}");
    }
}

#[test]
fn out_is_appended_to_not_cleared() {
    let get = lookup(b"get").unwrap();
    let mut out = vec![(99, 0)];
    let _ = key_positions(get, &[&b"GET"[..], b"k"], &mut out);
    assert_eq!(out, [(99, 0), (1, RO | ACCESS)]);
}

/// Every spec in the table, fed junk of every length, stays in bounds.
#[test]
fn no_spec_panics_or_reports_out_of_range_positions() {
    const WORDS: &[&str] = &[
        "",
        "0",
        "1",
        "2",
        "3",
        "-1",
        "-2",
        "999999999",
        "9223372036854775807",
        "x",
        "KEYS",
        "STREAMS",
        "STORE",
        "STOREDIST",
        "GET",
        "BY",
        "LIMIT",
        "AUTH",
        "AUTH2",
        "COPY",
        "get",
        "set",
        "overflow",
        "*",
    ];
    let mut all: Vec<&CommandSpec> = Vec::new();
    for c in super::super::all() {
        all.push(c);
        all.extend(c.subcommands);
    }
    let mut out = Vec::new();
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    for spec in all {
        for len in 0..12 {
            for _ in 0..40 {
                let mut args: Vec<&str> = Vec::with_capacity(len);
                for _ in 0..len {
                    // xorshift: deterministic, dependency-free variety.
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let pick = usize::try_from(seed % WORDS.len() as u64).unwrap();
                    args.push(WORDS[pick]);
                }
                out.clear();
                let _ = key_positions(spec, &args, &mut out);
                assert!(
                    out.iter().all(|&(p, _)| p >= 1 && p < args.len()),
                    "{} {args:?} -> {out:?}",
                    spec.name
                );
            }
        }
    }
}
