//! What one user may run: commands, keys and channels, parsed once from a
//! subset of Redis's ACL syntax into sets that a request is checked against
//! with bit tests and glob matches, allocating nothing.

use bytes::Bytes;

use crate::command::{self, CommandSpec, IdSet, key_flag, keys};
use crate::glob;

/// Why a command was refused, worded as Redis 7 words it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// The command (or subcommand) is not allowed.
    Command,
    /// One of its keys is outside the user's key patterns.
    Key,
    /// One of its channels is outside the user's channel patterns.
    Channel,
}

/// A key pattern and what it allows.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeyPattern {
    glob: Vec<u8>,
    /// What every match starts with, and whether the glob is just that
    /// followed by `*` (`ticker:*`, the usual case): then a prefix test is
    /// the whole match, and a key with another prefix is refused at once.
    prefix: Vec<u8>,
    prefix_only: bool,
    read: bool,
    write: bool,
}

impl KeyPattern {
    fn new(glob: &str, read: bool, write: bool) -> Self {
        let prefix = glob::literal_prefix(glob.as_bytes()).to_vec();
        let prefix_only = glob.len() == prefix.len() + 1 && glob.ends_with('*');
        Self {
            glob: glob.as_bytes().to_vec(),
            prefix,
            prefix_only,
            read,
            write,
        }
    }

    fn matches(&self, key: &[u8]) -> bool {
        key.starts_with(&self.prefix) && (self.prefix_only || glob::matches(&self.glob, key))
    }
}

/// A user's permissions.
#[derive(Debug, Clone)]
pub struct Permissions {
    commands: IdSet,
    /// `allcommands` (or `+@all`) not undone since: commands the table does
    /// not know (modules, newer Redis) are allowed too.
    all_commands: bool,
    keys: Vec<KeyPattern>,
    all_keys: bool,
    channels: Vec<Vec<u8>>,
    all_channels: bool,
}

impl Permissions {
    /// Everything, as Redis's `default` user has out of the box.
    #[must_use]
    pub fn everything() -> Self {
        Self {
            commands: IdSet::full(),
            all_commands: true,
            keys: Vec::new(),
            all_keys: true,
            channels: Vec::new(),
            all_channels: true,
        }
    }

    /// Nothing at all.
    #[must_use]
    pub fn nothing() -> Self {
        Self {
            commands: IdSet::empty(),
            all_commands: false,
            keys: Vec::new(),
            all_keys: false,
            channels: Vec::new(),
            all_channels: false,
        }
    }

    /// Parses the three rule strings of a `[[users]]` entry; the error names
    /// the field (`commands`, `keys`, `channels`) and the bad rule.
    pub fn parse(
        commands: &str,
        keys: &str,
        channels: &str,
    ) -> Result<Self, (&'static str, String)> {
        let mut p = Self::nothing();
        for rule in commands.split_whitespace() {
            p.command_rule(rule).map_err(|m| ("commands", m))?;
        }
        for rule in keys.split_whitespace() {
            p.key_rule(rule).map_err(|m| ("keys", m))?;
        }
        for rule in channels.split_whitespace() {
            p.channel_rule(rule).map_err(|m| ("channels", m))?;
        }
        Ok(p)
    }

    fn command_rule(&mut self, rule: &str) -> Result<(), String> {
        let lower = rule.to_ascii_lowercase();
        match lower.as_str() {
            "allcommands" | "+@all" => {
                self.commands = IdSet::full();
                self.all_commands = true;
                return Ok(());
            }
            "nocommands" | "-@all" => {
                self.commands = IdSet::empty();
                self.all_commands = false;
                return Ok(());
            }
            _ => {}
        }
        let (allow, what) = match lower.split_at_checked(1) {
            Some(("+", what)) => (true, what),
            Some(("-", what)) => (false, what),
            _ => {
                return Err(format!(
                    "'{rule}' is not a command rule (+cmd, -cmd, +@category, -@category, allcommands, nocommands)"
                ));
            }
        };
        if !allow {
            self.all_commands = false;
        }
        let mut apply = |spec: &CommandSpec| {
            if allow {
                self.commands.insert(spec);
            } else {
                self.commands.remove(spec);
            }
        };
        if let Some(category) = what.strip_prefix('@') {
            let bit = command::acl::by_name(category).ok_or_else(|| {
                format!("'{rule}': unknown category '@{category}' (see Redis's ACL CAT)")
            })?;
            command::every()
                .filter(|s| s.acl & bit != 0)
                .for_each(&mut apply);
            return Ok(());
        }
        let spec = command::lookup(what.as_bytes())
            .ok_or_else(|| format!("'{rule}': '{what}' is not a command Redis knows"))?;
        apply(spec);
        // A container's rule covers its subcommands, as in Redis.
        spec.subcommands.iter().for_each(apply);
        Ok(())
    }

