//! The durable pool, end to end: the real binary on a real sled data dir. Restarts keep the
//! pool, reputation and strategy; SIGKILL never loses an acknowledged change; legacy data is
//! migrated; keys are checked, rotated and resumed; the pool CLI works offline and live.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failed expectation must fail loudly"
)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proxygate_core::Upstream;
use proxygate_tests::curl::curl;
use proxygate_tests::fakes::{FakeUpstream, Kind, refusing_addr};
use proxygate_tests::gateway::{Gateway, cli_env};
use proxygate_tests::id_of;
use proxygate_tests::origin::Origin;
use serde_json::Value;

/// Opens the raw database as test code that builds or inspects old shapes does. sled lets go
/// of its file lock when its background threads drop the database, a moment after the last
/// handle in this process is dropped: wait for that (a lock held elsewhere still fails).
fn open_db(path: std::path::PathBuf) -> sled::Db {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match proxygate_store::sled_config(&path).open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5))
            }
            other => return other.unwrap(),
        }
    }
}

/// `proxygate pool --data-dir DIR ARGS...`; returns (exit code, stdout, stderr).
async fn pool(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut all = vec!["pool", "--data-dir", dir.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = cli_env(&all, env).await;
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `pool ARGS` must succeed; returns stdout.
async fn pool_ok(dir: &Path, args: &[&str]) -> String {
    let (code, out, err) = pool(dir, args, &[]).await;
    assert_eq!(code, 0, "pool {args:?}: {err}");
    out
}

/// `proxygate key rotate --data-dir DIR ARGS...` must succeed; returns stdout.
async fn rotate_ok(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut all = vec!["key", "rotate", "--data-dir", dir.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = cli_env(&all, env).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `proxygate key generate`: the key is the last line.
async fn generate_key() -> String {
    let out = cli_env(&["key", "generate"], &[]).await;
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let key = text.lines().last().unwrap().to_owned();
    assert_eq!(key.len(), 44, "base64 of 32 bytes: {key:?}");
    key
}

async fn show(dir: &Path, id: &str) -> Value {
    serde_json::from_str(&pool_ok(dir, &["show", id, "--json"]).await).unwrap()
}

/// Export lines (decrypted) as (id -> url).
async fn exported(dir: &Path, env: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
    let (code, out, err) = pool(dir, &["export", "--decrypt"], env).await;
    assert_eq!(code, 0, "{err}");
    out.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["id"].as_str().unwrap().to_owned(),
                v["url"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_pool_reputation_and_strategy() {
    let origin = Origin::start().await;
    let good = FakeUpstream::start(Kind::Http, Some(("op", "p w:@1"))).await;
    let dead = format!("http://{}", refusing_addr().await);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");

    let mut gw = Gateway::builder()
        .config("[store]\nstats_flush_interval = \"1h\"")
        .data_dir(&data)
        .start()
        .await;
    // Live through the control socket: acknowledged only once durable.
    let out = pool_ok(&data, &["add", &good.url("http"), &dead]).await;
    assert!(out.starts_with("added 2, updated 0"), "{out}");
    assert!(
        pool_ok(&data, &["strategy", "round_robin"])
            .await
            .contains("live")
    );
    for _ in 0..12 {
        let r = curl(&["-x", &gw.http_proxy(), &origin.url()]).await;
        assert_eq!(r.status, 200, "{}", r.stderr);
    }
    let live_good = show(&data, &id_of(&good.url("http"))).await;
    assert_eq!(live_good["state"], "healthy");
    assert!(live_good["uses"].as_u64().unwrap() >= 6, "{live_good}");
    // The write-behind interval is an hour: only the shutdown flush writes these stats.
    assert!(gw.terminate(Duration::from_secs(10)).await.success());
    assert!(
        gw.logs().contains("stats flushed upstreams=2"),
        "{}",
        gw.logs()
    );

    // Offline: the stats and the strategy are on disk.
    let good_saved = show(&data, &id_of(&good.url("http"))).await;
    let dead_saved = show(&data, &id_of(&dead)).await;
    assert_eq!(good_saved["uses"], live_good["uses"]);
    assert_eq!(good_saved["success_rate"], 1.0);
    assert!(good_saved["last_used_unix_ms"].as_u64().is_some());
    // Its first use (on probation) was its last check.
    let checked = good_saved["last_health_check_unix_ms"].as_u64().unwrap();
    assert!(checked <= good_saved["last_used_unix_ms"].as_u64().unwrap());
    assert!(
        dead_saved["failures"].as_u64().unwrap() >= 1,
        "{dead_saved}"
    );
    assert!(
        dead_saved["reputation"].as_u64().unwrap() < 50,
        "{dead_saved}"
    );
    assert_eq!(pool_ok(&data, &["strategy"]).await.trim(), "round_robin");

    // Restarted: the pool serves before any refresh, with the same reputation and strategy.
    let mut gw = Gateway::builder().data_dir(&data).start().await;
    assert!(gw.logs().contains("strategy=round_robin"), "{}", gw.logs());
    let restored = show(&data, &id_of(&good.url("http"))).await;
    assert_eq!(restored["reputation"], good_saved["reputation"]);
    assert_eq!(restored["uses"], good_saved["uses"]);
    assert_eq!(restored["state"], "healthy", "its last attempt succeeded");
    assert_eq!(
        show(&data, &id_of(&dead)).await["reputation"],
        dead_saved["reputation"]
    );
    let r = curl(&["-x", &gw.http_proxy(), &origin.url()]).await;
    assert_eq!(r.status, 200);
    // The password survived: the fake saw it byte for byte.
    assert!(
        good.seen()
            .auth
            .iter()
            .all(|a| a.as_ref().unwrap().1 == "p w:@1")
    );

    // Live disable / enable / remove.
    pool_ok(&data, &["disable", &id_of(&good.url("http"))]).await;
    let r = curl(&["-x", &gw.http_proxy(), &origin.url()]).await;
    assert_ne!(r.status, 200, "only the dead upstream is left");
    pool_ok(&data, &["enable", &id_of(&good.url("http"))[..6]]).await;
    pool_ok(&data, &["remove", &id_of(&dead)]).await;
    for _ in 0..3 {
        let r = curl(&["-x", &gw.http_proxy(), &origin.url()]).await;
        assert_eq!(r.status, 200);
    }
    assert!(gw.logs().contains("operator: removed"), "{}", gw.logs());
    let out = pool_ok(&data, &["strategy", "--reset"]).await;
    assert!(
        out.contains("weighted_random (from the config), live"),
        "{out}"
    );
    assert_eq!(
        pool_ok(&data, &["strategy"]).await.trim(),
        "weighted_random"
    );
    assert!(gw.terminate(Duration::from_secs(10)).await.success());
    let left = exported(&data, &[]).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[&id_of(&good.url("http"))], good.url("http"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_upstreams_follow_the_config_operator_ones_stay() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut gw = Gateway::builder()
        .data_dir(&data)
        .upstream("http://10.0.0.1:3128")
        .upstream("socks5://10.0.0.2:1080")
        .start()
        .await;
    pool_ok(&data, &["add", "http://10.0.0.3:8080"]).await;
    assert!(gw.terminate(Duration::from_secs(10)).await.success());
    let mut gw = Gateway::builder()
        .data_dir(&data)
        .upstream("http://10.0.0.1:3128")
        .start()
        .await;
    assert!(gw.logs().contains("from_config_removed=1"), "{}", gw.logs());
    let list: Value = serde_json::from_str(&pool_ok(&data, &["list", "--json"]).await).unwrap();
    let mut got: Vec<(String, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["address"].as_str().unwrap().to_owned(),
                r["origin"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("10.0.0.1:3128".to_owned(), "config".to_owned()),
            ("10.0.0.3:8080".to_owned(), "operator".to_owned())
        ]
    );
    assert!(gw.terminate(Duration::from_secs(10)).await.success());
}

/// SIGKILL the gateway again and again while an operator adds upstreams through it and
/// traffic flows; every add it acknowledged must be there afterwards, and decrypt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loop_loses_nothing_acknowledged() {
    let cycles: usize = std::env::var("PROXYGATE_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let origin = Origin::start().await;
    // Accepts any credentials: every added upstream is a working one.
    let fake = FakeUpstream::start(Kind::Http, None).await;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let (mut served, mut failed_adds) = (0usize, 0usize);
    for cycle in 0..cycles {
        let mut gw = Gateway::builder()
            .config("[store]\nstats_flush_interval = \"200ms\"")
            .data_dir(&data)
            .upstream(format!("http://{}", fake.addr))
            .start()
            .await;
        let stop = Arc::new(AtomicBool::new(false));
        let adder = {
            let (stop, acked, data) = (Arc::clone(&stop), Arc::clone(&acked), data.clone());
            let addr = fake.addr;
            tokio::spawn(async move {
                let mut failed = 0;
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    let url = format!("http://c{cycle}n{n}:pw%2F{n}@{addr}");
                    n += 1;
                    let (code, _, _) = pool(&data, &["add", &url], &[]).await;
                    if code == 0 {
                        acked.lock().unwrap().push(url);
                    } else {
                        failed += 1;
                    }
                }
                failed
            })
        };
        let traffic = {
            let (stop, proxy, url) = (Arc::clone(&stop), gw.http_proxy(), origin.url());
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .proxy(reqwest::Proxy::all(proxy).unwrap())
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap();
                let mut ok = 0;
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(r) = client.get(&url).send().await
                        && r.status() == 200
                    {
                        ok += 1;
                    }
                }
                ok
            })
        };
        tokio::time::sleep(Duration::from_millis(300 + 150 * (cycle as u64 % 5))).await;
        gw.kill().await;
        stop.store(true, Ordering::SeqCst);
        failed_adds += adder.await.unwrap();
        served += traffic.await.unwrap();
    }
    // Reopened offline: every acknowledged add is there, with its password.
    let stored = exported(&data, &[]).await;
    let acked = acked.lock().unwrap().clone();
    let lost: Vec<&String> = acked
        .iter()
        .filter(|url| stored.get(&id_of(url)) != Some(*url))
        .collect();
    println!(
        "sigkill loop: {cycles} cycles, {} adds acknowledged, {failed_adds} refused while down, \
         {served} requests served, {} records stored, {} lost",
        acked.len(),
        stored.len(),
        lost.len()
    );
    assert!(acked.len() >= cycles, "the adder made too little progress");
    assert!(lost.is_empty(), "lost acknowledged adds: {lost:?}");
    // And the data dir still serves.
    let mut gw = Gateway::builder().data_dir(&data).start().await;
    let r = curl(&["-x", &gw.http_proxy(), &origin.url()]).await;
    assert_eq!(r.status, 200);
    assert!(gw.terminate(Duration::from_secs(10)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_plaintext_data_dir_is_migrated_and_serves() {
    let origin = Origin::start().await;
    let socks = FakeUpstream::start(Kind::Socks5, Some(("legacy", "p@ss:1"))).await;
    let http = FakeUpstream::start(Kind::Http, None).await;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let socks_url = socks.url("socks5");
    let http_url = http.url("http");
    {
        // Schema version 1, written by test code: no meta tree, plaintext credentials, no
        // stats, no proxy type.
        let db = open_db(data.join("db"));
        let tree = db.open_tree("upstreams").unwrap();
        for (url, creds) in [(&socks_url, Some(("legacy", "p@ss:1"))), (&http_url, None)] {
            let u = Upstream::parse(url).unwrap();
            let mut v = serde_json::json!({
                "scheme": u.scheme.as_str(),
                "host": u.host.to_string(),
                "port": u.port,
            });
            if let Some((user, pass)) = creds {
                v["username"] = user.into();
                v["password"] = pass.into();
            }
            tree.insert(u.id().0.to_be_bytes(), serde_json::to_vec(&v).unwrap())
                .unwrap();
        }
        db.flush().unwrap();
    }
    let mut gw = Gateway::builder()
        .data_dir(&data)
        .arg("--strategy")
        .arg("round_robin")
        .start()
        .await;
    let logs = gw.logs();
    assert!(
        logs.contains("migration=\"add_reputation_fields\"")
            && logs.contains("migration=\"encrypt_credentials\""),
        "{logs}"
    );
    // Every record, with the new fields at their defaults (nothing has used them yet).
    let list: Value = serde_json::from_str(&pool_ok(&data, &["list", "--json"]).await).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    for row in list.as_array().unwrap() {
        assert_eq!(row["reputation"], 50, "{row}");
        assert_eq!(row["proxy_type"], "datacenter");
        assert_eq!(row["uses"], 0);
        assert_eq!(row["consecutive_failures"], 0);
        assert!(row["success_rate"].is_null() && row["avg_latency_ms"].is_null());
        assert!(row["last_health_check_unix_ms"].is_null());
    }
    // The password survived: the SOCKS5 fake demands it.
    for _ in 0..4 {
        let r = curl(&["-x", &gw.http_proxy(), &origin.url()]).await;
        assert_eq!(r.status, 200, "{}", r.stderr);
    }
    assert!(!socks.seen().auth.is_empty());
    assert!(
        socks
            .seen()
            .auth
            .iter()
            .all(|a| a.as_ref() == Some(&("legacy".into(), "p@ss:1".into())))
    );
    assert!(gw.terminate(Duration::from_secs(10)).await.success());
    assert_eq!(exported(&data, &[]).await[&id_of(&socks_url)], socks_url);
    // No plaintext is left on disk.
    let db = open_db(data.join("db"));
    for item in &db.open_tree("upstreams").unwrap() {
        let (_, v) = item.unwrap();
        let text = String::from_utf8_lossy(&v);
        assert!(!text.contains("p@ss") && !text.contains("legacy"), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_schema_is_refused_and_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    pool_ok(&data, &["add", "socks5://u:p@10.0.0.1:1080"]).await;
    let dump = || {
        let db = open_db(data.join("db"));
        let mut all = Vec::new();
        for name in db.tree_names() {
            for item in &db.open_tree(&name).unwrap() {
                all.push((name.to_vec(), item.unwrap()));
            }
        }
        all
    };
    {
        let db = open_db(data.join("db"));
        db.open_tree("meta")
            .unwrap()
            .insert("schema_version", &7u32.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let before = dump();
    let (code, err) = Gateway::builder().data_dir(&data).start_fails().await;
    assert_eq!(code, Some(1));
    assert!(
        err.contains("schema version 7") && err.contains("upgrade proxygate"),
        "{err}"
    );
    let (code, _, err) = pool(&data, &["list"], &[]).await;
    assert_eq!(code, 1);
    assert!(err.contains("schema version 7"), "{err}");
    assert_eq!(dump(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_and_open_key_file_are_refused_without_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let a = "socks5://alice:one@10.0.0.1:1080";
    let b = "http://bob:two@10.0.0.2:3128";
    pool_ok(&data, &["add", a, b, "http://10.0.0.3:3128"]).await;
    let other = generate_key().await;

    let (code, err) = Gateway::builder()
        .data_dir(&data)
        .env("ENCRYPTION_KEY", &other)
        .start_fails()
        .await;
    assert_eq!(code, Some(1));
    assert!(
        err.contains("2 of 3 upstream records cannot be decrypted"),
        "{err}"
    );
    assert!(err.contains(&id_of(a)) && err.contains(&id_of(b)), "{err}");
    let (code, _, err) = pool(&data, &["list"], &[("ENCRYPTION_KEY", &other)]).await;
    assert_eq!(code, 1, "{err}");
    let (code, _, err) = pool(&data, &["list"], &[("ENCRYPTION_KEY", "short")]).await;
    assert_eq!(code, 1);
    assert!(err.contains("ENCRYPTION_KEY: not valid base64"), "{err}");

    let key = data.join("encryption.key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    let (code, err) = Gateway::builder().data_dir(&data).start_fails().await;
    assert_eq!(code, Some(1));
    assert!(
        err.contains("readable by group or others (mode 0640)"),
        "{err}"
    );
    assert!(err.contains("chmod 600"), "{err}");

    // Nothing was lost or rewritten: with the right key, everything reads.
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let all = exported(&data, &[]).await;
    assert_eq!((all[&id_of(a)].as_str(), all[&id_of(b)].as_str()), (a, b));

    // A key file gone while records need it: refused, and no new key is made over it.
    std::fs::rename(&key, tmp.path().join("backup.key")).unwrap();
    let (code, err) = Gateway::builder().data_dir(&data).start_fails().await;
    assert_eq!(code, Some(1));
    assert!(err.contains("no key was given"), "{err}");
    assert!(!key.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_from_the_key_file_and_resumed() {
    let origin = Origin::start().await;
    let fake = FakeUpstream::start(Kind::Socks5, Some(("rot", "s3cret"))).await;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let refusing = refusing_addr().await;
    let mut urls = vec![fake.url("socks5")];
    urls.extend((0..20).map(|i| format!("http://u{i}:p{i}@{refusing}")));
    let args: Vec<&str> = std::iter::once("add")
        .chain(urls.iter().map(String::as_str))
        .collect();
    pool_ok(&data, &args).await;
    let key_before = std::fs::read_to_string(data.join("encryption.key")).unwrap();

    let stdout = rotate_ok(&data, &[], &[]).await;
    assert!(stdout.contains("re-encrypted 21 records"), "{stdout}");
    let key_after = std::fs::read_to_string(data.join("encryption.key")).unwrap();
    assert_ne!(key_before, key_after);
    assert!(!data.join("encryption.key.next").exists());

    // Interrupted: a rotation begun, 5 records done, then the process died.
    {
        let (store, _) = proxygate_store::Store::open(&data, None).unwrap();
        let next = proxygate_store::Key::generate();
        proxygate_store::crypto::write_key_file(&data.join("encryption.key.next"), &next).unwrap();
        store.begin_rotation(next).unwrap();
        let p = store.rotate_some(5).unwrap();
        assert_eq!((p.reencrypted, p.left), (5, 16));
    }
    // Mid-rotation the gateway still reads every record (both keys load) and says so.
    let mut gw = Gateway::builder().data_dir(&data).start().await;
    assert!(gw.logs().contains("key rotation"), "{}", gw.logs());
    assert!(gw.terminate(Duration::from_secs(10)).await.success());
    let stdout = rotate_ok(&data, &[], &[]).await;
    assert!(stdout.contains("re-encrypted 16 records"), "{stdout}");

    let all = exported(&data, &[]).await;
    for url in &urls {
        assert_eq!(&all[&id_of(url)], url);
    }
    let mut gw = Gateway::builder().data_dir(&data).start().await;
    // 21 upstreams, 20 of them refusing: a request may run out of attempts, but once the
    // SOCKS5 fake is reached it gets the password that was rotated twice.
    for _ in 0..20 {
        let _ = curl(&["-x", &gw.http_proxy(), &origin.url()]).await;
        if !fake.seen().auth.is_empty() {
            break;
        }
    }
    assert!(!fake.seen().auth.is_empty());
    assert!(
        fake.seen()
            .auth
            .iter()
            .all(|a| a == &Some(("rot".into(), "s3cret".into())))
    );
    assert!(gw.terminate(Duration::from_secs(10)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_with_the_key_in_the_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (k1, k2) = (generate_key().await, generate_key().await);
    let url = "socks5://env:pw@10.0.0.1:1080";
    let (code, _, err) = pool(&data, &["add", url], &[("ENCRYPTION_KEY", &k1)]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        !data.join("encryption.key").exists(),
        "the key came from the environment"
    );
    let out = cli_env(
        &["key", "rotate", "--data-dir", data.to_str().unwrap()],
        &[("ENCRYPTION_KEY", &k1)],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--new-key-file"));

    let new_file = tmp.path().join("new.key");
    std::fs::write(&new_file, format!("{k2}\n")).unwrap();
    std::fs::set_permissions(
        &new_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let stdout = rotate_ok(
        &data,
        &["--new-key-file", new_file.to_str().unwrap()],
        &[("ENCRYPTION_KEY", &k1)],
    )
    .await;
    assert!(
        stdout.contains("re-encrypted 1 records") && stdout.contains("set it to the new key"),
        "{stdout}"
    );
    assert!(!data.join("encryption.key").exists());
    // The old key no longer opens anything; the new one does.
    let (code, _, err) = pool(&data, &["export", "--decrypt"], &[("ENCRYPTION_KEY", &k1)]).await;
    assert_eq!(code, 1);
    assert!(err.contains(&id_of(url)), "{err}");
    assert_eq!(
        exported(&data, &[("ENCRYPTION_KEY", &k2)]).await[&id_of(url)],
        url
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_cli_offline_export_import_and_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let secret =
        "socks5h://carol:Tr0ub4dor%263@proxy.example:1080?country=de&proxy_type=residential";
    let plain = "http://10.1.1.1:3128";
    let (code, _, err) = pool(&data, &["list"], &[]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no data dir"), "{err}");
    let (code, _, err) = pool(&data, &["add", plain, "socks9://x:1"], &[]).await;
    assert_eq!(code, 65);
    assert!(
        err.contains("URL 2: unknown scheme") && err.contains("nothing was added"),
        "{err}"
    );
    pool_ok(&data, &["add", secret, plain]).await;

    let table = pool_ok(&data, &["list"]).await;
    for column in [
        "ID", "SCHEME", "ADDRESS", "COUNTRY", "REP", "SUCCESS", "LATENCY", "USES", "TIER", "EXIT",
        "STATE",
    ] {
        assert!(table.lines().next().unwrap().contains(column), "{table}");
    }
    assert!(
        table.contains("proxy.example:1080") && table.contains("DE") && table.contains("operator"),
        "{table}"
    );
    let shown = pool_ok(&data, &["show", &id_of(secret)]).await;
    assert!(
        shown.contains("carol") && shown.contains("residential"),
        "{shown}"
    );
    let (code, _, err) = pool(&data, &["show", "ffffffffffffffff"], &[]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no upstream with id"), "{err}");
    pool_ok(&data, &["disable", &id_of(plain)]).await;
    assert!(pool_ok(&data, &["list"]).await.contains("disabled"));
    let sealed = pool_ok(&data, &["export"]).await;
    for text in [&table, &shown, &sealed] {
        assert!(!text.contains("Tr0ub4dor"), "a password leaked: {text}");
    }

    // Sealed export -> another data dir with the same key: identical after import.
    let same = tmp.path().join("same");
    std::fs::create_dir(&same).unwrap();
    std::fs::copy(data.join("encryption.key"), same.join("encryption.key")).unwrap();
    let file = tmp.path().join("export.jsonl");
    std::fs::write(&file, &sealed).unwrap();
    let out = pool_ok(&same, &["import", file.to_str().unwrap()]).await;
    assert!(out.contains("added 2"), "{out}");
    assert_eq!(exported(&same, &[]).await, exported(&data, &[]).await);
    assert!(pool_ok(&same, &["list"]).await.contains("disabled"));

    // ... into a data dir with another key: refused by line, nothing imported.
    let other = tmp.path().join("other");
    let (code, _, err) = pool(&other, &["import", file.to_str().unwrap()], &[]).await;
    assert_eq!(code, 65);
    assert!(
        err.contains("line ") && err.contains("--decrypt") && err.contains("nothing was imported"),
        "{err}"
    );
    assert_eq!(pool_ok(&other, &["list", "--json"]).await.trim(), "[]");
    // A decrypted export imports anywhere; so does a plain list of URLs.
    let clear = pool_ok(&data, &["export", "--decrypt"]).await;
    std::fs::write(
        &file,
        format!("# restored\n{clear}\nhttp://10.2.2.2:8080\n"),
    )
    .unwrap();
    let out = pool_ok(&other, &["import", file.to_str().unwrap()]).await;
    assert!(out.contains("added 3"), "{out}");
    assert_eq!(
        exported(&other, &[]).await[&id_of(secret)],
        Upstream::parse(secret).unwrap().expose_url()
    );

    std::fs::write(&file, "http://ok:1\nnot a url\n{\"id\": 1}\n").unwrap();
    let (code, _, err) = pool(&other, &["import", file.to_str().unwrap()], &[]).await;
    assert_eq!(code, 65);
    assert!(err.contains("line 2:") && err.contains("line 3:"), "{err}");

    pool_ok(&data, &["remove", &id_of(secret)]).await;
    assert_eq!(exported(&data, &[]).await.len(), 1);
}
