//! Redis command metadata: the command table (name → arity, flags and key
//! positions, generated from a real redis-server), command lookup, and key
//! extraction from a request's arguments.
//!
//! Everything here is on the request hot path: [`lookup`], [`resolve`] and
//! [`keys::key_positions`] do not allocate (the latter only pushes into the
//! caller's buffer) and never panic, whatever the client sends.

mod idset;
pub mod keys;
pub mod spec;
mod table;

pub use idset::IdSet;
pub use spec::{BeginSearch, CommandSpec, FindKeys, KeySpec, acl, flag, key_flag};
pub use table::COUNT;

/// Longest name [`lookup`] accepts. The longest name Redis 7 has is
/// `cluster|count-failure-reports` (29 bytes); anything longer cannot match,
/// so it is rejected before it is copied.
const MAX_NAME_LEN: usize = 32;

/// Every top-level command, sorted by name, each with its subcommands.
#[inline]
#[must_use]
pub fn all() -> &'static [CommandSpec] {
    table::COMMANDS
}

/// Every command and every subcommand (containers before their
/// subcommands).
pub fn every() -> impl Iterator<Item = &'static CommandSpec> {
    table::COMMANDS
        .iter()
        .flat_map(|c| std::iter::once(c).chain(c.subcommands.iter()))
}

/// Finds a command by name, ignoring ASCII case.
///
/// `name` is a top-level command (`b"GET"`) or a full subcommand name
/// (`b"client|setname"`). Names longer than 32 bytes are never commands and
/// yield `None`.
#[must_use]
pub fn lookup(name: &[u8]) -> Option<&'static CommandSpec> {
    let mut buf = [0u8; MAX_NAME_LEN];
    let lower = lowercase(name, &mut buf)?;
    match lower.iter().position(|&b| b == b'|') {
        None => find_top(lower),
        Some(bar) => {
            let (container, rest) = lower.split_at(bar);
            // `rest` starts with the '|'.
            find_sub(find_top(container)?, rest.get(1..)?)
        }
    }
}

/// Finds the spec that governs a whole request (`args[0]` is the command
/// name).
///
/// For a container command whose `args[1]` names one of its subcommands, that
/// subcommand's spec (`CLIENT SETNAME x` → `client|setname`); otherwise the
/// command's own spec, including for an unknown or missing subcommand (Redis
/// will reject those itself). `None` for empty `args` or an unknown command.
#[must_use]
pub fn resolve<A: AsRef<[u8]>>(args: &[A]) -> Option<&'static CommandSpec> {
    // A client's `CONFIG|GET` is one unknown word to Redis, not a subcommand.
    let mut buf = [0u8; MAX_NAME_LEN];
    let cmd = find_top(lowercase(args.first()?.as_ref(), &mut buf)?)?;
    if cmd.subcommands.is_empty() {
        return Some(cmd);
    }
    let Some(sub) = args.get(1) else {
        return Some(cmd);
    };
    let mut buf = [0u8; MAX_NAME_LEN];
    let found = lowercase(sub.as_ref(), &mut buf).and_then(|sub| find_sub(cmd, sub));
    Some(found.unwrap_or(cmd))
}

/// ASCII-lower-cases `name` into `buf`; `None` if it does not fit.
#[inline]
fn lowercase<'b>(name: &[u8], buf: &'b mut [u8; MAX_NAME_LEN]) -> Option<&'b [u8]> {
    let out = buf.get_mut(..name.len())?;
    for (o, &b) in out.iter_mut().zip(name) {
        *o = b.to_ascii_lowercase();
    }
    Some(out)
}

