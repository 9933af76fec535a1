//! The session of one pooled connection: what the server holds, decided from what the
//! server reports, and how each statement travels.
//!
//! # The reset
//! A checkout that sent any SQL arms the reset for the next one. The reset is every
//! statement that returns a session to what a new connection of the same login holds, bar
//! the protocol-level prepared statements the pool owns: session authorization and role,
//! every setting (custom ones too), cursors, listeners, advisory locks, temporary objects,
//! sequence state, SQL-level prepared statements. It travels in the next checkout's first
//! flight, under the same Sync as that statement: a check (which also resets the
//! role and releases advisory locks; the session authorization is reset before it when
//! the server reported it changed, or behind a pooler), then the rest inside a
//! transaction block of the pool's, committed before the context and the statement run,
//! so it is durable whatever becomes of them. It counts as done when the server answered
//! that `COMMIT`; until then it stays armed and goes again. If any of it fails, the server
//! skips the rest of the batch: the statement never runs and its caller gets the reset's
//! error.
//!
//! # The context
//! In transaction scope, a statement under a context runs in the same implicit
//! transaction as the context statement (`set_config(…, true)`): one Sync, no `BEGIN`, no
//! `COMMIT`, and the context is gone when the transaction ends. A `BEGIN` of the user's
//! (by [`transaction`](super::ClientWrapper::transaction), in SQL text, in a
//! multi-statement string) turns that transaction into the user's own, still under the
//! context; statements inside it need no context statement of their own. The status byte
//! of ReadyForQuery says when it ended. When the user's request binds a prepared statement
//! (its first frame is a Bind), the whole batch rides on that request: the wire layer
//! binds the context statement for the context's attribute count itself, in text format,
//! and writes it with the reset in front of the request; the first batch of a count on a
//! connection prepares that statement in the same flight (a Parse before its Bind), so
//! that a session holds only the counts it used. Other requests (`query_typed`, simple
//! queries, `BEGIN`) carry the batch on the context statement for any count, prepared at
//! connect and sent through tokio-postgres, merged with them under one Sync. In session
//! scope the context statement (`set_config(…, false)`) joins the reset's transaction
//! block, and the context counts as applied only once the server answered the block's
//! `COMMIT`.

use std::sync::Arc;

use futures_util::future::join;
use parking_lot::Mutex;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Error, Statement};

use super::mapping::{
    self, ContextConfig, ContextScope, FLAT_NAMES, MAX_FLAT, Mapped, SYNC_ANY_SQL,
};
use super::wire::{Anchor, Batch, Statements, TxStatus, WireHandle};
use crate::backend::DiscardReason;

/// The reset's statements after its opening check, in order, inside a transaction block
/// of the pool's (`BEGIN` … `COMMIT`): the block makes them durable whatever becomes of the
/// statement that follows (a procedure of the user's may commit or roll back), and, unlike
/// a bare `COMMIT` in the implicit transaction, it draws no warning into the server log.
/// Every name is qualified: the previous user's `search_path` is still in force while
/// they run.
const RESET: &[&str] = &[
    "RESET ALL",
    "CLOSE ALL",
    "UNLISTEN *",
    "DISCARD TEMP",
    "DISCARD SEQUENCES",
];

/// Deallocates SQL-level prepared statements (`PREPARE`); sent when a command tag said
/// one was made, or after a reset failed. Sent as text, not prepared: it is seldom needed,
/// and each statement the pool prepares is one more row for every reset's check to build.
const DEALLOCATE_SQL_PREPARED: &str = "DO $ctxpool$ DECLARE s record; BEGIN \
     FOR s IN SELECT name FROM pg_catalog.pg_prepared_statements WHERE from_sql LOOP \
     EXECUTE pg_catalog.format('DEALLOCATE %I', s.name); END LOOP; END $ctxpool$";

/// Returns session authorization to the login's (a `NULL` value to `set_config` resets the
/// setting, as `RESET` does). Sent before [`CHECK_SQL_PREPARED`] only when it can matter:
/// the server reports every change of `session_authorization` (ParameterStatus), so on a
/// direct connection whose reported value is still the one of the connection's start the
/// statement would change nothing. Behind a pooler, whose reports may not be the server's,
/// it is always sent.
const AUTHORIZATION_RESET_SQL: &str =
    "SELECT pg_catalog.set_config('session_authorization', NULL, false)";

