//! `GET /`: the dashboard, embedded in the binary so it works offline.

use axum::response::Html;

pub async fn index() -> Html<&'static str> {
    Html(include_str!("dashboard/index.html"))
}
