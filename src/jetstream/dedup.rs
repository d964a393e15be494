//! The dedup window on JetStream: one subject per key, the stream's
//! message limit as the window's size.
//!
//! A key is a message on `<prefix>.dedup.<hex of its digest>`, published
//! with an expected last subject sequence of 0, so of two processes adding
//! one key only one succeeds. The stream keeps the last `capacity`
//! messages and drops the oldest, which is how the in-memory window
//! forgets.

use std::fmt::Write as _;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, DiscardPolicy, LastRawMessageErrorKind, StorageType};
use futures_util::future::BoxFuture;

use super::Connection;
use super::state::{Names, OpenError};
use crate::engine::store::{SharedWindow, StoreError};

pub struct Window {
    jetstream: async_nats::jetstream::Context,
    stream: stream::Stream,
    names: Names,
}

impl Window {
    /// Opens the window's stream, making it if need be, for the last
    /// `capacity` keys.
    pub async fn open(
        connection: &Connection,
        names: Names,
        capacity: usize,
        replicas: usize,
    ) -> Result<Self, OpenError> {
        let config = stream::Config {
            name: names.dedup_stream(),
            subjects: vec![names.dedup_subjects()],
            storage: StorageType::File,
            num_replicas: replicas,
            max_messages: i64::try_from(capacity.max(1)).unwrap_or(i64::MAX),
            max_messages_per_subject: 1,
            discard: DiscardPolicy::Old,
            allow_direct: true,
            ..Default::default()
        };
        let stream = connection.stream(config).await?;
        Ok(Self {
            jetstream: connection.jetstream.clone(),
            stream,
            names,
        })
    }

    fn subject(&self, key: [u8; 32]) -> String {
        let mut hex = String::with_capacity(64);
        for byte in key {
            let _ = write!(hex, "{byte:02x}");
        }
        self.names.dedup_subject(&hex)
    }
}

impl SharedWindow for Window {
    fn contains(&self, key: [u8; 32]) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(async move {
            match self
                .stream
                .get_last_raw_message_by_subject(&self.subject(key))
                .await
            {
                Ok(_) => Ok(true),
                Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(false),
                Err(error) => Err(StoreError::Unavailable(error.to_string())),
            }
        })
    }

    fn add(&self, key: [u8; 32]) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(async move {
            let unavailable = |e: &dyn std::fmt::Display| StoreError::Unavailable(e.to_string());
            let publish = PublishMessage::build()
                .payload(Default::default())
                .expected_last_subject_sequence(0);
            let ack = self
                .jetstream
                .send_publish(self.subject(key), publish)
                .await
                .map_err(|e| unavailable(&e))?
                .await;
            match ack {
                Ok(_) => Ok(true),
                Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => Ok(false),
                Err(error) => Err(unavailable(&error)),
            }
        })
    }
}
