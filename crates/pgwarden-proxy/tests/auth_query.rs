//! Users known only to the server, found with auth_query and logged into the server by SCRAM
//! pass-through.

mod common;

use common::setup;

const AUTH: &str = "[proxy.auth]\nauth_user = \"pgwarden_auth\"\nauth_query = \"SELECT * FROM public.pgwarden_lookup($1)\"\n[[proxy.users]]\nname = \"pgwarden_auth\"\npassword = \"auth-secret\"";

#[tokio::test]
async fn users_found_by_auth_query_log_in_with_scram_pass_through() {
    let s = setup(0, AUTH).await;
    // As PgBouncer recommends: the auth user reads secrets only through a definer function.
    s.cluster
        .execute(0, "CREATE ROLE pgwarden_auth LOGIN PASSWORD 'auth-secret'; CREATE ROLE dyn LOGIN PASSWORD 'dyn-secret'; GRANT CONNECT ON DATABASE app TO dyn")
        .await;
    s.cluster
        .client_db(0, "app")
        .await
        .batch_execute(
            "CREATE FUNCTION public.pgwarden_lookup(u text, OUT usename name, OUT passwd text) \
             RETURNS record LANGUAGE sql SECURITY DEFINER \
             AS $$SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename = u$$; \
             REVOKE ALL ON FUNCTION public.pgwarden_lookup(text) FROM public; \
             GRANT EXECUTE ON FUNCTION public.pgwarden_lookup(text) TO pgwarden_auth",
        )
        .await
        .expect("lookup function");
    let dyn_client = s
        .try_connect("dyn", "dyn-secret", "app")
        .await
        .expect("dyn logs in");
    let who: String = dyn_client
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("query")
        .get(0);
    assert_eq!(who, "dyn", "the server session is dyn's own");
    let code = |e: tokio_postgres::Error| e.code().map(|c| c.code().to_string());
    let e = s
        .try_connect("dyn", "wrong", "app")
        .await
        .expect_err("wrong password");
    assert_eq!(code(e).as_deref(), Some("28P01"));
    let e = s
        .try_connect("nobody", "x", "app")
        .await
        .expect_err("unknown user");
    assert_eq!(code(e).as_deref(), Some("28P01"));
    // Listed users still work as before.
    s.app().await.batch_execute("SELECT 1").await.expect("app");
}

#[tokio::test]
async fn a_failing_auth_query_fails_the_login_without_leaking_why() {
    let s = setup(0, AUTH).await;
    s.cluster
        .execute(0, "CREATE ROLE pgwarden_auth LOGIN PASSWORD 'auth-secret'; CREATE ROLE dyn LOGIN PASSWORD 'dyn-secret'")
        .await;
    // No lookup function: the query fails on the server.
    let e = s
        .try_connect("dyn", "dyn-secret", "app")
        .await
        .expect_err("refused");
    assert_eq!(e.code().map(|c| c.code()), Some("28P01"), "{e:?}");
    let msg = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    assert!(
        !msg.contains("pgwarden_lookup"),
        "server internals leaked: {msg}"
    );
}
