//! Tables and the change log on one JetStream stream.
//!
//! Every record's state is a message on the subject
//! `<prefix>.state.<table>.<id in base64url>`; the last message on that
//! subject is the record's state, and its stream sequence the state's
//! revision. A write publishes the new state with
//! `Nats-Expected-Last-Subject-Sequence` set to the revision it was worked
//! out from, so of two processes writing one record at once exactly one
//! wins and the other works its write out again ([`crate::engine::store`]).
//! The message's payload is the entry and the change it made (the same
//! `PUT` frame a data directory writes), so the stream *is* the change log:
//! a change's `sequence` is its message's stream sequence.
//!
//! Each process follows the stream from its start with an ordered consumer
//! and applies every message to its tables and change log, in stream
//! order; its tables are then a replica of the stream, and serve reads,
//! paging and counts.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, LastRawMessageErrorKind, StorageType};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Connection;
use crate::engine::children::Children;
use crate::engine::log::{ChangeLog, TableName};
use crate::engine::store::{Key, Store, StoreError, Stored};
use crate::engine::table::Table;
use crate::storage::effect::{self, Correlations, CurrentFrame, MarkFrame, StateFrame};

/// How long the stream's reader may send nothing while the stream has
/// more before it is made again (see [`StateStore::follow`]).
const STALL: Duration = Duration::from_secs(2);

/// How stream, subject and consumer names are made from a prefix, so that
/// several pipelines can share one NATS account.
#[derive(Clone, Debug)]
pub struct Names {
    prefix: String,
}

/// The prefix names everything eventsys makes in JetStream.
#[derive(Debug, thiserror::Error)]
#[error("the JetStream prefix `{0}` may only hold letters, digits, `-` and `_` (1 to 32 of them)")]
pub struct BadPrefix(String);

impl Names {
    pub fn new(prefix: &str) -> Result<Self, BadPrefix> {
        let fits = (1..=32).contains(&prefix.len())
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !fits {
            return Err(BadPrefix(prefix.to_owned()));
        }
        Ok(Self {
            prefix: prefix.to_owned(),
        })
    }

    /// The stream of every record's state.
    pub fn state_stream(&self) -> String {
        format!("{}_state", self.prefix)
    }

    /// What the state stream holds: every record's state, every table's
    /// current reconciliation, every parent's child-list mark, and changes
    /// redriven from dead letters (which a replica passes over, so that
    /// how far it has got is a place in the stream).
    pub fn stream_subjects(&self) -> Vec<String> {
        ["state", "current", "mark", "redrive"]
            .iter()
            .map(|kind| format!("{}.{kind}.>", self.prefix))
            .collect()
    }

    /// Where the changes redriven to `queue` go, one subject each.
    pub fn redrive_subject(&self, queue: &str) -> String {
        format!("{}.redrive.{queue}", self.prefix)
    }

    /// Every change redriven to `queue`.
    pub fn redrive_subjects(&self, queue: &str) -> String {
        format!("{}.redrive.{queue}.>", self.prefix)
    }

    /// The subject of `table`'s `key`.
    pub fn subject(&self, table: &str, key: Key<'_>) -> String {
        match key {
            Key::Record(id) => self.state_subject(table, id),
            Key::Current => format!("{}.current.{table}", self.prefix),
            Key::Mark(parent) => format!(
                "{}.mark.{table}.{}",
                self.prefix,
                URL_SAFE_NO_PAD.encode(parent)
            ),
        }
    }

    /// The subject of `table`'s record `id`.
    pub fn state_subject(&self, table: &str, id: &str) -> String {
        format!(
            "{}.state.{table}.{}",
            self.prefix,
            URL_SAFE_NO_PAD.encode(id)
        )
    }

    /// Every state subject of `table`.
    pub fn table_subjects(&self, table: &str) -> String {
        format!("{}.state.{table}.>", self.prefix)
    }

    /// The stream of the dedup window.
    pub fn dedup_stream(&self) -> String {
        format!("{}_dedup", self.prefix)
    }

    /// Every key of the dedup window.
    pub fn dedup_subjects(&self) -> String {
        format!("{}.dedup.*", self.prefix)
    }

