//! `projection_handler`: read models kept from the standard tables
//! (scenario 5, CQRS over pub/sub).
//!
//! The standard tables feed `projection_queue` beside whatever they fed
//! before, and `projection_handler` alone writes two tables of kind `view`:
//!
//! - `filmography`: per live actor, `{id, name, movies: [{id, title,
//!   year}]}`, the live movies naming them, by year (null last), title, id;
//! - `series_overview`: per live series, `{id, title, seasons, episodes}`,
//!   counting its live episodes and their distinct non-null seasons.
//!
//! Each view has an *owner* table (one view record per live owner: actors,
//! series) and a *member* table whose records name owners (movies name
//! actors, episodes name their series). A view record is recomputed from
//! the tables whenever a change could move it: the owner's own change, or
//! a change of a member that names it now or named it before. "Before" is
//! what the view's index remembers: member → the owners it named when the
//! view last saw it, so a movie that stops naming an actor still refreshes
//! that actor. Arrival order does not matter: a movie naming an actor not
//! yet known is in the index, and joins the actor's record once the actor
//! arrives.
//!
//! The index lives in memory. It is built from the tables, with a full
//! recomputation of the view (a *rebuild*, also `POST
//! /tables/{view}/rebuild`), on the first change after a start or restart,
//! so that index and view agree from then on whatever the log replays.
//!
//! Work on one view is serialised by its lock. Each computation first
//! reads the change-log position, then the tables, so what it read holds
//! every change up to that position; the record is written at that position
//! (a sequenced table keeps the newest), and a later computation, which
//! read later, always wins. A computation that leaves a record as it was
//! writes nothing.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::engine::handler::{Failure, Process};
use crate::engine::log::{Cause, Change, ChangeLog};
use crate::engine::record::{Data, RecordId, Tie, Timestamp, Version};
use crate::engine::table::{Full, Record, Table};

/// What a view is computed from: the record it keeps per live owner.
pub trait Rule: Send + Sync + 'static {
    /// The view's table name.
    const NAME: &'static str;
    /// The owners a member's record names (deduplicated, any order).
    fn owners_of(member: &Data) -> Vec<RecordId>;
    /// The view record of a live owner and the live members naming it.
    fn record(owner: &Record, members: &[Record]) -> Result<Data, String>;
}

/// `filmography`: actors, and the movies naming them.
pub struct Filmography;

/// `series_overview`: series, and their episodes.
pub struct Overview;

#[derive(Deserialize)]
struct Named {
    name: String,
}

#[derive(Deserialize)]
struct Titled {
    title: String,
}

#[derive(Deserialize)]
struct Movie {
    title: String,
    year: Option<i64>,
    #[serde(default)]
    actor_ids: Vec<String>,
}

#[derive(Deserialize)]
struct Episode {
    series_id: String,
    season: Option<u64>,
}

fn parse<'a, T: Deserialize<'a>>(data: &'a Data, what: &str) -> Result<T, String> {
    serde_json::from_str(data.as_str()).map_err(|e| format!("{what} that is not standard: {e}"))
}

fn ids(texts: impl IntoIterator<Item = String>) -> Vec<RecordId> {
    let set: BTreeSet<RecordId> = texts
        .into_iter()
        .filter_map(|t| RecordId::parse(&t).ok())
        .collect();
    set.into_iter().collect()
}

/// A movie as its actors' filmography lists it.
#[derive(Serialize)]
struct Credit<'a> {
    id: &'a str,
    title: String,
    year: Option<i64>,
}

impl Rule for Filmography {
    const NAME: &'static str = "filmography";

    fn owners_of(movie: &Data) -> Vec<RecordId> {
        parse::<Movie>(movie, "a movie")
            .map(|m| ids(m.actor_ids))
            .unwrap_or_default()
    }

