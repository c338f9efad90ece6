//! The real curl as a client.

use std::collections::HashMap;

use tokio::process::Command;

/// What curl got back: the final response (after any CONNECT).
#[derive(Debug)]
pub struct CurlResponse {
    pub status: u16,
    /// Lower-cased header names; the last value wins.
    pub headers: HashMap<String, String>,
    pub body: String,
    pub stderr: String,
    pub exit_code: i32,
}

impl CurlResponse {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }
}

/// Runs `curl -sS <args>` and parses the final response.
pub async fn curl(args: &[&str]) -> CurlResponse {
    let dir = tempfile::tempdir().unwrap();
    let head = dir.path().join("head");
    let body = dir.path().join("body");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-D"])
        .arg(&head)
        .arg("-o")
        .arg(&body)
        .args(["-w", "%{http_code} %{http_connect}"])
        .args(args)
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("all_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .env_remove("no_proxy")
        .output()
        .await
        .expect("curl must be installed (tests/run.sh installs it)");
    let head = std::fs::read_to_string(&head).unwrap_or_default();
    // With a CONNECT there are two blocks: the proxy's 200, then the origin's response.
    let block = head
        .split("\r\n\r\n")
        .filter(|b| !b.trim().is_empty())
        .last()
        .unwrap_or("");
    let headers = block
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    // A refused CONNECT leaves http_code at 0; the proxy's answer is in http_connect.
    let codes = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut codes = codes
        .split_whitespace()
        .map(|c| c.parse::<u16>().unwrap_or(0));
    let (code, connect) = (codes.next().unwrap_or(0), codes.next().unwrap_or(0));
    let status = if code == 0 { connect } else { code };
    CurlResponse {
        status,
        headers,
        body: std::fs::read_to_string(&body).unwrap_or_default(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        exit_code: out.status.code().unwrap_or(-1),
    }
}
