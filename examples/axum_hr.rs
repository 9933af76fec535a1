//! An HR web service on axum where the database decides what each end user sees.
//!
//! ```text
//! cargo run --release --example axum_hr --features tower
//! curl -b 'identity={"name":"alice"}' http://127.0.0.1:3000/employees   # her own row
//! curl -b 'identity={"name":"bob"}'   http://127.0.0.1:3000/employees   # his organisation
//! curl http://127.0.0.1:3000/employees                                  # no identity: []
//! curl -b 'identity={"name":"bob"}' -H 'content-type: application/json' \
//!      -d '{"amount": 100}' http://127.0.0.1:3000/employees/4/raise
//! ```
//!
//! The handlers call plain `pool.get()`; they never name the user. [`IdentityLayer`] reads
//! the `identity` cookie (or `Authorization: Bearer`) and runs each request in an end-user
//! scope; the pool, built with a [`ContextProvider`], acquires as that user; PostgreSQL's
//! Row-Level Security policies (`examples/hr.sql`) filter the rows.
//!
//! The provider here is [`Directory`], a stand-in for the application's user store that
//! maps user names to data roles and HR attributes. A deployment with an identity provider
//! uses `ctxpool::providers::EndUserSecProvider` (feature `providers`) from an
//! `end_user_sec_params` block instead, with a token validator on the layer and the
//! provider. Like the reference's middleware, this service trusts the `identity` cookie:
//! in production the application sets it after authenticating the user (signed, HttpOnly).
//!
//! Without `DATABASE_URL` (a superuser URL of a scratch database) the example starts a
//! throwaway PostgreSQL cluster. `PORT` sets the port (default 3000).
#![allow(dead_code)] // the end-to-end tests include this file as a module

use std::collections::HashMap;
use std::fmt;

use async_trait::async_trait;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ctxpool::middleware::IdentityLayer;
use ctxpool::postgres::{
    Config, ContextConfig, ContextScope, ManagerConfig, Pool, PoolError, RecyclingMethod,
    RoleMapping, Runtime,
};
use ctxpool::scope;
use ctxpool::{ContextProvider, ContextRequest, ProviderError, SecurityContext};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_postgres::NoTls;

/// The data roles the pool may enable; anything else is refused before any SQL.
pub const ALLOWED_ROLES: [&str; 3] = ["hr_employee", "hr_manager", "hr_directory"];

/// One user of the application's store: a data role and the HR attributes.
#[derive(Clone, Copy, Debug)]
pub struct User {
    /// The login name.
    pub name: &'static str,
    /// The data role the database enforces.
    pub role: &'static str,
    /// `hr.hcm_context.emp_id`.
    pub emp_id: i32,
    /// `hr.hcm_context.org_id`.
    pub org_id: i32,
}

/// The users of the demo.
pub const USERS: [User; 4] = [
    User {
        name: "alice",
        role: "hr_employee",
        emp_id: 3,
        org_id: 5,
    },
    User {
        name: "bob",
        role: "hr_manager",
        emp_id: 4,
        org_id: 7,
    },
    User {
        name: "dana",
        role: "hr_manager",
        emp_id: 1,
        org_id: 5,
    },
    User {
        name: "erin",
        role: "hr_employee",
        emp_id: 6,
        org_id: 9,
    },
];

/// The context provider: completes an application-store identity from the user store.
/// Unknown users and token identities are refused (fail closed), never served as someone
/// else or as the plain login.
pub struct Directory {
    users: HashMap<&'static str, User>,
    database_access_token: secrecy::SecretString,
}

impl Directory {
    /// The demo's users, with one database-access token for all of them.
    pub fn new(database_access_token: &str) -> Self {
        Self {
            users: USERS.iter().map(|u| (u.name, *u)).collect(),
            database_access_token: database_access_token.to_owned().into(),
        }
    }
}

