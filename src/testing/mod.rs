//! An in-process backend that models a database server's session state.
//!
//! [`MemServer`] plays the server: sessions with a current role, an end-user setting, data
//! roles and a transaction status, and faults to inject (lost sessions, refused contexts,
//! failing or hanging connects and recycles, slow statements). [`MemBackend`] connects to
//! it; [`MemConnection`] speaks a tiny statement language ([`Statement`]) and piggybacks
//! its context the way a real backend must: the reset and the new context travel with the
//! next statement, in the same flight, and a context that cannot be applied fails the
//! statement without running it.
//!
//! Every network flight is a yield to the runtime, so a future driving a statement can be
//! cancelled between sending and receiving, as on a real socket. Property tests and the
//! hot-path bench use it; it is no substitute for tests against a live database.

mod connection;
mod pg_cluster;
mod proxy;
pub mod sabotage;
mod server;

pub use connection::{MemConnection, Observation, Statement};
pub use pg_cluster::{ClusterError, PgBouncer, PgCluster};
pub use proxy::{FlightProxy, ProxyError};
pub use server::{MemBackend, MemError, MemServer, ServerStats};