/// The reset's first statement, before its `BEGIN` (after [`AUTHORIZATION_RESET_SQL`] when
/// that is sent): returns the role to the login's, releases session-level advisory locks,
/// and fails when SQL-level prepared statements remain, for those made where no command
/// tag shows it (inside a function);
/// the next reset then deallocates them. It comes before the `BEGIN` so that its refusal
/// ends in the implicit transaction, rolled back at the Sync, rather than in an aborted
/// transaction block. The failing cast depends on a row, so the planner cannot fold it
/// away.
const CHECK_SQL_PREPARED: &str = "SELECT \
     pg_catalog.set_config('role', NULL, false), \
     pg_catalog.pg_advisory_unlock_all(), \
     (SELECT ('ctxpool: the session holds SQL prepared statements of an earlier checkout' \
     || pg_catalog.left(name, 0))::int \
     FROM pg_catalog.pg_prepared_statements WHERE from_sql LIMIT 1)";

/// What the error of [`CHECK_SQL_PREPARED`] says (PostgreSQL quotes the text it could not
/// read as an integer).
pub(crate) const PREPARED_CHECK_MARK: &str =
    "ctxpool: the session holds SQL prepared statements of an earlier checkout";

/// The `COMMIT` that ends a reset when no context statement follows it, prepared under
/// this text when statements are not prepared (behind a pooler).
const COMMIT_ANCHOR_SQL: &str = "COMMIT /* ctxpool: end of the session reset */";

/// A statement the pool prepared, with the name the server knows it by.
struct Named {
    statement: Statement,
    name: String,
}

/// The context statement for one attribute count up to [`MAX_FLAT`]: not prepared at
/// connect but by the first batch that needs it, in that batch (a Parse before its Bind),
/// since every statement a session holds is one more row for each reset's scan of
/// `pg_prepared_statements` to build, and a connection seldom needs more than one count.
struct FlatStatement {
    /// The name the layer prepares it under ([`FLAT_NAMES`]).
    name: &'static str,
    sql: String,
    /// The parameter type OIDs.
    types: Vec<u32>,
}

/// The statements the pool prepares on each connection at connect, in one flight, and the
/// texts of those it prepares on first use.
pub(crate) struct PoolStatements {
    /// The context statement for each attribute count up to [`MAX_FLAT`], for batches the
    /// layer binds itself.
    flat: Vec<FlatStatement>,
    /// The context statement for any attribute count; the one sent through tokio-postgres
    /// as a carrier.
    any: Named,
    /// `BEGIN`.
    begin: Named,
    /// `COMMIT`.
    commit: Named,
    /// [`RESET`] and [`CHECK_SQL_PREPARED`], in this order.
    reset: Vec<Named>,
    /// The reset up to its `COMMIT` (the check, `BEGIN`, [`RESET`]), encoded once: the
    /// same frames open every batch that resets.
    reset_frames: Statements,
}

impl PoolStatements {
    /// The reset up to its `COMMIT`, one step per statement: the check, `BEGIN`, [`RESET`].
    fn reset_steps(&self) -> impl Iterator<Item = Step<'_>> {
        let (block, check) = self.reset.split_at(RESET.len());
        check
            .iter()
            .chain([&self.begin])
            .chain(block)
            .map(|named| Step::Prepared(&named.name))
    }

    /// Prepares them, learning their names from the wire. `None` when a name could not be
    /// learnt (the statements are then sent unnamed).
    pub(crate) async fn prepare(client: &Client, wire: &WireHandle) -> Result<Option<Self>, Error> {
        let flat = FLAT_NAMES
            .iter()
            .copied()
            .enumerate()
            .map(|(n, name)| FlatStatement {
                name,
                sql: mapping::sync_sql(n),
                types: mapping::sync_types(n).iter().map(Type::oid).collect(),
            })
            .collect();
        let reset_sqls: Vec<&str> = RESET.iter().copied().chain([CHECK_SQL_PREPARED]).collect();
        let mut texts = vec![SYNC_ANY_SQL.to_owned()];
        texts.push("BEGIN".to_owned());
        texts.push("COMMIT".to_owned());
        texts.extend(reset_sqls.iter().map(|s| (*s).to_owned()));
        wire.learn_names(texts);
        let any = client.prepare_typed(SYNC_ANY_SQL, &mapping::SYNC_ANY_TYPES);
        let begin = client.prepare("BEGIN");
        let commit = client.prepare("COMMIT");
        let reset =
            futures_util::future::try_join_all(reset_sqls.iter().map(|sql| client.prepare(sql)));
        let (any, (begin, (commit, reset))) = join(any, join(begin, join(commit, reset))).await;
        let names = wire.learned_names();
        let (any, begin, commit, reset) = (any?, begin?, commit?, reset?);
        let mut statements = [any, begin, commit].into_iter().chain(reset);
        let mut named = names.into_iter().map(|name| {
            let statement = statements.next()?;
            Some(Named {
                statement,
                name: name?,
            })
        });
        let (Some(Some(any)), Some(Some(begin)), Some(Some(commit))) =
            (named.next(), named.next(), named.next())
        else {
            return Ok(None);
        };
        let reset: Option<Vec<Named>> = named.collect();
        let Some(reset) = reset.filter(|r| r.len() == RESET.len() + 1) else {
            return Ok(None);
        };
        let mut statements = Self {
            flat,
            any,
            begin,
            commit,
            reset,
            reset_frames: Statements::default(),
        };
        statements.reset_frames = self::statements(&statements.reset_steps().collect::<Vec<_>>());
        Ok(Some(statements))
    }
}

