//! Access control (API.md, "Access control"): who may call which route.
//!
//! With `--auth-tokens-file`, every request but the open ones
//! ([`Need::Open`]) carries `Authorization: Bearer <token>`; the token
//! names a caller with a role, and the route's method and path alone say
//! which role it needs ([`need`]), so a route added to the router is
//! guarded by the same rule as its neighbours without a list to keep.
//!
//! Without a tokens file the server binds loopback only (see
//! [`check_exposure`]) and everyone is an `anonymous` operator, but a
//! state-changing request must name a loopback `Host` and carry no
//! `Origin` of another site: a web page in the user's browser can send a
//! form to `http://127.0.0.1:8080/...` (no preflight for a body-less
//! `POST`), and this is what keeps it from driving the server.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use axum::http::{HeaderMap, Method, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a caller may do; each role may do all that the ones before it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Every `GET` and `HEAD`, the event stream included.
    Reader,
    /// A reader who may also `POST`, `PUT` and `DELETE` on `/raw/...`.
    Producer,
    /// A producer who may also set faults, redrive, discard, replay,
    /// rebuild and retry.
    Operator,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Reader, Role::Producer, Role::Operator];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Producer => "producer",
            Role::Operator => "operator",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == text)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who made a request, as its token says (or `anonymous` without tokens).
#[derive(Clone, Debug)]
pub struct Caller {
    pub name: Arc<str>,
    pub role: Role,
    /// The CloudEvents `source` prefixes this caller may send; empty: any,
    /// plain JSON included.
    pub sources: Arc<[String]>,
}

impl Caller {
    /// Everyone, when the server has no tokens file.
    pub fn anonymous() -> Self {
        Self {
            name: "anonymous".into(),
            role: Role::Operator,
            sources: Arc::from([]),
        }
    }

    /// Whether this caller may send events from `source` (`None`: a
    /// plain JSON post, which has none).
    pub fn may_send_from(&self, source: Option<&str>) -> bool {
        self.sources.is_empty()
            || source.is_some_and(|s| self.sources.iter().any(|p| s.starts_with(p.as_str())))
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    /// The caller [`super::guard::authorize`] found (anonymous where the
    /// router runs without it).
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Caller>()
            .cloned()
            .unwrap_or_else(Caller::anonymous))
    }
}

/// The shortest token accepted: 16 characters is 96 bits or more of a
/// random base64 or hex string.
pub const MIN_TOKEN_LEN: usize = 16;

/// A tokens file that cannot be used, with the line that is wrong.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("cannot read the tokens file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}:{line}: {reason} (each line is `name role token [source-prefix ...]`)")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{path}: no tokens (each line is `name role token [source-prefix ...]`)")]
    Empty { path: PathBuf },
}

