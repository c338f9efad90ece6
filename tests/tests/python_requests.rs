//! Python requests through the gateway: absolute-form HTTP, and HTTPS through CONNECT with
//! the origin's certificate verified, with hinted credentials in the proxy URL.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failed step must fail the test loudly"
)]

use proxygate_tests::fakes::{FakeUpstream, Kind};
use proxygate_tests::gateway::Gateway;
use proxygate_tests::origin::Origin;
use proxygate_tests::tls::TestPki;

const SCRIPT: &str = r#"
import sys, requests
proxy, http_url, https_url, ca = sys.argv[1:5]
proxies = {"http": proxy, "https": proxy}
r = requests.get(http_url, proxies=proxies, timeout=20)
print(r.status_code, r.headers["x-peer"], r.headers["x-target"])
r = requests.post(https_url, data=b"x" * 5000, proxies=proxies, verify=ca, timeout=20)
print(r.status_code, r.headers["x-peer"], r.headers["x-body-len"])
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_requests_http_and_https() {
    let pki = TestPki::new();
    let ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca.path(), &pki.ca_pem).unwrap();
    let origin = Origin::start().await;
    let tls_origin = Origin::start_on("127.0.0.1:0".parse().unwrap(), Some(pki.acceptor())).await;
    let fake = FakeUpstream::start(Kind::Socks5, Some(("py", "thon"))).await;
    let gw = Gateway::builder()
        .upstream(fake.url("socks5h"))
        .start()
        .await;
    let proxy = format!("http://user-session-py1:any@{}", gw.addr);
    let out = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .arg(&proxy)
        .arg(format!("{}/py?x=1", origin.url()))
        .arg(format!(
            "https://localhost:{}/secure",
            tls_origin.addr.port()
        ))
        .arg(ca.path())
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("REQUESTS_CA_BUNDLE")
        .output()
        .await
        .expect("python3 with requests (tests/run.sh installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.logs()
    );
    let egress = fake.egress.to_string();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], format!("200 {egress} /py?x=1"));
    assert_eq!(lines[1], format!("200 {egress} 5000"));
}