impl fmt::Debug for Directory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Directory")
            .field("users", &self.users.len())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl ContextProvider for Directory {
    async fn security_context(
        &self,
        request: &ContextRequest,
    ) -> Result<SecurityContext, ProviderError> {
        use secrecy::ExposeSecret;
        let name = request.identity.name().ok_or_else(|| {
            ProviderError::InvalidToken("this directory serves application-store users".into())
        })?;
        let user = self.users.get(name).ok_or_else(|| ProviderError::Refused {
            status: 403,
            code: Some("unknown_end_user".into()),
        })?;
        let roles = request
            .data_roles
            .clone()
            .unwrap_or_else(|| vec![user.role.to_owned()]);
        let attributes = request.attributes.clone().unwrap_or_else(
            || json!({"hr.hcm_context": {"emp_id": user.emp_id, "org_id": user.org_id}}),
        );
        Ok(SecurityContext::builder(
            request.identity.clone(),
            self.database_access_token.expose_secret().to_owned(),
        )
        .data_roles(roles)
        .attributes(attributes)
        .build()?)
    }
}

/// The pool: one least-privileged login (`url`), contexts in transaction scope, the
/// [`Directory`] as provider.
pub fn pool(url: &str, max_size: usize) -> Pool {
    let mut cfg = Config::new();
    cfg.url = Some(url.to_owned());
    cfg.manager = Some(ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    });
    cfg.pool = Some(ctxpool::postgres::PoolConfig::new(max_size));
    cfg.context = Some(
        ContextConfig::new(RoleMapping::FirstDataRole, ALLOWED_ROLES)
            .scope(ContextScope::Transaction),
    );
    cfg.builder(NoTls)
        .expect("pool configuration")
        .runtime(Runtime::Tokio1)
        .provider(Directory::new("demo-db-token"))
        .build()
        .expect("pool")
}

/// The service: routes, the pool as state, and the identity layer around all of it.
pub fn app(pool: Pool) -> Router {
    Router::new()
        .route("/whoami", get(whoami))
        .route("/employees", get(list))
        .route("/employees/{id}", get(read_one))
        .route("/employees/{id}/raise", post(raise))
        .route("/colleagues", get(colleagues))
        .with_state(pool)
        .layer(IdentityLayer::new())
}

/// An employee as the API shows it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Employee {
    /// Id.
    pub id: i32,
    /// Name.
    pub name: String,
    /// Organisation.
    pub org_id: i32,
    /// Salary.
    pub salary: i32,
}

impl From<&tokio_postgres::Row> for Employee {
    fn from(row: &tokio_postgres::Row) -> Self {
        Self {
            id: row.get(0),
            name: row.get(1),
            org_id: row.get(2),
            salary: row.get(3),
        }
    }
}

/// Who the database thinks is asking.
async fn whoami(State(pool): State<Pool>) -> Result<Json<serde_json::Value>, ApiError> {
    let client = pool.get().await?;
    let row = client
        .query_one("SELECT ctxpool.end_user(), current_user::text", &[])
        .await?;
    let end_user: Option<String> = row.get(0);
    let role: String = row.get(1);
    Ok(Json(json!({ "end_user": end_user, "role": role })))
}

/// The employees the end user may see.
async fn list(State(pool): State<Pool>) -> Result<Json<Vec<Employee>>, ApiError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT id, name, org_id, salary FROM hr.employees ORDER BY id",
            &[],
        )
        .await?;
    Ok(Json(rows.iter().map(Employee::from).collect()))
}

/// One employee, if the end user may see them: 404 otherwise (the policy hides the row).
async fn read_one(
    State(pool): State<Pool>,
    Path(id): Path<i32>,
) -> Result<Json<Employee>, ApiError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            "SELECT id, name, org_id, salary FROM hr.employees WHERE id = $1",
            &[&id],
        )
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Json(Employee::from(&row)))
}

/// The body of a raise.
#[derive(Debug, Deserialize, Serialize)]
pub struct Raise {
    /// The amount to add, 1 to 10,000.
    pub amount: i32,
}

