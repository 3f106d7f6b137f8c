//! Which commands a limit counts: names and classes (`@write`), resolved
//! once against the command table into a bitset of command ids, so that
//! matching a request is one bit test.

use crate::command::{self, CommandSpec, IdSet, acl, flag};

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
pub struct CommandSet(IdSet);

/// Adds every command `pick` chooses.
fn add_where(set: &mut IdSet, pick: impl Fn(&CommandSpec) -> bool) {
    for spec in command::every().filter(|s| pick(s)) {
        set.insert(spec);
    }
}

impl CommandSet {
    /// Resolves `entries` (`KEYS`, `client|list`, `@write`); the error says
    /// which entry is not a command or a class.
    pub fn new(entries: &[String]) -> Result<CommandSet, String> {
        let mut set = IdSet::empty();
        for entry in entries {
            if let Some(class) = entry.strip_prefix('@') {
                let class = class.to_ascii_lowercase();
                if class == "dangerous" {
                    add_where(&mut set, |s| s.acl & acl::DANGEROUS != 0);
                } else if class == "slow" {
                    add_where(&mut set, |s| s.flags & flag::FAST == 0);
                } else if let Some(&(_, f)) = CLASSES.iter().find(|(n, _)| *n == class) {
                    add_where(&mut set, |s| s.flags & f != 0);
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
                Some(spec) => set.insert(spec),
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
        Ok(CommandSet(set))
    }

    /// Whether the command `spec` (None: not in the table) is in the set.
    #[inline]
    pub fn contains(&self, spec: Option<&'static CommandSpec>) -> bool {
        spec.is_some_and(|spec| self.0.contains(spec))
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
