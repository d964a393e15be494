//! Bounded memory at the edge, against the real binary: connections are
//! capped and timed out, and what a request carries is not kept longer
//! than it is handled.
//!
//! Nothing here sleeps to wait for work: each test waits on a socket (with
//! a read deadline) or on `/settle`.

#[path = "support/server.rs"]
mod server;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use server::{DEADLINE, Server, http};

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(DEADLINE))
        .expect("read timeout");
    stream
}

/// Reads until the server closes the connection; fails if it does not
/// within the deadline. Returns what was read.
fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    let started = Instant::now();
    loop {
        // Keep-alive comments would otherwise reset the read timeout for ever.
        assert!(
            started.elapsed() < DEADLINE,
            "the server kept the connection open past {DEADLINE:?}"
        );
        match stream.read(&mut buffer) {
            Ok(0) => return String::from_utf8_lossy(&seen).into_owned(),
            Ok(n) => seen.extend_from_slice(&buffer[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                return String::from_utf8_lossy(&seen).into_owned();
            }
            Err(e) => panic!(
                "the server kept the connection open past {DEADLINE:?} ({e}); read: {}",
                String::from_utf8_lossy(&seen)
            ),
        }
    }
}

/// One keep-alive `GET` on `stream`; the response's status.
fn get_keep_alive(stream: &mut TcpStream, path: &str) -> u16 {
    write!(stream, "GET {path} HTTP/1.1\r\nHost: eventsys\r\n\r\n").expect("send");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).expect("read the response head");
        assert!(
            n > 0,
            "closed mid-response: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no content-length: {head}"));
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).expect("read the body");
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status")
}

#[test]
fn a_half_written_request_is_closed_after_the_header_timeout() {
    let server = Server::start(&["--header-read-timeout", "300ms", "--idle-timeout", "1h"]);
    let started = Instant::now();
    let mut half: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut stream = connect(server.addr);
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: eventsys\r\nX-Slow: ")
                .expect("send half a header");
            stream
        })
        .collect();
    for stream in &mut half {
        let answer = read_until_closed(stream);
        assert!(answer.is_empty(), "a half request got an answer: {answer}");
    }
    assert!(started.elapsed() >= Duration::from_millis(300));
    // Whole requests are served as before.
    assert_eq!(http(server.addr, "GET", "/healthz", None).0, 200);
}

#[test]
fn an_idle_connection_is_closed_but_a_live_stream_is_not() {
    let server = Server::start(&["--idle-timeout", "200ms"]);
    let mut stream = connect(server.addr);
    write!(
        stream,
        "GET /events/stream HTTP/1.1\r\nHost: eventsys\r\nAccept: text/event-stream\r\n\r\n"
    )
    .expect("open the stream");
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).expect("the stream's head");
    assert_eq!(&head, b"HTTP/1.1 200");

    // A keep-alive connection that asks nothing more is closed...
    let mut idle = connect(server.addr);
    assert_eq!(get_keep_alive(&mut idle, "/healthz"), 200);
    read_until_closed(&mut idle);

    // ...but the stream, idle as long, still delivers.
    let (status, _) = http(
        server.addr,
        "POST",
        "/raw/movies",
        Some(&json!({"id": "after-idle", "title": "T"})),
    );
    assert_eq!(status, 200);
    let mut seen = String::new();
    let mut buffer = [0u8; 4096];
    while !seen.contains("after-idle") {
        let n = stream
            .read(&mut buffer)
            .expect("the stream keeps delivering");
        assert!(n > 0, "the stream was closed: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buffer[..n]));
    }
}

#[test]
fn a_connection_over_the_cap_is_answered_503_and_closed() {
    let server = Server::start(&["--max-connections", "4"]);
    let mut open: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut stream = connect(server.addr);
            // Served, so it holds one of the four places.
            assert_eq!(get_keep_alive(&mut stream, "/healthz"), 200);
            stream
        })
        .collect();

    let mut over = connect(server.addr);
    let _ = over.write_all(b"GET /healthz HTTP/1.1\r\nHost: eventsys\r\n\r\n");
    let answer = read_until_closed(&mut over);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let lower = answer.to_ascii_lowercase();
    assert!(lower.contains("retry-after: 1"), "{answer}");
    assert!(
        lower.contains("content-type: application/problem+json"),
        "{answer}"
    );
    let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap_or(""))
        .unwrap_or_else(|e| panic!("not a problem body ({e}): {answer}"));
    assert_eq!(body["status"], 503);
    assert_eq!(body["limit"], 4);
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("--max-connections")
    );

    // A place that frees up is taken again (the server sees the close
    // when it reads; poll, with a deadline).
    drop(open.pop());
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut stream = connect(server.addr);
        let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: eventsys\r\n\r\n");
        let mut head = [0u8; 12];
        if stream.read_exact(&mut head).is_ok() && &head == b"HTTP/1.1 200" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the freed place was not given back"
        );
        std::thread::yield_now();
    }
}

