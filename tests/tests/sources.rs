//! The pool filling itself, end to end, against a local list server and a local judge: list
//! sources fill an empty pool and curl gets through the imported proxies; the checker's three
//! anonymity verdicts; a candidate that accepts TCP but fails its handshake (or is black-holed,
//! or refuses) never serves; paging stops on an empty page; dedup across sources; poisoned
//! addresses dropped; a broken source (Cloudflare page, 502, empty body) never shrinks the
//! pool; `sources fetch` and `check` offline and live, with their exit codes.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failed step must fail the test loudly"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use proxygate_tests::curl::curl;
use proxygate_tests::fakes::{Behavior, Blackhole, FakeUpstream, Kind, Reveal, refusing_addr};
use proxygate_tests::gateway::{Gateway, cli};
use proxygate_tests::id_of;
use proxygate_tests::lists::{Judge, ListServer};
use proxygate_tests::origin::Origin;
use serde_json::Value;

/// A server that accepts TCP and answers anything with garbage: no proxy at all.
async fn garbage() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = tokio::io::AsyncWriteExt::write_all(&mut s, b"SSH-2.0-OpenSSH_9.2\r\n").await;
        }
    });
    addr
}

async fn fake(reveal: Reveal) -> FakeUpstream {
    FakeUpstream::start_with(
        Kind::Http,
        None,
        Behavior {
            reveal,
            ..Behavior::default()
        },
    )
    .await
}