    /// The subject of one key (its digest in hex).
    pub fn dedup_subject(&self, hex: &str) -> String {
        format!("{}.dedup.{hex}", self.prefix)
    }

    /// The work-queue stream of items handlers put on queues.
    pub fn work_stream(&self) -> String {
        format!("{}_work", self.prefix)
    }

    /// Every queue's items.
    pub fn work_subjects(&self) -> String {
        format!("{}.work.*", self.prefix)
    }

    /// The items of the queue `queue`.
    pub fn work_subject(&self, queue: &str) -> String {
        format!("{}.work.{queue}", self.prefix)
    }

    /// The dead-letter stream.
    pub fn dead_stream(&self) -> String {
        format!("{}_dead", self.prefix)
    }

    /// Every queue's dead letters.
    pub fn dead_subjects(&self) -> String {
        format!("{}.dead.*", self.prefix)
    }

    /// The dead letters of the queue `queue`.
    pub fn dead_subject(&self, queue: &str) -> String {
        format!("{}.dead.{queue}", self.prefix)
    }

    /// The durable consumer of the queue `queue`.
    pub fn consumer(&self, queue: &str) -> String {
        format!("{}_{queue}", self.prefix)
    }

    /// The table and key a subject of the state stream is for.
    fn parse_subject(&self, subject: &str) -> Option<(String, Parsed)> {
        let rest = subject.strip_prefix(self.prefix.as_str())?;
        if let Some(table) = rest.strip_prefix(".current.") {
            return Some((table.to_owned(), Parsed::Current));
        }
        if let Some(queue) = rest.strip_prefix(".redrive.") {
            let (queue, _) = queue.split_once('.')?;
            return Some((queue.to_owned(), Parsed::Redrive));
        }
        let (kind, rest) = rest.strip_prefix('.')?.split_once('.')?;
        let (table, id) = rest.split_once('.')?;
        let id = String::from_utf8(URL_SAFE_NO_PAD.decode(id).ok()?).ok()?;
        let key = match kind {
            "state" => Parsed::Record(id),
            "mark" => Parsed::Mark(id),
            _ => return None,
        };
        Some((table.to_owned(), key))
    }
}

/// What a subject of the state stream is for.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Record(String),
    Current,
    Mark(String),
    /// A change redriven to a queue: for its consumer, not the replica.
    Redrive,
}

/// What a process keeps a replica of: its tables, and its parents' child
/// lists, by table name (a listing table's, for child lists).
#[derive(Default)]
pub struct Replicas {
    pub tables: HashMap<TableName, Arc<Table>>,
    pub children: HashMap<TableName, Arc<Children>>,
}

/// How the state stream is made.
#[derive(Clone, Debug)]
pub struct StateOptions {
    /// Copies JetStream keeps of each message (1, or 3 in a cluster).
    pub replicas: usize,
    /// States kept per record: the latest always, older ones for the
    /// change log's history.
    pub history: i64,
}

impl Default for StateOptions {
    fn default() -> Self {
        Self {
            replicas: 1,
            history: 64,
        }
    }
}

/// Why the state stream cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the JetStream stream `{stream}`: {reason}")]
pub struct OpenError {
    stream: String,
    reason: String,
}

impl OpenError {
    pub fn new(stream: &str, reason: impl std::fmt::Display) -> Self {
        Self {
            stream: stream.to_owned(),
            reason: reason.to_string(),
        }
    }
}

/// The state stream, as this process's tables use it.
pub struct StateStore {
    jetstream: async_nats::jetstream::Context,
    stream: stream::Stream,
    names: Names,
    /// The stream sequence of the last message this process's replica has
    /// applied.
    applied: watch::Sender<u64>,
}

impl StateStore {
    /// Opens the state stream, making it if it does not exist.
    pub async fn open(
        connection: &Connection,
        names: Names,
        options: &StateOptions,
    ) -> Result<Arc<Self>, OpenError> {
        let config = stream::Config {
            name: names.state_stream(),
            subjects: names.stream_subjects(),
            storage: StorageType::File,
            num_replicas: options.replicas,
            // Older states of a record go first; its latest never does.
            max_messages_per_subject: options.history.max(1),
            allow_direct: true,
            ..Default::default()
        };
        let stream = connection.stream(config).await?;
        Ok(Arc::new(Self {
            jetstream: connection.jetstream.clone(),
            stream,
            names,
            applied: watch::Sender::new(0),
        }))
    }

