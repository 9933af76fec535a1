//! A per-connection cache of prepared statements, for `prepare_cached`.

use std::collections::HashMap;

use parking_lot::RwLock;
use tokio_postgres::Statement;
use tokio_postgres::types::Type;

/// The statements of one query text, by parameter types (nearly always one entry).
type ByTypes = Vec<(Vec<Type>, Statement)>;

/// Prepared statements of one connection, by query text and parameter types.
#[derive(Debug, Default)]
pub struct StatementCache {
    /// Keyed by the text alone, so that a look-up borrows the caller's text instead of
    /// copying it (every `prepare_cached` looks up).
    map: RwLock<HashMap<String, ByTypes>>,
}

impl StatementCache {
    /// How many statements are cached.
    pub fn size(&self) -> usize {
        self.map.read().values().map(Vec::len).sum()
    }

    /// Forgets every statement (they stay prepared on the server).
    pub fn clear(&self) {
        self.map.write().clear();
    }

    /// Forgets one statement.
    pub fn remove(&self, query: &str, types: &[Type]) -> Option<Statement> {
        let mut map = self.map.write();
        let entries = map.get_mut(query)?;
        let at = entries.iter().position(|(t, _)| t.as_slice() == types)?;
        let (_, statement) = entries.swap_remove(at);
        if entries.is_empty() {
            map.remove(query);
        }
        Some(statement)
    }

    pub(crate) fn get(&self, query: &str, types: &[Type]) -> Option<Statement> {
        self.map
            .read()
            .get(query)?
            .iter()
            .find(|(t, _)| t.as_slice() == types)
            .map(|(_, statement)| statement.clone())
    }

    pub(crate) fn insert(&self, query: &str, types: &[Type], statement: Statement) {
        let mut map = self.map.write();
        let entries = map.entry(query.to_owned()).or_default();
        match entries.iter_mut().find(|(t, _)| t.as_slice() == types) {
            Some((_, slot)) => *slot = statement,
            None => entries.push((types.to_owned(), statement)),
        }
    }
}
