//! A set of commands as a fixed bitset over the table's ids: what a user may
//! run is decided with one load and a mask, whatever rules built the set.

use super::spec::CommandSpec;
use super::table::COUNT;

const WORDS: usize = COUNT.div_ceil(64);

/// A set of commands and subcommands, by [`CommandSpec::id`].
#[derive(Clone, Default, PartialEq, Eq)]
pub struct IdSet([u64; WORDS]);

impl IdSet {
    /// No command.
    #[must_use]
    pub const fn empty() -> Self {
        Self([0; WORDS])
    }

    /// Every command in the table.
    #[must_use]
    pub fn full() -> Self {
        let mut set = Self::empty();
        for spec in super::every() {
            set.insert(spec);
        }
        set
    }

    /// Adds `spec`.
    pub fn insert(&mut self, spec: &CommandSpec) {
        let id = usize::from(spec.id);
        if let Some(word) = self.0.get_mut(id / 64) {
            *word |= 1 << (id % 64);
        }
    }

    /// Removes `spec`.
    pub fn remove(&mut self, spec: &CommandSpec) {
        let id = usize::from(spec.id);
        if let Some(word) = self.0.get_mut(id / 64) {
            *word &= !(1 << (id % 64));
        }
    }

    /// Whether `spec` is in the set.
    #[inline]
    #[must_use]
    pub fn contains(&self, spec: &CommandSpec) -> bool {
        let id = usize::from(spec.id);
        self.0
            .get(id / 64)
            .is_some_and(|w| w & (1 << (id % 64)) != 0)
    }
}

impl std::fmt::Debug for IdSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count: u32 = self.0.iter().map(|w| w.count_ones()).sum();
        write!(f, "IdSet({count} commands)")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_dense_and_unique() {
        let mut seen = vec![false; COUNT];
        for spec in crate::command::every() {
            let id = usize::from(spec.id);
            assert!(!seen[id], "{} reuses id {id}", spec.name);
            seen[id] = true;
        }
        assert!(seen.iter().all(|&s| s), "every id below COUNT is used");
    }

    #[test]
    fn insert_remove_contains() {
        let get = crate::command::lookup(b"get").unwrap();
        let set = crate::command::lookup(b"set").unwrap();
        let mut s = IdSet::empty();
        s.insert(get);
        assert!(s.contains(get) && !s.contains(set));
        s.remove(get);
        assert!(!s.contains(get));
        assert!(IdSet::full().contains(set));
    }
}
