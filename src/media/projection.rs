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
//! /tables/{view}/rebuild`), on the first change after a start and at once
//! after a restart, so that index and view agree from then on whatever the
//! log replays.
//!
//! On JetStream every instance follows the whole change log into its
//! tables, and each runs this handler over all of it, as one more
//! subscriber: each computes every view record from the same log, and
//! writes it at the position it read, so the first write of a record at a
//! position is kept and the others' writes of it are stale (most are not
//! even sent: the record is already what they computed).
//!
//! The handler only marks the owners a change moves; the view's own tasks
//! recompute them in rounds (see [`View`]), and settle waits for them. Each
//! round first reads the change-log position, then the tables, so what it
//! read holds every change up to that position; records are written at
//! that position (a sequenced table keeps the newest). One owner is never
//! in two rounds at once, so a later computation of it read later and
//! wins. A computation that leaves a record as it was writes nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::engine::handler::{Failure, Process};
use crate::engine::log::{Cause, Change, ChangeLog};
use crate::engine::record::{Data, RecordId, Tie, Timestamp, Version};
use crate::engine::settle::Activity;
use crate::engine::table::{Full, Record, Table, WriteError};

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

/// The fields read from standard records: borrowed from their canonical
/// JSON text, and written back into view records as that same text, so a
/// view record is canonical without being canonicalised again.
#[derive(Deserialize)]
struct Owner<'a> {
    /// An actor's `name`, a series' `title`.
    #[serde(borrow, alias = "title")]
    name: &'a RawValue,
}

#[derive(Deserialize)]
struct MovieCast {
    #[serde(default)]
    actor_ids: Vec<String>,
}

#[derive(Deserialize)]
struct Movie<'a> {
    #[serde(borrow)]
    title: &'a RawValue,
    #[serde(borrow)]
    year: &'a RawValue,
}

#[derive(Deserialize)]
struct Episode {
    series_id: String,
    season: Option<serde_json::Number>,
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

/// A movie as its actors' filmography lists it. Fields in byte-wise order
/// of their names, as RFC 8785 orders them (so are the records' below).
#[derive(Serialize)]
struct Credit<'a> {
    id: &'a RecordId,
    title: &'a RawValue,
    year: &'a RawValue,
}

#[derive(Serialize)]
struct FilmographyRecord<'a> {
    id: &'a RecordId,
    movies: Vec<Credit<'a>>,
    name: &'a RawValue,
}

#[derive(Serialize)]
struct OverviewRecord<'a> {
    episodes: usize,
    id: &'a RecordId,
    seasons: usize,
    title: &'a RawValue,
}

impl Rule for Filmography {
    const NAME: &'static str = "filmography";

    fn owners_of(movie: &Data) -> Vec<RecordId> {
        parse::<MovieCast>(movie, "a movie")
            .map(|m| ids(m.actor_ids))
            .unwrap_or_default()
    }

