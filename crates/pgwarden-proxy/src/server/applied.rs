//! The settings the proxy has given a server connection beyond its login defaults.

use std::collections::BTreeMap;
use std::sync::Arc;

/// Settings as name -> SQL: those the proxy has given a server connection beyond its login
/// defaults, or those a client's connection should have. Behind a shared pointer, and equal
/// settings converge on one allocation (see [`Applied::same`]), so that the check on every
/// checkout is nearly always one pointer comparison rather than a walk over both maps.
#[derive(Debug, Clone, Default)]
pub struct Applied(Arc<BTreeMap<String, String>>);

impl std::ops::Deref for Applied {
    type Target = BTreeMap<String, String>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl From<BTreeMap<String, String>> for Applied {
    fn from(map: BTreeMap<String, String>) -> Self {
        Applied(Arc::new(map))
    }
}

impl<const N: usize> From<[(String, String); N]> for Applied {
    fn from(pairs: [(String, String); N]) -> Self {
        Applied::from(BTreeMap::from(pairs))
    }
}

impl Applied {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, name: String, sql: String) {
        Arc::make_mut(&mut self.0).insert(name, sql);
    }

    pub fn remove(&mut self, name: &str) {
        if self.0.contains_key(name) {
            Arc::make_mut(&mut self.0).remove(name);
        }
    }

    pub fn clear(&mut self) {
        if !self.0.is_empty() {
            self.0 = Arc::default();
        }
    }

    /// Whether both hold the same settings. If they do in separate allocations, both keep the
    /// one at the lower address from now on: every comparison of equal settings merges two
    /// allocations into the same survivor, so clients and connections with equal settings
    /// end up sharing one, and the next comparison is a pointer comparison.
    pub fn same(&mut self, other: &mut Applied) -> bool {
        if Arc::ptr_eq(&self.0, &other.0) {
            return true;
        }
        if self.0 != other.0 {
            return false;
        }
        if Arc::as_ptr(&self.0) < Arc::as_ptr(&other.0) {
            other.0 = Arc::clone(&self.0);
        } else {
            self.0 = Arc::clone(&other.0);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_settings_converge_on_one_allocation_and_stay_independent() {
        let pairs = || [("a".to_string(), "SET a = 1".to_string())];
        let (mut x, mut y, mut z) = (
            Applied::from(pairs()),
            Applied::from(pairs()),
            Applied::from(pairs()),
        );
        assert!(!Arc::ptr_eq(&x.0, &y.0));
        assert!(x.same(&mut y) && Arc::ptr_eq(&x.0, &y.0));
        assert!(z.same(&mut y) && y.same(&mut x) && Arc::ptr_eq(&x.0, &z.0));
        // A change to one of them is its own.
        y.insert("b".to_string(), "SET b = 2".to_string());
        assert!(!x.same(&mut y));
        assert_eq!((x.len(), y.len(), z.len()), (1, 2, 1));
        y.remove("b");
        assert!(x.same(&mut y));
        x.clear();
        assert!(x.is_empty() && !x.same(&mut z) && z.len() == 1);
    }
}
