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

/// The argument index of the first key [`key_positions`] would report, if
/// any; allocates nothing.
pub fn first_key<A: AsRef<[u8]>>(spec: &CommandSpec, args: &[A]) -> Option<usize> {
    let mut first = None;
    extract(spec, args, &mut |pos, _| {
        first.get_or_insert(pos);
    });
    first
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
mod tests;
