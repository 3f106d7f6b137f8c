//! Who may run what: users with permissions in a subset of Redis's ACL
//! syntax (`[[users]]`), and commands fenced off for everyone
//! (`server.deny`, `server.rename`). Checked at the admission seam, before
//! limits and routing, in every mode.
//!
//! The client's user never changes the upstream identity: every user's
//! commands go over the same upstream connections, as nearcache's own
//! upstream user.

mod fence;
mod rules;
mod users;

use bytes::Bytes;

pub use fence::{Fence, Renamed, unknown_command};
pub use rules::{Denial, Permissions};
pub use users::{User, UserError, Users, hash_password};

use crate::command::CommandSpec;

/// `ACL` subcommands that change Redis's users: refused unless the user may
/// run admin commands.
const ACL_WRITES: &[&str] = &["acl|setuser", "acl|deluser", "acl|load", "acl|save"];

/// Whether `user` may run `argv` (table entry `spec`; `proxy`: a `PROXY`
/// command); the error is Redis's `NOPERM` text.
pub fn check(
    user: &User,
    spec: Option<&'static CommandSpec>,
    proxy: bool,
    argv: &[Bytes],
    scratch: &mut Vec<(usize, u16)>,
) -> Result<(), String> {
    let needs_admin = proxy || spec.is_some_and(|s| ACL_WRITES.contains(&s.name));
    if needs_admin && !user.admin {
        let name = if proxy {
            "proxy".to_owned()
        } else {
            spec.map_or("", |s| s.name).to_owned()
        };
        return Err(command_denied(&name));
    }
    if proxy {
        return Ok(());
    }
    match user.perms.check(spec, argv, scratch) {
        Ok(()) => Ok(()),
        Err(Denial::Command) => Err(command_denied(&match spec {
            Some(s) => s.name.to_owned(),
            None => String::from_utf8_lossy(&argv[0]).to_ascii_lowercase(),
        })),
        Err(Denial::Key) => Err(
            "NOPERM this user has no permissions to access one of the keys used as arguments"
                .into(),
        ),
        Err(Denial::Channel) => Err(
            "NOPERM this user has no permissions to access one of the channels used as arguments"
                .into(),
        ),
    }
}

fn command_denied(name: &str) -> String {
    format!("NOPERM this user has no permissions to run the '{name}' command")
}
