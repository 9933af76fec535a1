//! A conservative reading of SQL text: may it change session state or transaction status?
//!
//! The pool cannot see what a statement does on the server (PostgreSQL does not report the
//! role or custom settings), so it reads the text the handle sends: anything other than
//! plain data statements marks the session for a reset at the next checkout. Reading
//! wrongly towards "unsafe" costs one piggybacked reset; the reverse is what the list below
//! is kept short for.

/// What a piece of SQL text may do beyond reading and writing data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Effects {
    /// May change session state (settings, role, temp tables, locks, listeners...).
    pub(crate) changes_session: bool,
    /// The transaction status the text leaves, if it controls transactions.
    pub(crate) tx: Option<TxControl>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TxControl {
    Begins,
    Ends,
}

/// Statements that only read or write data. `EXECUTE`, `CALL`, `DO`, `SET`, `RESET`,
/// `CREATE` (temp tables), `LISTEN`... are not on it.
const DATA_STATEMENTS: &[&str] = &[
    "select", "insert", "update", "delete", "with", "values", "table", "merge", "explain", "copy",
    "show", "fetch", "move",
];

pub(crate) fn effects(sql: &str) -> Effects {
    let mut effects = Effects::default();
    // `set_config(…, false)` can hide in any statement.
    if contains_ignore_case(sql, "set_config") {
        effects.changes_session = true;
    }
    // Splitting on `;` ignores quoting: a `;` inside a literal only adds a statement to
    // judge, which can only make the verdict more cautious.
    for statement in sql.split(';') {
        let Some(word) = first_word(statement) else {
            continue;
        };
        match word.as_str() {
            "begin" | "start" => effects.tx = Some(TxControl::Begins),
            "commit" | "end" | "rollback" | "abort" => effects.tx = Some(TxControl::Ends),
            w if DATA_STATEMENTS.contains(&w) => {}
            _ => effects.changes_session = true,
        }
    }
    effects
}

/// Whether `haystack` contains the ASCII `needle`, ignoring case, without allocating.
fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    haystack
        .as_bytes()
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// The first keyword, lower-cased, skipping white space, comments and parentheses.
fn first_word(statement: &str) -> Option<String> {
    let mut rest = statement;
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == '(');
        if let Some(after) = rest.strip_prefix("--") {
            rest = after.split_once('\n').map_or("", |(_, r)| r);
        } else if let Some(after) = rest.strip_prefix("/*") {
            // An unterminated comment hides nothing we could run.
            rest = after.split_once("*/").map_or("", |(_, r)| r);
        } else {
            break;
        }
    }
    let word: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect();
    (!word.is_empty()).then(|| word.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_statements_are_safe() {
        for sql in [
            "SELECT 1",
            "  (select * from t)",
            "-- hi\nINSERT INTO t VALUES (1)",
            "/* x */ with a as (select 1) select * from a",
            "",
        ] {
            assert_eq!(effects(sql), Effects::default(), "{sql}");
        }
    }

    #[test]
    fn session_changes_and_transactions_are_seen() {
        for sql in [
            "SET ROLE admin",
            "reset role",
            "select 1; set search_path = x",
            "SELECT set_config('role', 'x', false)",
            "DO $$ BEGIN END $$",
            "CREATE TEMP TABLE t (x int)",
            "execute p",
            "call proc()",
        ] {
            assert!(effects(sql).changes_session, "{sql}");
        }
        assert_eq!(effects("BEGIN").tx, Some(TxControl::Begins));
        assert_eq!(effects("begin; select 1; commit").tx, Some(TxControl::Ends));
        assert_eq!(
            effects("START TRANSACTION READ ONLY").tx,
            Some(TxControl::Begins)
        );
        assert_eq!(effects("select 1").tx, None);
        assert!(effects("SELECT SET_CONFIG('x', 'y', false)").changes_session);
    }
}