/// The `[checker]` of these tests: the local judge, short timeouts, no integrity references
/// (the trust tests have theirs).
fn checker(judge: &Judge) -> String {
    format!(
        "[checker]\njudge_urls = [{:?}, {:?}]\ntimeout = \"1s\"\nrecheck_every = \"1s\"\n\
         tls_judge_url = \"\"\nintegrity_url = \"\"\n",
        judge.httpbin_url(),
        judge.azenv_url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_fill_an_empty_pool_and_curl_gets_through() {
    let origin = Origin::start().await;
    let judge = Judge::start().await;
    let elite = fake(Reveal::Nothing).await;
    let anonymous = fake(Reveal::Via).await;
    let transparent = fake(Reveal::ClientIp).await;
    let socks = FakeUpstream::start(Kind::Socks5, None).await;
    let refusing = refusing_addr().await;
    let hole = Blackhole::start().await;
    let junk = garbage().await;
    // ProxyScrape JSON over three pages and an empty one; a dead row; the SOCKS proxy twice.
    let ps_rows = vec![
        format!(
            r#"{{"alive":true,"anonymity":"elite","ip":"127.0.0.1","port":{},"protocol":"http","ip_data":{{"countryCode":"DE"}}}}"#,
            elite.addr.port()
        ),
        format!(
            r#"{{"alive":true,"ip":"127.0.0.1","port":{},"protocol":"http"}}"#,
            refusing.port()
        ),
        format!(
            r#"{{"alive":false,"ip":"127.0.0.1","port":{},"protocol":"http"}}"#,
            anonymous.addr.port()
        ),
        format!(
            r#"{{"alive":true,"ip":"127.0.0.1","port":{},"protocol":"socks5","ip_data":null}}"#,
            socks.addr.port()
        ),
        format!(
            r#"{{"alive":true,"ip":"127.0.0.1","port":{},"protocol":"http"}}"#,
            hole.addr.port()
        ),
    ];
    let ps_pages = Arc::new(ps_rows);
    let geo = format!(
        r#"{{"data":[{{"ip":"127.0.0.1","port":"{}","protocols":["http"],"country":"FR","anonymityLevel":"anonymous"}},{{"ip":"127.0.0.1","port":"{}","protocols":["socks5"],"country":"US"}},{{"ip":"127.0.0.1","port":"{}","protocols":["http"]}}],"total":3,"page":1,"limit":"500"}}"#,
        anonymous.addr.port(),
        socks.addr.port(),
        junk.port()
    );
    let list = format!(
        "# operator list\r\n127.0.0.1:{}\r\n",
        transparent.addr.port()
    );
    let lists = ListServer::start(move |path, q| match path {
        "/ps" => {
            let skip: usize = q.get("skip").and_then(|s| s.parse().ok()).unwrap_or(0);
            let page = skip / 2000;
            let rows: Vec<String> = match page {
                0 => ps_pages[0..2].to_vec(),
                1 => ps_pages[2..4].to_vec(),
                2 => ps_pages[4..].to_vec(),
                _ => Vec::new(),
            };
            let body = format!(
                r#"{{"shown_records":{},"total_records":3,"limit":2000,"skip":{skip},"nextpage":{},"proxies":[{}]}}"#,
                rows.len(),
                page < 2,
                rows.join(",")
            );
            (200, "application/json", body)
        }
        "/geonode" if q.get("page").map(String::as_str) == Some("1") => {
            (200, "application/json", geo.clone())
        }
        "/geonode" => (200, "application/json", r#"{"data":[],"total":3,"page":2,"limit":500}"#.into()),
        "/mine.txt" => (200, "text/plain", list.clone()),
        _ => (404, "text/plain", "no".into()),
    })
    .await;
    let config = format!(
        "allow_private_networks = true\n\
         [[sources]]\nname = \"ps\"\nkind = \"proxyscrape\"\nurl = {:?}\n\
         [[sources]]\nname = \"geo\"\nkind = \"geonode\"\nurl = {:?}\n\
         [[sources]]\nname = \"mine\"\nkind = \"generic\"\nurl = {:?}\n\
         {}",
        lists.url("/ps?request=display_proxies&proxy_format=protocolipport&format=json"),
        lists.url("/geonode?sort_by=lastChecked"),
        lists.url("/mine.txt"),
        checker(&judge)
    );
    let gw = Gateway::builder().config(&config).start().await;
    // Four work: elite (ps), socks (ps, and geo again), anonymous (geo), transparent (mine).
    let list = proxygate_tests::eventually_async(Duration::from_secs(30), || async {
        let v = gw.api("/api/v1/upstreams").await;
        (v["total"] == 4).then_some(v)
    })
    .await;
    let rows: Vec<&Value> = list["upstreams"].as_array().unwrap().iter().collect();
    let row = |url: &str| {
        let id = id_of(url);
        *rows
            .iter()
            .find(|r| r["id"] == id.as_str())
            .unwrap_or_else(|| panic!("{url} not imported: {list}"))
    };
    let e = row(&format!("http://127.0.0.1:{}", elite.addr.port()));
    assert_eq!(
        (e["origin"].as_str(), e["source"].as_str()),
        (Some("source"), Some("ps"))
    );
    assert_eq!(e["anonymity"], "elite");
    assert_eq!(e["country"], "DE");
    assert_eq!(e["exit_ip"], elite.egress.to_string());
    assert_eq!(e["last_check_passed"], true);
    let a = row(&format!("http://127.0.0.1:{}", anonymous.addr.port()));
    assert_eq!(
        (a["anonymity"].as_str(), a["source"].as_str()),
        (Some("anonymous"), Some("geo"))
    );
    let t = row(&format!("http://127.0.0.1:{}", transparent.addr.port()));
    assert_eq!(
        (t["anonymity"].as_str(), t["source"].as_str()),
        (Some("transparent"), Some("mine"))
    );
    // Both ps and geo list the SOCKS proxy: whichever source's batch came first checked and
    // claimed it (a known candidate is checked again only at the daily full re-import).
    let s = row(&format!("socks5://127.0.0.1:{}", socks.addr.port()));
    assert_eq!(s["anonymity"], "elite");
    let socks_source = s["source"].as_str().unwrap().to_owned();
    assert!(["ps", "geo"].contains(&socks_source.as_str()), "{s}");
    for dead in [refusing.port(), hole.addr.port(), junk.port()] {
        assert!(
            !rows
                .iter()
                .any(|r| r["address"] == format!("127.0.0.1:{dead}")),
            "127.0.0.1:{dead} failed its check but serves: {list}"
        );
    }
    assert!(hole.accepted() >= 1, "the black hole was tried");

    // Every page was read, up to the empty one; every request said it is a browser.
    let seen = lists.seen();
    for skip in ["skip=0", "skip=2000", "skip=4000", "skip=6000"] {
        assert!(
            seen.iter().any(|s| s.target.contains(skip)),
            "{skip}: {seen:?}"
        );
    }
    assert!(seen.iter().all(|s| s.user_agent.starts_with("Mozilla/5.0")));

    // Curl through the imported proxies.
    let mut peers = std::collections::HashSet::new();
    for _ in 0..20 {
        let r = curl(&["-x", &gw.http_proxy(), &origin.url()]).await;
        assert_eq!(r.status, 200, "{}", r.body);
        peers.insert(r.header("x-peer").to_owned());
    }
    assert!(peers.len() >= 2, "{peers:?}");

    // Sources, as operators see them.
    let out = cli(&["sources", "list", "--admin", &gw.admin_url(), "--json"]).await;
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let source = |name: &str| {
        v["sources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
            .unwrap()
    };
    let (ps, geo_row) = (source("ps"), source("geo"));
    let ps_socks = u64::from(socks_source == "ps");
    assert_eq!(ps["fetches_ok"], 1);
    assert_eq!(ps["unique"], 4, "{ps}");
    assert_eq!(ps["passed"], 1 + ps_socks, "{ps}");
    assert_eq!(ps["imported"], 1 + ps_socks, "{ps}");
    // The junk one failed; the anonymous one and (maybe) the SOCKS proxy joined.
    assert_eq!(geo_row["imported"], 2 - ps_socks, "{geo_row}");
    assert_eq!(source("mine")["imported"], 1);
    let m = gw.admin_get("/metrics").await.1;
    assert!(
        m.contains("proxygate_source_fetches_total{result=\"ok\",source=\"ps\"} 1"),
        "{m}"
    );
    assert!(m.contains(&format!(
        "proxygate_source_imported_total{{source=\"ps\"}} {}",
        1 + ps_socks
    )));
    assert!(m.contains("proxygate_source_checks_total{result=\"failed\",source=\"ps\"} 2"));
    assert!(judge.hits() >= 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_source_never_shrinks_the_pool() {
    let judge = Judge::start().await;
    let ups: Vec<FakeUpstream> = futures_join(3).await;
    let body: String = ups.iter().map(|u| format!("{}\n", u.addr)).collect();
    // 0: the list; 1: a Cloudflare challenge; 2: a 502 page; 3: an empty body.
    let mode = Arc::new(AtomicU8::new(0));
    let m = Arc::clone(&mode);
    let lists = ListServer::start(move |_, _| match m.load(Ordering::SeqCst) {
        0 => (200, "text/plain", body.clone()),
        1 => (
            503,
            "text/html",
            "<!DOCTYPE html><html><head><title>Just a moment...</title></head><body></body></html>"
                .into(),
        ),
        2 => (200, "text/html", "<html>502 Bad Gateway</html>".into()),
        _ => (200, "text/plain", String::new()),
    })
    .await;
    let config = format!(
        "allow_private_networks = true\n[[sources]]\nname = \"paid\"\nkind = \"generic\"\nurl = {:?}\ninterval = \"1h\"\n{}[refresh]\nretries = 0\n",
        lists.url("/list.txt"),
        checker(&judge)
    );
    let gw = Gateway::builder().config(&config).start().await;
    proxygate_tests::eventually_async(Duration::from_secs(30), || async {
        (gw.api("/api/v1/upstreams").await["total"] == 3).then_some(())
    })
    .await;
    let admin = gw.admin_url();
    for (m, why) in [(1, "Cloudflare"), (2, "HTML page"), (3, "empty body")] {
        mode.store(m, Ordering::SeqCst);
        let out = cli(&["sources", "fetch", "--admin", &admin]).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("source paid:") && err.contains(why), "{err}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("failed:"), "{stdout}");
        assert_eq!(
            gw.api("/api/v1/upstreams").await["total"],
            3,
            "a broken source shrank the pool"
        );
    }
    let v = gw.api("/api/v1/sources").await;
    assert_eq!(v["sources"][0]["fetches_failed"], 3, "{v}");
    // The same, through the running gateway's control socket.
    let data = gw.data_dir().to_str().unwrap().to_owned();
    let out = cli(&["sources", "list", "--data-dir", &data]).await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        table.lines().any(|l| l.starts_with("paid ")
            && l.contains("last fetch failed:")
            && l.ends_with("empty body")),
        "{table}"
    );
    let m = gw.admin_get("/metrics").await.1;
    assert!(m.contains("proxygate_source_up{source=\"paid\"} 0"), "{m}");
    // Back to a list: exit 0.
    mode.store(0, Ordering::SeqCst);
    let out = cli(&["sources", "fetch", "paid", "--admin", &admin]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = cli(&["sources", "fetch", "nope", "--admin", &admin]).await;
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no source named \"nope\""));
}

async fn futures_join(n: usize) -> Vec<FakeUpstream> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(FakeUpstream::start(Kind::Http, None).await);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_fetch_drops_poisoned_addresses_and_dedupes() {
    let judge = Judge::start().await;
    let up = FakeUpstream::start(Kind::Http, None).await;
    let poisoned = format!(
        "127.0.0.1:{}\n10.0.0.5:3128\n169.254.169.254:80\n100.64.1.1:8080\n[::1]:3128\nlocalhost:22\n0.0.0.0:80\n",
        up.addr.port()
    );
    let twice = format!("http://127.0.0.1:{}\n", up.addr.port());
    let lists = ListServer::fixed(vec![
        ("/poisoned.txt", 200, "text/plain", poisoned),
        ("/twice.txt", 200, "text/plain", twice),
        (
            "/down.txt",
            200,
            "text/html",
            "<html><head><title>502 Bad Gateway</title></head></html>".into(),
        ),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("proxygate.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\n[[sources]]\nname = \"a\"\nkind = \"generic\"\nurl = {:?}\n[[sources]]\nname = \"b\"\nkind = \"generic\"\nurl = {:?}\n{}",
            dir.path().join("data").to_str().unwrap(),
            lists.url("/poisoned.txt"),
            lists.url("/twice.txt"),
            checker(&judge)
        ),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    // Without --allow-private-networks: every entry of a points at this machine or its network.
    let out = cli(&["sources", "fetch", "a", "--config", cfg, "--json"]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["sources"][0]["fetched"], 7);
    assert_eq!(v["sources"][0]["dropped_private"], 7, "{v}");
    assert!(
        v["sources"][0]["error"]
            .as_str()
            .unwrap()
            .contains("private")
    );
    // With it: imported (after its check), and b's copy of the same proxy is not new.
    let out = cli(&[
        "sources",
        "fetch",
        "--config",
        cfg,
        "--import",
        "--allow-private-networks",
        "--json",
    ])
    .await;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "every source answered a list: {v}"
    );
    let a = &v["sources"][0];
    assert_eq!(
        (a["unique"].as_u64(), a["imported"].as_u64()),
        (Some(7), Some(1)),
        "{v}"
    );
    let b = &v["sources"][1];
    assert_eq!(
        (b["unique"].as_u64(), b["new"].as_u64()),
        (Some(1), Some(0)),
        "{v}"
    );
    assert!(b["error"].is_null(), "{v}");
    let out = cli(&["pool", "--config", cfg, "list", "--json"]).await;
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
    assert_eq!(rows[0]["origin"], "source");
    // A source that answers an HTML page: exit 1, named, with why.
    std::fs::write(
        dir.path().join("down.toml"),
        format!(
            "data_dir = {:?}\n[[sources]]\nname = \"down\"\nkind = \"proxy_list_download\"\nurl = {:?}\n{}",
            dir.path().join("data").to_str().unwrap(),
            lists.url("/down.txt"),
            checker(&judge)
        ),
    )
    .unwrap();
    let out = cli(&[
        "sources",
        "fetch",
        "--config",
        dir.path().join("down.toml").to_str().unwrap(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("source down:") && err.contains("502 Bad Gateway"),
        "{err}"
    );
    // A config mistake: 64, naming the key.
    std::fs::write(
        dir.path().join("bad.toml"),
        "[[sources]]\nname = \"x\"\nkind = \"rss\"\n",
    )
    .unwrap();
    let out = cli(&[
        "sources",
        "list",
        "--config",
        dir.path().join("bad.toml").to_str().unwrap(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sources[0].kind"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_gives_the_three_verdicts_and_min_anonymity_applies() {
    let judge = Judge::start().await;
    let elite = fake(Reveal::Nothing).await;
    let anonymous = fake(Reveal::Via).await;
    let transparent = fake(Reveal::ClientIp).await;
    let junk = garbage().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let write = |name: &str, extra: &str| {
        let p = dir.path().join(name);
        std::fs::write(
            &p,
            format!(
                "data_dir = {:?}\nsources = []\n{}{extra}",
                data.to_str().unwrap(),
                checker(&judge)
            ),
        )
        .unwrap();
        p.to_str().unwrap().to_owned()
    };
    let cfg = write("a.toml", "");
    let urls = [
        elite.url("http"),
        anonymous.url("http"),
        transparent.url("http"),
        format!("http://{junk}"),
    ];
    let mut add = vec!["pool", "--config", &cfg, "add"];
    add.extend(urls.iter().map(String::as_str));
    assert!(cli(&add).await.status.success());
    let out = cli(&["check", "--all", "--config", &cfg, "--json"]).await;
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let verdict = |url: &str| {
        let id = id_of(url);
        v["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id.as_str())
            .cloned()
            .unwrap()
    };
    assert_eq!(verdict(&urls[0])["anonymity"], "elite");
    assert_eq!(verdict(&urls[1])["anonymity"], "anonymous");
    assert_eq!(verdict(&urls[2])["anonymity"], "transparent");
    assert_eq!(verdict(&urls[3])["passed"], false);
    assert_eq!(
        (v["passed"].as_u64(), v["failed"].as_u64()),
        (Some(3), Some(1))
    );
    // Recorded and shown.
    let out = cli(&["pool", "--config", &cfg, "show", &id_of(&urls[2]), "--json"]).await;
    let row: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(row["anonymity"], "transparent");
    assert_eq!(row["exit_ip"], transparent.egress.to_string());
    // Demanding elite: only the elite one passes.
    let strict = write("strict.toml", "min_anonymity = \"elite\"\n");
    let out = cli(&[
        "check",
        "--config",
        &strict,
        &id_of(&urls[1]),
        &id_of(&urls[0]),
    ])
    .await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("below checker.min_anonymity (elite)"),
        "{table}"
    );
    assert!(table.contains("1 passed, 1 failed"), "{table}");
    let out = cli(&["check", "--config", &cfg]).await;
    assert_eq!(out.status.code(), Some(64), "neither ids nor --all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_check_through_the_control_socket_moves_reputation() {
    let judge = Judge::start().await;
    let up = FakeUpstream::start(Kind::Socks5, None).await;
    let dead = refusing_addr().await;
    let gw = Gateway::builder()
        .config(&format!("sources = []\n{}", checker(&judge)))
        .upstream(up.url("socks5"))
        .upstream(format!("http://{dead}"))
        .start()
        .await;
    let data = gw.data_dir().to_str().unwrap().to_owned();
    let out = cli(&["check", "--all", "--data-dir", &data, "--json"]).await;
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["passed"].as_u64(), v["failed"].as_u64()),
        (Some(1), Some(1)),
        "{v}"
    );
    // The checks fed the live reputation: the good one healthy, the dead one in backoff.
    let h = gw.api("/api/v1/health").await;
    assert_eq!(h["states"]["healthy"], 1, "{h}");
    assert_eq!(h["states"]["backoff"], 1, "{h}");
    let r = gw
        .api(&format!("/api/v1/upstreams/{}", id_of(&up.url("socks5"))))
        .await;
    assert_eq!(r["anonymity"], "elite");
    assert!(r["last_health_check_unix_ms"].as_u64().is_some(), "{r}");
}

/// The samples of SOURCES.md, served as each API serves them.
const FPL_PAGE: &str = r#"<!DOCTYPE html><html><head><title>Free Proxy List - Just Checked Proxy List</title></head><body>
<section id="list"><div class="container"><div class="table-responsive fpl-list">
<table class="table table-striped table-bordered"><thead><tr><th>IP Address</th><th>Port</th><th>Code</th><th class='hm'>Country</th><th>Anonymity</th><th class='hm'>Google</th><th class='hx'>Https</th><th class='hm'>Last Checked</th></tr></thead><tbody><tr><td>195.154.84.106</td><td>5566</td><td>FR</td><td class='hm'>France</td><td>elite proxy</td><td class='hm'>no</td><td class='hx'>yes</td><td class='hm'>1 minute ago</td></tr><tr><td>24.172.82.94</td><td>53281</td><td>US</td><td class='hm'>United States</td><td>transparent</td><td class='hm'></td><td class='hx'>no</td><td class='hm'>1 minute ago</td></tr></tbody></table></div></div></section>
<div class="modal fade" id="raw"><div class="modal-body"><textarea class="form-control" readonly="readonly" rows="12">Free proxies from free-proxy-list.net
Updated at 2021-08-14 04:32:18 UTC.

195.154.84.106:5566
24.172.82.94:53281
</textarea></div></div></body></html>"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_and_failure_body_through_the_fetcher() {
    let flaky = Arc::new(AtomicU8::new(0));
    let tries = Arc::clone(&flaky);
    let lists = ListServer::start(move |path, q| {
        let json = "application/json";
        let text = "text/plain";
        match path {
            "/ps-v2" => (200, text, "45.167.124.5:999\r\n103.152.112.162:80\r\n20.206.106.192:80\r\n".into()),
            "/ps-v4" => (200, text, "http://45.86.229.39:8080\nsocks5://202.179.76.105:1080\nsocks4://142.54.229.249:4145".into()),
            "/geonode" if q.get("page").map(String::as_str) == Some("1") => (200, json, r#"{"data":[{"_id":"60d7aa86ce5b3bb0e9890cb4","ip":"147.135.255.62","port":"8123","anonymityLevel":"elite","country":"FR","latency":143,"protocols":["https"]},{"ip":"116.100.220.220","anonymityLevel":"elite","country":"VN","latency":184.703,"port":"1080","protocols":["socks4"]}],"total":1557,"page":1,"limit":"10"}"#.into()),
            "/geonode" if q.get("page").map(String::as_str) == Some("2") => (200, json, r#"{"data":[{"ip":"8.8.4.4","port":3128,"protocols":["http"]}],"total":11111,"page":2,"limit":5}"#.into()),
            "/geonode" => (200, json, r#"{"data":[],"total":3,"page":3,"limit":500}"#.into()),
            "/pld-v1" => (200, text, "185.26.197.13:8080\r\n138.118.104.166:999\r\n45.4.253.133:999\r\n".into()),
            "/pld-v2" => (200, json, r#"{"LISTA":[{"IP":"185.26.197.14","PORT":"8080","ANON":"Elite","COUNTRY":"Russian Federation","ISO":"RU","PING":"120"}]}"#.into()),
            "/fpl" => (200, "text/html", FPL_PAGE.into()),
            // 503 twice, then the list: retried with backoff.
            "/flaky" => match tries.fetch_add(1, Ordering::SeqCst) {
                0 | 1 => (503, "text/html", "<html>busy</html>".into()),
                _ => (200, text, "9.9.9.9:3128\n".into()),
            },
            "/cloudflare" => (403, "text/html", "<!DOCTYPE html><html><head><title>Just a moment...</title></head><body></body></html>".into()),
            "/bad-gateway" => (200, "text/html", "<html>502 Bad Gateway</html>".into()),
            "/null" => (200, json, "null".into()),
            "/unexpected" => (200, json, r#"{"data": {"unexpected": true}}"#.into()),
            "/notfound" => (200, text, "NOTFOUND".into()),
            "/empty" => (200, text, String::new()),
            "/truncated" => (200, json, r#"{"shown_records":3,"proxies":[{"ip":"#.into()),
            _ => (404, "text/html", "<!DOCTYPE HTML PUBLIC \"-//IETF//DTD HTML 2.0//EN\"><html><head><title>404 Not Found</title></head></html>".into()),
        }
    })
    .await;
    let sources: Vec<(&str, &str, String)> = vec![
        (
            "ps-v2",
            "proxyscrape",
            lists.url("/ps-v2?request=displayproxies&protocol=http"),
        ),
        (
            "ps-v4",
            "proxyscrape",
            lists.url("/ps-v4?proxy_format=protocolipport&format=text"),
        ),
        ("geo", "geonode", lists.url("/geonode?sort_by=lastChecked")),
        (
            "pld-v1",
            "proxy_list_download",
            lists.url("/pld-v1?type=socks5"),
        ),
        (
            "pld-v2",
            "proxy_list_download",
            lists.url("/pld-v2?l=en&t=http"),
        ),
        ("fpl", "free_proxy_list", lists.url("/fpl")),
        ("flaky", "generic", lists.url("/flaky")),
        ("cloudflare", "proxyscrape", lists.url("/cloudflare")),
        ("bad-gateway", "geonode", lists.url("/bad-gateway")),
        ("null", "geonode", lists.url("/null")),
        ("unexpected", "geonode", lists.url("/unexpected")),
        ("notfound", "generic", lists.url("/notfound")),
        ("empty", "proxy_list_download", lists.url("/empty")),
        ("truncated", "proxyscrape", lists.url("/truncated")),
        ("gone", "free_proxy_list", lists.url("/gone.html")),
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = format!(
        "data_dir = {:?}\n[refresh]\nretry_backoff = \"50ms\"\n",
        dir.path().join("data").to_str().unwrap()
    );
    for (name, kind, url) in &sources {
        cfg.push_str(&format!(
            "[[sources]]\nname = {name:?}\nkind = {kind:?}\nurl = {url:?}\n"
        ));
    }
    let path = dir.path().join("all.toml");
    std::fs::write(&path, cfg).unwrap();
    let out = cli(&[
        "sources",
        "fetch",
        "--config",
        path.to_str().unwrap(),
        "--json",
    ])
    .await;
    assert_eq!(out.status.code(), Some(1), "some sources failed");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let by = |name: &str| {
        v["sources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} missing: {v}"))
    };
    for (name, unique) in [
        ("ps-v2", 3),
        ("ps-v4", 3),
        ("geo", 3),
        ("pld-v1", 3),
        ("pld-v2", 1),
        ("fpl", 2),
        ("flaky", 1),
    ] {
        let s = by(name);
        assert!(s["error"].is_null(), "{name}: {s}");
        assert_eq!(s["unique"], unique, "{name}: {s}");
    }
    // Geonode: every page read up to the empty one.
    assert!(lists.seen().iter().any(|s| s.target.contains("page=3")));
    // The flaky one answered on its third try.
    assert_eq!(flaky.load(Ordering::SeqCst), 3);
    for (name, why) in [
        ("cloudflare", "Cloudflare"),
        ("bad-gateway", "HTML page"),
        ("null", "unexpected shape"),
        ("unexpected", "unexpected shape"),
        ("notfound", "no proxy"),
        ("empty", "empty body"),
        ("truncated", "invalid JSON"),
        ("gone", "HTTP 404"),
    ] {
        let s = by(name);
        let e = s["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} read as a list: {s}"));
        assert!(e.contains(why), "{name}: {e}");
        assert_eq!(s["unique"], 0, "{name}");
    }
    let err = String::from_utf8_lossy(&out.stderr);
    for name in ["cloudflare", "null", "gone"] {
        assert!(err.contains(&format!("source {name}:")), "{err}");
    }
    // Nothing was imported (no --import), and the source stats are kept.
    let out = cli(&[
        "sources",
        "list",
        "--config",
        path.to_str().unwrap(),
        "--json",
    ])
    .await;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let geo = v["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "geo")
        .unwrap()
        .clone();
    assert_eq!(
        (geo["fetches_ok"].as_u64(), geo["unique"].as_u64()),
        (Some(1), Some(3)),
        "{geo}"
    );
}
