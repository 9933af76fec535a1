//! The driver operations the pooled connection uses, behind a small trait.
//!
//! Every method is *blocking* and is only ever called on a blocking thread (inside
//! `tokio::task::spawn_blocking`), never on the async runtime. The trait exists so that
//! the pooled connection's ordering and discard rules can be tested against a recording
//! double, without a database; [`oracledb::Connection`] is the real implementation.

use std::fmt;

use oracledb::ToDbValue;

use super::error::OracleError;
use super::translate::DriverContext;

/// One owned bind value. Owned and `Send` because it travels to a blocking thread.
pub type Param = Box<dyn ToDbValue + Send>;

/// Positional bind values (`:1`, `:2`, …) for one statement.
///
/// Built from a tuple of up to eight values (`(3, "x".to_string())`), from `()` for none,
/// or with [`Params::push`]. Values are bound, never spliced into SQL text. `Debug` shows
/// only how many there are: values may be personal data.
#[derive(Default)]
pub struct Params(Vec<Param>);

impl Params {
    /// No values.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next positional value.
    pub fn push(mut self, value: impl ToDbValue + Send + 'static) -> Self {
        self.0.push(Box::new(value));
        self
    }

    /// How many values.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The values as the driver takes them.
    pub fn as_refs(&self) -> Vec<&dyn ToDbValue> {
        self.0
            .iter()
            .map(|p| {
                let value: &dyn ToDbValue = &**p;
                value
            })
            .collect()
    }
}

impl fmt::Debug for Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Params({} values)", self.0.len())
    }
}

impl From<()> for Params {
    fn from(_: ()) -> Self {
        Self::new()
    }
}

impl From<Vec<Param>> for Params {
    fn from(values: Vec<Param>) -> Self {
        Self(values)
    }
}

macro_rules! params_from_tuple {
    ($($name:ident),+) => {
        impl<$($name: ToDbValue + Send + 'static),+> From<($($name,)+)> for Params {
            #[allow(non_snake_case)]
            fn from(($($name,)+): ($($name,)+)) -> Self {
                Self(vec![$(Box::new($name) as Param),+])
            }
        }
    };
}
params_from_tuple!(A);
params_from_tuple!(A, B);
params_from_tuple!(A, B, C);
params_from_tuple!(A, B, C, D);
params_from_tuple!(A, B, C, D, E);
params_from_tuple!(A, B, C, D, E, F);
params_from_tuple!(A, B, C, D, E, F, G);
params_from_tuple!(A, B, C, D, E, F, G, H);

/// A driver connection as the pool drives it. Every method blocks; the pool calls them
/// only on blocking threads.
///
/// Implemented for [`oracledb::Connection`]; tests implement it with a recording double.
pub trait Session: Send + 'static {
    /// What [`OracleConnection::with_connection`](super::OracleConnection::with_connection)
    /// hands to its closure.
    type Raw;
    /// A fetched row.
    type Row: Send + 'static;

    /// Sets the end-user security context the next calls carry. Local state in the
    /// driver (no round trip), refused without TLS or without Deep Data Security.
    fn set_context(&mut self, context: &DriverContext) -> Result<(), OracleError>;
    /// Clears it. Local state, no round trip. An error means the driver connection is
    /// unusable.
    fn clear_context(&mut self) -> Result<(), OracleError>;
    /// Runs a statement; returns the rows affected.
    fn execute(&mut self, sql: &str, params: &Params) -> Result<u64, OracleError>;
    /// Runs a query and fetches every row.
    fn query(&mut self, sql: &str, params: &Params) -> Result<Vec<Self::Row>, OracleError>;
    /// Commits.
    fn commit(&mut self) -> Result<(), OracleError>;
    /// Rolls back.
    fn rollback(&mut self) -> Result<(), OracleError>;
    /// One round trip to check the connection.
    fn ping(&mut self) -> Result<(), OracleError>;
    /// The underlying connection.
    fn raw(&self) -> &Self::Raw;
}

