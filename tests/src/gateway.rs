//! The real `proxygate` binary, built once per test process and run as a child process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The path of the `proxygate` binary, built (debug profile) on first use.
pub fn binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .to_owned();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = std::process::Command::new(cargo);
        build
            .args(["build", "--quiet", "-p", "proxygate", "--bin", "proxygate"])
            .current_dir(&root);
        // The variables `cargo test` sets for this test crate (CARGO_PKG_*, CARGO_MANIFEST_DIR,
        // ...) would make build scripts that watch the environment run again: build the
        // binary as tests/run.sh did, so it is found up to date (with tests/run.sh's own
        // settings: CI turns incremental builds off, and a build with them on is a rebuild).
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().into_owned();
            if k.starts_with("CARGO_")
                && !matches!(
                    k.as_str(),
                    "CARGO_HOME" | "CARGO_TARGET_DIR" | "CARGO_INCREMENTAL"
                )
            {
                build.env_remove(&k);
            }
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "cargo build -p proxygate failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        let bin = target.join("debug").join("proxygate");
        assert!(bin.exists(), "{} missing after build", bin.display());
        bin
    })
}

/// Runs the CLI to completion.
pub async fn cli(args: &[&str]) -> std::process::Output {
    cli_env(args, &[]).await
}

/// Runs the CLI to completion with extra environment (`ENCRYPTION_KEY` is removed unless
/// given).
pub async fn cli_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(binary())
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("ENCRYPTION_KEY")
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap()
}

/// Writes a users file with these accounts, through `proxygate user add` (argon2id hashes).
pub async fn users_file(path: &Path, accounts: &[(&str, &str)]) {
    for (name, password) in accounts {
        let mut child = Command::new(binary())
            .args(["user", "add", name, "--password-stdin", "--users-file"])
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stdin, format!("{password}\n").as_bytes())
            .await
            .unwrap();
        drop(stdin);
        assert!(child.wait().await.unwrap().success(), "user add {name}");
    }
}

/// Configures a gateway before starting it.
#[derive(Default)]
pub struct Builder {
    config: String,
    args: Vec<String>,
    data_dir: Option<PathBuf>,
    env: Vec<(String, String)>,
    /// Keep the production destination policy (tests otherwise reach loopback origins on
    /// any port).
    strict: bool,
}