    fn record(actor: &Record, movies: &[Record]) -> Result<Data, String> {
        let Named { name } = parse(&actor.data, "an actor")?;
        let mut credits = movies
            .iter()
            .map(|m| {
                let Movie { title, year, .. } = parse(&m.data, "a movie")?;
                Ok(Credit {
                    id: m.id.as_str(),
                    title,
                    year,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        // By year, null last, then title, then id.
        credits.sort_by(|a, b| {
            (a.year.is_none(), a.year, &a.title, a.id).cmp(&(
                b.year.is_none(),
                b.year,
                &b.title,
                b.id,
            ))
        });
        let record = serde_json::json!({"id": actor.id, "name": name, "movies": credits});
        Data::canonical(&record).map_err(|e| e.to_string())
    }
}

impl Rule for Overview {
    const NAME: &'static str = "series_overview";

    fn owners_of(episode: &Data) -> Vec<RecordId> {
        parse::<Episode>(episode, "an episode")
            .map(|e| ids([e.series_id]))
            .unwrap_or_default()
    }

    fn record(series: &Record, episodes: &[Record]) -> Result<Data, String> {
        let Titled { title } = parse(&series.data, "a series")?;
        let mut seasons = BTreeSet::new();
        for episode in episodes {
            let Episode { season, .. } = parse(&episode.data, "an episode")?;
            seasons.extend(season);
        }
        let record = serde_json::json!({
            "id": series.id,
            "title": title,
            "seasons": seasons.len(),
            "episodes": episodes.len(),
        });
        Data::canonical(&record).map_err(|e| e.to_string())
    }
}

/// Which owners each member named when the view last saw it, both ways.
#[derive(Default)]
struct Index {
    owners: HashMap<RecordId, Vec<RecordId>>,
    members: HashMap<RecordId, BTreeSet<RecordId>>,
}

impl Index {
    /// Records that `member` names `owners` now; returns whom it named.
    fn set(&mut self, member: &RecordId, owners: Vec<RecordId>) -> Vec<RecordId> {
        let before = if owners.is_empty() {
            self.owners.remove(member)
        } else {
            self.owners.insert(member.clone(), owners.clone())
        }
        .unwrap_or_default();
        for gone in before.iter().filter(|o| !owners.contains(o)) {
            if let Some(set) = self.members.get_mut(gone) {
                set.remove(member);
                if set.is_empty() {
                    self.members.remove(gone);
                }
            }
        }
        for owner in &owners {
            self.members
                .entry(owner.clone())
                .or_default()
                .insert(member.clone());
        }
        before
    }
}

/// One view: its table, the tables it is computed from, and its index
/// (`None` until the first change or rebuild builds it).
pub struct View<R: Rule> {
    pub table: Arc<Table>,
    owners: Arc<Table>,
    members: Arc<Table>,
    log: Arc<ChangeLog>,
    index: Mutex<Option<Index>>,
    _rule: std::marker::PhantomData<R>,
}

/// Why a view could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error(transparent)]
    Full(#[from] Full),
    #[error("{0}")]
    Source(String),
}

impl<R: Rule> View<R> {
    pub fn new(
        table: Arc<Table>,
        owners: Arc<Table>,
        members: Arc<Table>,
        log: Arc<ChangeLog>,
    ) -> Self {
        Self {
            table,
            owners,
            members,
            log,
            index: Mutex::new(None),
            _rule: std::marker::PhantomData,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Index>> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The position every computation starting now reads at least.
    fn position(&self) -> u64 {
        self.log.next_seq().saturating_sub(1)
    }

    /// Refreshes what `change` (of the owner or member table) can move.
    pub fn apply(&self, change: &Change) -> Result<(), ViewError> {
        let mut guard = self.lock();
        let cause = Cause::caused_by(change);
        let index = match &mut *guard {
            Some(index) => index,
            None => {
                let index = self.rebuild_locked(&cause)?.1;
                guard.insert(index)
            }
        };
        let at = self.position();
        let mut moved = BTreeSet::new();
        if change.table == *self.owners.name() {
            moved.insert(change.key.clone());
        } else {
            let now = (self.members.get(change.key.as_str()))
                .map(|m| R::owners_of(&m.data))
                .unwrap_or_default();
            moved.extend(now.iter().cloned());
            moved.extend(index.set(&change.key, now));
        }
        for owner in &moved {
            self.refresh(index, owner, at, &cause)?;
        }
        Ok(())
    }

    /// Recomputes the whole view and its index from the tables; how many
    /// records the view holds after.
    pub fn rebuild(&self, cause: &Cause) -> Result<u64, ViewError> {
        let mut guard = self.lock();
        let (count, index) = self.rebuild_locked(cause)?;
        *guard = Some(index);
        Ok(count)
    }

    fn rebuild_locked(&self, cause: &Cause) -> Result<(u64, Index), ViewError> {
        let at = self.position();
        let mut index = Index::default();
        for member in self.members.snapshot() {
            index.set(&member.id, R::owners_of(&member.data));
        }
        let mut keys: BTreeSet<RecordId> =
            self.owners.snapshot().into_iter().map(|r| r.id).collect();
        keys.extend(self.table.snapshot().into_iter().map(|r| r.id));
        for key in &keys {
            self.refresh(&index, key, at, cause)?;
        }
        Ok((self.table.len(), index))
    }

    /// Writes `owner`'s view record as the tables say it is now (read after
    /// position `at`), unless it is so already.
    fn refresh(
        &self,
        index: &Index,
        owner: &RecordId,
        at: u64,
        cause: &Cause,
    ) -> Result<(), ViewError> {
        let record = match self.owners.get(owner.as_str()) {
            None => None,
            Some(live) => {
                let members: Vec<Record> = (index.members.get(owner).into_iter().flatten())
                    .filter_map(|m| self.members.get(m.as_str()))
                    .filter(|m| R::owners_of(&m.data).contains(owner))
                    .collect();
                Some(R::record(&live, &members).map_err(ViewError::Source)?)
            }
        };
        let stored = self.table.get(owner.as_str()).map(|r| r.data);
        if stored == record {
            return Ok(());
        }
        let now = Timestamp::now();
        let version = match &record {
            Some(data) => Version::write(now, data.clone()),
            None => Version {
                at: now,
                tie: Tie::Tombstone,
            },
        };
        self.table.derive(owner, at, version, record, cause)?;
        Ok(())
    }
}

/// The handler of `projection_queue`: routes each change to the view its
/// table feeds.
pub struct ProjectionHandler {
    pub filmography: Arc<View<Filmography>>,
    pub overview: Arc<View<Overview>>,
}

impl ProjectionHandler {
    fn feeds<R: Rule>(view: &View<R>, change: &Change) -> bool {
        change.table == *view.owners.name() || change.table == *view.members.name()
    }
}

impl Process<Arc<Change>> for ProjectionHandler {
    async fn process(&self, change: &Arc<Change>) -> Result<(), Failure> {
        let applied = if Self::feeds(&self.filmography, change) {
            self.filmography.apply(change)
        } else if Self::feeds(&self.overview, change) {
            self.overview.apply(change)
        } else {
            return Err(Failure::Permanent(format!(
                "no view is computed from `{}`",
                change.table
            )));
        };
        applied.map_err(|e| Failure::Permanent(e.to_string()))
    }
}
