//! The media catalog: actors, movies, series, episodes and videos, wired
//! into the six scenarios on the engine. Knows nothing about HTTP.

pub mod data_dir;
pub mod encode_handler;
pub mod pipeline;
pub mod projection;
pub mod raw_handler;
pub mod records;
pub mod saga;
pub mod scale_out;
