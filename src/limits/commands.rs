//! Which commands a limit counts: names and classes (`@write`), resolved
//! once against the command table so that matching a request is a flag test
//! and, for names, one set lookup.

use std::collections::HashSet;

use crate::command::{self, CommandSpec, flag};

/// Redis 7's `@dangerous` ACL category (`ACL CAT dangerous`), by the
/// command table's full names.
const DANGEROUS: &[&str] = &[
    "acl|deluser",
    "acl|dryrun",
    "acl|getuser",
    "acl|list",
    "acl|load",
    "acl|log",
    "acl|save",
    "acl|setuser",
    "acl|users",
    "bgrewriteaof",
    "bgsave",
    "client|kill",
    "client|list",
    "client|no-evict",
    "client|pause",
    "client|unblock",
    "client|unpause",
    "cluster|addslots",
    "cluster|addslotsrange",
    "cluster|bumpepoch",
    "cluster|count-failure-reports",
    "cluster|delslots",
    "cluster|delslotsrange",
    "cluster|failover",
    "cluster|flushslots",
    "cluster|forget",
    "cluster|meet",
    "cluster|replicas",
    "cluster|replicate",
    "cluster|reset",
    "cluster|saveconfig",
    "cluster|set-config-epoch",
    "cluster|setslot",
    "cluster|slaves",
    "config|get",
    "config|resetstat",
    "config|rewrite",
    "config|set",
    "debug",
    "failover",
    "flushall",
    "flushdb",
    "info",
    "keys",
    "lastsave",
    "latency|doctor",
    "latency|graph",
    "latency|histogram",
    "latency|history",
    "latency|latest",
    "latency|reset",
    "migrate",
    "module|list",
    "module|load",
    "module|loadex",
    "module|unload",
    "monitor",
    "pfdebug",
    "pfselftest",
    "psync",
    "replconf",
    "replicaof",
    "restore",
    "restore-asking",
    "role",
    "save",
    "shutdown",
    "slaveof",
    "slowlog|get",
    "slowlog|len",
    "slowlog|reset",
    "sort",
    "sort_ro",
    "swapdb",
    "sync",
];

/// The classes a limit may name, and the command-table flags behind each.
const CLASSES: &[(&str, u32)] = &[
    ("read", flag::READONLY),
    ("write", flag::WRITE),
    ("admin", flag::ADMIN),
    ("blocking", flag::BLOCKING),
    ("pubsub", flag::PUBSUB),
    ("scripting", flag::SCRIPTING),
    ("transaction", flag::TRANSACTION),
    ("connection", flag::CONNECTION),
    ("fast", flag::FAST),
];

/// A set of commands.
#[derive(Debug, Default)]
pub struct CommandSet {
    /// Any of these flags.
    flags: u32,
    /// `@slow`: commands without `fast`.
    slow: bool,
    /// Commands by their entry's address in the (static) table.
    named: HashSet<usize>,
}

fn address(spec: &'static CommandSpec) -> usize {
    std::ptr::from_ref(spec) as usize
}

impl CommandSet {
    /// Resolves `entries` (`KEYS`, `client|list`, `@write`); the error says
    /// which entry is not a command or a class.
    pub fn new(entries: &[String]) -> Result<CommandSet, String> {
        let mut set = CommandSet::default();
        for entry in entries {
            if let Some(class) = entry.strip_prefix('@') {
                let class = class.to_ascii_lowercase();
                if class == "dangerous" {
                    for name in DANGEROUS {
                        // (A name this table lacks is a command Redis 7.0 lacks.)
                        if let Some(spec) = command::lookup(name.as_bytes()) {
                            set.named.insert(address(spec));
                        }
                    }
                } else if class == "slow" {
                    set.slow = true;
                } else if let Some((_, f)) = CLASSES.iter().find(|(n, _)| *n == class) {
                    set.flags |= f;
                } else {
                    let known: Vec<&str> = CLASSES.iter().map(|(n, _)| *n).collect();
                    return Err(format!(
                        "'{entry}' is not a class (use @{}, @slow or @dangerous)",
                        known.join(", @")
                    ));
                }
                continue;
            }
            match command::lookup(entry.as_bytes()) {
                Some(spec) => {
                    set.named.insert(address(spec));
                }
                None if CLASSES.iter().any(|(n, _)| entry.eq_ignore_ascii_case(n))
                    || entry.eq_ignore_ascii_case("dangerous") =>
                {
                    return Err(format!(
                        "'{entry}' is not a command; a class is written '@{entry}'"
                    ));
                }
                None => return Err(format!("'{entry}' is not a command Redis knows")),
            }
        }
        Ok(set)
    }

    /// Whether the command `spec` (None: not in the table) is in the set.
    #[inline]
    pub fn contains(&self, spec: Option<&'static CommandSpec>) -> bool {
        let Some(spec) = spec else { return false };
        spec.flags & self.flags != 0
            || (self.slow && spec.flags & flag::FAST == 0)
            || (!self.named.is_empty() && self.named.contains(&address(spec)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn set(entries: &[&str]) -> CommandSet {
        CommandSet::new(&entries.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn has(set: &CommandSet, name: &str) -> bool {
        set.contains(command::lookup(name.as_bytes()))
    }

    #[test]
    fn classes_and_names_resolve_against_the_table() {
        let writes = set(&["@write"]);
        assert!(has(&writes, "set") && has(&writes, "del"));
        assert!(!has(&writes, "get"));
        let heavy = set(&["KEYS", "scan", "HGETALL"]);
        assert!(has(&heavy, "keys") && has(&heavy, "hgetall") && !has(&heavy, "get"));
        let dangerous = set(&["@dangerous"]);
        assert!(has(&dangerous, "flushall") && has(&dangerous, "keys"));
        assert!(has(&dangerous, "client|kill") && !has(&dangerous, "client|setname"));
        assert!(!has(&dangerous, "get"));
        let slow = set(&["@slow"]);
        assert!(has(&slow, "keys") && !has(&slow, "get"));
        assert!(
            !set(&["@read"]).contains(None),
            "unknown commands are in no class"
        );
    }

    #[test]
    fn a_bad_entry_is_named() {
        let err = |e: &str| CommandSet::new(&[e.to_string()]).unwrap_err();
        assert!(
            err("read").contains("a class is written '@read'"),
            "{}",
            err("read")
        );
        assert!(err("@reads").contains("'@reads' is not a class"));
        assert!(err("NOSUCH").contains("'NOSUCH' is not a command"));
    }
}
