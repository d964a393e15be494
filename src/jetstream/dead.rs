//! Dead letters on JetStream, one subject per queue: any process lists,
//! redrives or discards what any process gave up on.
//!
//! A queue's letters are the messages of `<prefix>.dead.<queue>`, kept up
//! to the queue's limit (the oldest go first, as in memory). A process
//! that gives up on a change publishes its letter before it acks the
//! change, so a crash between the two leaves the change to be tried again,
//! never a change neither done nor dead-lettered. A redrive reads the
//! letters up to the last one, puts their items back for the queue's
//! consumer (see [`super::queue`]) and then purges what it read, so a
//! letter written meanwhile stays.

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, DiscardPolicy, StorageType};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::Connection;
use super::state::{Names, OpenError};
use crate::engine::store::StoreError;

/// A dead letter as it is kept: the item as its queue stores it, why it
/// was given up on, after how many attempts, and when (RFC 3339).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Letter {
    pub item: serde_json::Value,
    pub error: String,
    pub attempts: u32,
    pub failed_at: String,
}

/// The dead-letter stream, as one process uses it.
#[derive(Clone)]
pub struct DeadLetters {
    jetstream: async_nats::jetstream::Context,
    stream: stream::Stream,
    names: Names,
}

fn unavailable(error: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(error.to_string())
}

impl DeadLetters {
    /// Opens the dead-letter stream, making it if need be, keeping up to
    /// `per_queue` letters of each queue.
    pub async fn open(
        connection: &Connection,
        names: Names,
        per_queue: usize,
        replicas: usize,
    ) -> Result<Self, OpenError> {
        let config = stream::Config {
            name: names.dead_stream(),
            subjects: vec![names.dead_subjects()],
            storage: StorageType::File,
            num_replicas: replicas,
            max_messages_per_subject: i64::try_from(per_queue.max(1)).unwrap_or(i64::MAX),
            discard: DiscardPolicy::Old,
            ..Default::default()
        };
        let stream = connection.stream(config).await?;
        Ok(Self {
            jetstream: connection.jetstream.clone(),
            stream,
            names,
        })
    }

    /// Keeps `letter` among `queue`'s; its number once JetStream has it.
    pub async fn record(&self, queue: &str, letter: &Letter) -> Result<u64, StoreError> {
        let payload = serde_json::to_vec(letter).map_err(unavailable)?;
        let publish = PublishMessage::build().payload(payload.into());
        let ack = self
            .jetstream
            .send_publish(self.names.dead_subject(queue), publish)
            .await
            .map_err(unavailable)?
            .await
            .map_err(unavailable)?;
        Ok(ack.sequence)
    }

    /// Every letter of `queue` kept now, oldest first, with its number.
    pub async fn list(&self, queue: &str) -> Result<Vec<(u64, Letter)>, StoreError> {
        let config = pull::OrderedConfig {
            filter_subject: self.names.dead_subject(queue),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        };
        let consumer = self
            .stream
            .create_consumer(config)
            .await
            .map_err(unavailable)?;
        let mut letters = Vec::new();
        // An empty subject delivers nothing: ask first.
        if consumer.cached_info().num_pending == 0 {
            return Ok(letters);
        }
        let mut messages = consumer.messages().await.map_err(unavailable)?;
        while let Some(message) = messages.next().await {
            let message = message.map_err(unavailable)?;
            let info = message.info().map_err(unavailable)?;
            let (seq, left) = (info.stream_sequence, info.pending);
            match serde_json::from_slice(&message.payload) {
                Ok(letter) => letters.push((seq, letter)),
                Err(error) => {
                    tracing::warn!(%queue, seq, %error, "a dead letter that cannot be read");
                }
            }
            if left == 0 {
                break;
            }
        }
        Ok(letters)
    }

    /// Drops `queue`'s letters numbered up to `upto`.
    pub async fn drop_through(&self, queue: &str, upto: u64) -> Result<(), StoreError> {
        self.stream
            .purge()
            .filter(self.names.dead_subject(queue))
            .sequence(upto + 1)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
