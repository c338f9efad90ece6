//! The observability files against a real Prometheus (Debian's `prometheus` package; tests/run.sh
//! installs it): a server scrapes a gateway under traffic (with a list source and a judge, so
//! every family has life), loads `deploy/prometheus/proxygate-rules.yml`, and every PromQL
//! expression of the dashboards and of the alert rules must parse and return data. Alert
//! expressions are `<query> <comparison> <threshold>`; they are evaluated with `bool`, so a rule
//! that does not fire still proves it has data. The rules also pass `promtool check rules` and
//! their own `promtool test rules`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failed step must fail the test loudly"
)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use proxygate_tests::curl::curl;
use proxygate_tests::fakes::{FakeUpstream, Kind};
use proxygate_tests::gateway::Gateway;
use proxygate_tests::lists::{Judge, ListServer};
use proxygate_tests::origin::Origin;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn promtool(args: &[&str], dir: &Path) {
    let out = std::process::Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool (Debian package prometheus; tests/run.sh installs it)");
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = repo().join("deploy/prometheus");
    promtool(&["check", "rules", "proxygate-rules.yml"], &dir);
    promtool(&["test", "rules", "proxygate-rules.test.yml"], &dir);
}

/// Every `expr` of every panel of every dashboard in `dashboards/`.
fn dashboard_exprs() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(repo().join("dashboards")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let d: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(
            d["templating"]["list"][0]["type"],
            "datasource",
            "{}: the datasource is a variable",
            path.display()
        );
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        for p in d["panels"].as_array().unwrap() {
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "{name}: {}",
                p["title"]
            );
            for t in p["targets"].as_array().unwrap() {
                out.push((
                    format!("{name}: {}", p["title"].as_str().unwrap()),
                    t["expr"].as_str().unwrap().to_owned(),
                ));
            }
        }
    }
    assert!(out.len() >= 30, "{} expressions", out.len());
    out
}

/// A free loopback port (bound and let go: Prometheus takes only a fixed port).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Prometheus {
    url: String,
    child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(target: std::net::SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let rules = repo().join("deploy/prometheus/proxygate-rules.yml");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: proxygate\n    static_configs:\n      - targets: ['{target}']\n",
                rules.display()
            ),
        )
        .unwrap();
        let port = free_port();
        let child = tokio::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("prometheus (Debian package prometheus; tests/run.sh installs it)");
        Prometheus {
            url: format!("http://127.0.0.1:{port}"),
            child,
            _dir: dir,
        }
    }

    async fn query(&self, q: &str) -> Value {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", q)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn get(&self, path: &str) -> Option<Value> {
        let r = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }
}

/// An alert expression with its final comparison made a `bool` one: it returns 0 or 1 for
/// every series whether the alert fires or not.
fn as_bool(expr: &str) -> String {
    let e = expr.trim();
    for op in [" < ", " > ", " == ", " != ", " <= ", " >= "] {
        if let Some(i) = e.rfind(op) {
            let threshold = &e[i + op.len()..];
            if threshold.trim().parse::<f64>().is_ok() {
                return format!("{}{}bool {}", &e[..i], op, threshold.trim());
            }
        }
    }
    panic!("alert expression without a final comparison to a number: {expr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_rule_expression_returns_data() {
    let origin = Origin::start().await;
    let judge = Judge::start().await;
    let up = FakeUpstream::start(Kind::Http, None).await;
    let listed = FakeUpstream::start(Kind::Socks5, None).await;
    let body = format!("socks5://{}\n", listed.addr);
    let lists = ListServer::fixed(vec![("/list.txt", 200, "text/plain", body)]).await;
    let gw = Gateway::builder()
        .config(&format!(
            "allow_private_networks = true\n[[sources]]\nname = \"fixture\"\nkind = \"generic\"\nurl = {:?}\n[checker]\njudge_urls = [{:?}]\ntimeout = \"1s\"\ntls_judge_url = \"\"\nintegrity_url = \"\"\n[store]\nstats_flush_interval = \"1s\"\n",
            lists.url("/list.txt"),
            judge.httpbin_url()
        ))
        .upstream(up.url("http"))
        .start()
        .await;
    let prom = Prometheus::start(gw.admin).await;
    // Traffic for the whole run: forwarded requests and tunnels.
    let proxy = gw.http_proxy();
    let url = origin.url();
    let traffic = tokio::spawn(async move {
        loop {
            let _ = curl(&["-x", &proxy, &url]).await;
            let _ = curl(&["-p", "-x", &proxy, &url]).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    proxygate_tests::eventually_async(Duration::from_secs(60), || async {
        let v = prom.get("/api/v1/query?query=up").await?;
        let up = &v["data"]["result"][0]["value"][1];
        (up == "1").then_some(())
    })
    .await;
    // The source fetched and checked, a few scrapes of traffic in.
    proxygate_tests::eventually_async(Duration::from_secs(60), || async {
        let v = prom
            .query("sum(proxygate_source_checks_total{result=\"passed\"})")
            .await;
        (v["data"]["result"][0]["value"][1] == "1").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;

    let mut failures = Vec::new();
    for (where_, expr) in dashboard_exprs() {
        let q = expr
            .replace("$__rate_interval", "15s")
            .replace("$instance", ".*");
        let v = prom.query(&q).await;
        if v["status"] != "success" {
            failures.push(format!("{where_}: {expr}: {v}"));
        } else if v["data"]["result"].as_array().is_none_or(Vec::is_empty) {
            failures.push(format!("{where_}: {expr}: no data"));
        }
    }
    // The rules as Prometheus loaded them: every one of the file.
    let rule_count = std::fs::read_to_string(repo().join("deploy/prometheus/proxygate-rules.yml"))
        .unwrap()
        .matches("- alert:")
        .count();
    let rules = proxygate_tests::eventually_async(Duration::from_secs(30), || async {
        let v = prom.get("/api/v1/rules").await?;
        let rules: Vec<Value> = v["data"]["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        (rules.len() == rule_count && rules.iter().all(|r| r["health"] == "ok")).then_some(rules)
    })
    .await;
    for r in &rules {
        let q = as_bool(r["query"].as_str().unwrap());
        let v = prom.query(&q).await;
        if v["status"] != "success" || v["data"]["result"].as_array().is_none_or(Vec::is_empty) {
            failures.push(format!("rule {}: {q}: {v}", r["name"]));
        }
    }
    traffic.abort();
    drop(prom.child);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
