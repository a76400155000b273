//! Logging setup: human-readable by default, JSON on request; `RUST_LOG` filters.
//!
//! Every client connection runs in a `conn` span carrying its id, listener, peer and (once
//! named) producer, so each line it writes says whose it is. Per-publish verdicts are not logged
//! one by one: [`crate::admin::events`] writes one line per producer and verdict per interval.

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colours only on a terminal).
    Text,
    /// One JSON object per line: `timestamp`, `level`, `fields` (`message` and the event's
    /// fields), `target`, and `span` (the connection's).
    Json,
}

/// Install the global subscriber. Safe to call more than once (later calls do nothing).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}
