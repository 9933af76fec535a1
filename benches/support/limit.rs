//! The physical limit of the piggyback and instructions benches: the bare wire client of
//! `raw.rs` sending ctxpool's context statement and its session reset, prepared once, in
//! front of the query under one Sync. No pool, no statement cache, no row type.

use std::net::SocketAddr;

use crate::raw::RawConn;
use crate::support::{ALICE_LOGIN, ContextSettings, LIST};

/// The transaction-local context statement of the limit: ctxpool's, for two attributes.
pub const CONTEXT_SQL: &str = "SELECT pg_catalog.set_config('role', $1, true), \
     pg_catalog.set_config('ctxpool.end_user', $2, true), \
     pg_catalog.set_config('ctxpool.data_roles', $3, true), \
     pg_catalog.set_config('ctxpool.attributes', $4, true), \
     pg_catalog.set_config($5, $6, true), pg_catalog.set_config($7, $8, true)";

/// ctxpool's session reset on a direct connection whose session authorization is
/// unchanged, one prepared statement each: its check (role, advisory locks, SQL prepared
/// statements), then the rest in a transaction block.
pub const RESET_SQL: [&str; 8] = [
    "SELECT pg_catalog.set_config('role', NULL, false), pg_catalog.pg_advisory_unlock_all(), \
     (SELECT ('dirty' || pg_catalog.left(name, 0))::int \
     FROM pg_catalog.pg_prepared_statements WHERE from_sql LIMIT 1)",
    "BEGIN",
    "RESET ALL",
    "CLOSE ALL",
    "UNLISTEN *",
    "DISCARD TEMP",
    "DISCARD SEQUENCES",
    "COMMIT",
];

/// The raw connection of the limit, the parameters of its context statement (none for
/// `raw_fast`, whose login holds the context) and the statements sent in front of it.
pub struct Limit {
    conn: RawConn,
    params: Option<Vec<Vec<u8>>>,
    /// The names of the statements sent in front of the context statement.
    sent: Vec<String>,
}

/// Asks a server connection for its process id.
pub const PID_SQL: &str = "SELECT pg_catalog.pg_backend_pid()";

impl Limit {
    /// The limit on hr_app: ctxpool's context statement for `settings`, `LIST` and (the
    /// statements of) the reset prepared once; each request sends the reset first when
    /// `reset`.
    pub async fn new(addr: SocketAddr, settings: &ContextSettings, reset: bool) -> Self {
        let sent: Vec<usize> = if reset {
            (0..RESET_SQL.len()).collect()
        } else {
            Vec::new()
        };
        Self::with_parts(addr, settings, &RESET_SQL, &sent).await
    }

    /// [`new`](Self::new) with `statements` prepared instead of the reset's, of which those
    /// at the indices `sent` go in front of the context statement: for weighing the
    /// reset's parts in a session that holds the same statements.
    pub async fn with_parts(
        addr: SocketAddr,
        settings: &ContextSettings,
        statements: &[&str],
        sent: &[usize],
    ) -> Self {
        let mut conn = RawConn::connect(addr, "hr_app", "hr").await;
        let params: Vec<Vec<u8>> = settings
            .statement_params()
            .into_iter()
            .map(String::into_bytes)
            .collect();
        conn.parse("ctx", CONTEXT_SQL, params.len());
        conn.parse("list", LIST, 0);
        for (i, sql) in statements.iter().enumerate() {
            conn.parse(&format!("prefix{i}"), sql, 0);
        }
        conn.sync().await;
        Self {
            conn,
            params: Some(params),
            sent: sent.iter().map(|i| format!("prefix{i}")).collect(),
        }
    }

    /// `raw_fast`: the baseline's query on the baseline's login through the limit's raw
    /// client, so that the client library's share of every other figure shows.
    pub async fn raw_fast(addr: SocketAddr) -> Self {
        let mut conn = RawConn::connect(addr, ALICE_LOGIN, "hr").await;
        conn.parse("list", LIST, 0);
        conn.sync().await;
        Self {
            conn,
            params: None,
            sent: Vec::new(),
        }
    }

    /// (The reset,) the context and `LIST` under one Sync; the rows of `LIST`.
    pub async fn request(&mut self) -> Vec<String> {
        for name in &self.sent {
            self.conn.bind_execute(name, std::iter::empty());
        }
        if let Some(params) = &self.params {
            self.conn
                .bind_execute("ctx", params.iter().map(Vec::as_slice));
        }
        self.conn.bind_execute("list", std::iter::empty());
        let mut reply = self.conn.sync().await;
        let expected = usize::from(self.params.is_some()) + self.sent.len() + 1;
        assert_eq!(reply.len(), expected, "one completion per statement");
        if self.params.is_some() {
            // The context statement answers one row.
            assert_eq!(reply[expected - 2].len(), 1);
        }
        reply.pop().unwrap_or_default()
    }

    /// The process id of the raw connection's server backend.
    pub async fn backend_pid(&mut self) -> Option<i32> {
        self.conn
            .parse("pid", "SELECT pg_catalog.pg_backend_pid()::text", 0);
        self.conn.bind_execute("pid", std::iter::empty());
        let mut reply = self.conn.sync().await;
        reply.pop()?.first()?.parse().ok()
    }
}