/// Gives a raise. Only managers hold `UPDATE (salary)`, and their policy limits it to their
/// organisation: anyone else gets 403, a row outside the policy 404.
async fn raise(
    State(pool): State<Pool>,
    Path(id): Path<i32>,
    Json(raise): Json<Raise>,
) -> Result<Json<Employee>, ApiError> {
    if !(1..=10_000).contains(&raise.amount) {
        return Err(ApiError::BadRequest("amount must be between 1 and 10000"));
    }
    let client = pool.get().await?;
    let row = client
        .query_opt(
            "UPDATE hr.employees SET salary = salary + $2 WHERE id = $1 \
             RETURNING id, name, org_id, salary",
            &[&id, &raise.amount],
        )
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Json(Employee::from(&row)))
}

/// The names in the end user's organisation: a scoped elevation. Employees see only their
/// own row, but while this handler enables the data role `hr_directory` the policy
/// `employee_directory` lets them see their colleagues' names.
async fn colleagues(State(pool): State<Pool>) -> Result<Json<Vec<String>>, ApiError> {
    let names = scope::with_data_roles(["hr_directory"], async {
        let client = pool.get().await?;
        let rows = client
            .query(
                "SELECT name FROM hr.employees \
                 WHERE org_id = ctxpool.attr('hr.hcm_context', 'org_id')::int ORDER BY id",
                &[],
            )
            .await?;
        Ok::<_, ApiError>(rows.iter().map(|r| r.get(0)).collect())
    })
    .map_err(|_| ApiError::NoIdentity)?
    .await?;
    Ok(Json(names))
}

/// What a handler answers when it cannot serve: a status and a short JSON body. Database
/// and provider errors are logged, not echoed.
#[derive(Debug)]
pub enum ApiError {
    /// The pool could not give a connection for this end user.
    Pool(PoolError),
    /// A statement failed.
    Db(tokio_postgres::Error),
    /// Not visible, or does not exist: the same answer, so that policies leak nothing.
    NotFound,
    /// A bad request body.
    BadRequest(&'static str),
    /// The handler needs an end user and the request names none.
    NoIdentity,
}

impl From<PoolError> for ApiError {
    fn from(e: PoolError) -> Self {
        Self::Pool(e)
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Db(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        use ctxpool::pool::PoolError as P;
        let (status, code) = match &self {
            Self::Pool(P::Provider(ProviderError::InvalidToken(_))) => {
                (StatusCode::UNAUTHORIZED, "invalid_identity")
            }
            Self::Pool(P::Provider(ProviderError::Refused { .. })) => {
                (StatusCode::FORBIDDEN, "unknown_end_user")
            }
            Self::Pool(P::ContextRejected(_)) => (StatusCode::FORBIDDEN, "context_rejected"),
            Self::Pool(P::Timeout(_) | P::Closed) => {
                (StatusCode::SERVICE_UNAVAILABLE, "database_busy")
            }
            Self::Pool(_) => (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable"),
            Self::Db(e)
                if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) =>
            {
                (StatusCode::FORBIDDEN, "not_allowed")
            }
            Self::Db(_) => (StatusCode::INTERNAL_SERVER_ERROR, "database_error"),
            Self::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::NoIdentity => (StatusCode::UNAUTHORIZED, "no_identity"),
        };
        if status.is_server_error() {
            tracing::warn!(error = ?self, "axum_hr: request failed");
        }
        let message = match &self {
            Self::BadRequest(m) => *m,
            _ => code,
        };
        (status, Json(json!({ "error": code, "message": message }))).into_response()
    }
}

#[tokio::main]
async fn main() {
    // Keep the database alive while serving; dropping a throwaway one stops it.
    let database = match ctxpool_testkit::hr::HrDatabase::from_env().await {
        Ok(database) => database,
        Err(e) => {
            eprintln!("axum_hr: could not set up the HR database: {e}");
            std::process::exit(1);
        }
    };
    let url = database.app_url().to_owned();
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3000);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind");
    println!(
        "axum_hr listening on http://{}",
        listener.local_addr().expect("address")
    );
    println!("  curl -b 'identity={{\"name\":\"alice\"}}' http://127.0.0.1:{port}/employees");
    axum::serve(listener, app(pool(&url, 4)))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .expect("serve");
}
