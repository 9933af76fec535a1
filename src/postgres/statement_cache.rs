//! A per-connection cache of prepared statements, for `prepare_cached`.

use std::collections::HashMap;

use parking_lot::RwLock;
use tokio_postgres::Statement;
use tokio_postgres::types::Type;

type Key = (String, Vec<Type>);

/// Prepared statements of one connection, by query text and parameter types.
#[derive(Debug, Default)]
pub struct StatementCache {
    map: RwLock<HashMap<Key, Statement>>,
}

impl StatementCache {
    /// How many statements are cached.
    pub fn size(&self) -> usize {
        self.map.read().len()
    }

    /// Forgets every statement (they stay prepared on the server).
    pub fn clear(&self) {
        self.map.write().clear();
    }

    /// Forgets one statement.
    pub fn remove(&self, query: &str, types: &[Type]) -> Option<Statement> {
        self.map
            .write()
            .remove(&(query.to_owned(), types.to_owned()))
    }

    pub(crate) fn get(&self, query: &str, types: &[Type]) -> Option<Statement> {
        self.map
            .read()
            .get(&(query.to_owned(), types.to_owned()))
            .cloned()
    }

    pub(crate) fn insert(&self, query: &str, types: &[Type], statement: Statement) {
        self.map
            .write()
            .insert((query.to_owned(), types.to_owned()), statement);
    }
}
