//! Access control and TLS on the real binary: what it refuses to start
//! with, the tokens file re-read on SIGHUP, and HTTPS.

#[path = "support/server.rs"]
mod server;
#[path = "support/temp_dir.rs"]
mod temp_dir;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;

use server::{DEADLINE, Server, run_to_exit};
use temp_dir::TempDir;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// A directory with a tokens file holding `text`.
fn tokens_file(text: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new();
    std::fs::create_dir_all(&dir.0).unwrap();
    let file = dir.0.join("tokens");
    std::fs::write(&file, text).unwrap();
    (dir, file)
}

/// One request with a bearer token on its own connection; the status.
fn status_with(addr: SocketAddr, method: &str, path: &str, token: &str) -> u16 {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Connection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    status_of(&response)
}

fn status_of(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"))
}

#[test]
fn a_non_loopback_address_without_tokens_is_refused_saying_how_to_add_them() {
    let (status, text) = run_to_exit(&["--addr", "0.0.0.0:0"]);
    assert!(!status.success(), "{text}");
    assert!(text.contains("--auth-tokens-file"), "{text}");
    assert!(text.contains("--insecure-open"), "{text}");
}

#[test]
fn insecure_open_serves_everyone_with_a_warning() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_eventsys"))
        .args([
            "--addr",
            "0.0.0.0:0",
            "--insecure-open",
            "--log-format",
            "json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = Vec::new();
    let mut port = None;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
        if line.contains("eventsys listening") {
            let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
            let addr: SocketAddr = entry["fields"]["addr"].as_str().unwrap().parse().unwrap();
            port = Some(addr.port());
            break;
        }
        lines.push(line);
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("WARN") && l.contains("--insecure-open")),
        "{lines:#?}"
    );
    // Any Host may change it: it is open on purpose.
    let addr = SocketAddr::from(([127, 0, 0, 1], port.expect("a listening line")));
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let body = r#"{"id":"m1","title":"Heat"}"#;
    write!(
        stream,
        "POST /raw/movies HTTP/1.1\r\nHost: eventsys.example:8080\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status_of(&response), 200, "{response}");
}

#[test]
fn a_malformed_tokens_file_stops_the_start_naming_the_line() {
    let (_dir, file) = tokens_file(
        "alice operator 0123456789abcdef0123\n# a comment\nbob admin 0123456789abcdef0124\n",
    );
    let path = file.display().to_string();
    let (status, text) = run_to_exit(&["--addr", "127.0.0.1:0", "--auth-tokens-file", &path]);
    assert!(!status.success(), "{text}");
    assert!(text.contains(&format!("{path}:3:")), "{text}");
    assert!(text.contains("unknown role `admin`"), "{text}");
}

#[test]
fn the_tokens_file_is_re_read_on_sighup() {
    let first = "first-token-0123456789";
    let second = "second-token-0123456789";
    let (_dir, file) = tokens_file(&format!("ann operator {first}\n"));
    set_mode(&file, 0o600);
    let path = file.display().to_string();
    let mut server = Server::start(&["--auth-tokens-file", &path]);
    assert!(
        !server.log_text().contains("chmod 600"),
        "{}",
        server.log_text()
    );
    assert_eq!(status_with(server.addr, "GET", "/tables", first), 200);
    assert_eq!(status_with(server.addr, "GET", "/tables", second), 401);

    std::fs::write(&file, format!("ann reader {second}\n")).unwrap();
    // Readable by others now: the reload says so.
    set_mode(&file, 0o644);
    server.signal("HUP");
    server.wait_for_message("the tokens file may be read by others");
    let reloaded = server.wait_for_message("tokens reloaded");
    assert_eq!(reloaded["fields"]["callers"], 1, "{reloaded}");
    assert_eq!(status_with(server.addr, "GET", "/tables", first), 401);
    assert_eq!(status_with(server.addr, "GET", "/tables", second), 200);
    // The new role holds too: a reader may not set faults.
    assert_eq!(
        status_with(server.addr, "DELETE", "/faults/raw_handler", second),
        403
    );

    // A file that is now wrong keeps the tokens in use.
    std::fs::write(&file, "ann nobody x\n").unwrap();
    server.signal("HUP");
    server.wait_for_message("tokens not reloaded");
    assert_eq!(status_with(server.addr, "GET", "/tables", second), 200);
    assert_eq!(
        status_with(server.addr, "GET", "/healthz", "anything"),
        200,
        "/healthz stays open"
    );
}

fn set_mode(file: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn https_is_served_with_the_certificate_given() {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = TempDir::new();
    std::fs::create_dir_all(&dir.0).unwrap();
    let (cert, key) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let server = Server::start(&[
        "--tls-cert",
        &cert.display().to_string(),
        "--tls-key",
        &key.display().to_string(),
    ]);
    assert!(
        server
            .log_text()
            .contains(&format!("https://{}", server.addr)),
        "{}",
        server.log_text()
    );

    let mut roots = RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    let config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("localhost").unwrap();
    let connection = ClientConnection::new(Arc::new(config), name).unwrap();
    let socket = TcpStream::connect(server.addr).unwrap();
    socket.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut tls = StreamOwned::new(connection, socket);
    write!(
        tls,
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    // A server may close without TLS's close_notify once the response is
    // whole; what was read by then is the answer.
    let _ = tls.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response);
    assert_eq!(status_of(&response), 200, "{response}");

    // Plain HTTP on the same port gets no answer.
    let mut plain = TcpStream::connect(server.addr).unwrap();
    plain.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(plain, "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = plain.read_to_string(&mut answer);
    assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn a_certificate_that_cannot_be_read_stops_the_start() {
    let dir = TempDir::new();
    std::fs::create_dir_all(&dir.0).unwrap();
    let cert = dir.0.join("cert.pem");
    std::fs::write(&cert, "not a certificate").unwrap();
    let cert = cert.display().to_string();
    let (status, text) = run_to_exit(&[
        "--addr",
        "127.0.0.1:0",
        "--tls-cert",
        &cert,
        "--tls-key",
        &cert,
    ]);
    assert!(!status.success(), "{text}");
    assert!(text.contains(&cert) && text.contains("HTTPS"), "{text}");
}