/// A running gateway.
pub struct Gateway {
    pub addr: SocketAddr,
    /// The admin listener (`/metrics`, `/api/v1`).
    pub admin: SocketAddr,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    data_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl Builder {
    /// TOML appended to the config file (short timeouts are set by default; override them
    /// here).
    pub fn config(mut self, toml: &str) -> Self {
        self.config.push_str(toml);
        self.config.push('\n');
        self
    }

    pub fn upstream(mut self, url: impl Into<String>) -> Self {
        self.args.push("--upstream".into());
        self.args.push(url.into());
        self
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Uses this data dir (kept after the gateway stops) instead of a fresh temporary one.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// The destination policy of production: no private destinations, tunnels to 443 and 80
    /// only (by default every test may reach its loopback origin on any port).
    pub fn strict(mut self) -> Self {
        self.strict = true;
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Runs the gateway expecting it to refuse to start; returns its exit code and stderr.
    pub async fn start_fails(self) -> (Option<i32>, String) {
        let (mut command, _dir, _) = self.command();
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            command.stderr(Stdio::piped()).output(),
        )
        .await
        .expect("the gateway started and kept running")
        .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn command(self) -> (Command, tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("proxygate.toml");
        let mut config = self.config.clone();
        if !self.strict {
            // Loopback origins on any port: everything a test reaches lives there.
            config = if config.contains("[server]") {
                config.replacen("[server]", "[server]\nconnect_ports = \"*\"", 1)
            } else {
                format!("{config}\n[server]\nconnect_ports = \"*\"\n")
            };
            if !config.contains("allow_private_networks") {
                config = format!("allow_private_networks = true\n{config}");
            }
        }
        let config = if config.contains("[dial]") {
            config
        } else {
            // After the test's own keys: top-level ones (`sources = []`) must come first.
            format!(
                "{config}\n[dial]\nconnect_timeout = \"1s\"\nhandshake_timeout = \"1s\"\nretry_deadline = \"5s\"\n"
            )
        };
        std::fs::write(&config_path, &config).unwrap();
        let data_dir = self.data_dir.unwrap_or_else(|| dir.path().join("data"));
        // Never the public sources of the embedded defaults: a test sets its own fixture
        // sources, or has none.
        let own_sources = config.contains("[[sources]]") || config.contains("sources =");
        let mut command = Command::new(binary());
        command
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--admin-listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&data_dir)
            .args((!own_sources).then_some("--no-sources"))
            .args(&self.args)
            .env("RUST_LOG", "info,proxygate_gateway=debug")
            .env_remove("ENCRYPTION_KEY")
            .envs(self.env)
            .stdout(Stdio::null())
            .kill_on_drop(true);
        (command, dir, data_dir)
    }

    /// Starts the gateway on 127.0.0.1:0 and waits until it listens.
    pub async fn start(self) -> Gateway {
        let (mut command, dir, data_dir) = self.command();
        let mut child = command.stderr(Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sink = Arc::clone(&log);
        tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut admin = None;
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let addr_after = |marker: &str| {
                    line.split(marker)
                        .nth(1)
                        .and_then(|rest| rest.split_whitespace().next())
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                };
                if let Some(a) = addr_after("admin API on http://") {
                    admin = Some(a);
                }
                let addr = addr_after("listening on ");
                // Logged before the start is signalled: `logs()` right after `start()` must
                // already hold the line that said it listens.
                sink.lock().unwrap().push(line);
                if let (Some(addr), Some(admin)) = (addr, admin)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send((addr, admin));
                }
            }
        });
        let (addr, admin) = match tokio::time::timeout(Duration::from_secs(60), rx).await {
            Ok(Ok(addrs)) => addrs,
            _ => panic!(
                "gateway did not start; its log:\n{}",
                log.lock().unwrap().join("\n")
            ),
        };
        Gateway {
            addr,
            admin,
            child,
            log,
            data_dir,
            _dir: dir,
        }
    }
}

impl Gateway {
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// `http://127.0.0.1:PORT`
    pub fn http_proxy(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A reqwest client through this gateway that opens a new connection per request, so
    /// every request selects and dials an upstream anew.
    pub fn fresh_client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .proxy(reqwest::Proxy::all(self.http_proxy()).unwrap())
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap()
    }

    /// `http://127.0.0.1:PORT` of the admin listener.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// A client for the admin API (never through a proxy).
    pub fn admin_client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap()
    }

    /// `GET` on the admin listener: status and body.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let r = self
            .admin_client()
            .get(format!("{}{path}", self.admin_url()))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// The admin API's JSON answer to `GET path` (which must succeed).
    pub async fn api(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.admin_get(path).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Everything the gateway logged so far.
    pub fn logs(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// SIGKILL: no drain, no flush; what the gateway acknowledged must be on disk already.
    pub async fn kill(&mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }

    /// The gateway's process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the gateway has exited")
    }

    /// The config file the gateway runs with (rewrite it and [`Gateway::signal`] `HUP`).
    pub fn config_path(&self) -> PathBuf {
        self._dir.path().join("proxygate.toml")
    }

    /// Sends a signal by name (`HUP`, `TERM`, `INT`).
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("the gateway has exited").to_string();
        let ok = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{name} {pid}");
    }

    /// Waits for the exit (at most `limit`).
    pub async fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("gateway still running after {limit:?}:\n{}", self.logs()))
            .unwrap()
    }

    /// Sends SIGTERM and waits for the exit (at most `limit`).
    pub async fn terminate(&mut self, limit: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().unwrap().to_string();
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(ok.success());
        tokio::time::timeout(limit, self.child.wait())
            .await
            .expect("gateway did not exit after SIGTERM")
            .unwrap()
    }
}