/// The resident set of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

#[test]
fn cloud_events_with_huge_sources_cost_the_dedup_window_nothing() {
    const EVENTS: usize = 20;
    const SOURCE: usize = 4 << 20;
    let server = Server::start(&[]);
    let pid = server.child.id();
    // Warm up: the first requests grow the allocator's pools.
    let warm = |i: usize| {
        let event = json!({
            "specversion": "1.0", "id": format!("warm-{i}"), "source": "x".repeat(SOURCE),
            "type": "com.example.movie", "data": {"id": format!("warm-{i}"), "title": "T"},
        });
        let (status, body) = http_ce(server.addr, &event);
        assert_eq!(status, 200, "{body}");
    };
    (0..2).for_each(warm);
    let before = rss(pid);
    for i in 0..EVENTS {
        // Each source differs, so each event is new to the window.
        let source = format!("{i:02}{}", "s".repeat(SOURCE - 2));
        let event = json!({
            "specversion": "1.0", "id": "1", "source": source, "type": "com.example.movie",
            "data": {"id": format!("m{i}"), "title": "T"},
        });
        let (status, body) = http_ce(server.addr, &event);
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"inserted\""), "{body}");
    }
    assert_eq!(
        http(server.addr, "GET", "/settle?timeout_ms=30000", None).0,
        200
    );
    let grown = rss(pid).saturating_sub(before);
    let bodies = (EVENTS * SOURCE) as u64;
    assert!(
        grown < bodies,
        "RSS grew by {} MiB handling {} MiB of sources: the window keeps them",
        grown >> 20,
        bodies >> 20
    );
    // Each is still recognised as a duplicate.
    let source = format!("{:02}{}", 7, "s".repeat(SOURCE - 2));
    let event = json!({
        "specversion": "1.0", "id": "1", "source": source, "type": "com.example.movie",
        "data": {"id": "m7", "title": "Changed"},
    });
    let (status, body) = http_ce(server.addr, &event);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"duplicate\""), "{body}");
}

/// POSTs one structured CloudEvent to `/raw/movies`.
fn http_ce(addr: SocketAddr, event: &Value) -> (u16, String) {
    let mut stream = connect(addr);
    let body = event.to_string();
    write!(
        stream,
        "POST /raw/movies HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/cloudevents+json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .expect("send the head");
    stream.write_all(body.as_bytes()).expect("send the body");
    let response = read_until_closed(&mut stream);
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response}"));
    (status, response)
}

/// Waits out at least `--idle-timeout` without sleeping: a keep-alive
/// connection that asks nothing is closed after it.
fn idle_timeout_passes(addr: SocketAddr) {
    let mut idle = connect(addr);
    assert_eq!(get_keep_alive(&mut idle, "/healthz"), 200);
    read_until_closed(&mut idle);
}

#[test]
fn a_client_that_takes_none_of_its_stream_is_closed_after_the_idle_timeout() {
    let server = Server::start(&["--idle-timeout", "300ms"]);
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket.connect(&server.addr.into()).expect("connect");
    let mut stalled: TcpStream = socket.into();
    stalled
        .set_read_timeout(Some(DEADLINE))
        .expect("read timeout");
    write!(
        stalled,
        "GET /events/stream HTTP/1.1\r\nHost: eventsys\r\nAccept: text/event-stream\r\n\r\n"
    )
    .expect("open the stream");
    // Far more changes than the socket buffers hold, none of them read.
    for round in 0..3 {
        let batch: Vec<Value> = (0..1000)
            .map(|i| json!({"id": format!("m{round}-{i}"), "title": "A title long enough to fill buffers"}))
            .collect();
        assert_eq!(
            http(server.addr, "POST", "/raw/movies", Some(&json!(batch))).0,
            200
        );
    }
    assert_eq!(
        http(server.addr, "GET", "/settle?timeout_ms=30000", None).0,
        200
    );
    idle_timeout_passes(server.addr);
    idle_timeout_passes(server.addr);
    // What was sent is still there to read, and then the end.
    let read = read_until_closed(&mut stalled);
    assert!(
        read.starts_with("HTTP/1.1 200"),
        "{}",
        &read[..read.len().min(200)]
    );
}

#[test]
fn a_half_written_request_does_not_hold_shutdown() {
    let mut server = Server::start(&["--header-read-timeout", "1h", "--shutdown-timeout", "500ms"]);
    let mut half = connect(server.addr);
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: eventsys\r\nX-Slow: ")
        .expect("send half a header");
    // Served once, so the server has certainly accepted the half one first.
    assert_eq!(http(server.addr, "GET", "/healthz", None).0, 200);
    server.signal("TERM");
    let (status, _) = server.wait_for_exit(DEADLINE);
    assert!(status.success(), "{status}");
    read_until_closed(&mut half);
}
