//! Graceful shutdown of the real binary.
//!
//! Each test spawns `eventsys` on port 0 with JSON logs, reads the address
//! it logs, gives it slow encode work, keeps a live `GET /events/stream`
//! open, and sends a signal. On SIGTERM and SIGINT it must stop taking
//! connections, end the live stream, drain the pipeline and exit 0 saying
//! it stopped cleanly; when the drain outlasts `--shutdown-timeout`, it must
//! still exit 0, promptly, and log what was left.
//!
//! Nothing here sleeps to wait for work: the tests wait on the server's
//! own output (its log, the event stream) and poll only for the process to
//! exit or the port to close, each with a deadline.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

#[path = "support/server.rs"]
mod server;

use server::{DEADLINE, Server, http, message};

fn find<'a>(entries: &'a [Value], text: &str) -> Vec<&'a Value> {
    entries
        .iter()
        .filter(|e| message(e).contains(text))
        .collect()
}

fn position(entries: &[Value], text: &str) -> Option<usize> {
    entries.iter().position(|e| message(e).contains(text))
}

fn show(entries: &[Value]) -> String {
    entries
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A live `GET /events/stream` from the start of the log, read raw.
struct Stream {
    stream: TcpStream,
    /// Everything received after the headers.
    seen: String,
}

impl Stream {
    fn open(addr: SocketAddr) -> Stream {
        let mut stream = TcpStream::connect(addr).expect("connect the stream");
        stream
            .set_read_timeout(Some(DEADLINE))
            .expect("read timeout");
        write!(
            stream,
            "GET /events/stream?after=0 HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
        )
        .expect("send the stream request");
        let mut this = Stream {
            stream,
            seen: String::new(),
        };
        let head = this.read_until("\r\n\r\n");
        let (head, rest) = head.split_once("\r\n\r\n").unwrap_or((&head, ""));
        assert!(
            head.starts_with("HTTP/1.1 200"),
            "the stream was refused: {head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/event-stream"),
            "not an event stream: {head}"
        );
        this.seen = rest.to_string();
        this
    }

    /// Reads until `text` has arrived; returns everything read so far.
    fn read_until(&mut self, text: &str) -> String {
        let mut buffer = [0u8; 8192];
        while !self.seen.contains(text) {
            match self.stream.read(&mut buffer) {
                Ok(0) => panic!("the stream ended before `{text}`: {}", self.seen),
                Ok(n) => self.seen.push_str(&String::from_utf8_lossy(&buffer[..n])),
                Err(e) => panic!("waiting for `{text}` on the stream: {e}; got {}", self.seen),
            }
        }
        self.seen.clone()
    }

    /// Reads to the end of the connection; fails if it stays open.
    fn read_to_end(&mut self) {
        let mut buffer = [0u8; 8192];
        loop {
            match self.stream.read(&mut buffer) {
                Ok(0) => return,
                Ok(n) => self.seen.push_str(&String::from_utf8_lossy(&buffer[..n])),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
                Err(e) => panic!("the event stream did not end after the signal: {e}"),
            }
        }
    }
}

/// A video with four renditions: four encode jobs.
fn video() -> Value {
    json!({
        "id": "v1",
        "title": "Clip",
        "duration_s": 60,
        "renditions": [
            {"id": "r240", "codec": "h264", "height": 240},
            {"id": "r480", "codec": "h264", "height": 480},
            {"id": "r720", "codec": "h264", "height": 720},
            {"id": "r1080", "codec": "av1", "height": 1080},
        ],
    })
}

/// Posts the video and waits, on the event stream, until `raw_handler`
/// has written it to `videos` (so its encode jobs exist).
fn start_work(server: &Server, stream: &mut Stream) {
    let (status, body) = http(server.addr, "POST", "/raw/videos", Some(&video()));
    assert_eq!(status, 200, "posting the video: {body}");
    stream.read_until("\"source\":\"/tables/videos\"");
}