/// What the pool knows of the server session.
#[derive(Default)]
struct State {
    /// The reset goes with the next statement sent while idle.
    reset_armed: bool,
    /// This checkout sent SQL.
    dirty: bool,
    /// Session scope: the context the server confirmed it holds.
    applied: Option<Arc<Mapped>>,
    /// The context in force in the open transaction.
    in_transaction: Option<Arc<Mapped>>,
    /// The next reset deallocates SQL-level prepared statements.
    deallocate: bool,
    /// Per attribute count: whether the server holds the flat context statement (a batch
    /// that prepared it was confirmed).
    flat_prepared: [bool; MAX_FLAT + 1],
}

/// The pool's own request that carries a batch.
#[derive(Clone)]
pub(crate) enum Carrier {
    /// The context statement, transaction-local or session-wide.
    Context { mapped: Arc<Mapped>, local: bool },
    /// `COMMIT`, ending a reset.
    Commit,
}

/// How one statement is sent.
pub(crate) enum Plan {
    /// As it is.
    Direct,
    /// Carried by a batch.
    Batch(BatchPlan),
}

/// A batch and what it would establish.
pub(crate) struct BatchPlan {
    pub(crate) batch: Arc<Batch>,
    pub(crate) carrier: Carrier,
    /// The batch carries the reset (confirmed by `before`, or by the carrier when it is
    /// the `COMMIT`).
    resets: bool,
    /// Session scope: the batch applies this context session-wide (confirmed by `after`).
    applies: Option<Arc<Mapped>>,
    /// The carrier's statement went into `before`, bound by the layer, and the user's own
    /// request is the anchor: the pool sends no request of its own through tokio-postgres.
    pub(crate) leading: bool,
    /// The batch prepares the flat context statement of this attribute count.
    prepares_flat: Option<usize>,
}

impl BatchPlan {
    /// Whether the statements before the carrier, the carrier and those after it were
    /// answered without error. A leading batch holds all three in `before`.
    fn outcome(&self, carrier_ok: bool) -> (bool, bool, bool) {
        let before = self.batch.before_confirmed();
        if self.leading {
            (before, before, before)
        } else {
            (before, carrier_ok, self.batch.after_confirmed())
        }
    }
}

/// Which statement a plan is for.
#[derive(Clone, Copy)]
pub(crate) enum Purpose<'a> {
    /// A statement of the user's, which follows the carrier under the same Sync.
    Statement,
    /// Opening a transaction with this `BEGIN` or `START TRANSACTION …`.
    Begin(&'a str),
}

