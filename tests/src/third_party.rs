//! Real third-party upstreams from Debian packages: tinyproxy (HTTP, Basic auth) and
//! microsocks (SOCKS5, username/password). `tests/run.sh` installs them; a test that needs one
//! fails with a clear message when it is missing.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// A third-party proxy process, killed on drop.
pub struct ThirdParty {
    pub addr: SocketAddr,
    _child: Child,
    _dir: tempfile::TempDir,
}

fn require(bin: &str) -> String {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
        let p = format!("{dir}/{bin}");
        if std::path::Path::new(&p).exists() {
            return p;
        }
    }
    panic!("{bin} is not installed: run tests/run.sh (it installs tinyproxy and microsocks)");
}

/// A free loopback port (these programs cannot bind port 0 and report it).
async fn free_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

async fn wait_listening(addr: SocketAddr) {
    for _ in 0..250 {
        if TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{addr} never started listening");
}

impl ThirdParty {
    /// tinyproxy requiring Basic credentials `user:pass`.
    pub async fn tinyproxy(user: &str, pass: &str) -> ThirdParty {
        Self::tinyproxy_conf(&format!("BasicAuth {user} {pass}\n")).await
    }

    async fn tinyproxy_conf(extra: &str) -> ThirdParty {
        let bin = require("tinyproxy");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port().await;
        let conf = dir.path().join("tinyproxy.conf");
        std::fs::write(
            &conf,
            format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 200\n\
                 {extra}Allow 127.0.0.1\nLogLevel Warning\nDisableViaHeader Yes\n"
            ),
        )
        .unwrap();
        let conf = conf.display().to_string();
        Self::spawn(&bin, &["-d", "-c", &conf], port, dir).await
    }

    /// Runs `bin args`, which must listen on 127.0.0.1:`port`, and waits until it does.
    async fn spawn(bin: &str, args: &[&str], port: u16, dir: tempfile::TempDir) -> ThirdParty {
        let child = Command::new(bin)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_listening(addr).await;
        ThirdParty {
            addr,
            _child: child,
            _dir: dir,
        }
    }

    /// tinyproxy requiring `user:pass` and dialing out from `bind` (`Bind`): on loopback its
    /// requests would otherwise come from 127.0.0.1, the gateway's own address.
    pub async fn tinyproxy_from(user: &str, pass: &str, bind: std::net::IpAddr) -> ThirdParty {
        Self::tinyproxy_conf(&format!("BasicAuth {user} {pass}\nBind {bind}\n")).await
    }

    /// microsocks requiring `user:pass` and dialing out from `bind` (`-b`).
    pub async fn microsocks_from(user: &str, pass: &str, bind: std::net::IpAddr) -> ThirdParty {
        let bin = require("microsocks");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port().await;
        let (port_s, bind_s) = (port.to_string(), bind.to_string());
        let args = [
            "-i",
            "127.0.0.1",
            "-p",
            &port_s,
            "-u",
            user,
            "-P",
            pass,
            "-b",
            &bind_s,
        ];
        Self::spawn(&bin, &args, port, dir).await
    }

    /// tinyproxy without authentication (for the load harness).
    pub async fn tinyproxy_open() -> ThirdParty {
        Self::tinyproxy_conf("").await
    }

    /// microsocks requiring `user:pass`.
    pub async fn microsocks(user: &str, pass: &str) -> ThirdParty {
        let bin = require("microsocks");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port().await;
        let port_s = port.to_string();
        let args = ["-i", "127.0.0.1", "-p", &port_s, "-u", user, "-P", pass];
        Self::spawn(&bin, &args, port, dir).await
    }
}