    /// The state stream.
    pub fn stream(&self) -> &stream::Stream {
        &self.stream
    }

    /// The JetStream context the stream is used through.
    pub fn jetstream(&self) -> &async_nats::jetstream::Context {
        &self.jetstream
    }

    /// The last stream sequence this process has applied.
    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    /// The stream's last sequence now (0 while it is empty).
    pub async fn last(&self) -> Result<u64, StoreError> {
        let mut stream = self.stream.clone();
        let info = stream
            .info()
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(info.state.last_sequence)
    }

    /// Waits until this process has applied the stream up to `seq`.
    pub async fn caught_up(&self, seq: u64) {
        let mut applied = self.applied.subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = applied.wait_for(|applied| *applied >= seq).await;
    }

    /// Follows the stream into `tables` and `log` until `stop`: every
    /// state, in stream order, from the oldest kept.
    ///
    /// The ordered consumer is made again from the next sequence to apply
    /// whenever it ends, or when it has sent nothing for [`STALL`] while
    /// the stream has more: a consumer on a NATS node that died can take a
    /// minute to notice it on its own, and every write through this
    /// process waits for the replica meanwhile.
    pub async fn follow(
        self: Arc<Self>,
        replicas: Replicas,
        log: Arc<ChangeLog>,
        stop: CancellationToken,
    ) {
        log.become_replica();
        let mut correlations = Correlations::default();
        loop {
            let Some(mut messages) = self.reader(&stop).await else {
                return;
            };
            loop {
                let message = tokio::select! {
                    () = stop.cancelled() => return,
                    message = tokio::time::timeout(STALL, messages.next()) => message,
                };
                let message = match message {
                    Ok(Some(Ok(message))) => message,
                    Ok(Some(Err(error))) => {
                        tracing::warn!(%error, "reading the state stream");
                        continue;
                    }
                    Ok(None) => break,
                    Err(_) => match self.last().await {
                        Ok(last) if last > self.applied() => {
                            tracing::warn!(
                                applied = self.applied(),
                                last,
                                "the state stream's reader stalled; reading it again"
                            );
                            break;
                        }
                        _ => continue,
                    },
                };
                let seq = match message.info() {
                    Ok(info) => info.stream_sequence,
                    Err(error) => {
                        tracing::warn!(%error, "a state message without its sequence");
                        continue;
                    }
                };
                if seq <= self.applied() {
                    // Sent again by a reader made again.
                    continue;
                }
                if let Err(error) = self.apply(&replicas, &log, &message, seq, &mut correlations) {
                    tracing::warn!(subject = %message.subject, seq, %error, "state message ignored");
                }
                self.applied.send_replace(seq);
            }
        }
    }