/// Logs a warning when others than its owner may read the tokens file.
fn warn_if_shared(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                path = %path.display(),
                "the tokens file may be read by others than its owner: chmod 600 it"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// The callers of a tokens file, found by their token's digest.
pub struct Tokens {
    callers: Vec<([u8; 32], Caller)>,
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

impl Tokens {
    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<Self, TokensError> {
        let text = std::fs::read_to_string(path).map_err(|error| TokensError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        warn_if_shared(path);
        Self::parse(path, &text)
    }

    /// Lines `name role token [source-prefix ...]`; blank lines and lines
    /// starting with `#` are skipped. Names and tokens are unique.
    pub fn parse(path: &Path, text: &str) -> Result<Self, TokensError> {
        let mut callers: Vec<([u8; 32], Caller)> = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line_error = |reason: String| TokensError::Line {
                path: path.to_path_buf(),
                line: index + 1,
                reason,
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [name, role, token, sources @ ..] = fields.as_slice() else {
                return Err(line_error(format!(
                    "{} field(s); a name, a role and a token are needed",
                    fields.len()
                )));
            };
            let role = Role::parse(role).ok_or_else(|| {
                line_error(format!(
                    "unknown role `{role}`; the roles are reader, producer and operator"
                ))
            })?;
            if token.len() < MIN_TOKEN_LEN {
                return Err(line_error(format!(
                    "the token of `{name}` is {} characters; at least {MIN_TOKEN_LEN} are needed \
                     (e.g. `openssl rand -hex 24`)",
                    token.len()
                )));
            }
            let hash = digest(token.as_bytes());
            if callers.iter().any(|(_, c)| &*c.name == *name) {
                return Err(line_error(format!("`{name}` is named twice")));
            }
            if callers.iter().any(|(h, _)| *h == hash) {
                return Err(line_error(format!(
                    "the token of `{name}` is also another caller's"
                )));
            }
            callers.push((
                hash,
                Caller {
                    name: (*name).into(),
                    role,
                    sources: sources.iter().map(|s| s.to_string()).collect(),
                },
            ));
        }
        if callers.is_empty() {
            return Err(TokensError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(Self { callers })
    }

    /// The caller whose token this is. Every caller's digest is compared,
    /// each in constant time, so neither the time taken nor where the
    /// search stops tells how much of a guess was right.
    pub fn find(&self, token: &str) -> Option<&Caller> {
        let hash = digest(token.as_bytes());
        let mut found = None;
        for (candidate, caller) in &self.callers {
            if bool::from(candidate.ct_eq(&hash)) {
                found = Some(caller);
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.callers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.callers.is_empty()
    }
}

/// The server's tokens, if it has a tokens file; re-read on `SIGHUP`.
pub struct Access {
    path: Option<PathBuf>,
    tokens: RwLock<Option<Arc<Tokens>>>,
}

impl Access {
    /// Reads the tokens file, if there is one.
    pub fn open(path: Option<&Path>) -> Result<Self, TokensError> {
        let tokens = path.map(Tokens::load).transpose()?;
        Ok(Self {
            path: path.map(Path::to_path_buf),
            tokens: RwLock::new(tokens.map(Arc::new)),
        })
    }

    /// Whether requests need tokens.
    pub fn enabled(&self) -> bool {
        self.path.is_some()
    }

    pub fn tokens(&self) -> Option<Arc<Tokens>> {
        self.tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the tokens file again; on an error, keeps the tokens it had.
    /// How many callers it now has.
    pub fn reload(&self) -> Result<usize, TokensError> {
        let Some(path) = &self.path else {
            return Ok(0);
        };
        let tokens = Tokens::load(path)?;
        let callers = tokens.len();
        *self.tokens.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(tokens));
        Ok(callers)
    }
}

/// What a route needs of its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Anyone: `/healthz`, `/openapi.json`, the dashboard page and assets.
    Open,
    Role(Role),
}

/// What `method` on `path` needs: every `GET` and `HEAD` a reader; a
/// write under `/raw/` a producer; every other write an operator.
pub fn need(method: &Method, path: &str) -> Need {
    let reads = method == Method::GET || method == Method::HEAD;
    if reads
        && (path == "/healthz"
            || path == "/openapi.json"
            || super::dashboard::PATHS.contains(&path))
    {
        Need::Open
    } else if reads {
        Need::Role(Role::Reader)
    } else if path.starts_with("/raw/") {
        Need::Role(Role::Producer)
    } else {
        Need::Role(Role::Operator)
    }
}

/// The README's table of every route the router serves and the role it
/// needs, made from the router's own declarations (the OpenAPI document
/// and the dashboard's paths) with [`need`].
pub fn route_table() -> String {
    let document = super::openapi();
    let mut routes: Vec<(String, Method)> = Vec::new();
    for (path, item) in &document.paths.paths {
        let methods = [
            (Method::GET, item.get.is_some()),
            (Method::POST, item.post.is_some()),
            (Method::PUT, item.put.is_some()),
            (Method::DELETE, item.delete.is_some()),
            (Method::PATCH, item.patch.is_some()),
        ];
        for (method, served) in methods {
            if served {
                routes.push((path.clone(), method));
            }
        }
    }
    for path in super::dashboard::PATHS {
        routes.push((path.to_string(), Method::GET));
    }
    routes.sort_by(|a, b| (&a.0, a.1.as_str()).cmp(&(&b.0, b.1.as_str())));
    let mut table = String::from("| Method | Path | Needs |\n|---|---|---|\n");
    for (path, method) in routes {
        let needs = match need(&method, &path) {
            Need::Open => "anyone".to_string(),
            Need::Role(role) => format!("`{role}`"),
        };
        table.push_str(&format!("| {method} | `{path}` | {needs} |\n"));
    }
    table
}

/// Whether a request of `method` changes state (and so, without tokens,
/// must come from a loopback page).
pub fn changes_state(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Why a request without tokens was refused as not local. With `open`
/// (`--insecure-open`, everyone is meant to reach the server) any `Host`
/// is taken, but a page of another origin is still refused.
pub fn not_local(headers: &HeaderMap, open: bool) -> Option<String> {
    // Browsers always send `Host`; a request without one (HTTP/1.0, or a
    // client in the same process) is no page's doing.
    let host = match headers.get(header::HOST) {
        None => return None,
        Some(host) => host.to_str().unwrap_or_default(),
    };
    if !open && !is_loopback_host(host) {
        return Some(format!(
            "this server has no tokens file, so it takes changes only from a loopback host; \
             the request's Host is `{host}` (start it with --auth-tokens-file to serve others)"
        ));
    }
    let origin = headers.get(header::ORIGIN)?;
    let origin = origin.to_str().unwrap_or("(not text)");
    let own = ["http://", "https://"]
        .iter()
        .any(|scheme| origin.strip_prefix(scheme) == Some(host));
    (!own).then(|| {
        format!("a page from `{origin}` may not change this server (its own pages are at `{host}`)")
    })
}

/// `localhost`, `127.x.y.z` or `[::1]`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((name, tail)) if tail.is_empty() || tail.starts_with(':') => name,
            _ => return false,
        }
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    };
    let name = name.to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Without a tokens file, a non-loopback address is refused unless the
/// operator says `--insecure-open`.
pub fn check_exposure(addr: SocketAddr, tokens: bool, insecure_open: bool) -> Result<(), String> {
    if tokens || insecure_open || addr.ip().is_loopback() {
        return Ok(());
    }
    Err(format!(
        "--addr {addr} is not a loopback address, and without tokens anyone who can reach it \
         could rewrite the catalog and drive the pipeline: give callers tokens with \
         --auth-tokens-file FILE (lines `name role token`, roles reader, producer, operator), \
         or pass --insecure-open to serve everyone as an operator anyway"
    ))
}

/// The token of an `Authorization: Bearer` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Tokens, TokensError> {
        Tokens::parse(Path::new("tokens"), text)
    }

    #[test]
    fn a_file_names_callers_by_token() {
        let tokens = parse(
            "# who may do what\n\nalice operator aaaaaaaaaaaaaaaa\n\
             cam producer bbbbbbbbbbbbbbbb urn:cam: urn:cams:\n",
        )
        .expect("parses");
        let alice = tokens.find("aaaaaaaaaaaaaaaa").expect("alice");
        assert_eq!((&*alice.name, alice.role), ("alice", Role::Operator));
        let cam = tokens.find("bbbbbbbbbbbbbbbb").expect("cam");
        assert_eq!(&*cam.sources, ["urn:cam:", "urn:cams:"]);
        assert!(tokens.find("aaaaaaaaaaaaaaab").is_none());
        assert!(cam.may_send_from(Some("urn:cams:7")));
        assert!(!cam.may_send_from(Some("urn:other")));
        assert!(!cam.may_send_from(None));
        assert!(alice.may_send_from(None));
    }

    #[test]
    fn a_bad_line_is_named_by_number() {
        for (text, line, says) in [
            (
                "a reader 0123456789abcdef\nb admin 0123456789abcdeg",
                2,
                "unknown role `admin`",
            ),
            ("\n\nb reader", 3, "2 field(s)"),
            ("b reader short", 1, "at least 16"),
            (
                "a reader 0123456789abcdef\na operator 0123456789abcdeg",
                2,
                "named twice",
            ),
            (
                "a reader 0123456789abcdef\nb operator 0123456789abcdef",
                2,
                "also another",
            ),
        ] {
            let error = parse(text).err().expect("refused").to_string();
            assert!(error.starts_with(&format!("tokens:{line}: ")), "{error}");
            assert!(error.contains(says), "{error}");
        }
        assert!(matches!(parse("# none\n"), Err(TokensError::Empty { .. })));
    }

    #[test]
    fn routes_need_roles_by_method_and_path() {
        assert_eq!(need(&Method::GET, "/healthz"), Need::Open);
        assert_eq!(need(&Method::GET, "/"), Need::Open);
        assert_eq!(need(&Method::POST, "/healthz"), Need::Role(Role::Operator));
        assert_eq!(
            need(&Method::GET, "/events/stream"),
            Need::Role(Role::Reader)
        );
        assert_eq!(
            need(&Method::PUT, "/raw/actors"),
            Need::Role(Role::Producer)
        );
        assert_eq!(
            need(&Method::DELETE, "/raw/actors/a1"),
            Need::Role(Role::Producer)
        );
        assert_eq!(
            need(&Method::PUT, "/faults/raw_handler"),
            Need::Role(Role::Operator)
        );
    }

    #[test]
    fn only_loopback_pages_may_change_an_open_server() {
        let headers = |pairs: &[(header::HeaderName, &str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.insert(name.clone(), value.parse().expect("header value"));
            }
            map
        };
        for host in [
            "127.0.0.1:8080",
            "localhost",
            "[::1]:80",
            "LOCALHOST:1",
            "app.localhost",
        ] {
            assert_eq!(
                not_local(&headers(&[(header::HOST, host)]), false),
                None,
                "{host}"
            );
        }
        for host in [
            "example.com",
            "10.0.0.1:8080",
            "127.0.0.1.example.com",
            "[::2]",
            "",
        ] {
            assert!(
                not_local(&headers(&[(header::HOST, host)]), false).is_some(),
                "{host}"
            );
        }
        assert_eq!(
            not_local(&HeaderMap::new(), false),
            None,
            "no Host: not a browser"
        );
        // --insecure-open: any host, but still no other site's page.
        let remote = [
            (header::HOST, "10.0.0.5:8080"),
            (header::ORIGIN, "http://10.0.0.5:8080"),
        ];
        assert_eq!(not_local(&headers(&remote), true), None);
        let evil = [
            (header::HOST, "10.0.0.5:8080"),
            (header::ORIGIN, "http://evil.example"),
        ];
        assert!(not_local(&headers(&evil), true).is_some());
        let own = [
            (header::HOST, "127.0.0.1:8080"),
            (header::ORIGIN, "http://127.0.0.1:8080"),
        ];
        assert_eq!(not_local(&headers(&own), false), None);
        for origin in ["http://evil.example", "null", "http://127.0.0.1:9999"] {
            let other = [(header::HOST, "127.0.0.1:8080"), (header::ORIGIN, origin)];
            assert!(not_local(&headers(&other), false).is_some(), "{origin}");
        }
    }

    #[test]
    fn an_open_server_binds_loopback_only() {
        let open: SocketAddr = "0.0.0.0:8080".parse().expect("addr");
        let local: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        let error = check_exposure(open, false, false).expect_err("refused");
        assert!(error.contains("--auth-tokens-file"), "{error}");
        assert!(check_exposure(open, true, false).is_ok());
        assert!(check_exposure(open, false, true).is_ok());
        assert!(check_exposure(local, false, false).is_ok());
    }

    #[test]
    fn bearer_tokens_are_read_from_the_header() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Bearer abc".parse().expect("value"));
        assert_eq!(bearer(&headers), Some("abc"));
        headers.insert(header::AUTHORIZATION, "Basic abc".parse().expect("value"));
        assert_eq!(bearer(&headers), None);
        headers.insert(header::AUTHORIZATION, "bearer ".parse().expect("value"));
        assert_eq!(bearer(&headers), None);
    }
}
