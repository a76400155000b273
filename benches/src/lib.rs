//! sluice's benchmarks: shared fixtures for the criterion benches (`cargo bench -p
//! sluice-benches`), the load generator ([`loadgen`], also the `loadgen` binary), the AMQP
//! end-to-end harness ([`e2e`], the `e2e` binary) and the Redis one ([`redis_e2e`], the
//! `redis_e2e` binary).
#![warn(missing_docs)]

pub mod celery;
pub mod e2e;
pub mod loadgen;
pub mod redis_e2e;

use std::path::PathBuf;

/// A built plugin from `plugins/dist/`. Panics with the command that builds it when missing.
pub fn plugin_path(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/dist")
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run `make plugins` first",
        path.display()
    );
    path
}
