//! The HTTP contract of API.md, end to end through the router.

mod auth;
mod contract;
mod events;
mod helpers;
mod limits;
#[path = "../support/nats.rs"]
mod nats;
mod observability;
mod openapi;
mod projection;
mod reliability;
mod saga;
mod scenarios;
#[path = "../support/temp_dir.rs"]
mod temp_dir;