    fn record(actor: &Record, movies: &[Record]) -> Result<Data, String> {
        let Owner { name } = parse(&actor.data, "an actor")?;
        // Each credit with what it sorts by: year, null last, then title,
        // then id.
        let mut credits = Vec::with_capacity(movies.len());
        for movie in movies {
            let Movie { title, year } = parse(&movie.data, "a movie")?;
            let title_text: String =
                serde_json::from_str(title.get()).map_err(|e| e.to_string())?;
            let year_number: Option<f64> =
                serde_json::from_str(year.get()).map_err(|e| e.to_string())?;
            let key = (year_number.is_none(), year_number, title_text);
            let credit = Credit {
                id: &movie.id,
                title,
                year,
            };
            credits.push((key, credit));
        }
        credits.sort_by(|(a, ca), (b, cb)| {
            (a, ca.id)
                .partial_cmp(&(b, cb.id))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let record = FilmographyRecord {
            id: &actor.id,
            movies: credits.into_iter().map(|(_, credit)| credit).collect(),
            name,
        };
        Data::of_canonical(&record).map_err(|e| e.to_string())
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
        let Owner { name: title } = parse(&series.data, "a series")?;
        let mut seasons = BTreeSet::new();
        for episode in episodes {
            let Episode { season, .. } = parse(&episode.data, "an episode")?;
            seasons.extend(season.map(|n| n.to_string()));
        }
        let record = OverviewRecord {
            episodes: episodes.len(),
            id: &series.id,
            seasons: seasons.len(),
            title,
        };
        Data::of_canonical(&record).map_err(|e| e.to_string())
    }
}

/// Which owners each member named when the view last saw it, both ways.
#[derive(Default)]
struct Index {
    owners: HashMap<RecordId, Vec<RecordId>>,
    members: HashMap<RecordId, BTreeSet<RecordId>>,
}

impl Index {
    /// The members that name `owner`.
    fn members_of(&self, owner: &RecordId) -> Vec<RecordId> {
        (self.members.get(owner).into_iter().flatten())
            .cloned()
            .collect()
    }

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

/// What a view's lock guards.
#[derive(Default)]
struct State {
    /// `None` until built (on the first change, or after a restart).
    index: Option<Index>,
    /// Owners some change moved whose record is not recomputed yet, with
    /// the cause of the latest such change (the view's change names it).
    dirty: BTreeMap<RecordId, Cause>,
    /// Owners a round is recomputing now, outside the lock; one owner is
    /// never recomputed by two rounds at once, so that the later one reads
    /// after the earlier one's write.
    computing: HashSet<RecordId>,
    /// Rebuilds writing the view now, outside the lock.
    rebuilding: usize,
    /// Whether settle is told that work is outstanding (one unit while
    /// anything is dirty, computing or being rebuilt, or the index
    /// unbuilt).
    owed: bool,
}

/// One view: its table, the tables it is computed from, its index, and the
/// owners waiting to be recomputed.
///
/// `projection_handler` only updates the index and marks owners dirty; the
/// view's own tasks ([`View::run`], two rounds) recompute them, as many as
/// are dirty at a time, reading the tables outside the lock, so a burst of
/// a thousand movies naming one actor recomputes that actor's record a few
/// times, not a thousand (a record of n movies rewritten for each of them
/// would be n² work).
pub struct View<R: Rule> {
    pub table: Arc<Table>,
    owners: Arc<Table>,
    members: Arc<Table>,
    log: Arc<ChangeLog>,
    activity: Activity,
    state: Mutex<State>,
    wake: Notify,
    _rule: std::marker::PhantomData<R>,
}

/// Why a view could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error(transparent)]
    Full(#[from] Full),
    #[error("{0}")]
    Source(String),
    /// The shared store could not be reached (never in memory): the
    /// record is computed again later.
    #[error("{0}")]
    Unavailable(String),
}

impl From<WriteError> for ViewError {
    fn from(error: WriteError) -> Self {
        match error {
            WriteError::Full(full) => ViewError::Full(full),
            WriteError::Unavailable(reason) => ViewError::Unavailable(reason),
            // A derived write has no precondition.
            WriteError::PreconditionFailed(failed) => ViewError::Source(failed.to_string()),
        }
    }
}

/// Owners one round takes at a time.
const CHUNK: usize = 256;

/// View records a rebuild writes at once (each is a round trip on
/// JetStream).
const WRITES_AT_ONCE: usize = 64;

/// How long a round waits before it writes again to a shared store that
/// did not answer.
const UNAVAILABLE_RETRY: std::time::Duration = std::time::Duration::from_millis(500);

/// What one round of a view's task did.
enum Flushed {
    /// Nothing is left for this round.
    Done,
    /// More owners are dirty.
    More,
    /// The shared store did not answer; what was not written is dirty
    /// again.
    Unavailable,
}

impl<R: Rule> View<R> {
    pub fn new(
        table: Arc<Table>,
        owners: Arc<Table>,
        members: Arc<Table>,
        log: Arc<ChangeLog>,
        activity: Activity,
    ) -> Self {
        Self {
            table,
            owners,
            members,
            log,
            activity,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            _rule: std::marker::PhantomData,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells settle that work is outstanding, once.
    fn owe(&self, state: &mut State) {
        if !state.owed {
            state.owed = true;
            self.activity.begin(1);
        }
    }

    /// Tells settle the outstanding work is done, if it is.
    fn settle_if_done(&self, state: &mut State) {
        if state.owed
            && state.index.is_some()
            && state.dirty.is_empty()
            && state.computing.is_empty()
            && state.rebuilding == 0
        {
            state.owed = false;
            self.activity.end(1);
        }
    }

    /// The position every computation starting now reads at least.
    fn position(&self) -> u64 {
        self.log.next_seq().saturating_sub(1)
    }

    /// Marks what `change` (of the owner or member table) can move.
    pub async fn apply(&self, change: &Change) -> Result<(), ViewError> {
        let cause = Cause::caused_by(change);
        let unbuilt = self.lock().index.is_none();
        if unbuilt {
            self.rebuild(&cause).await?;
        }
        let mut state = self.lock();
        let state = &mut *state;
        let Some(index) = state.index.as_mut() else {
            return Ok(());
        };
        let moved = if change.table == *self.owners.name() {
            vec![change.key.clone()]
        } else {
            let now = (self.members.get(change.key.as_str()))
                .map(|m| R::owners_of(&m.data))
                .unwrap_or_default();
            let mut moved = index.set(&change.key, now.clone());
            moved.extend(now);
            moved
        };
        for owner in moved {
            state.dirty.insert(owner, cause.clone());
        }
        if !state.dirty.is_empty() {
            self.owe(state);
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Recomputes the whole view and its index from the tables; how many
    /// records the view holds after. The index is built at once, under
    /// the lock; the records are written after, outside it (what changes
    /// meanwhile is marked as usual, and written at a later position).
    pub async fn rebuild(&self, cause: &Cause) -> Result<u64, ViewError> {
        let (at, work) = {
            let mut state = self.lock();
            self.index_locked(&mut state)
        };
        let mut rebuild = Rebuild {
            view: self,
            work,
            cause: cause.clone(),
            finished: false,
        };
        let mut written = Ok(());
        let mut writing = futures_util::stream::FuturesUnordered::new();
        for (owner, members) in &rebuild.work {
            if writing.len() >= WRITES_AT_ONCE
                && let Some(result) = writing.next().await
            {
                written = written.and(result);
            }
            writing.push(self.refresh(owner, members, at, cause));
        }
        while let Some(result) = writing.next().await {
            written = written.and(result);
        }
        drop(writing);
        // Unless the store did not answer, what was to be written is.
        rebuild.finished = !matches!(written, Err(ViewError::Unavailable(_)));
        drop(rebuild);
        written.map(|()| self.table.len())
    }

    /// Forgets the index, so that it is rebuilt with the whole view (after
    /// a restart: what was dirty in memory is gone, and the tables may
    /// have moved since the view last saw them).
    pub fn invalidate(&self) {
        let mut state = self.lock();
        state.index = None;
        self.owe(&mut state);
        self.wake.notify_one();
    }

    /// Builds the index from the tables and starts a rebuild: the position
    /// read before the tables, and every owner and view record with the
    /// members naming it, to be written at that position.
    fn index_locked(&self, state: &mut State) -> (u64, Vec<(RecordId, Vec<RecordId>)>) {
        let at = self.position();
        let mut index = Index::default();
        for member in self.members.snapshot() {
            index.set(&member.id, R::owners_of(&member.data));
        }
        let mut keys: BTreeSet<RecordId> =
            self.owners.snapshot().into_iter().map(|r| r.id).collect();
        keys.extend(self.table.snapshot().into_iter().map(|r| r.id));
        let work = keys
            .into_iter()
            .map(|key| {
                let members = index.members_of(&key);
                (key, members)
            })
            .collect();
        state.index = Some(index);
        state.dirty.clear();
        state.rebuilding += 1;
        self.owe(state);
        (at, work)
    }

    /// Recomputes up to [`CHUNK`] dirty owners (none another round is
    /// computing), reading the tables outside the lock.
    async fn flush_some(&self) -> Flushed {
        let unbuilt = self.lock().index.is_none();
        if unbuilt {
            match self.rebuild(&Cause::request("recovery")).await {
                Ok(_) => {}
                Err(ViewError::Unavailable(error)) => {
                    tracing::warn!(view = R::NAME, %error, "the view waits for its store to rebuild");
                    return Flushed::Unavailable;
                }
                Err(error) => {
                    tracing::error!(view = R::NAME, %error, "the view could not be rebuilt");
                    return Flushed::Done;
                }
            }
        }
        let picked: Vec<(RecordId, Cause, Vec<RecordId>)> = {
            let mut state = self.lock();
            let state = &mut *state;
            let Some(index) = &state.index else {
                return Flushed::Done;
            };
            let owners: Vec<RecordId> = (state.dirty.keys())
                .filter(|o| !state.computing.contains(*o))
                .take(CHUNK)
                .cloned()
                .collect();
            if owners.is_empty() {
                // Nothing to take: a rebuild just now may have been all.
                self.settle_if_done(state);
                return Flushed::Done;
            }
            owners
                .into_iter()
                .filter_map(|owner| {
                    let cause = state.dirty.remove(&owner)?;
                    let members = index.members_of(&owner);
                    state.computing.insert(owner.clone());
                    Some((owner, cause, members))
                })
                .collect()
        };
        // Read after what the picked members say: every change up to `at`
        // is in the tables read below.
        let at = self.position();
        let mut unwritten = Vec::new();
        for (owner, cause, members) in &picked {
            match self.refresh(owner, members, at, cause).await {
                Ok(()) => {}
                Err(ViewError::Unavailable(error)) => {
                    tracing::warn!(view = R::NAME, owner = %owner.as_str(), %error,
                        "a view record waits for its store");
                    unwritten.push((owner.clone(), cause.clone()));
                }
                Err(error) => {
                    tracing::warn!(view = R::NAME, owner = %owner.as_str(), %error,
                        "a view record could not be written");
                }
            }
        }
        let mut state = self.lock();
        for (owner, ..) in &picked {
            state.computing.remove(owner);
        }
        let waits = !unwritten.is_empty();
        for (owner, cause) in unwritten {
            // A newer change's cause, if one came meanwhile, is kept.
            state.dirty.entry(owner).or_insert(cause);
        }
        self.settle_if_done(&mut state);
        let more = !state.dirty.is_empty();
        if more {
            // Another round may be waiting for an owner this one held.
            self.wake.notify_one();
        }
        match (waits, more) {
            (true, _) => Flushed::Unavailable,
            (false, true) => Flushed::More,
            (false, false) => Flushed::Done,
        }
    }

    /// Recomputes dirty owners whenever there are some, until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = self.wake.notified() => {}
            }
            loop {
                match self.flush_some().await {
                    Flushed::Done => break,
                    // Let the handler mark more meanwhile: they join this
                    // round.
                    Flushed::More => tokio::task::yield_now().await,
                    Flushed::Unavailable => tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(UNAVAILABLE_RETRY) => {}
                    },
                }
            }
        }
    }

    /// Writes `owner`'s view record as the tables say it is now (read after
    /// position `at`), unless it is so already.
    ///
    /// `members` are those the index says name it: what the handler has
    /// seen of them (a member whose change is still on its way marks this
    /// owner again once seen).
    async fn refresh(
        &self,
        owner: &RecordId,
        members: &[RecordId],
        at: u64,
        cause: &Cause,
    ) -> Result<(), ViewError> {
        let record = match self.owners.get(owner.as_str()) {
            None => None,
            Some(live) => {
                let members: Vec<Record> = (members.iter())
                    .filter_map(|m| self.members.get(m.as_str()))
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
        (self.table.writer())
            .derive(owner, at, version, record, cause)
            .await?;
        Ok(())
    }
}

/// A rebuild writing its view: ended when dropped. If it did not finish
/// (the store did not answer, or its caller went away mid-way), the
/// records it was to write are left dirty, for the rounds to write.
struct Rebuild<'v, R: Rule> {
    view: &'v View<R>,
    work: Vec<(RecordId, Vec<RecordId>)>,
    cause: Cause,
    finished: bool,
}

impl<R: Rule> Drop for Rebuild<'_, R> {
    fn drop(&mut self) {
        let view = self.view;
        let mut state = view.lock();
        state.rebuilding -= 1;
        if !self.finished {
            for (owner, _) in self.work.drain(..) {
                state
                    .dirty
                    .entry(owner)
                    .or_insert_with(|| self.cause.clone());
            }
            view.owe(&mut state);
            view.wake.notify_one();
        }
        view.settle_if_done(&mut state);
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
            self.filmography.apply(change).await
        } else if Self::feeds(&self.overview, change) {
            self.overview.apply(change).await
        } else {
            return Err(Failure::Permanent(format!(
                "no view is computed from `{}`",
                change.table
            )));
        };
        applied.map_err(|error| match error {
            ViewError::Unavailable(reason) => Failure::Unavailable(reason),
            error => Failure::Permanent(error.to_string()),
        })
    }
}
