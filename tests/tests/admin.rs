//! The admin listener end to end: a real scrape that `promtool check metrics` accepts, with
//! the figures the traffic made; a series count that does not grow with the pool; the JSON
//! API and the CLI commands over it (strategy switched live, a reputation explained, health,
//! stats, pool commands with `--admin`); the bearer token; live key rotation under traffic.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failed step must fail the test loudly"
)]

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use proxygate_tests::curl::curl;
use proxygate_tests::fakes::{FakeUpstream, Kind, refusing_addr};
use proxygate_tests::gateway::{Gateway, cli, cli_env};
use proxygate_tests::origin::Origin;
use proxygate_tests::sample;
use serde_json::Value;

fn series(text: &str) -> usize {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .count()
}

/// `promtool check metrics` on a scrape (Debian's prometheus package; tests/run.sh installs
/// it).
async fn promtool_check_metrics(text: &str) {
    let mut child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; tests/run.sh installs it)");
    tokio::io::AsyncWriteExt::write_all(child.stdin.as_mut().unwrap(), text.as_bytes())
        .await
        .unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_traffic_and_pass_promtool() {
    let origin = Origin::start().await;
    let good = FakeUpstream::start(Kind::Http, None).await;
    let dead = refusing_addr().await;
    let gw = Gateway::builder()
        .config("[pool]\nstrategy = \"round_robin\"")
        .upstream(good.url("http"))
        .upstream(format!("http://{dead}"))
        .start()
        .await;
    let (status, _) = gw.admin_get("/readyz").await;
    assert_eq!(status, 503, "nothing is healthy before any traffic");
    for _ in 0..6 {
        let r = curl(&["-x", &gw.http_proxy(), &origin.url()]).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let r = curl(&["-p", "-x", &gw.http_proxy(), &origin.url()]).await;
    assert_eq!(r.status, 200);
    let r = curl(&["--socks5-hostname", &gw.addr.to_string(), &origin.url()]).await;
    assert_eq!(r.status, 200);
    let (status, text) = gw.admin_get("/metrics").await;
    assert_eq!(status, 200);
    promtool_check_metrics(&text).await;
    assert_eq!(
        sample(
            &text,
            "proxygate_client_requests_total{outcome=\"ok\",protocol=\"http_forward\"}"
        ),
        6.0
    );
    assert_eq!(
        sample(
            &text,
            "proxygate_client_requests_total{outcome=\"ok\",protocol=\"http_connect\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "proxygate_client_requests_total{outcome=\"ok\",protocol=\"socks5\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "proxygate_client_connections_total{protocol=\"socks5\"}"
        ),
        1.0
    );
    let refused = sample(
        &text,
        "proxygate_upstream_failures_total{kind=\"upstream_connect_refused\"}",
    );
    assert!(refused >= 1.0, "the dead upstream was tried: {refused}");
    let attempts = sample(&text, "proxygate_upstream_attempts_total");
    assert!(
        attempts >= 8.0 + refused,
        "{attempts} attempts, {refused} refused"
    );
    assert_eq!(
        sample(&text, "proxygate_upstream_retries_total"),
        refused,
        "every refused attempt was retried"
    );
    assert!(sample(&text, "proxygate_bytes_total{direction=\"down\"}") > 0.0);
    // Forwarded requests reuse kept upstream connections (one per worker at most here), the
    // tunnels each open one.
    let connects = sample(&text, "proxygate_upstream_connect_seconds_count");
    assert!(
        (3.0..8.0).contains(&connects),
        "{connects} upstream connections"
    );
    assert!(sample(&text, "proxygate_upstream_first_byte_seconds_count") >= 7.0);
    assert_eq!(
        sample(&text, "proxygate_pool_upstreams{state=\"healthy\"}"),
        1.0
    );
    assert_eq!(
        sample(&text, "proxygate_pool_strategy{strategy=\"round_robin\"}"),
        1.0
    );
    assert_eq!(sample(&text, "proxygate_upstream_reputation_count"), 2.0);
    // The last tunnel's relay ends a moment after curl has its answer (the upstream's EOF has
    // to come back through the chain): on a loaded box the scrape above can beat it.
    proxygate_tests::eventually_async(Duration::from_secs(10), || async {
        let (_, t) = gw.admin_get("/metrics").await;
        (sample(&t, "proxygate_active_tunnels") == 0.0).then_some(())
    })
    .await;
    // The persister flushed at least once (5 s default: wait for it).
    proxygate_tests::eventually_async(Duration::from_secs(15), || async {
        let (_, t) = gw.admin_get("/metrics").await;
        (sample(&t, "proxygate_store_flush_seconds_count") >= 1.0).then_some(())
    })
    .await;
    let (status, body) = gw.admin_get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = gw.admin_get("/livez").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_do_not_grow_with_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let mut counts = Vec::new();
    for n in [10usize, 10_000] {
        let list = dir.path().join(format!("{n}.txt"));
        let lines: String = (0..n)
            .map(|i| {
                format!(
                    "http://10.{}.{}.{}:3128\n",
                    i >> 16,
                    (i >> 8) & 255,
                    i & 255
                )
            })
            .collect();
        std::fs::write(&list, lines).unwrap();
        let gw = Gateway::builder()
            .arg("--upstreams-file")
            .arg(list.to_str().unwrap())
            .start()
            .await;
        let (_, text) = gw.admin_get("/metrics").await;
        assert_eq!(
            sample(&text, "proxygate_pool_upstreams{state=\"probation\"}"),
            n as f64
        );
        counts.push(series(&text));
        let health = gw.api("/api/v1/health").await;
        assert_eq!(health["upstreams"], n);
    }
    assert_eq!(counts[0], counts[1], "series with 10 and 10,000 upstreams");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strategy_reputation_health_and_stats_from_the_cli() {
    let origin = Origin::start().await;
    let good = FakeUpstream::start(Kind::Http, None).await;
    let dead = refusing_addr().await;
    let gw = Gateway::builder()
        .upstream(good.url("http"))
        .upstream(format!("http://{dead}"))
        .start()
        .await;
    let admin = gw.admin_url();
    let out = cli(&["strategy", "--admin", &admin]).await;
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("weighted_random\n"), "{stdout}");

    let out = cli(&["strategy", "random", "--admin", &admin, "--json"]).await;
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["strategy"].as_str(), v["set_by"].as_str()),
        (Some("random"), Some("operator"))
    );
    // The next request is selected by it.
    let before = gw.admin_get("/metrics").await.1;
    let before = sample(&before, "proxygate_selections_total{strategy=\"random\"}");
    let r = curl(&["-x", &gw.http_proxy(), &origin.url()]).await;
    assert_eq!(r.status, 200);
    let after = gw.admin_get("/metrics").await.1;
    assert!(sample(&after, "proxygate_selections_total{strategy=\"random\"}") > before);

    let out = cli(&["strategy", "psychic", "--admin", &admin]).await;
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown strategy"));
    let out = cli(&["strategy", "--reset", "--admin", &admin]).await;
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("weighted_random"));

    for _ in 0..10 {
        let r = curl(&["-x", &gw.http_proxy(), &origin.url()]).await;
        assert_eq!(r.status, 200);
    }
    let list = gw.api("/api/v1/upstreams?sort=reputation").await;
    assert_eq!(list["total"], 2);
    let worst = &list["upstreams"][0];
    assert_eq!(worst["address"], dead.to_string());
    let id = worst["id"].as_str().unwrap().to_owned();
    // Pages of the same order: `total` counts them all, `upstreams` holds the page.
    let first = gw.api("/api/v1/upstreams?sort=reputation&limit=1").await;
    assert_eq!(first["total"], 2);
    assert_eq!(first["upstreams"].as_array().unwrap().len(), 1);
    assert_eq!(first["upstreams"][0]["id"], worst["id"]);
    let second = gw
        .api("/api/v1/upstreams?sort=reputation&offset=1&limit=5")
        .await;
    assert_eq!(second["upstreams"].as_array().unwrap().len(), 1);
    assert_eq!(second["upstreams"][0]["address"], good.addr.to_string());
    let best = gw.api("/api/v1/upstreams?sort=-reputation&limit=1").await;
    assert_eq!(best["upstreams"][0]["id"], second["upstreams"][0]["id"]);
    let past = gw.api("/api/v1/upstreams?offset=9").await;
    assert_eq!(
        (
            past["total"].as_u64(),
            past["upstreams"].as_array().map(Vec::len)
        ),
        (Some(2), Some(0))
    );

    // Why does it score what it scores?
    let e = gw.api(&format!("/api/v1/upstreams/{}", &id[..6])).await;
    let f = &e["formula"];
    let sum = [
        "base",
        "success_term",
        "latency_term",
        "failure_term",
        "uses_term",
    ]
    .iter()
    .map(|k| f[k].as_f64().unwrap())
    .sum::<f64>();
    assert!((sum - f["score"].as_f64().unwrap()).abs() < 1e-9, "{e}");
    assert_eq!(f["reputation"], e["reputation"]);
    assert!(e["why"].as_array().unwrap().len() >= 2, "{e}");
    // What weighted_random draws by: the reputation discounted by the success rate.
    let weight = e["selection_weight"].as_u64().unwrap();
    let rate = f["success_rate"].as_f64().unwrap_or(1.0);
    let want = (f["reputation"].as_f64().unwrap() * rate.powi(4)).round() as u64;
    assert_eq!(weight, want, "{e}");
    let out = cli(&["reputation", &id, "--admin", &admin]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    for want in [
        "reputation formula:",
        "success",
        "consecutive failures",
        "why:",
        "-> reputation",
        "selection weight",
    ] {
        assert!(text.contains(want), "{want:?} missing:\n{text}");
    }
    let good_id = list["upstreams"][1]["id"].as_str().unwrap().to_owned();
    let g = gw.api(&format!("/api/v1/upstreams/{good_id}")).await;
    assert!(g["latency_ms"]["samples"].as_u64().unwrap() >= 5, "{g}");
    assert!(g["latency_ms"]["p99"].as_u64().is_some());

    let out = cli(&["health", "--admin", &admin]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("worst upstreams:") && text.contains(&dead.to_string()),
        "{text}"
    );
    let h = gw.api("/api/v1/health").await;
    assert_eq!(h["states"]["healthy"], 1);
    assert_eq!(h["worst"][0]["address"], dead.to_string());

    let s = gw.api("/api/v1/stats?window=5m").await;
    assert!(s["successes"].as_u64().unwrap() >= 11, "{s}");
    assert!(s["failures"].as_u64().unwrap() >= 1, "{s}");
    assert!(s["response_ms"]["p50"].as_u64().is_some(), "{s}");
    let out = cli(&["stats", "--window", "1h", "--admin", &admin]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("last 1h:"));
    let (status, body) = gw.admin_get("/api/v1/stats?window=2d").await;
    assert_eq!(status, 400, "{body}");

    // Pool commands through the API.
    let out = cli(&["pool", "--admin", &admin, "add", "socks5://10.1.2.3:1080"]).await;
    assert!(out.status.success(), "{out:?}");
    let out = cli(&["pool", "--admin", &admin, "add", "gopher://u:hunter2@x:1"]).await;
    assert_eq!(out.status.code(), Some(65));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("hunter2"));
    let out = cli(&["pool", "--admin", &admin, "list"]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("10.1.2.3:1080"));
    let out = cli(&["pool", "--admin", &admin, "disable", &id]).await;
    assert!(out.status.success(), "{out:?}");
    let m = gw.admin_get("/metrics").await.1;
    assert_eq!(
        sample(&m, "proxygate_pool_upstreams{state=\"disabled\"}"),
        1.0
    );
    let out = cli(&["pool", "--admin", &admin, "remove", "ffff0000ffff0000"]).await;
    assert_eq!(out.status.code(), Some(1));
    let (status, _) = gw.admin_get("/api/v1/nothing").await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_guards_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin.token");
    std::fs::write(&token, "s3cret-token-of-32-characters-ok\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let gw = Gateway::builder()
        .config(&format!(
            "[admin]\ntoken_file = {:?}",
            token.to_str().unwrap()
        ))
        .start()
        .await;
    let (status, _) = gw.admin_get("/api/v1/health").await;
    assert_eq!(status, 401);
    let (status, _) = gw.admin_get("/metrics").await;
    assert_eq!(status, 401);
    let (status, _) = gw.admin_get("/livez").await;
    assert_eq!(status, 200, "probes need no token");
    let r = gw
        .admin_client()
        .get(format!("{}/api/v1/health", gw.admin_url()))
        .bearer_auth("s3cret-token-of-32-characters-ok")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let admin = gw.admin_url();
    let out = cli(&["health", "--admin", &admin]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--token-file"));
    let out = cli(&[
        "health",
        "--admin",
        &admin,
        "--token-file",
        token.to_str().unwrap(),
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
    let out = cli_env(
        &["strategy", "--admin", &admin],
        &[("PROXYGATE_ADMIN_TOKEN", "s3cret-token-of-32-characters-ok")],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        !gw.logs().contains("s3cret-token"),
        "the token never reaches the log"
    );

    // A public admin listener without a token is refused before anything binds.
    let data = dir.path().join("data");
    let out = cli(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "0.0.0.0:0",
        "--data-dir",
        data.to_str().unwrap(),
    ])
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(!data.exists(), "refused before the data dir was touched");
    assert!(
        err.contains("admin.listen") && err.contains("token_file"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_rotates_live_under_traffic() {
    let origin = Origin::start().await;
    let up = FakeUpstream::start(Kind::Http, Some(("alice", "p@ss:w0rd"))).await;
    let data = tempfile::tempdir().unwrap();
    let data = data.path().join("data");
    let mut gw = Gateway::builder().data_dir(&data).start().await;
    let admin = gw.admin_url();
    let out = cli(&["pool", "--admin", &admin, "add", &up.url("http")]).await;
    assert!(out.status.success(), "{out:?}");
    let key_before = std::fs::read_to_string(data.join("encryption.key")).unwrap();

    let proxy = gw.http_proxy();
    let url = origin.url();
    let traffic = tokio::spawn(async move {
        let mut ok = 0;
        for _ in 0..30 {
            let r = curl(&["-x", &proxy, &url]).await;
            assert_eq!(r.status, 200, "{}", r.body);
            ok += 1;
        }
        ok
    });
    let out = cli(&["key", "rotate", "--admin", &admin]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("re-encrypted 1 records"), "{stdout}");
    assert_eq!(
        traffic.await.unwrap(),
        30,
        "traffic went on during the rotation"
    );
    let key_after = std::fs::read_to_string(data.join("encryption.key")).unwrap();
    assert_ne!(key_before, key_after);
    assert!(!data.join("encryption.key.next").exists());

    // Restarted on the rotated data dir, the credentials still open and work.
    gw.terminate(Duration::from_secs(15)).await;
    let gw = Gateway::builder().data_dir(&data).start().await;
    let r = curl(&["-x", &gw.http_proxy(), &origin.url()]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        up.seen()
            .auth
            .iter()
            .all(|a| a.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
                == Some(("alice", "p@ss:w0rd")))
    );
}

#[test]
fn the_openapi_description_is_valid() {
    let spec = concat!(env!("CARGO_MANIFEST_DIR"), "/../crates/admin/openapi.yaml");
    let out = std::process::Command::new("python3")
        .args(["-m", "openapi_spec_validator", spec])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openapi-spec-validator (tests/run.sh installs it): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
