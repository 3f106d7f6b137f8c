//! The users nearcache checks itself (`[[users]]`), and how a client becomes
//! one of them.

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::rules::Permissions;
use crate::config::UserConfig;

/// One user: who, how it authenticates, what it may run.
#[derive(Debug)]
pub struct User {
    /// Its name (`CLIENT LIST`'s `user=`, `ACL WHOAMI`).
    pub name: Arc<str>,
    /// A disabled user cannot authenticate.
    pub enabled: bool,
    nopass: bool,
    /// SHA-256 of each accepted password.
    passwords: Vec<[u8; 32]>,
    /// What it may run.
    pub perms: Permissions,
    /// May run `PROXY …` and the `ACL` subcommands that change users.
    pub admin: bool,
}

impl User {
    /// A user with every permission and no password (Redis's `default` out
    /// of the box).
    fn everything(name: &str) -> Self {
        Self {
            name: name.into(),
            enabled: true,
            nopass: true,
            passwords: Vec::new(),
            perms: Permissions::everything(),
            admin: true,
        }
    }

    /// Whether `password` is one of the user's.
    fn accepts(&self, password: &[u8]) -> bool {
        if self.nopass {
            return true;
        }
        let digest: [u8; 32] = Sha256::digest(password).into();
        // Every hash is compared, so the time says nothing of which matched.
        self.passwords
            .iter()
            .fold(subtle::Choice::from(0), |acc, h| acc | h.ct_eq(&digest))
            .into()
    }
}

/// A `[[users]]` entry that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("users[{index}] (\"{name}\").{field}: {message}")]
pub struct UserError {
    /// Its position in the file.
    pub index: usize,
    /// Its name.
    pub name: String,
    /// The field at fault.
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

/// Every user, and the one clients start as.
#[derive(Debug)]
pub struct Users {
    /// Whether permissions are checked at all (false without `[[users]]`:
    /// nearcache is then as transparent as before users existed).
    pub enforced: bool,
    by_name: HashMap<String, Arc<User>>,
    default: Arc<User>,
}

impl Users {
    /// From the configuration: with no `[[users]]`, everyone is `default`
    /// with every permission (`server.password`, if set, is checked
    /// elsewhere). With users, `default` is the entry of that name if there
    /// is one, else a user with every permission and `server.password` as
    /// its password, else a disabled user: clients must then authenticate.
    pub fn new(password: Option<&str>, users: &[UserConfig]) -> Result<Self, UserError> {
        if users.is_empty() {
            let default = Arc::new(User::everything("default"));
            return Ok(Self {
                enforced: false,
                by_name: HashMap::from([("default".to_owned(), default.clone())]),
                default,
            });
        }
        let mut by_name = HashMap::new();
        for (index, u) in users.iter().enumerate() {
            let err = |field, message: String| UserError {
                index,
                name: u.name.clone(),
                field,
                message,
            };
            if u.name.is_empty() || u.name.contains(|c: char| c.is_whitespace()) {
                return Err(err("name", "a user needs a name without spaces".into()));
            }
            let perms = Permissions::parse(&u.commands, &u.keys, &u.channels)
                .map_err(|(field, m)| err(field, m))?;
            let passwords = u
                .passwords
                .iter()
                .map(|h| parse_hash(h))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|m| err("passwords", m))?;
            if passwords.is_empty() && !u.nopass && u.enabled {
                return Err(err(
                    "passwords",
                    "an enabled user needs a password hash (nearcache hash-password) or nopass = true"
                        .into(),
                ));
            }
            let user = Arc::new(User {
                name: u.name.as_str().into(),
                enabled: u.enabled,
                nopass: u.nopass,
                passwords,
                perms,
                admin: u.admin,
            });
            if by_name.insert(u.name.clone(), user).is_some() {
                return Err(err("name", format!("'{}' is defined twice", u.name)));
            }
        }
        let default = match (by_name.get("default"), password) {
            (Some(user), _) => user.clone(),
            (None, Some(password)) => {
                let mut user = User::everything("default");
                user.nopass = false;
                user.passwords = vec![Sha256::digest(password.as_bytes()).into()];
                Arc::new(user)
            }
            (None, None) => Arc::new(User {
                enabled: false,
                nopass: false,
                perms: Permissions::nothing(),
                admin: false,
                ..User::everything("default")
            }),
        };
        by_name.insert("default".to_owned(), default.clone());
        Ok(Self {
            enforced: true,
            by_name,
            default,
        })
    }