fn find_top(lower: &[u8]) -> Option<&'static CommandSpec> {
    // A hash map rather than a binary search: every request looks its
    // command up, and ~8 string comparisons cost more than one hash.
    static BY_NAME: std::sync::OnceLock<
        std::collections::HashMap<&'static [u8], &'static CommandSpec, foldhash::fast::FixedState>,
    > = std::sync::OnceLock::new();
    BY_NAME
        .get_or_init(|| {
            table::COMMANDS
                .iter()
                .map(|c| (c.name.as_bytes(), c))
                .collect()
        })
        .get(lower)
        .copied()
}

/// Subcommands are named `container|sub` and all share the container's
/// prefix, so ordering by the part after the `|` is the table's order.
fn find_sub(container: &'static CommandSpec, lower_sub: &[u8]) -> Option<&'static CommandSpec> {
    let subs = container.subcommands;
    let i = subs
        .binary_search_by(|c| sub_name(c.name).cmp(lower_sub))
        .ok()?;
    subs.get(i)
}

#[inline]
fn sub_name(full: &str) -> &[u8] {
    full.split_once('|').map_or(full, |(_, sub)| sub).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_unique_and_lower_case() {
        let names: Vec<&str> = all().iter().map(|c| c.name).collect();
        assert!(
            names.windows(2).all(|w| w[0] < w[1]),
            "top level not sorted"
        );
        for cmd in all() {
            assert_eq!(cmd.name, cmd.name.to_ascii_lowercase());
            assert!(!cmd.name.contains('|'), "{}", cmd.name);
            assert!(
                cmd.subcommands.windows(2).all(|w| w[0].name < w[1].name),
                "{} subcommands not sorted",
                cmd.name
            );
            for sub in cmd.subcommands {
                let (container, rest) = sub.name.split_once('|').expect("sub name has '|'");
                assert_eq!(container, cmd.name);
                assert!(!rest.is_empty() && !rest.contains('|'), "{}", sub.name);
                assert!(sub.subcommands.is_empty(), "{} nests deeper", sub.name);
            }
        }
    }

    #[test]
    fn every_table_name_fits_the_lookup_buffer_and_is_found() {
        for cmd in all() {
            assert!(cmd.name.len() <= MAX_NAME_LEN, "{}", cmd.name);
            assert_eq!(lookup(cmd.name.as_bytes()), Some(cmd));
            assert_eq!(lookup(cmd.name.to_ascii_uppercase().as_bytes()), Some(cmd));
            for sub in cmd.subcommands {
                assert!(sub.name.len() <= MAX_NAME_LEN, "{}", sub.name);
                assert_eq!(lookup(sub.name.as_bytes()), Some(sub));
                assert_eq!(lookup(sub.name.to_ascii_uppercase().as_bytes()), Some(sub));
            }
        }
    }

    #[test]
    fn modifies_keys_covers_writes_scripts_and_pfcount_but_not_reads() {
        let modifies = |name: &str| lookup(name.as_bytes()).expect(name).modifies_keys();
        for name in ["set", "del", "lpush", "eval", "fcall", "pfcount", "pfadd"] {
            assert!(modifies(name), "{name}");
        }
        for name in ["get", "hgetall", "mget", "eval_ro", "fcall_ro", "ping"] {
            assert!(!modifies(name), "{name}");
        }
    }

    #[test]
    fn cacheable_commands_are_single_key_reads() {
        let cacheable: Vec<&CommandSpec> = all()
            .iter()
            .chain(all().iter().flat_map(|c| c.subcommands))
            .filter(|c| c.has(flag::CACHEABLE))
            .collect();
        assert!(cacheable.len() > 30, "{}", cacheable.len());
        for spec in cacheable {
            assert!(spec.has(flag::READONLY), "{}", spec.name);
            assert!(!spec.modifies_keys(), "{}", spec.name);
            let [key] = spec.key_specs else {
                panic!("{} has {} key specs", spec.name, spec.key_specs.len());
            };
            assert_eq!(key.begin, BeginSearch::Index(1), "{}", spec.name);
            // EXISTS takes many keys; the request path caches it with one.
            let last = if spec.name == "exists" { -1 } else { 0 };
            assert!(
                matches!(key.find, FindKeys::Range { last_key, .. } if last_key == last),
                "{}",
                spec.name
            );
        }
        for name in ["ttl", "pttl", "mget", "set", "randomkey", "eval_ro"] {
            assert!(
                !lookup(name.as_bytes()).expect(name).has(flag::CACHEABLE),
                "{name}"
            );
        }
    }

    #[test]
    fn lookup_ignores_case_and_rejects_unknown_names() {
        let get = lookup(b"gEt").expect("GET");
        assert_eq!(get.name, "get");
        assert!(get.has(flag::READONLY | flag::FAST));
        assert_eq!(
            lookup(b"CLIENT|SetName").map(|c| c.name),
            Some("client|setname")
        );
        for name in [
            &b""[..],
            b"nosuchcommand",
            b"|",
            b"client|",
            b"|setname",
            b"client|nosuch",
            b"get|x",
            b"client|setname|x",
            b"ge",
            b"gett",
            b"\xff\xfe",
            &[b'a'; 33],
            &[b'g'; 4096],
        ] {
            assert_eq!(lookup(name), None, "{:?}", String::from_utf8_lossy(name));
        }
    }

    #[test]
    fn resolve_picks_the_subcommand_when_args_name_one() {
        let name = |args: &[&[u8]]| resolve(args).map(|c| c.name);
        assert_eq!(name(&[b"CLIENT", b"SETNAME", b"x"]), Some("client|setname"));
        assert_eq!(
            name(&[b"object", b"Encoding", b"k"]),
            Some("object|encoding")
        );
        assert_eq!(name(&[b"CLIENT"]), Some("client"));
        assert_eq!(name(&[b"CLIENT", b"nosuch"]), Some("client"));
        assert_eq!(name(&[b"CLIENT", &[b'x'; 100]]), Some("client"));
        // A plain command's second argument is data, never a subcommand.
        assert_eq!(name(&[b"GET", b"setname"]), Some("get"));
        assert_eq!(name(&[b"nosuch", b"x"]), None);
        // A subcommand's full name, sent as one word, is no command to Redis.
        assert_eq!(name(&[b"CONFIG|GET", b"x"]), None);
        assert_eq!(name(&[]), None);
    }

    #[test]
    fn resolve_accepts_owned_and_borrowed_arguments() {
        let owned = vec![
            bytes::Bytes::from_static(b"config"),
            bytes::Bytes::from("get"),
        ];
        assert_eq!(resolve(&owned).map(|c| c.name), Some("config|get"));
        let strs = ["XINFO", "STREAM", "s"];
        assert_eq!(resolve(&strs).map(|c| c.name), Some("xinfo|stream"));
    }

    #[test]
    fn flags_carry_acl_categories_and_no_keys() {
        let spec = |n: &str| lookup(n.as_bytes()).expect(n);
        assert!(spec("multi").has(flag::TRANSACTION | flag::NO_KEYS));
        assert!(spec("exec").has(flag::TRANSACTION));
        assert!(spec("select").has(flag::CONNECTION));
        assert!(spec("hello").has(flag::CONNECTION | flag::NO_AUTH));
        assert!(spec("eval").has(flag::SCRIPTING | flag::MOVABLE_KEYS));
        assert!(spec("set").has(flag::WRITE | flag::DENYOOM));
        assert!(!spec("set").has(flag::NO_KEYS));
        assert!(spec("blpop").has(flag::BLOCKING));
        assert!(spec("subscribe").has(flag::PUBSUB));
        // A command has NO_KEYS exactly when it has no key specs at all.
        for cmd in all().iter().chain(all().iter().flat_map(|c| c.subcommands)) {
            assert_eq!(
                cmd.has(flag::NO_KEYS),
                cmd.key_specs.is_empty(),
                "{}",
                cmd.name
            );
        }
    }
}
