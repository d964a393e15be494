//! `GET /`: the live dashboard, and the two assets it loads.
//!
//! The page, its script and its style sheet are embedded at compile time so
//! the binary serves a working dashboard offline, with nothing fetched from
//! any other host. Each asset carries an `ETag` computed from its content at
//! compile time and `Cache-Control: no-cache`: a browser revalidates on
//! every load (a cheap 304 on loopback) and so never runs a script older
//! than the binary serving it.

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::{AppState, NoQuery};

/// The dashboard's paths (all `GET`), as [`routes`] declares them (the
/// OpenAPI tests read those declarations from this file's source).
pub const PATHS: [&str; 3] = ["/", "/dashboard/app.js", "/dashboard/style.css"];

/// One embedded file: its bytes, media type and content-derived `ETag`.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    etag: &'static str,
}

/// Builds an [`Asset`] whose `ETag` is the FNV-1a hash of its content,
/// computed by the compiler, so a changed file always gets a new tag.
macro_rules! asset {
    ($path:literal, $content_type:literal) => {{
        const BODY: &str = include_str!($path);
        const TAG: [u8; 18] = etag(BODY.as_bytes());
        Asset {
            body: BODY,
            content_type: $content_type,
            // `etag` writes only ASCII hex digits and quotes.
            etag: match std::str::from_utf8(&TAG) {
                Ok(tag) => tag,
                Err(_) => panic!("etag is ASCII"),
            },
        }
    }};
}

static INDEX: Asset = asset!("dashboard/index.html", "text/html; charset=utf-8");
static SCRIPT: Asset = asset!("dashboard/app.js", "text/javascript; charset=utf-8");
static STYLE: Asset = asset!("dashboard/style.css", "text/css; charset=utf-8");

/// The dashboard's routes, merged into the API router.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/",
            get(|_: NoQuery, headers: HeaderMap| async move { serve(&INDEX, &headers) }),
        )
        .route(
            "/dashboard/app.js",
            get(|_: NoQuery, headers: HeaderMap| async move { serve(&SCRIPT, &headers) }),
        )
        .route(
            "/dashboard/style.css",
            get(|_: NoQuery, headers: HeaderMap| async move { serve(&STYLE, &headers) }),
        )
}

/// The asset, or a bodiless 304 when the browser already holds this version.
fn serve(asset: &'static Asset, request: &HeaderMap) -> Response {
    let etag = HeaderValue::from_static(asset.etag);
    let cache = HeaderValue::from_static("no-cache");
    let fresh = request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| tag.trim() == asset.etag || tag.trim() == "*");
    if fresh {
        return (
            StatusCode::NOT_MODIFIED,
            [(header::ETAG, etag), (header::CACHE_CONTROL, cache)],
        )
            .into_response();
    }
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            ),
            (header::ETAG, etag),
            (header::CACHE_CONTROL, cache),
            // Browsers use the type given, never a guessed one.
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        asset.body,
    )
        .into_response()
}

/// A strong `ETag` (`"` + 16 hex digits + `"`) from the 64-bit FNV-1a hash
/// of `bytes`; a `const fn` so it costs nothing at run time.
const fn etag(bytes: &[u8]) -> [u8; 18] {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut tag = [b'"'; 18];
    let mut digit = 0;
    while digit < 16 {
        tag[1 + digit] = HEX[((hash >> (60 - 4 * digit)) & 0xf) as usize];
        digit += 1;
    }
    tag
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_are_quoted_hex_and_differ_per_asset() {
        for asset in [&INDEX, &SCRIPT, &STYLE] {
            assert_eq!(asset.etag.len(), 18);
            assert!(asset.etag.starts_with('"') && asset.etag.ends_with('"'));
        }
        assert_ne!(INDEX.etag, SCRIPT.etag);
        assert_ne!(SCRIPT.etag, STYLE.etag);
    }
}
