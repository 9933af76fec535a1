//! Shared by the PostgreSQL benches: a throwaway cluster with the HR schema, pools, and
//! reading criterion's estimates back to print ratios from one run.

use std::path::PathBuf;

use ctxpool::postgres::{ContextScope, Pool};
use ctxpool::testing::PgCluster;

#[path = "../../tests/support/mod.rs"]
mod hr;

// Each bench uses its own subset.
#[allow(unused_imports)]
pub use hr::{LIST, alice, bob};

pub fn cluster() -> PgCluster {
    hr::hr_cluster()
}

pub fn pool(url: &str, scope: ContextScope, max_size: usize) -> Pool {
    hr::pool(url, scope, max_size)
}

pub fn criterion_dir() -> PathBuf {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    target.join("criterion")
}

/// Median time per iteration, in ns, from criterion's saved estimates of this run.
pub fn median_ns(group: &str, bench: &str) -> Option<f64> {
    let path = criterion_dir()
        .join(group)
        .join(bench)
        .join("new/estimates.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    json["median"]["point_estimate"].as_f64()
}
