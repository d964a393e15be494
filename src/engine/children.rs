//! Child sets: which children a parent listed last, by version.
//!
//! When one record carries the complete list of another kind (a series'
//! episodes, a video's renditions), the children it no longer lists must be
//! deleted. [`ChildSets`] remembers, per parent, the set from the newest
//! version seen, and answers each new list with what to delete, or, for a
//! list older than the one remembered, which of its children are still
//! current. Like a table, the result does not depend on the order in which
//! versions arrive.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use super::record::{RecordId, Version};

struct ChildSet {
    version: Version,
    children: BTreeSet<RecordId>,
    /// What the replace at `version` removed, so that a retried handler
    /// replacing again at the same version is told to delete them again.
    removed: Vec<RecordId>,
}

/// The answer to [`ChildSets::replace`].
#[derive(Debug, PartialEq, Eq)]
pub enum Replaced {
    /// The list is the newest: delete `removed`, write the whole list.
    Current { removed: Vec<RecordId> },
    /// A newer list is known: write only the children in `current`.
    Outdated { current: BTreeSet<RecordId> },
}

#[derive(Default)]
pub struct ChildSets {
    /// Never held across an await.
    sets: Mutex<HashMap<RecordId, ChildSet>>,
}

impl ChildSets {
    /// Records that `parent` at `version` lists exactly `children` (a
    /// delete is a tombstone version listing none).
    pub fn replace(
        &self,
        parent: &RecordId,
        version: Version,
        children: BTreeSet<RecordId>,
    ) -> Replaced {
        let mut sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        match sets.get_mut(parent) {
            Some(set) if version < set.version => Replaced::Outdated {
                current: set.children.clone(),
            },
            Some(set) if version == set.version => Replaced::Current {
                removed: set.removed.clone(),
            },
            Some(set) => {
                let removed: Vec<RecordId> = set.children.difference(&children).cloned().collect();
                *set = ChildSet {
                    version,
                    children,
                    removed: removed.clone(),
                };
                Replaced::Current { removed }
            }
            None => {
                sets.insert(
                    parent.clone(),
                    ChildSet {
                        version,
                        children,
                        removed: Vec::new(),
                    },
                );
                Replaced::Current {
                    removed: Vec::new(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::record::{Data, Timestamp};

    fn ids(list: &[&str]) -> BTreeSet<RecordId> {
        list.iter().map(|s| RecordId::parse(s).unwrap()).collect()
    }

    fn v(secs: i64) -> Version {
        let at = Timestamp::from_datetime(chrono::DateTime::from_timestamp(secs, 0).unwrap());
        Version::write(at, Data::canonical(&serde_json::json!({})).unwrap())
    }

    #[test]
    fn a_newer_list_removes_what_it_no_longer_lists() {
        let sets = ChildSets::default();
        let parent = RecordId::parse("s1").unwrap();
        assert_eq!(
            sets.replace(&parent, v(1), ids(&["e1", "e2"])),
            Replaced::Current { removed: vec![] }
        );
        assert_eq!(
            sets.replace(&parent, v(2), ids(&["e1"])),
            Replaced::Current {
                removed: ids(&["e2"]).into_iter().collect()
            }
        );
        // A retry at the same version is told the same.
        assert_eq!(
            sets.replace(&parent, v(2), ids(&["e1"])),
            Replaced::Current {
                removed: ids(&["e2"]).into_iter().collect()
            }
        );
        assert_eq!(
            sets.replace(&parent, v(1), ids(&["e1", "e2"])),
            Replaced::Outdated {
                current: ids(&["e1"])
            }
        );
    }
}