    /// No one may authenticate and the default user may run nothing.
    #[must_use]
    pub fn closed() -> Self {
        let default = Arc::new(User {
            enabled: false,
            nopass: false,
            perms: Permissions::nothing(),
            admin: false,
            ..User::everything("default")
        });
        Self {
            enforced: true,
            by_name: HashMap::new(),
            default,
        }
    }

    /// The user clients are before they authenticate.
    #[must_use]
    pub fn default_user(&self) -> &Arc<User> {
        &self.default
    }

    /// Whether a new client may run commands without `AUTH` (its default
    /// user is enabled and needs no password).
    #[must_use]
    pub fn open(&self) -> bool {
        self.default.enabled && self.default.nopass
    }

    /// The user `name` if `password` is one of its own and it is enabled
    /// (None, whichever of the three failed: Redis's WRONGPASS does not say).
    #[must_use]
    pub fn authenticate(&self, name: &[u8], password: &[u8]) -> Option<Arc<User>> {
        let user = std::str::from_utf8(name)
            .ok()
            .and_then(|n| self.by_name.get(n))?;
        (user.enabled && user.accepts(password)).then(|| user.clone())
    }

    /// The user called `name` now (after a reload), or a disabled user with
    /// no permissions if it is gone.
    #[must_use]
    pub fn current(&self, name: &str) -> Arc<User> {
        self.by_name.get(name).cloned().unwrap_or_else(|| {
            Arc::new(User {
                enabled: false,
                nopass: false,
                perms: Permissions::nothing(),
                admin: false,
                ..User::everything(name)
            })
        })
    }
}

/// A password's SHA-256 in hex, as `[[users]].passwords` holds it.
#[must_use]
pub fn hash_password(password: &[u8]) -> String {
    Sha256::digest(password)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn parse_hash(hex: &str) -> Result<[u8; 32], String> {
    let bad = || {
        "a password is given as its SHA-256 in hex (64 characters; nearcache hash-password prints it)".to_string()
    };
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
            .map_err(|_| bad())?;
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn user(name: &str, password: &str) -> UserConfig {
        UserConfig {
            name: name.into(),
            passwords: vec![hash_password(password.as_bytes())],
            commands: "+@all".into(),
            keys: "allkeys".into(),
            ..UserConfig::default()
        }
    }

    #[test]
    fn users_authenticate_by_hash_and_disabled_ones_never() {
        let mut off = user("off", "pw");
        off.enabled = false;
        let users = Users::new(None, &[user("bot", "s3cret"), off]).unwrap();
        assert!(
            users.enforced && !users.open(),
            "no default entry: AUTH required"
        );
        assert_eq!(&*users.authenticate(b"bot", b"s3cret").unwrap().name, "bot");
        assert!(users.authenticate(b"bot", b"wrong").is_none());
        assert!(users.authenticate(b"off", b"pw").is_none());
        assert!(users.authenticate(b"nobody", b"x").is_none());
        assert!(users.authenticate(b"default", b"").is_none());
    }

    #[test]
    fn default_comes_from_its_entry_or_server_password() {
        let with_pw = Users::new(Some("pw"), &[user("bot", "x")]).unwrap();
        assert!(with_pw.authenticate(b"default", b"pw").is_some());
        let mut open = user("default", "x");
        open.nopass = true;
        let users = Users::new(Some("ignored"), &[open]).unwrap();
        assert!(users.open());
        let none = Users::new(None, &[]).unwrap();
        assert!(!none.enforced && none.open());
    }

    #[test]
    fn bad_entries_name_the_field() {
        let mut bad = user("bot", "x");
        bad.passwords = vec!["plaintext".into()];
        let e = Users::new(None, &[bad]).unwrap_err().to_string();
        assert!(e.starts_with("users[0] (\"bot\").passwords: "), "{e}");
        let mut bad = user("bot", "x");
        bad.keys = "ticker:*".into();
        let e = Users::new(None, &[user("a", "x"), bad])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("users[1] (\"bot\").keys: "), "{e}");
        let e = Users::new(None, &[user("a", "x"), user("a", "y")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("defined twice"), "{e}");
    }

    #[test]
    fn hash_is_sha256_hex() {
        assert_eq!(
            hash_password(b"foobar"),
            "c3ab8ff13720e8ad9047dd39466b3c8974e592c2fa383d4a3960714caef0c4f2"
        );
    }
}