fn encode_queue(server: &Server) -> Value {
    let (status, body) = http(server.addr, "GET", "/queues", None);
    assert_eq!(status, 200, "GET /queues: {body}");
    let queues: Value = serde_json::from_str(&body).expect("/queues is JSON");
    queues["queues"]
        .as_array()
        .and_then(|q| q.iter().find(|q| q["name"] == "encode_queue"))
        .cloned()
        .unwrap_or_else(|| panic!("no encode_queue in {body}"))
}

/// Polls until a new connection is refused; true if it was refused while
/// the process was still running (draining), false if only after it exited.
fn refused_while_running(server: &mut Server) -> bool {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let running = matches!(server.child.try_wait(), Ok(None));
        match TcpStream::connect_timeout(&server.addr, Duration::from_secs(1)) {
            // A connection caught in the backlog as the listener closes is
            // reset rather than refused: the same answer.
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset
                ) =>
            {
                return running;
            }
            Err(e) => panic!("connecting after the signal: {e}"),
            Ok(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "new connections were still accepted {DEADLINE:?} after the signal"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// On `signal`, the server stops taking connections, ends the live stream,
/// finishes the four encodes and exits 0, saying it stopped cleanly.
fn drains_and_exits_on(signal: &str) {
    let mut server = Server::start(&[
        "--encode-delay-ms",
        "300",
        "--encode-workers",
        "1",
        "--shutdown-timeout",
        "10s",
    ]);
    let mut stream = Stream::open(server.addr);
    start_work(&server, &mut stream);
    let pending = encode_queue(&server);
    assert!(
        pending["processed"].as_u64().unwrap_or(0) < 4,
        "the encodes finished before the signal, so nothing would be drained: {pending}"
    );

    server.signal(signal);
    let refused_early = refused_while_running(&mut server);
    stream.read_to_end();
    let (status, took) = server.wait_for_exit(DEADLINE);
    let entries = server.entries();
    let log = show(&entries);

    assert!(
        status.success(),
        "exit status {status} after {signal}; log:\n{log}"
    );
    let stopping = position(&entries, "shutting down: no new requests")
        .unwrap_or_else(|| panic!("no \"shutting down\" line; log:\n{log}"));
    let clean = position(&entries, "stopped cleanly")
        .unwrap_or_else(|| panic!("no \"stopped cleanly\" line; log:\n{log}"));
    assert!(
        stopping < clean,
        "stopped before shutting down? log:\n{log}"
    );
    for unwanted in [
        "left unfinished",
        "left in queue",
        "events unfinished",
        "dead-lettered",
    ] {
        assert!(
            find(&entries, unwanted).is_empty(),
            "`{unwanted}` in the log of a clean drain:\n{log}"
        );
    }
    assert!(
        !entries.iter().any(|e| e["level"] == "ERROR"),
        "errors logged:\n{log}"
    );
    assert!(
        refused_early,
        "new connections were refused only once the process had exited, not while it drained"
    );
    eprintln!("{signal}: exited 0 {took:?} after the signal; connections refused while draining");
}

#[test]
fn sigterm_stops_intake_ends_streams_drains_and_exits_zero() {
    drains_and_exits_on("TERM");
}

#[test]
fn sigint_stops_intake_ends_streams_drains_and_exits_zero() {
    drains_and_exits_on("INT");
}

/// Shutdown with four encodes that each take a minute (`--encode-delay-ms
/// 60000`, or an injected `delay_ms` fault when `fault` is set) and a
/// 300 ms timeout: it gives up on the drain, logs what was left, and still
/// exits 0 promptly.
fn gives_up_after_the_timeout(encode_delay_ms: &str, fault: bool) {
    let mut server = Server::start(&[
        "--encode-delay-ms",
        encode_delay_ms,
        "--encode-workers",
        "1",
        "--shutdown-timeout",
        "300ms",
    ]);
    if fault {
        let (status, body) = http(
            server.addr,
            "PUT",
            "/faults/encode_handler",
            Some(&json!({"delay_ms": 60_000})),
        );
        assert_eq!(status, 200, "injecting the delay: {body}");
    }
    let mut stream = Stream::open(server.addr);
    start_work(&server, &mut stream);

    server.signal("TERM");
    stream.read_to_end();
    let (status, took) = server.wait_for_exit(Duration::from_secs(10));
    let entries = server.entries();
    let log = show(&entries);

    assert!(status.success(), "exit status {status}; log:\n{log}");
    assert!(
        took < Duration::from_secs(5),
        "took {took:?} to exit with a 300 ms shutdown timeout; log:\n{log}"
    );
    let timeout = find(&entries, "events left unfinished");
    assert_eq!(timeout.len(), 1, "one timeout warning; log:\n{log}");
    assert_eq!(timeout[0]["level"], "WARN", "{log}");
    assert_eq!(
        timeout[0]["fields"]["left"], 4,
        "the four encodes are left; log:\n{log}"
    );
    let queues = find(&entries, "left in queue");
    let encode = queues
        .iter()
        .find(|e| e["fields"]["queue"] == "encode_queue")
        .unwrap_or_else(|| panic!("no \"left in queue\" line for encode_queue; log:\n{log}"));
    let count = |field: &str| encode["fields"][field].as_u64().unwrap_or(0);
    assert_eq!(
        count("depth") + count("in_flight") + count("retrying") + count("backlog"),
        4,
        "encode_queue holds the four jobs; log:\n{log}"
    );
    assert_eq!(
        count("in_flight"),
        1,
        "one worker holds one job; log:\n{log}"
    );
    let raw = queues
        .iter()
        .find(|e| e["fields"]["queue"] == "raw_queue")
        .unwrap_or_else(|| panic!("no \"left in queue\" line for raw_queue; log:\n{log}"));
    assert_eq!(
        raw["fields"]["depth"], 0,
        "raw_queue had drained; log:\n{log}"
    );
    let stopped = find(&entries, "stopped with events unfinished");
    assert_eq!(stopped.len(), 1, "a final warning; log:\n{log}");
    assert_eq!(stopped[0]["fields"]["left"], 4, "{log}");
    assert!(
        find(&entries, "stopped cleanly").is_empty(),
        "\"stopped cleanly\" with work left; log:\n{log}"
    );
    eprintln!("timeout: exited 0 {took:?} after the signal");
}

#[test]
fn a_drain_past_the_timeout_is_logged_and_still_exits_zero() {
    gives_up_after_the_timeout("60000", false);
}

#[test]
fn an_injected_fault_delay_does_not_hold_shutdown_past_the_timeout() {
    gives_up_after_the_timeout("0", true);
}

/// A `GET /settle?timeout_ms=600000` waiting on a minute of encodes ends
/// when shutdown starts (503, not settled), so the 300 ms shutdown timeout
/// still holds.
#[test]
fn a_pending_settle_does_not_hold_shutdown() {
    let mut server = Server::start(&[
        "--encode-delay-ms",
        "60000",
        "--encode-workers",
        "1",
        "--shutdown-timeout",
        "300ms",
    ]);
    let mut stream = Stream::open(server.addr);
    start_work(&server, &mut stream);
    let addr = server.addr;
    // Requests in flight, as the server counts them (this scrape included).
    let in_flight = || {
        let (_, metrics) = http(addr, "GET", "/metrics", None);
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("eventsys_http_requests_in_flight "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no in-flight gauge in:\n{metrics}"))
    };
    let before = in_flight();
    let settle = thread::spawn(move || http(addr, "GET", "/settle?timeout_ms=600000", None));
    // Wait until the server is serving the settle request.
    let deadline = Instant::now() + DEADLINE;
    while in_flight() <= before {
        assert!(
            Instant::now() < deadline,
            "the settle request never arrived"
        );
        thread::sleep(Duration::from_millis(5));
    }

    server.signal("TERM");
    let (status, body) = settle.join().expect("the settle client");
    stream.read_to_end();
    let (exit, took) = server.wait_for_exit(Duration::from_secs(10));
    let log = show(&server.entries());
    assert_eq!(status, 503, "the pending settle: {body}");
    let problem: Value = serde_json::from_str(&body).expect("problem+json");
    assert_eq!(problem["settled"], false, "{body}");
    assert!(exit.success(), "exit status {exit}; log:\n{log}");
    assert!(
        took < Duration::from_secs(5),
        "took {took:?} to exit with a 300 ms shutdown timeout and a pending settle; log:\n{log}"
    );
}
