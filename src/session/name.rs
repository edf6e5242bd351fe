//! [`Name`]: a channel name shared by the connections that hold it.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::rc::Rc;

/// A channel name, shared (reference-counted) and one pointer wide.
///
/// A connection lists every channel it is subscribed to, and a user in 20
/// rooms lists 21 names: at 16 bytes a fat `Rc<str>` made that list the
/// largest part of a subscription (docs/architecture.md, "A room
/// subscription"). This one is 8 bytes; the price is a second, small
/// allocation per name per shard (the shard's router hands its copy to
/// every subscriber), paid once per room, not once per member.
///
/// Equality and hashing are the text's, so a table keyed by `Name` is
/// looked up with a `&str`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Name(Rc<Box<str>>);

impl Name {
    /// Whether `a` and `b` are the same allocation (not just equal text).
    pub fn ptr_eq(a: &Name, b: &Name) -> bool {
        Rc::ptr_eq(&a.0, &b.0)
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl Hash for Name {
    fn hash<H: Hasher>(&self, h: &mut H) {
        // As `str` hashes: `Borrow<str>` lookups must find it.
        self.as_str().hash(h)
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Self {
        Name(Rc::new(Box::from(s)))
    }
}

impl From<String> for Name {
    fn from(s: String) -> Self {
        Name(Rc::new(s.into_boxed_str()))
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn one_pointer_wide() {
        assert_eq!(std::mem::size_of::<Name>(), 8);
    }

    #[test]
    fn a_table_keyed_by_name_is_looked_up_by_str() {
        let mut t = HashMap::new();
        t.insert(Name::from("room:a"), 1);
        assert_eq!(t.get("room:a"), Some(&1));
        assert_eq!(t.get("room:b"), None);
        let a = Name::from("room:a");
        let b = a.clone();
        assert!(Name::ptr_eq(&a, &b));
        assert!(!Name::ptr_eq(&a, &Name::from("room:a")));
        assert_eq!(a, Name::from(String::from("room:a")));
    }
}