/// One statement of the pool's in a batch.
#[derive(Clone)]
enum Step<'a> {
    /// Prepared at connect under this name.
    Prepared(&'a str),
    /// Sent as text, parsed unnamed.
    Text(&'a str),
    /// Statements encoded once.
    Encoded(&'a Statements),
    /// Closed and prepared here under this name from this text and these parameter type
    /// OIDs, then bound to these text parameters.
    ParsedBound(&'a str, &'a str, &'a [u32], Vec<&'a str>),
}

impl Step<'_> {
    /// About how many bytes the step's frames take: enough that a batch's buffer is
    /// allocated once.
    fn size_hint(&self) -> usize {
        // Frame headers, portal and format fields, the Execute.
        const FIXED: usize = 48;
        let params = |p: &[&str]| p.iter().map(|v| 4 + v.len()).sum::<usize>();
        match self {
            Self::Prepared(name) => FIXED + name.len(),
            Self::Text(sql) => FIXED + sql.len(),
            Self::Encoded(statements) => statements.len(),
            Self::ParsedBound(name, sql, types, p) => {
                2 * FIXED + 3 * name.len() + sql.len() + 4 * types.len() + params(p)
            }
        }
    }
}

type Steps<'a> = Vec<Step<'a>>;

/// The frames of these steps.
fn statements(steps: &[Step<'_>]) -> Statements {
    let mut out = Statements::with_capacity(steps.iter().map(Step::size_hint).sum());
    for step in steps {
        match step {
            Step::Prepared(name) => out.push_prepared(name),
            Step::Text(sql) => out.push(sql),
            Step::Encoded(statements) => out.push_all(statements),
            Step::ParsedBound(name, sql, types, params) => {
                out.push_parsed_bound(name, sql, types, params.iter().copied());
            }
        }
    }
    out
}

/// Test builds injecting an error: the reset as one step per statement, so that the error
/// can go between any two of them (the bytes are the same, see `reset_frames`).
#[cfg(feature = "sabotage")]
fn one_step_each() -> bool {
    crate::sabotage::injected_error_position().is_some()
}
#[cfg(not(feature = "sabotage"))]
fn one_step_each() -> bool {
    false
}

/// Test builds: a failing statement at the position the sabotage switch names, counted
/// over the statements before the anchor and then those after it.
#[cfg(feature = "sabotage")]
fn inject_error(before: &mut Steps<'_>, after: &mut Steps<'_>) {
    let Some(at) = crate::sabotage::injected_error_position() else {
        return;
    };
    let failing = Step::Text(crate::sabotage::INJECTED_ERROR_SQL);
    if at <= before.len() {
        before.insert(at, failing);
    } else if at - before.len() - 1 <= after.len() {
        after.insert(at - before.len() - 1, failing);
    }
}
#[cfg(not(feature = "sabotage"))]
fn inject_error(_: &mut Steps<'_>, _: &mut Steps<'_>) {}

/// A batch being planned: the pool's statements around the carrier.
struct Draft<'s> {
    carrier: Carrier,
    before: Steps<'s>,
    after: Steps<'s>,
    /// The carrier's Sync is removed, so that the user's request follows it.
    merge: bool,
    resets: bool,
    applies: Option<Arc<Mapped>>,
}

/// What the pool found between itself and the server at connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Routing {
    /// The server itself.
    Direct,
    /// A pooler or proxy other than pgpool-II (PgBouncer, say).
    Pooler,
    /// pgpool-II, whose settings keep a context and the statements after it on one server.
    Pgpool,
    /// pgpool-II, whose settings may run the context and the statement after it apart
    /// (on different servers, or in different transactions); says which.
    PgpoolSplits(&'static str),
}

/// One connection's session.
pub(crate) struct Session {
    pub(crate) wire: WireHandle,
    config: Arc<ContextConfig>,
    /// `None` when statements are sent unnamed (a pooler sits in between, or the
    /// configuration says so).
    statements: Option<PoolStatements>,
    /// What sits between the pool and the server.
    routing: Routing,
    /// `session_authorization` as the server reported it when the connection started.
    login_authorization: Option<String>,
    state: Mutex<State>,
}

impl Session {
    pub(crate) fn new(
        wire: WireHandle,
        config: Arc<ContextConfig>,
        statements: Option<PoolStatements>,
        routing: Routing,
    ) -> Self {
        let login_authorization = wire.parameter("session_authorization");
        Self {
            wire,
            config,
            statements,
            routing,
            login_authorization,
            state: Mutex::new(State::default()),
        }
    }

    pub(crate) fn config(&self) -> &ContextConfig {
        &self.config
    }

    pub(crate) fn proxied(&self) -> bool {
        self.routing != Routing::Direct
    }

    pub(crate) fn routing(&self) -> Routing {
        self.routing
    }

    /// Decides how the next statement travels under `desired`.
    ///
    /// `binds`: the user's request starts with a Bind (a prepared statement). The batch
    /// then rides on that request itself, its context statement bound by the wire layer,
    /// instead of on a carrier request of the pool's.
    pub(crate) fn plan<'a>(
        &'a self,
        desired: Option<&Arc<Mapped>>,
        purpose: Purpose<'a>,
        binds: bool,
    ) -> Plan {
        let mut st = self.state.lock();
        st.dirty = true;
        let begin = match purpose {
            Purpose::Begin(sql) => Some(sql),
            Purpose::Statement => None,
        };
        let Some(draft) = self.plan_status(&mut st, desired, begin) else {
            return Plan::Direct;
        };
        let Draft {
            carrier,
            mut before,
            mut after,
            merge,
            resets,
            applies,
        } = draft;
        let context = match &carrier {
            Carrier::Context { mapped, local } => Some((mapped.clone(), *local)),
            Carrier::Commit => None,
        };
        // The batch can ride on the user's own request when it binds a prepared statement,
        // the pool's statements are prepared, and the context statement has the flat form
        // (the layer binds its parameters as text).
        let mut prepares_flat = None;
        let carrier_step = match (binds && begin.is_none(), &self.statements, &context) {
            (true, Some(s), Some((mapped, local))) => {
                let count = mapped.attribute_count();
                match (s.flat.get(count), st.flat_prepared.get(count)) {
                    (Some(flat), Some(&prepared)) => {
                        if prepared {
                            mapped.flat_bind(*local).map(Step::Encoded)
                        } else {
                            prepares_flat = Some(count);
                            let params = mapped.flat_text_params(*local);
                            Some(Step::ParsedBound(flat.name, &flat.sql, &flat.types, params))
                        }
                    }
                    _ => None,
                }
            }
            (true, Some(s), None) => Some(Step::Prepared(&s.commit.name)),
            _ => None,
        };
        // Injected before the merge below, so that every position precedes the user's
        // statement, as in a batch with a carrier.
        inject_error(&mut before, &mut after);
        let leading = carrier_step.is_some();
        if let Some(step) = carrier_step {
            before.push(step);
            before.append(&mut after);
        }
        let anchor = if leading {
            Anchor::NextBind
        } else {
            self.anchor(&carrier)
        };
        let batch = Batch::new(
            anchor,
            statements(&before),
            statements(&after),
            merge && !leading,
        );
        Plan::Batch(BatchPlan {
            batch: Arc::new(batch),
            carrier,
            resets,
            applies,
            leading,
            prepares_flat,
        })
    }

    /// What the next statement needs, from the transaction status: `None` when it goes as
    /// it is.
    fn plan_status<'a>(
        &'a self,
        st: &mut State,
        desired: Option<&Arc<Mapped>>,
        begin: Option<&'a str>,
    ) -> Option<Draft<'a>> {
        match self.wire.status() {
            TxStatus::Failed => None,
            TxStatus::InTransaction => {
                // Statements inside an open transaction run under the context it holds;
                // only a change needs a context statement (local to the transaction).
                // In session scope, the session-wide context is in force unless this
                // transaction set another.
                let held = st.in_transaction.clone().or_else(|| {
                    (self.config.scope == ContextScope::Session)
                        .then(|| st.applied.clone())
                        .flatten()
                });
                let mapped = match (desired, &held) {
                    (Some(d), Some(h)) if d.same_as(h) => return None,
                    (Some(d), _) => d.clone(),
                    (None, Some(h)) if h.is_cleared() => return None,
                    (None, Some(h)) => Arc::new(h.cleared()),
                    (None, None) => return None,
                };
                if self.config.scope == ContextScope::Session {
                    // The session-wide context is switched at the next idle statement.
                    st.reset_armed = true;
                }
                Some(Draft {
                    carrier: Carrier::Context {
                        mapped,
                        local: true,
                    },
                    before: Steps::new(),
                    after: Steps::new(),
                    merge: false,
                    resets: false,
                    applies: None,
                })
            }
            TxStatus::Idle => self.plan_idle(st, desired, begin),
        }
    }

    fn plan_idle<'a>(
        &'a self,
        st: &mut State,
        desired: Option<&Arc<Mapped>>,
        begin: Option<&'a str>,
    ) -> Option<Draft<'a>> {
        let session = self.config.scope == ContextScope::Session;
        let holds_desired = match (&st.applied, desired) {
            (None, None) => true,
            (Some(a), Some(d)) => a.same_as(d),
            _ => false,
        };
        // In session scope a context switch resets first: nothing of the previous
        // context may survive into the next.
        let resets =
            (st.reset_armed || (session && !holds_desired)) && !crate::sabotage::reset_skipped();
        let mut before = Steps::new();
        if resets {
            self.push_reset(&mut before, st.deallocate);
        }
        let mut after = Steps::new();
        let (carrier, applies) = match desired {
            Some(d) if !session || !holds_desired || resets => {
                let local = !session;
                if session {
                    // The session-wide context joins the reset's transaction block (or
                    // opens one), committed after it.
                    if !resets {
                        self.push_begin(&mut before);
                    }
                    self.push_commit(&mut after);
                } else if resets {
                    self.push_commit(&mut before);
                }
                let carrier = Carrier::Context {
                    mapped: d.clone(),
                    local,
                };
                (carrier, session.then(|| d.clone()))
            }
            _ if resets => (Carrier::Commit, None),
            _ => return None,
        };
        // A BEGIN goes after the context in extended form: the context statement then
        // belongs to the user's transaction. START TRANSACTION with options must come
        // first in its transaction, so it goes before.
        let merge = match begin {
            None => true,
            Some(sql) => {
                match &carrier {
                    Carrier::Context { local: true, .. } => before.push(Step::Text(sql)),
                    _ => after.push(Step::Text(sql)),
                }
                false
            }
        };
        Some(Draft {
            carrier,
            before,
            after,
            merge,
            resets,
            applies,
        })
    }

    /// The reset's statements up to its `COMMIT` (which the caller places), prepared ones
    /// where the connection has them.
    fn push_reset<'s>(&'s self, into: &mut Steps<'s>, deallocate: bool) {
        if self.authorization_may_have_changed() {
            into.push(Step::Text(AUTHORIZATION_RESET_SQL));
        }
        match &self.statements {
            Some(s) => {
                if deallocate {
                    into.push(Step::Text(DEALLOCATE_SQL_PREPARED));
                }
                if one_step_each() {
                    into.extend(s.reset_steps());
                } else {
                    into.push(Step::Encoded(&s.reset_frames));
                }
            }
            None => {
                if deallocate {
                    into.push(Step::Text(DEALLOCATE_SQL_PREPARED));
                }
                into.push(Step::Text(CHECK_SQL_PREPARED));
                into.push(Step::Text("BEGIN"));
                into.extend(RESET.iter().map(|sql| Step::Text(sql)));
            }
        }
    }

    /// Whether the session's authorization may differ from the login's: not known on a
    /// direct connection (no report at start), reported changed, or behind a pooler.
    fn authorization_may_have_changed(&self) -> bool {
        self.routing != Routing::Direct
            || self.login_authorization.is_none()
            || !self
                .wire
                .parameter_is("session_authorization", self.login_authorization.as_deref())
    }

    fn push_begin<'s>(&'s self, into: &mut Steps<'s>) {
        into.push(match &self.statements {
            Some(s) => Step::Prepared(&s.begin.name),
            None => Step::Text("BEGIN"),
        });
    }

    fn push_commit<'s>(&'s self, into: &mut Steps<'s>) {
        into.push(match &self.statements {
            Some(s) => Step::Prepared(&s.commit.name),
            None => Step::Text("COMMIT"),
        });
    }

    fn anchor(&self, carrier: &Carrier) -> Anchor {
        match (&self.statements, carrier) {
            (Some(s), Carrier::Context { .. }) => Anchor::Named(s.any.name.clone()),
            (Some(s), Carrier::Commit) => Anchor::Named(s.commit.name.clone()),
            (None, Carrier::Context { .. }) => Anchor::Unnamed(SYNC_ANY_SQL),
            (None, Carrier::Commit) => Anchor::Unnamed(COMMIT_ANCHOR_SQL),
        }
    }

    /// Sends the carrier request of a batch through tokio-postgres.
    pub(crate) async fn send_carrier(
        &self,
        client: &Client,
        carrier: &Carrier,
    ) -> Result<(), Error> {
        static LOCAL: bool = true;
        static SESSION: bool = false;
        match (&self.statements, carrier) {
            (Some(s), Carrier::Context { mapped, local }) => {
                let local = if *local { &LOCAL } else { &SESSION };
                let params = mapped.any_params(local);
                client.execute(&s.any.statement, &params.refs()).await?;
            }
            (Some(s), Carrier::Commit) => {
                client.execute(&s.commit.statement, &[]).await?;
            }
            (None, Carrier::Context { mapped, local }) => {
                let local = if *local { &LOCAL } else { &SESSION };
                let params = mapped.any_params(local);
                client.query_typed(SYNC_ANY_SQL, &params.typed()).await?;
            }
            (None, Carrier::Commit) => {
                let none: &[(&(dyn ToSql + Sync), Type)] = &[];
                client.query_typed(COMMIT_ANCHOR_SQL, none).await?;
            }
        }
        Ok(())
    }

    /// Records what the server confirmed once a planned statement was answered. Returns
    /// whether the plan carried a reset that was not confirmed.
    pub(crate) fn settle(&self, plan: &Plan, carrier_ok: bool) -> bool {
        let mut reset_failed = false;
        let mut st = self.state.lock();
        if let Plan::Batch(p) = plan {
            let (before_done, carrier_done, after_done) = p.outcome(carrier_ok);
            if let Some(prepared) = p.prepares_flat.and_then(|n| st.flat_prepared.get_mut(n)) {
                // Unconfirmed: parsed or not, the next batch closes and parses it again.
                *prepared |= before_done;
            }
            // Where the reset's COMMIT went: before a transaction-local context, as the
            // carrier, or after a session-wide context (in the same transaction block).
            let reset_done = match p.carrier {
                Carrier::Commit => before_done && carrier_done,
                Carrier::Context { local: true, .. } => before_done,
                Carrier::Context { local: false, .. } => before_done && carrier_done && after_done,
            };
            if p.resets {
                if reset_done {
                    st.reset_armed = false;
                    st.deallocate = false;
                    st.applied = None;
                } else {
                    // Still armed; whatever failed, SQL prepared statements may be why.
                    reset_failed = true;
                    st.reset_armed = true;
                    st.deallocate = true;
                    st.applied = None;
                }
            }
            if let Some(mapped) = &p.applies {
                if reset_done || !p.resets {
                    st.applied = after_done.then(|| mapped.clone());
                }
            }
            if let Carrier::Context { mapped, .. } = &p.carrier {
                if carrier_done && self.wire.status() == TxStatus::InTransaction {
                    st.in_transaction = Some(mapped.clone());
                }
            }
        }
        if self.wire.take_sql_prepared() {
            st.deallocate = true;
        }
        if self.wire.status() == TxStatus::Idle {
            st.in_transaction = None;
        }
        reset_failed
    }

    /// Whether a batch of this plan failed in the pool's own statements and left an
    /// aborted transaction block: the user's statement was skipped, so the block is the
    /// reset's (or a context statement's inside it), never one the user opened.
    pub(crate) fn left_aborted(&self, plan: &Plan, carrier_ok: bool) -> bool {
        let Plan::Batch(p) = plan else {
            return false;
        };
        // Only the reset and a session-wide context open a block of the pool's; a context
        // statement inside the user's transaction fails in the user's block, which stays
        // theirs to end.
        let opens_block = p.resets || matches!(p.carrier, Carrier::Context { local: false, .. });
        let (before_done, carrier_done, after_done) = p.outcome(carrier_ok);
        let own_done = before_done && carrier_done && after_done;
        opens_block && !own_done && self.wire.status() == TxStatus::Failed
    }

    /// Release: decides whether the connection may go back to the pool. `in_flight`: an
    /// operation was cancelled mid-flight, or a result stream outlived its handle (the next
    /// acquirer would queue behind it). Other requests still unanswered (tokio-postgres
    /// closing a dropped statement) are waited for by the recycle check.
    pub(crate) fn release(&self, closed: bool, in_flight: bool) -> Result<(), DiscardReason> {
        if in_flight {
            return Err(DiscardReason::InFlight);
        }
        if closed {
            return Err(DiscardReason::Lost);
        }
        if self.wire.statements_lost() {
            return Err(DiscardReason::ResetFailed);
        }
        let mut st = self.state.lock();
        if self.wire.status() != TxStatus::Idle && !crate::sabotage::status_ignored() {
            // Left in a transaction (forgotten, or opened in SQL and never ended): roll it
            // back now, so that its locks go; recycle waits for the answer.
            self.wire.send_query("ROLLBACK");
            st.in_transaction = None;
            st.reset_armed = true;
        }
        if std::mem::take(&mut st.dirty) || st.applied.is_some() {
            st.reset_armed = true;
        }
        Ok(())
    }

    /// Arms the reset (after a recycle query that may have changed the session).
    pub(crate) fn arm_reset(&self) {
        self.state.lock().reset_armed = true;
    }
}
