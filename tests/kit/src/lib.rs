//! # ctxpool-testkit: the parts ctxpool's tests, benches and examples run against
//!
//! A dev-dependency of ctxpool, never published: nothing here ships in the library.
//!
//! - [`MemServer`], [`MemBackend`], [`MemConnection`]: an in-process backend that models a
//!   database server's session state. [`MemServer`] plays the server: sessions with a
//!   current role, an end-user setting, data roles and a transaction status, and faults to
//!   inject (lost sessions, refused contexts, failing or hanging connects and recycles,
//!   slow statements). [`MemConnection`] speaks a tiny statement language ([`Statement`])
//!   and piggybacks its context the way a real backend must: the reset and the new context
//!   travel with the next statement, in the same flight, and a context that cannot be
//!   applied fails the statement without running it. Every flight yields to the runtime,
//!   so a future can be cancelled between sending and receiving, as on a real socket.
//!   Property tests and the hot-path bench use it; it proves the model, not PostgreSQL.
//! - [`PgCluster`], [`PgBouncer`]: a throwaway PostgreSQL server (and a PgBouncer in front
//!   of it) on a free loopback port in a temporary directory, stopped and deleted however
//!   the process ends. [`PgCluster::start_standby`] adds a streaming hot standby of a
//!   cluster (`pg_basebackup`), which [`PgCluster::promote`] turns into a primary after
//!   [`PgCluster::kill`] crashed the old one.
//! - [`PgPool`]: a throwaway pgpool-II in front of a primary and a standby, in streaming
//!   replication mode with load balancing on.
//! - [`hr`]: the HR database of the README, the demo and the tests (`examples/hr.sql`), and
//!   the harness of the README's doctests.
//! - [`idp`]: a real OpenID provider (oidc-provider on Node.js) on loopback, over http and
//!   https with a per-run private CA; [`process`]: the child-process guard it shares with
//!   ctxpool's Glewlwyd harness.
//! - [`FlightProxy`]: a loopback TCP proxy that counts round trips and protocol messages and
//!   adds latency.
//! - [`sabotage`]: switches that break the PostgreSQL backend's safety on purpose, so a test
//!   can show its checks would catch the breakage (ctxpool's feature `sabotage`, which this
//!   crate turns on).

#![warn(missing_docs)]

pub mod hr;
pub mod idp;
mod mem_connection;
mod mem_server;
mod pg_cluster;
mod pgpool;
pub mod process;
mod proxy;

pub use ctxpool::sabotage;
pub use mem_connection::{MemConnection, Observation, Statement};
pub use mem_server::{MemBackend, MemError, MemServer, ServerStats};
pub use pg_cluster::{ClusterError, PgBouncer, PgCluster};
pub use pgpool::PgPool;
pub use proxy::{FlightProxy, ProxyError};
