//! Key extraction: which arguments of a request are keys, and how each one is
//! accessed.
//!
//! This follows Redis's own key-spec walk (`getKeysUsingKeySpecs` in
//! `src/db.c`), in its "return partial" mode: a spec that cannot be resolved
//! is skipped and reported through [`Extraction::Incomplete`] instead of
//! discarding what the other specs found. Where Redis 7's metadata cannot
//! describe a command's keys (SORT's `STORE`, MIGRATE's `KEYS`) or its key
//! flags (SET, BITFIELD), the command is parsed the way Redis's own code
//! parses it.
//!
//! Nothing here trusts the request: counts are bounds-checked against the
//! argument list, so malformed input yields fewer keys, never a panic or a
//! huge loop.

use super::spec::{BeginSearch, CommandSpec, FindKeys, KeySpec, flag, key_flag};

/// Whether a key extraction reported every key the command may touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extraction {
    /// Every key the command can access was reported.
    Complete,
    /// The command may access keys that were not reported: a key spec Redis
    /// itself cannot resolve (SORT `BY`/`GET` patterns, whose key names come
    /// from the data), or arguments too malformed to locate the keys (Redis
    /// will normally reject such a request). Callers should treat the request
    /// as touching unknown keys.
    Incomplete,
}

impl Extraction {
    /// True for [`Extraction::Complete`].
    #[inline]
    #[must_use]
    pub const fn is_complete(self) -> bool {
        matches!(self, Self::Complete)
    }
}

/// Pushes `(argument index, key_flag::* bits)` for every key in `args` onto
/// `out`, and says whether that is all of them.
///
/// `args` is the whole request, command name at index 0 (and subcommand name
/// at index 1); `spec` should come from [`super::resolve`] for those same
/// arguments, since subcommands carry their own key specs. Keys are pushed in
/// key-spec order, not sorted and not deduplicated. `out` is appended to, not
/// cleared, and is the only thing that allocates.
///
/// Arity is not checked (see [`CommandSpec::arity_ok`]): a request Redis
/// will reject for its arity may still report the keys it names.
///
/// Arguments Redis marks `not_key` (the channel of SPUBLISH and friends) are
/// not reported, as in `COMMAND GETKEYS`. Keys a script or function touches
/// without declaring them are outside what any key spec can know; decide on
/// those from [`flag::SCRIPTING`].
pub fn key_positions<A: AsRef<[u8]>>(
    spec: &CommandSpec,
    args: &[A],
    out: &mut Vec<(usize, u16)>,
) -> Extraction {
    extract(spec, args, &mut |pos, flags| out.push((pos, flags)))
}

/// True when [`key_positions`] would return [`Extraction::Incomplete`] for
/// these arguments, i.e. the request may touch keys that cannot be named.
#[must_use]
pub fn has_unknown_keys<A: AsRef<[u8]>>(spec: &CommandSpec, args: &[A]) -> bool {
    !extract(spec, args, &mut |_, _| {}).is_complete()
}

fn extract<A: AsRef<[u8]>>(
    spec: &CommandSpec,
    args: &[A],
    sink: &mut dyn FnMut(usize, u16),
) -> Extraction {
    // Every command whose specs cannot be resolved from the metadata alone is
    // flagged movablekeys, so plain commands skip the name comparisons.
    if spec.flags & flag::MOVABLE_KEYS != 0 {
        match spec.name {
            "sort" => return sort_keys(args, false, sink),
            "sort_ro" => return sort_keys(args, true, sink),
            "migrate" => return migrate_keys(args, sink),
            _ => {}
        }
    }

    let mut complete = true;
    for ks in spec.key_specs {
        if ks.flags & key_flag::NOT_KEY != 0 {
            continue;
        }
        let flags = if ks.flags & key_flag::VARIABLE_FLAGS != 0 {
            variable_flags(spec.name, ks.flags, args)
        } else {
            ks.flags
        };
        if !walk_spec(ks, flags, args, sink) || ks.flags & key_flag::INCOMPLETE != 0 {
            complete = false;
        }
    }
    if complete {
        Extraction::Complete
    } else {
        Extraction::Incomplete
    }
}