    /// An ordered consumer of the stream from the first sequence not yet
    /// applied, made again every half second until it can be; `None` once
    /// `stop`.
    async fn reader(&self, stop: &CancellationToken) -> Option<pull::Ordered> {
        loop {
            let next = self.applied() + 1;
            let config = pull::OrderedConfig {
                filter_subjects: self.names.stream_subjects(),
                deliver_policy: if next == 1 {
                    DeliverPolicy::All
                } else {
                    DeliverPolicy::ByStartSequence {
                        start_sequence: next,
                    }
                },
                ..Default::default()
            };
            match self.stream.create_consumer(config).await {
                Ok(consumer) => match consumer.messages().await {
                    Ok(messages) => return Some(messages),
                    Err(error) => tracing::warn!(%error, "cannot read the state stream"),
                },
                Err(error) => tracing::warn!(%error, "cannot follow the state stream"),
            }
            tokio::select! {
                () = stop.cancelled() => return None,
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    fn apply(
        &self,
        replicas: &Replicas,
        log: &ChangeLog,
        message: &async_nats::Message,
        seq: u64,
        correlations: &mut Correlations,
    ) -> Result<(), String> {
        let (table, key) = self
            .names
            .parse_subject(&message.subject)
            .ok_or("not a state subject")?;
        if key == Parsed::Redrive {
            return Ok(());
        }
        if let Parsed::Mark(parent) = key {
            let children = replicas
                .children
                .get(table.as_str())
                .ok_or_else(|| format!("no child lists of `{table}` here"))?;
            let frame: MarkFrame = effect::decode(effect::MARK, &message.payload)?;
            if frame.applied.t != table || frame.applied.p != parent {
                let (p, t) = (frame.applied.p, frame.applied.t);
                return Err(format!("it holds the mark of `{p}` of `{t}`"));
            }
            return children.replicate_mark(seq, frame);
        }
        let table = replicas
            .tables
            .get(table.as_str())
            .ok_or_else(|| format!("no table `{table}` here"))?;
        let Parsed::Record(id) = key else {
            let frame: CurrentFrame = effect::decode(effect::CURRENT, &message.payload)?;
            if frame.t != **table.name() {
                return Err(format!("it holds the reconciliation of `{}`", frame.t));
            }
            return table.replicate_current(seq, frame);
        };
        let frame: StateFrame = effect::decode(effect::STATE, &message.payload)?;
        if frame.t != **table.name() || frame.id != id {
            return Err(format!("it holds `{}` of `{}`", frame.id, frame.t));
        }
        if let Some(change) = table.replicate(seq, frame, correlations)? {
            log.replicate(change);
        }
        Ok(())
    }
}

impl Store for StateStore {
    fn applied(&self) -> u64 {
        StateStore::applied(self)
    }

    fn put<'a>(
        &'a self,
        table: &'a str,
        key: Key<'a>,
        expected: u64,
        frame: Vec<u8>,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let unavailable = |e: &dyn std::fmt::Display| StoreError::Unavailable(e.to_string());
            let publish = PublishMessage::build()
                .payload(frame.into())
                .expected_last_subject_sequence(expected);
            let subject = self.names.subject(table, key);
            let ack = self
                .jetstream
                .send_publish(subject, publish)
                .await
                .map_err(|e| unavailable(&e))?
                .await;
            let seq = match ack {
                Ok(ack) => ack.sequence,
                Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => {
                    return Err(StoreError::Conflict);
                }
                Err(error) => return Err(unavailable(&error)),
            };
            self.caught_up(seq).await;
            Ok(seq)
        })
    }

    fn latest<'a>(
        &'a self,
        table: &'a str,
        key: Key<'a>,
    ) -> BoxFuture<'a, Result<Option<Stored>, StoreError>> {
        Box::pin(async move {
            let subject = self.names.subject(table, key);
            match self.stream.get_last_raw_message_by_subject(&subject).await {
                Ok(message) => Ok(Some(Stored {
                    rev: message.sequence,
                    frame: message.payload.to_vec(),
                })),
                Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
                Err(error) => Err(StoreError::Unavailable(error.to_string())),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_name_the_table_and_encode_the_id() {
        let names = Names::new("es-1").expect("a good prefix");
        let subject = names.state_subject("movies", "a.b c/✓");
        assert!(subject.starts_with("es-1.state.movies."), "{subject}");
        let token = subject.rsplit('.').next().expect("a last token");
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{token}"
        );
        assert_eq!(
            names.parse_subject(&subject),
            Some(("movies".to_owned(), Parsed::Record("a.b c/✓".to_owned())))
        );
        assert_eq!(
            names.parse_subject(&names.subject("movies", Key::Current)),
            Some(("movies".to_owned(), Parsed::Current))
        );
        assert_eq!(
            names.parse_subject(&names.subject("series_episodes", Key::Mark("s.1"))),
            Some(("series_episodes".to_owned(), Parsed::Mark("s.1".to_owned())))
        );
        assert_eq!(
            names.parse_subject(&format!("{}.7", names.redrive_subject("raw_queue"))),
            Some(("raw_queue".to_owned(), Parsed::Redrive))
        );
        assert_eq!(names.parse_subject("other.state.movies.YQ"), None);
        for bad in ["", "a.b", "a b", "a>", &"x".repeat(33)] {
            assert!(Names::new(bad).is_err(), "{bad:?}");
        }
    }
}
