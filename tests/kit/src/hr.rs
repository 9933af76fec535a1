//! The HR database of ctxpool's README, demo and tests: ctxpool's helpers and
//! `examples/hr.sql` in database `hr` of a throwaway cluster.

use std::future::Future;

use crate::{ClusterError, PgCluster};

/// `examples/hr.sql`: the login `hr_app`, the data roles, the tables and their policies.
pub const HR_SQL: &str = include_str!("../../../examples/hr.sql");

/// Starts a cluster and creates database `hr` in it with the helpers and [`HR_SQL`]; the
/// pool's login is `hr_app` (`cluster.url("hr_app", "hr")`).
///
/// # Errors
/// What [`PgCluster::start`] or [`PgCluster::psql`] return.
pub fn hr_cluster() -> Result<PgCluster, ClusterError> {
    let cluster = PgCluster::start()?;
    cluster.psql("postgres", "CREATE DATABASE hr")?;
    cluster.psql("hr", ctxpool::postgres::HELPERS_SQL)?;
    cluster.psql("hr", HR_SQL)?;
    Ok(cluster)
}

/// Runs `check` with the URL of `hr_app` on a fresh HR database, on a runtime of its
/// own, and panics with the error if it fails: the harness of the README's doctests.
///
/// # Panics
/// If the cluster cannot start, or `check` returns an error.
pub fn on_hr_database<F, Fut>(check: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = Result<(), Box<dyn std::error::Error>>>,
{
    let cluster = hr_cluster().unwrap_or_else(|e| panic!("{e}"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("a tokio runtime: {e}"));
    if let Err(e) = runtime.block_on(check(cluster.url("hr_app", "hr"))) {
        panic!("{e}");
    }
}

/// The HR database an example runs on: a throwaway cluster, or the scratch database a
/// superuser URL in `DATABASE_URL` names.
pub struct HrDatabase {
    /// Kept alive while the example runs; dropping it stops the server.
    _cluster: Option<PgCluster>,
    app_url: String,
    place: String,
}

/// Why the HR database could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum HrError {
    /// The throwaway cluster did not start (or PostgreSQL is not installed).
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// `DATABASE_URL` is not a usable superuser URL, or the set-up SQL failed there.
    #[error("setting up the HR schema on DATABASE_URL failed: {0}")]
    Database(#[from] tokio_postgres::Error),
}

/// The password the examples give `hr_app` on a `DATABASE_URL` database, which may not
/// trust local connections as the throwaway cluster does.
const APP_PASSWORD: &str = "hr-demo";

impl HrDatabase {
    /// On `DATABASE_URL` when set (dropping and re-creating the HR roles and schema
    /// there), else on a throwaway cluster.
    ///
    /// # Errors
    /// [`HrError`] when neither works.
    pub async fn from_env() -> Result<HrDatabase, HrError> {
        match std::env::var("DATABASE_URL") {
            Ok(admin_url) => Ok(HrDatabase {
                _cluster: None,
                app_url: install_on(&admin_url).await?,
                place: "DATABASE_URL".to_owned(),
            }),
            Err(_) => {
                let cluster = hr_cluster()?;
                Ok(HrDatabase {
                    app_url: cluster.url("hr_app", "hr"),
                    place: format!("throwaway cluster on 127.0.0.1:{}", cluster.port()),
                    _cluster: Some(cluster),
                })
            }
        }
    }

    /// The URL of the least-privileged login `hr_app`.
    pub fn app_url(&self) -> &str {
        &self.app_url
    }

    /// Where the database is, for the example's first line of output.
    pub fn place(&self) -> &str {
        &self.place
    }
}

/// Re-creates the HR roles and schema on the database of `admin_url` (a superuser) and
/// returns `hr_app`'s URL there, with a password.
async fn install_on(admin_url: &str) -> Result<String, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls).await?;
    let connection = tokio::spawn(connection);
    client
        .batch_execute(
            "DROP SCHEMA IF EXISTS hr CASCADE; DROP ROLE IF EXISTS hr_app; \
             DROP ROLE IF EXISTS hr_employee; DROP ROLE IF EXISTS hr_manager; \
             DROP ROLE IF EXISTS hr_auditor;",
        )
        .await?;
    ctxpool::postgres::install_helpers(&client).await?;
    client.batch_execute(HR_SQL).await?;
    client
        .batch_execute(&format!("ALTER ROLE hr_app PASSWORD '{APP_PASSWORD}'"))
        .await?;
    drop(client);
    let _ = connection.await;
    let mut app: tokio_postgres::Config = admin_url.parse()?;
    app.user("hr_app").password(APP_PASSWORD);
    let host = match app.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        _ => "localhost".to_owned(),
    };
    let port = app.get_ports().first().copied().unwrap_or(5432);
    let dbname = app.get_dbname().unwrap_or("postgres");
    Ok(format!(
        "postgres://hr_app:{APP_PASSWORD}@{host}:{port}/{dbname}"
    ))
}