impl Session for oracledb::Connection {
    type Raw = oracledb::Connection;
    type Row = oracledb::Row;

    fn set_context(&mut self, context: &DriverContext) -> Result<(), OracleError> {
        self.set_end_user_security_context(context.to_driver())
            .map_err(OracleError::from_driver)
    }

    fn clear_context(&mut self) -> Result<(), OracleError> {
        self.clear_end_user_security_context()
            .map_err(OracleError::from_driver)
    }

    fn execute(&mut self, sql: &str, params: &Params) -> Result<u64, OracleError> {
        let result = oracledb::Connection::execute(self, sql, &params.as_refs())?;
        Ok(result.rows_affected())
    }

    fn query(&mut self, sql: &str, params: &Params) -> Result<Vec<Self::Row>, OracleError> {
        let cursor = oracledb::Connection::query(self, sql, &params.as_refs())?;
        cursor
            .collect::<Result<Vec<_>, _>>()
            .map_err(OracleError::from_driver)
    }

    fn commit(&mut self) -> Result<(), OracleError> {
        oracledb::Connection::commit(self).map_err(OracleError::from_driver)
    }

    fn rollback(&mut self) -> Result<(), OracleError> {
        oracledb::Connection::rollback(self).map_err(OracleError::from_driver)
    }

    fn ping(&mut self) -> Result<(), OracleError> {
        oracledb::Connection::ping(self).map_err(OracleError::from_driver)
    }

    fn raw(&self) -> &Self::Raw {
        self
    }
}

/// Whether a statement may leave a transaction open, judged from its text. Only a plain
/// query is known not to: text that starts with `SELECT` or `WITH` and mentions none of
/// `UPDATE` (`FOR UPDATE` locks rows), `INSERT`, `DELETE`, `MERGE`, `LOCK`, nor a database
/// link (`@`). Anything else, including a query behind a comment, counts as maybe, and the
/// connection is rolled back before reuse.
pub(crate) fn may_open_transaction(sql: &str) -> bool {
    if sql.contains('@') {
        return true;
    }
    let mut words = sql
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '$' || c == '#'))
        .filter(|w| !w.is_empty());
    let starts_as_query = matches!(
        words.next(),
        Some(w) if w.eq_ignore_ascii_case("select") || w.eq_ignore_ascii_case("with")
    ) && sql
        .trim_start()
        .as_bytes()
        .first()
        .is_some_and(u8::is_ascii_alphabetic);
    if !starts_as_query {
        return true;
    }
    words.any(|w| {
        ["update", "insert", "delete", "merge", "lock"]
            .iter()
            .any(|k| w.eq_ignore_ascii_case(k))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn params_from_tuples_and_debug_hides_values() {
        let p: Params = (3_i64, "SECRET-value".to_string(), Some(1.5_f64)).into();
        assert_eq!(p.len(), 3);
        assert_eq!(p.as_refs().len(), 3);
        assert_eq!(format!("{p:?}"), "Params(3 values)");
        let none: Params = ().into();
        assert!(none.is_empty());
        assert_eq!(Params::new().push(1).push("x").len(), 2);
    }

    #[test]
    fn plain_queries_do_not_open_transactions() {
        for sql in [
            "SELECT name FROM hr.employees WHERE id = :1",
            "  select 1 from dual",
            "WITH t AS (SELECT 1 x FROM dual) SELECT x FROM t",
        ] {
            assert!(!may_open_transaction(sql), "{sql}");
        }
    }

    #[test]
    fn anything_else_may() {
        for sql in [
            "SELECT * FROM t FOR UPDATE",
            "select * from t for\nupdate nowait",
            "SELECT * FROM t@remote",
            "INSERT INTO t VALUES (1)",
            "UPDATE t SET x = 1",
            "BEGIN pkg.proc; END;",
            "/* hint */ SELECT 1 FROM dual",
            "-- c\nSELECT 1 FROM dual",
            "LOCK TABLE t IN EXCLUSIVE MODE",
            "",
        ] {
            assert!(may_open_transaction(sql), "{sql:?}");
        }
    }
}
