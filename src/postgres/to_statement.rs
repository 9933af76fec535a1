//! [`ToStatement`]: what the statement methods accept, as in tokio-postgres.

use tokio_postgres::Statement;

/// A statement given as SQL text or prepared: what `query` and friends accept, as in
/// tokio-postgres (`&str`, `String` or `Statement`).
pub trait ToStatement: private::Sealed + Sync {
    #[doc(hidden)]
    fn to_statement(&self) -> StatementRef<'_>;
}

/// The two shapes of [`ToStatement`].
#[doc(hidden)]
#[derive(Debug)]
pub enum StatementRef<'a> {
    Prepared(&'a Statement),
    Sql(&'a str),
}

mod private {
    pub trait Sealed {}
    impl Sealed for str {}
    impl Sealed for String {}
    impl Sealed for tokio_postgres::Statement {}
}

impl ToStatement for str {
    fn to_statement(&self) -> StatementRef<'_> {
        StatementRef::Sql(self)
    }
}
impl ToStatement for String {
    fn to_statement(&self) -> StatementRef<'_> {
        StatementRef::Sql(self)
    }
}
impl ToStatement for Statement {
    fn to_statement(&self) -> StatementRef<'_> {
        StatementRef::Prepared(self)
    }
}