    fn key_rule(&mut self, rule: &str) -> Result<(), String> {
        let lower = rule.to_ascii_lowercase();
        let (read, write, glob) = match lower.as_str() {
            "allkeys" => {
                self.all_keys = true;
                return Ok(());
            }
            "resetkeys" => {
                self.all_keys = false;
                self.keys.clear();
                return Ok(());
            }
            _ if rule.starts_with('~') => (true, true, &rule[1..]),
            _ if rule.starts_with('%') => {
                let (perms, glob) = rule[1..].split_once('~').ok_or_else(|| {
                    format!("'{rule}': expected %R~, %W~ or %RW~ before the pattern")
                })?;
                let perms = perms.to_ascii_uppercase();
                if perms.is_empty() || !perms.chars().all(|c| c == 'R' || c == 'W') {
                    return Err(format!("'{rule}': permissions are R, W or RW"));
                }
                (perms.contains('R'), perms.contains('W'), glob)
            }
            _ => {
                return Err(format!(
                    "'{rule}' is not a key rule (~pattern, %R~pattern, %W~pattern, %RW~pattern, allkeys, resetkeys)"
                ));
            }
        };
        if glob == "*" && read && write {
            self.all_keys = true;
        }
        self.keys.push(KeyPattern::new(glob, read, write));
        Ok(())
    }

    fn channel_rule(&mut self, rule: &str) -> Result<(), String> {
        match rule.to_ascii_lowercase().as_str() {
            "allchannels" => self.all_channels = true,
            "resetchannels" => {
                self.all_channels = false;
                self.channels.clear();
            }
            _ => {
                let glob = rule.strip_prefix('&').ok_or_else(|| {
                    format!("'{rule}' is not a channel rule (&pattern, allchannels, resetchannels)")
                })?;
                if glob == "*" {
                    self.all_channels = true;
                }
                self.channels.push(glob.as_bytes().to_vec());
            }
        }
        Ok(())
    }

    /// Whether the request `argv` (whose table entry is `spec`, None when
    /// unknown) may run. `scratch` is reused for key positions.
    pub fn check(
        &self,
        spec: Option<&'static CommandSpec>,
        argv: &[Bytes],
        scratch: &mut Vec<(usize, u16)>,
    ) -> Result<(), Denial> {
        let Some(spec) = spec else {
            // Not in the table (a module's, a newer Redis's): only a user
            // with every command may run what cannot be classified.
            return if self.all_commands {
                Ok(())
            } else {
                Err(Denial::Command)
            };
        };
        if !self.commands.contains(spec) {
            return Err(Denial::Command);
        }
        if !self.all_keys
            && spec
                .key_specs
                .iter()
                .any(|k| k.flags & key_flag::NOT_KEY == 0)
        {
            scratch.clear();
            // Keys that cannot be named (SORT … BY, a malformed request)
            // need every key, as Redis asks of SORT's BY and GET.
            if !keys::key_positions(spec, argv, scratch).is_complete() {
                return Err(Denial::Key);
            }
            for &(pos, flags) in scratch.iter() {
                let Some(key) = argv.get(pos) else { continue };
                if !self.key_allowed(key, flags) {
                    return Err(Denial::Key);
                }
            }
        }
        if !self.all_channels {
            self.check_channels(spec, argv)?;
        }
        Ok(())
    }

    /// As Redis's `ACLSelectorCheckKey`: a key the command reads needs a
    /// read pattern, one it changes a write pattern, one it only looks at
    /// (EXISTS, TYPE) any pattern.
    fn key_allowed(&self, key: &[u8], flags: u16) -> bool {
        let need_read = flags & key_flag::ACCESS != 0;
        let need_write = flags & (key_flag::INSERT | key_flag::DELETE | key_flag::UPDATE) != 0;
        self.keys
            .iter()
            .any(|p| (p.read || !need_read) && (p.write || !need_write) && p.matches(key))
    }

