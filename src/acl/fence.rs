//! Commands fenced off for every client: `server.deny` refuses them,
//! `server.rename` hides them behind another name (Redis's
//! `rename-command`). Both are decided before anything reaches Redis.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::command::{self, CommandSpec, IdSet};

/// What a rename made of a request's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renamed {
    /// Not concerned.
    No,
    /// The client used an alias: `argv[0]` is now the real name.
    Alias,
    /// The client used a hidden original name: unknown, as in Redis.
    Hidden,
}

/// `server.deny` and `server.rename`, resolved against the command table.
#[derive(Debug, Default)]
pub struct Fence {
    deny: IdSet,
    any_denied: bool,
    /// Original names clients may no longer use (lower case).
    hidden: Vec<Vec<u8>>,
    /// (alias, lower case → the original name).
    aliases: Vec<(Vec<u8>, Bytes)>,
}

impl Fence {
    /// Resolves the two settings; the error names the field and the entry.
    pub fn new(
        deny: &[String],
        rename: &BTreeMap<String, String>,
    ) -> Result<Self, (&'static str, String)> {
        let mut fence = Fence::default();
        for name in deny {
            let spec = command::lookup(name.as_bytes()).ok_or_else(|| {
                (
                    "server.deny",
                    format!("'{name}' is not a command Redis knows"),
                )
            })?;
            fence.deny.insert(spec);
            spec.subcommands.iter().for_each(|s| fence.deny.insert(s));
            fence.any_denied = true;
        }
        for (original, alias) in rename {
            let spec = command::lookup(original.as_bytes())
                .filter(|s| !s.name.contains('|'))
                .ok_or_else(|| {
                    (
                        "server.rename",
                        format!("'{original}' is not a command Redis knows (subcommands cannot be renamed)"),
                    )
                })?;
            if alias.contains(|c: char| c.is_whitespace() || c == '|') {
                return Err((
                    "server.rename",
                    format!("'{alias}': a new name has no spaces or '|'"),
                ));
            }
            if !alias.is_empty() && command::lookup(alias.as_bytes()).is_some() {
                return Err((
                    "server.rename",
                    format!("'{alias}' is already a command: pick a name Redis does not use"),
                ));
            }
            fence.hidden.push(spec.name.as_bytes().to_vec());
            if !alias.is_empty() {
                fence.aliases.push((
                    alias.to_ascii_lowercase().into_bytes(),
                    Bytes::from_static(spec.name.as_bytes()),
                ));
            }
        }
        Ok(fence)
    }

    /// Every command denied.
    #[must_use]
    pub fn closed() -> Self {
        Self {
            deny: IdSet::full(),
            any_denied: true,
            ..Self::default()
        }
    }

    /// Applies the renames to `argv[0]`.
    #[inline]
    pub fn rename(&self, argv: &mut [Bytes]) -> Renamed {
        if self.hidden.is_empty() {
            return Renamed::No;
        }
        let Some(name) = argv.first_mut() else {
            return Renamed::No;
        };
        if let Some((_, original)) = self
            .aliases
            .iter()
            .find(|(a, _)| a.eq_ignore_ascii_case(name))
        {
            *name = original.clone();
            return Renamed::Alias;
        }
        if self.hidden.iter().any(|h| h.eq_ignore_ascii_case(name)) {
            return Renamed::Hidden;
        }
        Renamed::No
    }

    /// Whether `spec` is in `server.deny`.
    #[inline]
    pub fn denied(&self, spec: Option<&CommandSpec>) -> bool {
        self.any_denied && spec.is_some_and(|s| self.deny.contains(s))
    }
}

/// Redis's reply to a command it does not have (a hidden one included):
/// `ERR unknown command 'x', with args beginning with: 'a' 'b' `.
#[must_use]
pub fn unknown_command(argv: &[Bytes]) -> String {
    let name = argv
        .first()
        .map(|a| String::from_utf8_lossy(a))
        .unwrap_or_default();
    let mut args = String::new();
    for arg in argv.iter().skip(1) {
        if args.len() >= 128 {
            break;
        }
        let room = 128 - args.len();
        let text = String::from_utf8_lossy(arg);
        let cut: String = text.chars().take(room).collect();
        args.push('\'');
        args.push_str(&cut);
        args.push_str("' ");
    }
    let name: String = name.chars().take(128).collect();
    format!("ERR unknown command '{name}', with args beginning with: {args}")
        .replace(['\r', '\n'], " ")
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

    #[test]
    fn deny_covers_a_container_or_one_subcommand() {
        let fence =
            Fence::new(&["flushall".into(), "CLIENT|KILL".into()], &BTreeMap::new()).unwrap();
        let denied = |line: &str| fence.denied(command::resolve(&argv(line)));
        assert!(denied("FLUSHALL") && denied("client kill id 1"));
        assert!(!denied("CLIENT SETNAME x") && !denied("GET k"));
        assert!(Fence::new(&["nosuch".into()], &BTreeMap::new()).is_err());
    }

    #[test]
    fn rename_hides_the_original_and_routes_the_alias() {
        let rename = BTreeMap::from([
            ("config".to_string(), "cfg-7f3".to_string()),
            ("keys".to_string(), String::new()),
        ]);
        let fence = Fence::new(&[], &rename).unwrap();
        let mut a = argv("CFG-7F3 GET maxmemory");
        assert_eq!(fence.rename(&mut a), Renamed::Alias);
        assert_eq!(&a[0][..], b"config");
        assert_eq!(fence.rename(&mut argv("config get x")), Renamed::Hidden);
        assert_eq!(fence.rename(&mut argv("KEYS *")), Renamed::Hidden);
        assert_eq!(fence.rename(&mut argv("GET k")), Renamed::No);
        let clash = BTreeMap::from([("config".to_string(), "get".to_string())]);
        assert!(
            Fence::new(&[], &clash)
                .unwrap_err()
                .1
                .contains("already a command")
        );
    }

    #[test]
    fn unknown_command_is_worded_as_redis_words_it() {
        assert_eq!(
            unknown_command(&argv("config get maxmemory")),
            "ERR unknown command 'config', with args beginning with: 'get' 'maxmemory' "
        );
        assert_eq!(
            unknown_command(&argv("keys")),
            "ERR unknown command 'keys', with args beginning with: "
        );
    }
}
