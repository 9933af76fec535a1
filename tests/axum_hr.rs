//! End to end over real HTTP: the example service `examples/axum_hr.rs` (its own code,
//! included below) on loopback, a throwaway PostgreSQL from the harness behind a
//! flight-counting proxy, and reqwest as the client.
#![cfg(feature = "tower")]

mod support;

#[path = "../examples/axum_hr.rs"]
mod axum_hr;

use std::net::SocketAddr;
use std::time::Duration;

use axum_hr::{Employee, USERS, User};
use ctxpool_testkit::{FlightProxy, PgCluster};
use reqwest::StatusCode;
use serde_json::Value;
use support::hr_cluster;
use tokio_postgres::NoTls;

/// The rows of `hr.employees` as the test knows them: (id, name, org).
const ROWS: [(i32, &str, i32); 6] = [
    (1, "Ada", 5),
    (2, "Grace", 5),
    (3, "Alan", 5),
    (4, "Edsger", 7),
    (5, "Barbara", 7),
    (6, "Donald", 9),
];

/// What `user`'s policies let them see, computed without the database.
fn expected(user: Option<&User>) -> Vec<&'static str> {
    ROWS.iter()
        .filter(|(id, _, org)| match user {
            None => false,
            Some(u) if u.role == "hr_employee" => *id == u.emp_id,
            Some(u) => *org == u.org_id,
        })
        .map(|(_, name, _)| *name)
        .collect()
}

