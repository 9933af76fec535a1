//! The ctxpool demo: one pool, one least-privileged login, and PostgreSQL Row-Level
//! Security deciding what each end user sees.
//!
//! `cargo run --release --example hr_demo` starts a throwaway PostgreSQL cluster (initdb in
//! a temporary folder, a free loopback port) unless `DATABASE_URL` names a superuser URL of
//! a scratch database, where the demo creates its roles and the `hr` schema.

use std::time::Instant;

use ctxpool::postgres::{
    Config, ContextConfig, ContextScope, ManagerConfig, Pool, PoolConfig, RecyclingMethod,
    RoleMapping, Runtime,
};
use ctxpool::{EndUserIdentity, SecurityContext};
use ctxpool_testkit::ClusterError;
use ctxpool_testkit::hr::{HrDatabase, HrError};
use serde_json::json;
use tokio_postgres::NoTls;

const LIST: &str = "SELECT name FROM hr.employees ORDER BY id";

struct User {
    name: &'static str,
    role: &'static str,
    emp_id: i32,
    org_id: i32,
}

const USERS: [User; 3] = [
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
];

fn context(u: &User) -> SecurityContext {
    SecurityContext::builder(EndUserIdentity::named(u.name, None), "demo-db-token")
        .data_roles([u.role])
        .attributes(json!({"hr.hcm_context": {"emp_id": u.emp_id, "org_id": u.org_id}}))
        .build()
        .expect("a valid context")
}

/// What each user's policies allow, computed independently of the database.
fn expected(u: Option<&User>) -> Vec<&'static str> {
    const ROWS: [(i32, &str, i32); 6] = [
        (1, "Ada", 5),
        (2, "Grace", 5),
        (3, "Alan", 5),
        (4, "Edsger", 7),
        (5, "Barbara", 7),
        (6, "Donald", 9),
    ];
    ROWS.iter()
        .filter(|(id, _, org)| match u {
            None => false,
            Some(u) if u.role == "hr_employee" => *id == u.emp_id,
            Some(u) => *org == u.org_id,
        })
        .map(|(_, name, _)| *name)
        .collect()
}

async fn names(pool: &Pool, who: Option<&SecurityContext>) -> Vec<String> {
    let client = match who {
        Some(ctx) => pool.acquire_as(ctx).await.expect("acquire_as"),
        None => pool.get().await.expect("get"),
    };
    let stmt = client.prepare_cached(LIST).await.expect("prepare");
    client
        .query(&stmt, &[])
        .await
        .expect("query")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn pool(url: &str, scope: ContextScope) -> Pool {
    let mut cfg = Config::new();
    cfg.url = Some(url.to_owned());
    cfg.manager = Some(ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    });
    cfg.pool = Some(PoolConfig::new(8));
    cfg.context = Some(
        ContextConfig::new(RoleMapping::FirstDataRole, ["hr_employee", "hr_manager"]).scope(scope),
    );
    cfg.create_pool(Some(Runtime::Tokio1), NoTls).expect("pool")
}

/// The median of `samples` (sorted in place).
fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

#[tokio::main]
async fn main() {
    // Keep the database alive for the whole demo; dropping a throwaway one stops it.
    let database = match HrDatabase::from_env().await {
        Ok(database) => database,
        Err(HrError::Cluster(e @ ClusterError::NotInstalled { .. })) => {
            eprintln!("hr_demo: {e}");
            std::process::exit(1);
        }
        Err(e) => panic!("could not set up the HR database: {e}"),
    };
    let (app_url, place) = (database.app_url().to_owned(), database.place());

    println!("ctxpool HR demo: PostgreSQL ({place}), one pool, login `hr_app`\n");
    let pool = pool(&app_url, ContextScope::Transaction);

    println!("| end user      | data role   | hcm_context          | sees (RLS)                 |");
    println!("|---------------|-------------|----------------------|----------------------------|");
    let seen = names(&pool, None).await;
    assert!(seen.is_empty(), "no identity must see nothing");
    println!(
        "| (no identity) | -           | -                    | {:<26} |",
        "nothing"
    );
    for u in &USERS {
        let seen = names(&pool, Some(&context(u))).await;
        assert_eq!(seen, expected(Some(u)), "{} saw the wrong rows", u.name);
        let hcm = format!("emp_id={} org_id={}", u.emp_id, u.org_id);
        println!(
            "| {:<13} | {:<11} | {hcm:<20} | {:<26} |",
            u.name,
            u.role,
            seen.join(", ")
        );
    }

    // 100 concurrent requests mixing the users and no identity, each checked.
    let mut tasks = Vec::new();
    for i in 0..100 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let user = USERS.get(i % (USERS.len() + 1));
            let ctx = user.map(context);
            let seen = names(&pool, ctx.as_ref()).await;
            seen == expected(user)
        }));
    }
    let mut right = 0;
    for t in tasks {
        if t.await.expect("request task") {
            right += 1;
        }
    }
    println!(
        "\n100 concurrent mixed requests through one pool of 8: {right} right, {} wrong",
        100 - right
    );
    assert_eq!(right, 100);

    // The per-query cost of a context, on this machine: the two variants alternate, so a
    // slow moment of the host slows both alike, and each ratio is taken within a pair.
    let alice = context(&USERS[0]);
    let runs = 2000;
    let mut line = Vec::new();
    for scope in [ContextScope::Transaction, ContextScope::Session] {
        let pool = self::pool(&app_url, scope);
        let (mut plain, mut ctx, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            let t = Instant::now();
            names(&pool, None).await;
            let p = t.elapsed().as_secs_f64();
            let t = Instant::now();
            names(&pool, Some(&alice)).await;
            let c = t.elapsed().as_secs_f64();
            plain.push(p);
            ctx.push(c);
            ratio.push(c / p);
        }
        line.push(format!(
            "{scope:?} scope: get()+query {:.0} µs, acquire_as(alice)+query {:.0} µs: {:.2}×",
            median(&mut plain) * 1e6,
            median(&mut ctx) * 1e6,
            median(&mut ratio)
        ));
    }
    println!(
        "\nwhat a context adds to a query (pool of 8, prepared statement, loopback; \
         {runs} pairs, the two alternating; median of the per-pair ratios):"
    );
    for l in line {
        println!("  {l}");
    }
}