/// Applies one key spec; false when it cannot be resolved for these
/// arguments (unknown spec type, malformed or out-of-range key count).
fn walk_spec<A: AsRef<[u8]>>(
    ks: &KeySpec,
    flags: u16,
    args: &[A],
    sink: &mut dyn FnMut(usize, u16),
) -> bool {
    // i64 throughout: every spec field is an i32 and argc is bounded by
    // memory, so sums of two never overflow; only the client-supplied key
    // count needs saturating arithmetic.
    let argc = i64::try_from(args.len()).unwrap_or(i64::MAX);

    let begin = match ks.begin {
        BeginSearch::Index(pos) => i64::from(pos),
        BeginSearch::Keyword {
            keyword,
            start_from,
        } => match find_keyword(args, argc, keyword, start_from) {
            Some(at) => at + 1,
            // An absent optional keyword (no STORE in GEORADIUS) just means
            // this spec has no keys in this request.
            None => return true,
        },
        BeginSearch::Unknown => return false,
    };

    let (first, last, step) = match ks.find {
        FindKeys::Range {
            last_key,
            step,
            limit,
        } => {
            let last = if last_key >= 0 {
                begin + i64::from(last_key)
            } else if limit <= 1 {
                argc + i64::from(last_key)
            } else {
                // Only the first 1/limit of what follows are keys (XREAD's
                // STREAMS k1 k2 id1 id2). Truncating division, as in C.
                begin + ((argc - begin) / i64::from(limit) + i64::from(last_key))
            };
            if last_key < 0 && last == begin - 1 {
                // An open-ended range that happens to be empty (PFMERGE dest
                // with no sources). Redis calls this an invalid spec and
                // COMMAND GETKEYS then reports no keys at all, yet PFMERGE
                // still writes dest; there is simply nothing more to find.
                return true;
            }
            (begin, last, i64::from(step))
        }
        FindKeys::KeyNum {
            key_num_idx,
            first_key,
            step,
        } => {
            // Redis checks `keynumidx >= argc` rather than the absolute
            // index; check what is actually read.
            let idx = begin + i64::from(key_num_idx);
            let Some(count) = usize::try_from(idx).ok().and_then(|i| args.get(i)) else {
                return false;
            };
            let Some(numkeys) = parse_ll(count.as_ref()).filter(|&n| n >= 0) else {
                return false;
            };
            if numkeys == 0 {
                // EVAL/FCALL with no keys is legitimate; for the commands that
                // need at least one, Redis rejects the request.
                return true;
            }
            let first = begin + i64::from(first_key);
            (first, first.saturating_add(numkeys - 1), i64::from(step))
        }
        FindKeys::Unknown => return false,
    };

    // Index 0 is the command name; anything past the end means the request
    // is malformed (Redis answers it with an error).
    if first < 1 || last >= argc || last < first || step < 1 {
        return false;
    }
    let mut i = first;
    while i <= last {
        // In range by the check above; the conversion cannot fail.
        if let Ok(pos) = usize::try_from(i) {
            sink(pos, flags);
        }
        i += step;
    }
    true
}

/// Redis's keyword search: forward from `start_from` up to (not including)
/// the last argument, or, for `start_from <= 0`, backward from
/// `argc + start_from` down to (not including) index 1. The excluded ends are
/// where no key could follow / no option could precede, and Redis skips them
/// too.
fn find_keyword<A: AsRef<[u8]>>(
    args: &[A],
    argc: i64,
    keyword: &str,
    start_from: i32,
) -> Option<i64> {
    let (start, end) = if start_from > 0 {
        (i64::from(start_from), argc - 1)
    } else {
        (argc + i64::from(start_from), 1)
    };
    let forward = start <= end;
    let mut i = start;
    while i != end {
        if i >= argc || i < 1 {
            break;
        }
        let arg = usize::try_from(i).ok().and_then(|i| args.get(i))?;
        if arg.as_ref().eq_ignore_ascii_case(keyword.as_bytes()) {
            return Some(i);
        }
        i = if forward { i + 1 } else { i - 1 };
    }
    None
}

/// Parses an integer the way Redis's `string2ll` does: optional `-`, no `+`,
/// no leading zeros, no spaces, no overflow. Anything else is not a count.
fn parse_ll(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s {
        [b'0'] => return Some(0),
        [b'-', rest @ ..] => (true, rest),
        _ => (false, s),
    };
    match digits.first() {
        Some(b'1'..=b'9') => {}
        _ => return None,
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        let d = i64::from(d - b'0');
        // Accumulate negatively so i64::MIN parses too.
        n = n.checked_mul(10)?.checked_sub(d)?;
    }
    if neg { Some(n) } else { n.checked_neg() }
}

fn eq(arg: &impl AsRef<[u8]>, word: &str) -> bool {
    arg.as_ref().eq_ignore_ascii_case(word.as_bytes())
}

