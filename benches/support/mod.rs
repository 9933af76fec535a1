//! Shared by the PostgreSQL benches: a throwaway cluster with the HR schema, pools, and
//! reading criterion's estimates back to print ratios from one run.

use ctxpool::postgres::{ContextScope, Pool};
use ctxpool::testing::PgCluster;

pub mod estimates;
pub use estimates::{criterion_dir, median_ns};

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