/// The service on a free loopback port, its pool talking to the cluster through a proxy.
struct Service {
    cluster: PgCluster,
    proxy: FlightProxy,
    pool: ctxpool::postgres::Pool,
    base: String,
    http: reqwest::Client,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Service {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn start(max_size: usize) -> Service {
    start_with(max_size, |router| router).await
}

async fn start_with(max_size: usize, wrap: impl FnOnce(axum::Router) -> axum::Router) -> Service {
    let cluster = hr_cluster();
    let proxy = FlightProxy::start(support::addr(&cluster), Duration::ZERO).unwrap();
    let url = format!("postgres://hr_app@127.0.0.1:{}/hr", proxy.port());
    let pool = axum_hr::pool(&url, max_size);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let app = wrap(axum_hr::app(pool.clone()));
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Service {
        cluster,
        proxy,
        pool,
        base: format!("http://{addr}"),
        http: reqwest::Client::new(),
        server,
    }
}

fn cookie(name: &str) -> String {
    format!(r#"identity={{"name":"{name}"}}"#)
}

impl Service {
    fn get(&self, path: &str, user: Option<&str>) -> reqwest::RequestBuilder {
        let req = self.http.get(format!("{}{path}", self.base));
        match user {
            Some(name) => req.header("cookie", cookie(name)),
            None => req,
        }
    }

    async fn names(&self, user: Option<&str>) -> Vec<String> {
        let res = self.get("/employees", user).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{user:?}");
        let employees: Vec<Employee> = res.json().await.unwrap();
        employees.into_iter().map(|e| e.name).collect()
    }

    async fn raise(&self, user: &str, id: i32, amount: i32) -> reqwest::Response {
        self.http
            .post(format!("{}/employees/{id}/raise", self.base))
            .header("cookie", cookie(user))
            .json(&axum_hr::Raise { amount })
            .send()
            .await
            .unwrap()
    }

    async fn admin(&self) -> tokio_postgres::Client {
        let (client, conn) =
            tokio_postgres::connect(&self.cluster.url(self.cluster.superuser(), "hr"), NoTls)
                .await
                .unwrap();
        tokio::spawn(conn);
        client
    }

    /// The proxy's flight count once everything the finished requests sent has reached
    /// the server. A request can leave a message queued on its connection after its
    /// response went out (tokio-postgres closes a dropped prepared statement with a
    /// message it does not wait for), so a count read right after a response may miss
    /// it. One simple query on every pooled connection, answered only after everything
    /// queued before it on that connection, closes that window.
    async fn settled_flights(&self) -> u64 {
        until("every connection is back in the pool", || async {
            self.in_use() == 0
        })
        .await;
        let mut held = Vec::new();
        for _ in 0..self.pool.status().size {
            let conn = self.pool.get().await.unwrap();
            conn.batch_execute("").await.unwrap();
            held.push(conn);
        }
        drop(held);
        self.proxy.flights()
    }

    fn in_use(&self) -> usize {
        let s = self.pool.status();
        s.size - s.available
    }
}

/// Waits for `condition`, re-checking every 10 ms, for at most 30 s.
async fn until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn user(name: &str) -> &'static User {
    USERS.iter().find(|u| u.name == name).unwrap()
}

#[tokio::test]
async fn two_users_see_different_rows_and_no_identity_sees_none() {
    let svc = start(2).await;
    assert_eq!(svc.names(None).await, Vec::<String>::new());
    assert_eq!(
        svc.names(Some("alice")).await,
        expected(Some(user("alice")))
    );
    assert_eq!(svc.names(Some("bob")).await, expected(Some(user("bob"))));
    assert_ne!(expected(Some(user("alice"))), expected(Some(user("bob"))));

    // The database, not the handler, knows who asks.
    let who: Value = svc
        .get("/whoami", Some("bob"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(who["end_user"], "bob");
    assert_eq!(who["role"], "hr_manager");
    let who: Value = svc
        .get("/whoami", None)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(who["end_user"], Value::Null);
    assert_eq!(who["role"], "hr_app");

    // A row outside the policy is indistinguishable from a missing one.
    let res = svc.get("/employees/4", Some("alice")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let res = svc.get("/employees/3", Some("alice")).send().await.unwrap();
    assert_eq!(res.json::<Employee>().await.unwrap().name, "Alan");

    // An unknown user fails closed: refused, not served as the plain login.
    let res = svc.get("/employees", Some("mallory")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_write_by_one_user_is_bounded_by_their_policy_and_invisible_to_others() {
    let svc = start(2).await;
    // Bob manages org 7: he may raise Edsger (org 7)...
    let res = svc.raise("bob", 4, 100).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.json::<Employee>().await.unwrap().salary, 6200);
    // ...but not Ada (org 5): his UPDATE policy does not reach her row.
    assert_eq!(
        svc.raise("bob", 1, 100).await.status(),
        StatusCode::NOT_FOUND
    );
    // Alice is an employee: no UPDATE privilege at all.
    assert_eq!(
        svc.raise("alice", 3, 100).await.status(),
        StatusCode::FORBIDDEN
    );

    // Dana manages org 5: Edsger's new salary is invisible to her, Ada's is unchanged.
    assert_eq!(
        svc.get("/employees/4", Some("dana"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    let ada: Employee = svc
        .get("/employees/1", Some("dana"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ada.salary, 5000);
    // Bob sees his write.
    let edsger: Employee = svc
        .get("/employees/4", Some("bob"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(edsger.salary, 6200);
    // The truth, as the superuser sees it.
    let admin = svc.admin().await;
    let rows = admin
        .query(
            "SELECT salary FROM hr.employees WHERE id IN (1, 3, 4) ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let salaries: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(salaries, [5000, 4800, 6200]);
}

#[tokio::test]
async fn scoped_elevation_widens_one_handler_only() {
    let svc = start(2).await;
    let colleagues: Vec<String> = svc
        .get("/colleagues", Some("alice"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(colleagues, ["Ada", "Grace", "Alan"]);
    // The elevation ended with the handler: the next request on the same pool is narrow.
    assert_eq!(svc.names(Some("alice")).await, ["Alan"]);
    // No identity, no elevation.
    let res = svc.get("/colleagues", None).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_role_outside_the_allow_list_fails_the_elevation_before_any_sql() {
    use ctxpool::EndUserIdentity;
    use ctxpool::postgres::PoolError;
    use ctxpool::scope::{self, EndUserScope};
    let cluster = hr_cluster();
    let pool = axum_hr::pool(&cluster.url("hr_app", "hr"), 1);
    // hr_auditor exists in the database but is not in the service's allow-list.
    let outcome = EndUserScope::new(EndUserIdentity::named("alice", None))
        .run(async {
            scope::with_data_roles(["hr_auditor"], pool.get())
                .unwrap()
                .await
                .map(drop)
        })
        .await;
    assert!(
        matches!(outcome, Err(PoolError::ContextRejected(_))),
        "{outcome:?}"
    );
    // The refusal came at attach, before any statement: the connection is clean.
    let conn = pool.get().await.unwrap();
    let plain = conn.query("SELECT current_user::text", &[]).await.unwrap();
    assert_eq!(plain[0].get::<_, String>(0), "hr_app");
}

#[tokio::test]
async fn malformed_and_oversize_credentials_get_400_or_401_and_no_database_work() {
    let svc = start(2).await;
    // Warm the pool so that later flights could only come from these requests.
    assert_eq!(svc.names(Some("alice")).await, ["Alan"]);
    let flights = svc.settled_flights().await;
    let big = "a".repeat(ctxpool::middleware::DEFAULT_MAX_CREDENTIAL_LEN + 1);
    // (headers, status, error code)
    type Case = (Vec<(&'static str, String)>, u16, &'static str);
    let cases: Vec<Case> = vec![
        (
            vec![("cookie", "identity={\"name\":".into())],
            400,
            "malformed_identity_cookie",
        ),
        (
            vec![(
                "cookie",
                "identity={\"name\":\"alice\",\"admin\":true}".into(),
            )],
            400,
            "malformed_identity_cookie",
        ),
        (
            vec![("cookie", "identity=%E0%A4%A".into())],
            400,
            "malformed_identity_cookie",
        ),
        (
            vec![("cookie", format!("identity={big}"))],
            400,
            "credential_too_large",
        ),
        (
            vec![("cookie", "identity=a.b; identity=c.d".into())],
            400,
            "conflicting_identity_cookies",
        ),
        (
            vec![("authorization", "Bearer".into())],
            401,
            "malformed_authorization",
        ),
        (
            vec![("authorization", "bearer a b".into())],
            401,
            "malformed_authorization",
        ),
        (
            vec![("authorization", format!("Bearer {big}"))],
            400,
            "credential_too_large",
        ),
        (
            vec![
                ("authorization", "Bearer a.b".into()),
                ("authorization", "Bearer a.b".into()),
            ],
            400,
            "several_authorization_headers",
        ),
        (
            vec![
                ("cookie", cookie("alice")),
                ("authorization", "Bearer x.y.z".into()),
            ],
            400,
            "conflicting_credentials",
        ),
    ];
    for (headers, status, code) in cases {
        let mut req = svc.http.get(format!("{}/employees", svc.base));
        for (k, v) in &headers {
            req = req.header(*k, v.as_str());
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status().as_u16(), status, "{code}");
        if status == 401 {
            assert!(res.headers().contains_key("www-authenticate"), "{code}");
        }
        let body = res.text().await.unwrap();
        assert!(body.len() < 200, "{code}: short body");
        assert!(
            !body.contains("aaaa") && !body.contains("x.y.z"),
            "{code}: no echo"
        );
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"], code);
    }
    assert_eq!(
        svc.proxy.flights(),
        flights,
        "a refused request reached the database"
    );
    // The service is still whole.
    assert_eq!(svc.names(Some("bob")).await, expected(Some(user("bob"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_requests_of_several_users_never_see_another_users_rows() {
    let svc = std::sync::Arc::new(start(4).await);
    let identities: Vec<Option<&'static User>> =
        [None].into_iter().chain(USERS.iter().map(Some)).collect();
    let mut tasks = Vec::new();
    for i in 0..400 {
        let svc = svc.clone();
        let who = identities[i % identities.len()];
        tasks.push(tokio::spawn(async move {
            let seen = svc.names(who.map(|u| u.name)).await;
            (who.map(|u| u.name), seen == expected(who))
        }));
    }
    let mut wrong = Vec::new();
    for t in tasks {
        let (who, right) = t.await.unwrap();
        if !right {
            wrong.push(who);
        }
    }
    assert!(
        wrong.is_empty(),
        "requests saw other users' rows: {wrong:?}"
    );
    let status = svc.pool.status();
    assert!(status.size <= 4, "{status:?}");
}

#[tokio::test]
async fn a_request_cancelled_mid_query_leaves_the_pool_whole() {
    let svc = start(1).await;
    assert_eq!(svc.names(Some("bob")).await, expected(Some(user("bob"))));

    // Hold the table so that the next query waits inside the server.
    let admin = svc.admin().await;
    admin
        .batch_execute("BEGIN; LOCK TABLE hr.employees IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let request = {
        let req = svc.get("/employees", Some("alice"));
        tokio::spawn(async move { req.send().await })
    };
    let waiting = "SELECT count(*) FROM pg_stat_activity \
                   WHERE usename = 'hr_app' AND wait_event_type = 'Lock'";
    until("the query to wait on the lock", || async {
        admin
            .query_one(waiting, &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
    })
    .await;
    assert_eq!(svc.in_use(), 1);

    // The client goes away mid-query: the server drops the handler, and with it the handle.
    request.abort();
    assert!(request.await.unwrap_err().is_cancelled());
    until("the handler's connection to be released", || async {
        svc.in_use() == 0
    })
    .await;

    admin.batch_execute("ROLLBACK").await.unwrap();
    // The pool serves every user correctly afterwards, on its one slot.
    for who in [Some("alice"), None, Some("bob"), Some("dana"), Some("erin")] {
        assert_eq!(
            svc.names(who).await,
            expected(who.map(user)),
            "{who:?} after the cancellation"
        );
    }
    assert!(svc.pool.status().size <= 1);
    // No session of the pool's login is left running the cancelled query.
    until("the cancelled query's session to end", || async {
        admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = 'hr_app' AND state = 'active'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 0
    })
    .await;
}

#[cfg(feature = "providers")]
#[tokio::test]
async fn with_token_validation_an_invalid_token_is_401_before_any_database_work() {
    use ctxpool::middleware::IdentityLayer;
    use ctxpool::providers::validation::{TokenValidator, ValidationConfig};
    use serde_json::json;
    use support::keys::*;
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let jwks = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/jwks"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"keys": [ec_jwk("a", EC_A_X, EC_A_Y)]})),
        )
        .mount(&jwks)
        .await;
    let issuer = "https://issuer.example.test/";
    let validator = TokenValidator::new(ValidationConfig::new(
        issuer,
        vec!["hr".into()],
        format!("{}/jwks", jwks.uri()),
    ))
    .unwrap();
    // An outer layer that validates tokens, around the example's own layer.
    let svc = start_with(2, |router| {
        router.layer(IdentityLayer::new().token_check(validator))
    })
    .await;
    assert_eq!(svc.names(Some("alice")).await, ["Alan"]);
    let flights = svc.settled_flights().await;

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({"iss": issuer, "aud": "hr", "sub": "alice", "exp": now + 600});
    let forged = sign_es256("a", EC_B_PRIVATE_PEM, &claims);
    let expired = sign_es256(
        "a",
        EC_A_PRIVATE_PEM,
        &json!({"iss": issuer, "aud": "hr", "sub": "alice", "exp": now - 3600}),
    );
    for token in [forged, expired, "not-a-jwt".to_owned()] {
        let res = svc
            .http
            .get(format!("{}/employees", svc.base))
            .header("authorization", format!("Bearer {token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"], "invalid_token");
    }
    assert_eq!(
        svc.proxy.flights(),
        flights,
        "an invalid token reached the database"
    );

    // A valid token passes the layer and reaches the service, whose provider decides
    // (this example's directory serves application-store users only).
    let valid = sign_es256("a", EC_A_PRIVATE_PEM, &claims);
    let res = svc
        .http
        .get(format!("{}/employees", svc.base))
        .header("authorization", format!("Bearer {valid}"))
        .send()
        .await
        .unwrap();
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"], "invalid_identity");
    assert_eq!(svc.proxy.flights(), flights);
}