/// SET and BITFIELD declare `variable_flags`: whether the key is read depends
/// on the options. Resolved as Redis's `setGetKeys` / `bitfieldGetKeys` do.
fn variable_flags<A: AsRef<[u8]>>(name: &str, declared: u16, args: &[A]) -> u16 {
    match name {
        "set" => {
            if args.iter().skip(3).any(|a| eq(a, "get")) {
                key_flag::RW | key_flag::ACCESS | key_flag::UPDATE
            } else {
                key_flag::OW | key_flag::UPDATE
            }
        }
        "bitfield" => {
            let mut readonly = true;
            let mut i = 2;
            while let Some(arg) = args.get(i) {
                let remaining = args.len() - i - 1;
                if eq(arg, "get") && remaining >= 2 {
                    i += 2;
                } else if (eq(arg, "set") || eq(arg, "incrby")) && remaining >= 3 {
                    readonly = false;
                    break;
                } else if eq(arg, "overflow") && remaining >= 1 {
                    i += 1;
                } else {
                    // A syntax error: assume the worst, as Redis does.
                    readonly = false;
                    break;
                }
                i += 1;
            }
            if readonly {
                key_flag::RO | key_flag::ACCESS
            } else {
                key_flag::RW | key_flag::ACCESS | key_flag::UPDATE
            }
        }
        // A command Redis has since taught to vary its flags: keep the declared
        // (worst-case) flags, VARIABLE_FLAGS included, so callers can tell.
        _ => declared,
    }
}

/// `SORT key [BY pattern] [LIMIT off count] [GET pattern ...] [ASC|DESC]
/// [ALPHA] [STORE dest]`, parsed like Redis's `sortCommand` (not like the
/// looser `sortGetKeys`, which can name a different STORE key than the one
/// SORT actually writes).
///
/// BY/GET patterns containing `*` make SORT read keys named after the sorted
/// elements, which no one can know in advance: Incomplete. Patterns without
/// `*` (`BY nosort`, `GET #`) read nothing.
fn sort_keys<A: AsRef<[u8]>>(
    args: &[A],
    readonly: bool,
    sink: &mut dyn FnMut(usize, u16),
) -> Extraction {
    if args.len() < 2 {
        return Extraction::Complete;
    }
    sink(1, key_flag::RO | key_flag::ACCESS);

    let mut complete = true;
    let mut store = None;
    let mut j = 2;
    while let Some(arg) = args.get(j) {
        let left = args.len() - j - 1;
        if eq(arg, "asc") || eq(arg, "desc") || eq(arg, "alpha") {
        } else if eq(arg, "limit") && left >= 2 {
            j += 2;
        } else if !readonly && eq(arg, "store") && left >= 1 {
            // The last STORE wins, as in SORT itself.
            store = Some(j + 1);
            j += 1;
        } else if (eq(arg, "by") || eq(arg, "get")) && left >= 1 {
            if args.get(j + 1).is_some_and(|p| p.as_ref().contains(&b'*')) {
                complete = false;
            }
            j += 1;
        } else {
            // Syntax error: SORT replies with an error and touches nothing.
            break;
        }
        j += 1;
    }
    if let Some(dest) = store {
        sink(dest, key_flag::OW | key_flag::UPDATE);
    }
    if complete {
        Extraction::Complete
    } else {
        Extraction::Incomplete
    }
}

/// `MIGRATE host port key|"" db timeout [COPY] [REPLACE] [AUTH pw]
/// [AUTH2 user pw] [KEYS key ...]`, parsed like Redis's `migrateCommand`.
/// Redis marks the KEYS spec incomplete because a password could read
/// "KEYS"; walking the options in order settles it.
fn migrate_keys<A: AsRef<[u8]>>(args: &[A], sink: &mut dyn FnMut(usize, u16)) -> Extraction {
    const FLAGS: u16 = key_flag::RW | key_flag::ACCESS | key_flag::DELETE;
    let argc = args.len();
    if argc < 6 {
        // Below MIGRATE's arity: rejected before it runs.
        return Extraction::Complete;
    }
    let mut j = 6;
    while let Some(arg) = args.get(j) {
        let more = argc - 1 - j;
        if eq(arg, "copy") || eq(arg, "replace") {
        } else if eq(arg, "auth") && more >= 1 {
            j += 1;
        } else if eq(arg, "auth2") && more >= 2 {
            j += 2;
        } else if eq(arg, "keys") {
            // With KEYS, the single-key slot must be empty; otherwise MIGRATE
            // refuses the request and moves nothing.
            if args.get(3).is_some_and(|k| k.as_ref().is_empty()) {
                for pos in j + 1..argc {
                    sink(pos, FLAGS);
                }
            }
            return Extraction::Complete;
        } else {
            // Syntax error: MIGRATE moves nothing. Reporting the single key
            // anyway errs on the side of invalidating too much.
            break;
        }
        j += 1;
    }
    sink(3, FLAGS);
    Extraction::Complete
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
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
            arity: -1,
            flags: 0,
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
}