    fn check_channels(&self, spec: &CommandSpec, argv: &[Bytes]) -> Result<(), Denial> {
        let (channels, literal) = match spec.name {
            "publish" | "spublish" => (argv.get(1..2).unwrap_or_default(), false),
            "subscribe" | "ssubscribe" => (argv.get(1..).unwrap_or_default(), false),
            // A pattern subscription must be one of the user's patterns,
            // letter for letter (a pattern is not checked against a glob).
            "psubscribe" => (argv.get(1..).unwrap_or_default(), true),
            _ => return Ok(()),
        };
        let allowed = |ch: &Bytes| {
            self.channels.iter().any(|p| {
                if literal {
                    p[..] == ch[..]
                } else {
                    glob::matches(p, ch)
                }
            })
        };
        if channels.iter().all(allowed) {
            Ok(())
        } else {
            Err(Denial::Channel)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn argv(line: &str) -> Vec<Bytes> {
        line.split(' ')
            .map(|s| Bytes::copy_from_slice(s.as_bytes()))
            .collect()
    }

    fn check(p: &Permissions, line: &str) -> Result<(), Denial> {
        let argv = argv(line);
        p.check(command::resolve(&argv), &argv, &mut Vec::new())
    }

    #[test]
    fn key_patterns_match_as_globs_with_or_without_a_plain_prefix() {
        for (glob, key, expected) in [
            ("ticker:*", b"ticker:btc".as_slice(), true),
            ("ticker:*", b"tickers", false),
            ("ticker:?tc", b"ticker:btc", true),
            ("ticker:[ab]*", b"ticker:cat", false),
            ("*:btc", b"book:btc", true),
            ("*:btc", b"book:eth", false),
            ("exact", b"exact", true),
            ("exact", b"exactly", false),
        ] {
            assert_eq!(
                KeyPattern::new(glob, true, true).matches(key),
                expected,
                "{glob} against {}",
                String::from_utf8_lossy(key)
            );
        }
    }

    #[test]
    fn categories_and_commands_apply_left_to_right() {
        let p = Permissions::parse("+@read -@dangerous +info -hgetall", "allkeys", "").unwrap();
        assert_eq!(check(&p, "GET k"), Ok(()));
        assert_eq!(check(&p, "SET k v"), Err(Denial::Command));
        assert_eq!(
            check(&p, "KEYS *"),
            Err(Denial::Command),
            "@dangerous removed"
        );
        assert_eq!(check(&p, "INFO"), Ok(()), "+info after -@dangerous");
        assert_eq!(check(&p, "HGETALL h"), Err(Denial::Command));
        assert_eq!(check(&p, "NOSUCHMODULE.CMD x"), Err(Denial::Command));
        let all = Permissions::parse("+@all -config|set", "allkeys", "").unwrap();
        assert_eq!(check(&all, "CONFIG GET x"), Ok(()));
        assert_eq!(check(&all, "CONFIG SET x y"), Err(Denial::Command));
        assert_eq!(
            check(&all, "NOSUCHMODULE.CMD x"),
            Err(Denial::Command),
            "a '-' rule undoes allcommands"
        );
        let every = Permissions::parse("allcommands", "allkeys", "").unwrap();
        assert_eq!(check(&every, "NOSUCHMODULE.CMD x"), Ok(()));
        let container = Permissions::parse("+client", "", "").unwrap();
        assert_eq!(check(&container, "CLIENT SETNAME x"), Ok(()));
    }

    #[test]
    fn keys_are_read_and_write_patterns() {
        let p = Permissions::parse("+@all", "~ticker:* %R~candles:* %W~signal:*", "").unwrap();
        assert_eq!(check(&p, "GET ticker:btc"), Ok(()));
        assert_eq!(check(&p, "SET ticker:btc 1"), Ok(()));
        assert_eq!(check(&p, "GET candles:1m"), Ok(()));
        assert_eq!(check(&p, "SET candles:1m 1"), Err(Denial::Key));
        assert_eq!(check(&p, "SET signal:x 1"), Ok(()));
        assert_eq!(check(&p, "GET signal:x"), Err(Denial::Key));
        assert_eq!(check(&p, "MGET ticker:a candles:b"), Ok(()));
        assert_eq!(check(&p, "MGET ticker:a other"), Err(Denial::Key));
        assert_eq!(check(&p, "DEL ticker:a other"), Err(Denial::Key));
        assert_eq!(
            check(&p, "EVAL s 2 ticker:a other"),
            Err(Denial::Key),
            "EVAL's declared keys"
        );
        assert_eq!(check(&p, "EVAL s 1 ticker:a other"), Ok(()));
        assert_eq!(check(&p, "SORT ticker:a BY x*"), Err(Denial::Key));
        assert_eq!(check(&p, "PING"), Ok(()));
    }

    #[test]
    fn channels_match_globs_and_patterns_literally() {
        let p = Permissions::parse("+@all", "allkeys", "&prices:*").unwrap();
        assert_eq!(check(&p, "PUBLISH prices:btc x"), Ok(()));
        assert_eq!(check(&p, "PUBLISH orders x"), Err(Denial::Channel));
        assert_eq!(check(&p, "SUBSCRIBE prices:a prices:b"), Ok(()));
        assert_eq!(check(&p, "SUBSCRIBE prices:a orders"), Err(Denial::Channel));
        assert_eq!(check(&p, "PSUBSCRIBE prices:*"), Ok(()));
        assert_eq!(check(&p, "PSUBSCRIBE prices:b*"), Err(Denial::Channel));
    }

    #[test]
    fn bad_rules_are_named() {
        let err = |c: &str, k: &str, ch: &str| Permissions::parse(c, k, ch).unwrap_err();
        assert_eq!(err("+@reads", "", "").0, "commands");
        assert!(
            err("+@reads", "", "")
                .1
                .contains("unknown category '@reads'")
        );
        assert!(
            err("+nosuch", "", "")
                .1
                .contains("'nosuch' is not a command")
        );
        assert!(err("get", "", "").1.contains("is not a command rule"));
        assert_eq!(err("", "%X~a", "").0, "keys");
        assert_eq!(err("", "", "prices").0, "channels");
    }
}
