//! A spawned `eventsys` binary on port 0, for the tests that need a real
//! process: signals, sockets, memory. Each test file uses what it needs.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a server may take to start, or to exit after a signal when it
/// has to drain 1.2 s of work.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A running `eventsys` process and everything it logged.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    /// Every line of stdout and stderr so far (stdout lines are JSON).
    log: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
    /// Lines of stdout not yet read by [`Server::wait_for_message`].
    lines: Option<Receiver<String>>,
}

impl Server {
    pub fn start(flags: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_eventsys"))
            .args(["--addr", "127.0.0.1:0", "--log-format", "json"])
            .args(flags)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the eventsys binary");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (lines, listening) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let readers = vec![
            collect(stdout, log.clone(), Some(lines)),
            collect(stderr, log.clone(), None),
        ];
        let mut server = Server {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
            readers,
            lines: None,
        };
        server.addr = server.wait_for_address(&listening);
        server.lines = Some(listening);
        server
    }

    /// The next log entry whose message starts with `prefix` (after the
    /// listening line), waiting for it up to [`DEADLINE`].
    pub fn wait_for_message(&mut self, prefix: &str) -> Value {
        let lines = self.lines.as_ref().expect("the server's lines");
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if let Ok(entry) = serde_json::from_str::<Value>(&line)
                        && message(&entry).starts_with(prefix)
                    {
                        return entry;
                    }
                }
                Err(_) => panic!(
                    "no \"{prefix}\" line within {DEADLINE:?}; log:\n{}",
                    self.log_text()
                ),
            }
        }
    }

    /// The `addr` of the "eventsys listening" line.
    pub fn wait_for_address(&mut self, lines: &Receiver<String>) -> SocketAddr {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match lines.recv_timeout(left) {
                Ok(line) => line,
                Err(_) => {
                    let _ = self.child.kill();
                    panic!(
                        "no \"eventsys listening\" line within {DEADLINE:?}; log:\n{}",
                        self.log_text()
                    );
                }
            };
            let Ok(entry) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if message(&entry).starts_with("eventsys listening") {
                let addr = entry["fields"]["addr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("the listening line has no `addr`: {line}"));
                return addr
                    .parse()
                    .unwrap_or_else(|e| panic!("bad addr `{addr}`: {e}"));
            }
        }
    }

    pub fn log_text(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed: {status}");
    }

    /// Waits for the process to exit, up to `limit`; kills it and fails
    /// if it does not.
    pub fn wait_for_exit(&mut self, limit: Duration) -> (ExitStatus, Duration) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return (status, started.elapsed());
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "eventsys did not exit within {limit:?} of the signal; log:\n{}",
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The JSON log entries, once the process has exited and its output
    /// is read to the end.
    pub fn entries(&mut self) -> Vec<Value> {
        for reader in self.readers.drain(..) {
            reader.join().expect("log reader");
        }
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the binary with exactly `flags` until it exits (within
/// [`DEADLINE`], or it is killed and the test fails): its exit status and
/// everything it printed.
pub fn run_to_exit(flags: &[&str]) -> (ExitStatus, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_eventsys"))
        .args(flags)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the eventsys binary");
    let log = Arc::new(Mutex::new(Vec::new()));
    let readers = [
        collect(child.stdout.take().expect("stdout"), log.clone(), None),
        collect(child.stderr.take().expect("stderr"), log.clone(), None),
    ];
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("eventsys {flags:?} did not exit within {DEADLINE:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    for reader in readers {
        reader.join().expect("log reader");
    }
    let text = log.lock().unwrap_or_else(|e| e.into_inner()).join("\n");
    (status, text)
}

/// Reads `from` line by line into `log`, forwarding lines to `lines`.
pub fn collect(
    from: impl Read + Send + 'static,
    log: Arc<Mutex<Vec<String>>>,
    lines: Option<mpsc::Sender<String>>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            log.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(line.clone());
            if let Some(lines) = &lines {
                let _ = lines.send(line);
            }
        }
    })
}

pub fn message(entry: &Value) -> &str {
    entry["fields"]["message"].as_str().unwrap_or("")
}

/// One HTTP/1.1 request on its own connection; the status and body.
pub fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(DEADLINE))
        .expect("read timeout");
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the response");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// [`http`] that reports a failed connection or a cut-off response (a
/// server killed mid-request) instead of panicking, with the body's
/// content type given.
pub fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(DEADLINE))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
