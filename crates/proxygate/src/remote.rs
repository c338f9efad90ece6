//! The CLI's side of the admin API: `proxygate strategy|reputation|health|stats|refresh`,
//! and `pool ...` / `key rotate` with `--admin URL`. Each command is one HTTP request to the
//! running gateway's admin listener; the answer is printed as a table, or as the API's JSON
//! with `--json`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use serde_json::Value;

use crate::EXIT_CONFIG;

/// The environment variable a token can come from.
pub(crate) const TOKEN_ENV: &str = "PROXYGATE_ADMIN_TOKEN";

/// Where the admin API is and how to prove who we are.
#[derive(Debug, Clone, Args)]
pub(crate) struct AdminArgs {
    /// The admin API's base URL (default: the config's admin.listen, else
    /// http://127.0.0.1:9090).
    #[arg(long, value_name = "URL")]
    pub(crate) admin: Option<String>,
    /// A file holding the bearer token (default: $PROXYGATE_ADMIN_TOKEN, else the config's
    /// admin.token_file).
    #[arg(long, value_name = "FILE")]
    pub(crate) token_file: Option<PathBuf>,
    /// Config file, for admin.listen and admin.token_file.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

/// A connection to one admin API.
pub(crate) struct Admin {
    base: String,
    token: Option<String>,
    client: reqwest::Client,
    runtime: tokio::runtime::Runtime,
    pub(crate) json: bool,
}

/// What went wrong, and the exit code it earns.
pub(crate) struct Failed {
    pub(crate) code: u8,
    pub(crate) message: String,
}

impl Failed {
    pub(crate) fn exit(&self) -> ExitCode {
        eprintln!("proxygate: {}", self.message);
        ExitCode::from(self.code)
    }
}

impl Admin {
    pub(crate) fn connect(args: &AdminArgs) -> Result<Admin, Failed> {
        let usage = |message: String| Failed {
            code: EXIT_CONFIG,
            message,
        };
        let cfg = crate::config::for_command(args.config.as_deref(), None, false)
            .map_err(|e| usage(e.to_string()))?;
        let base = args
            .admin
            .clone()
            .unwrap_or_else(|| format!("http://{}", cfg.admin.listen));
        let base = base.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(usage(format!(
                "--admin {base:?}: expected an http:// or https:// URL"
            )));
        }
        let token_file = args.token_file.clone().or(cfg.admin.token_file.clone());
        let token = match (&args.token_file, std::env::var(TOKEN_ENV).ok(), token_file) {
            (None, Some(t), _) if !t.trim().is_empty() => Some(t.trim().to_owned()),
            (_, _, Some(path)) => Some(
                proxygate_admin::config::read_token(&path)
                    .map_err(|why| usage(format!("token file: {why}")))?,
            ),
            _ => None,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Failed {
                code: 1,
                message: format!("cannot start the runtime: {e}"),
            })?;
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(std::time::Duration::from_secs(600))
            .build()
            .map_err(|e| Failed {
                code: 1,
                message: format!("HTTP client: {e}"),
            })?;
        Ok(Admin {
            base,
            token,
            client,
            runtime,
            json: args.json,
        })
    }

    /// Sends one request; returns the JSON (or text) of a 2xx answer.
    pub(crate) fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Body>,
    ) -> Result<Answer, Failed> {
        let url = format!("{}{path}", self.base);
        let mut req = self.client.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        req = match body {
            Some(Body::Json(v)) => req.json(&v),
            Some(Body::Text(t)) => req.body(t),
            None => req,
        };
        self.runtime.block_on(async {
            let resp = req.send().await.map_err(|e| Failed {
                code: 1,
                message: format!(
                    "the admin API at {} did not answer ({e}); is the gateway running, and \
                     is --admin right?",
                    self.base
                ),
            })?;
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            if status.is_success() {
                return Ok(Answer(text));
            }
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| format!("{status}: {text}"));
            let code = match status.as_u16() {
                422 => proxygate_admin::catalog::EXIT_DATA,
                400 => EXIT_CONFIG,
                401 => {
                    return Err(Failed {
                        code: 1,
                        message: format!("{message}: give --token-file, or set {TOKEN_ENV}"),
                    });
                }
                _ => 1,
            };
            Err(Failed { code, message })
        })
    }

    pub(crate) fn get(&self, path: &str) -> Result<Answer, Failed> {
        self.call(reqwest::Method::GET, path, None)
    }
}

/// A request body.
pub(crate) enum Body {
    Json(Value),
    Text(String),
}

/// A successful answer's body.
pub(crate) struct Answer(pub(crate) String);

impl Answer {
    pub(crate) fn value(&self) -> Value {
        serde_json::from_str(&self.0).unwrap_or(Value::Null)
    }
}

/// Prints the answer as JSON, or through `render`.
pub(crate) fn print(
    admin: &Admin,
    answer: Result<Answer, Failed>,
    render: fn(&Value) -> String,
) -> ExitCode {
    print_as(answer, render, admin.json)
}

/// Prints the answer as JSON (`json`), or through `render`.
pub(crate) fn print_as(
    answer: Result<Answer, Failed>,
    render: fn(&Value) -> String,
    json: bool,
) -> ExitCode {
    match answer {
        Ok(a) if json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&a.value()).unwrap_or(a.0)
            );
            ExitCode::SUCCESS
        }
        Ok(a) => {
            print!("{}", render(&a.value()));
            ExitCode::SUCCESS
        }
        Err(f) => f.exit(),
    }
}

fn opt(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.2}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

fn percent(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| "-".into(), |r| format!("{:.1}%", r * 100.0))
}

pub(crate) fn render_strategy(v: &Value) -> String {
    let mut out = format!("{}\n", opt(&v["strategy"]));
    let _ = writeln!(
        out,
        "set by: {}{}",
        opt(&v["set_by"]),
        match v["configured"].as_str() {
            Some(c) => format!(" (the config's: {c})"),
            None => String::new(),
        }
    );
    out
}

pub(crate) fn render_explained(v: &Value) -> String {
    let f = &v["formula"];
    let mut out = String::new();
    for key in [
        "id",
        "scheme",
        "address",
        "country",
        "origin",
        "state",
        "reputation",
        "uses",
        "failures",
        "consecutive_failures",
        "in_flight",
        "backoff_left_ms",
        "last_used_unix_ms",
        "last_health_check_unix_ms",
        "anonymity",
        "exit_ip",
        "exit_group_size",
        "tier",
        "leak",
        "integrity_passes",
        "disabled_reason",
    ] {
        if let Some(x) = v.get(key) {
            let _ = writeln!(out, "{key:<26} {}", opt(x));
        }
    }
    let _ = writeln!(
        out,
        "{:<26} {}",
        "success_rate",
        percent(&v["success_rate"])
    );
    let l = &v["latency_ms"];
    let _ = writeln!(
        out,
        "{:<26} p50 {} / p95 {} / p99 {} ms ({} samples)",
        "latency",
        opt(&l["p50"]),
        opt(&l["p95"]),
        opt(&l["p99"]),
        opt(&l["samples"])
    );
    out.push_str("\nreputation formula:\n");
    let _ = writeln!(
        out,
        "  base                       {:>+7.1}",
        f["base"].as_f64().unwrap_or(0.0)
    );
    let term = |out: &mut String, name: &str, term: &str, input: String| {
        let _ = writeln!(
            out,
            "  {name:<26} {:>+7.1}   ({input})",
            f[term].as_f64().unwrap_or(0.0)
        );
    };
    term(
        &mut out,
        "success",
        "success_term",
        format!("success rate {}", percent(&f["success_rate"])),
    );
    term(
        &mut out,
        "latency",
        "latency_term",
        format!("response time {} ms", opt(&f["response_time_ms"])),
    );
    term(
        &mut out,
        "consecutive failures",
        "failure_term",
        format!("{} in a row", opt(&f["consecutive_failures"])),
    );
    term(
        &mut out,
        "experience",
        "uses_term",
        format!("{} uses", opt(&f["total_uses"])),
    );
    let _ = writeln!(
        out,
        "  = {:.1} -> reputation {} (healthy needs >= {} and fewer than {} consecutive failures)",
        f["score"].as_f64().unwrap_or(0.0),
        opt(&f["reputation"]),
        opt(&v["healthy_reputation"]),
        opt(&v["max_consecutive_failures"])
    );
    let _ = writeln!(
        out,
        "  selection weight {} (weighted_random draws by reputation x success rate ^ \
         pool.weight_success_exponent)",
        opt(&v["selection_weight"])
    );
    let blocked = v["blocked_sites"].as_array().cloned().unwrap_or_default();
    if !blocked.is_empty() {
        out.push_str("\nblocked at (selection avoids it there):\n");
        for b in &blocked {
            let _ = writeln!(
                out,
                "  {:<30} {} failures in a row ({} in all), last {} s ago",
                b["site"].as_str().unwrap_or_default(),
                opt(&b["consecutive"]),
                opt(&b["failures"]),
                b["since_ms"].as_u64().unwrap_or(0) / 1000
            );
        }
    }
    out.push_str("\nwhy:\n");
    for w in v["why"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "  - {}", w.as_str().unwrap_or_default());
    }
    out
}

pub(crate) fn render_health(v: &Value) -> String {
    let mut out = format!(
        "ready: {}   strategy: {}   upstreams: {}   sticky sessions: {}   panic picks: {}\n\n",
        opt(&v["ready"]),
        opt(&v["strategy"]),
        opt(&v["upstreams"]),
        opt(&v["sticky_sessions"]),
        opt(&v["panic_selections"])
    );
    for state in ["healthy", "probation", "backoff", "unhealthy", "disabled"] {
        let _ = writeln!(out, "{state:<10} {:>8}", opt(&v["states"][state]));
    }
    let worst = v["worst"].as_array().cloned().unwrap_or_default();
    if !worst.is_empty() {
        out.push_str("\nworst upstreams:\n");
        for w in worst {
            let _ = writeln!(
                out,
                "{}  {:<28} {:>3}  {}",
                opt(&w["id"]),
                opt(&w["address"]),
                opt(&w["reputation"]),
                opt(&w["state"])
            );
            for why in w["why"].as_array().into_iter().flatten().take(3) {
                let _ = writeln!(out, "    - {}", why.as_str().unwrap_or_default());
            }
        }
    }
    out
}

pub(crate) fn render_stats(v: &Value) -> String {
    let p = &v["response_ms"];
    let mut out = format!(
        "last {}: {} attempts, {} failed, success {}, response p50/p95/p99 {}/{}/{} ms, {} \
         upstreams active\n",
        opt(&v["window"]),
        opt(&v["attempts"]),
        opt(&v["failures"]),
        percent(&v["success_rate"]),
        opt(&p["p50"]),
        opt(&p["p95"]),
        opt(&p["p99"]),
        opt(&v["active_upstreams"])
    );
    for (title, key) in [("top", "top"), ("bottom", "bottom")] {
        let rows = v[key].as_array().cloned().unwrap_or_default();
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(
            out,
            "\n{title:<16}  {:<28} {:>8} {:>8} {:>9}   lifetime p50/p95/p99",
            "ADDRESS", "ATTEMPTS", "SUCCESS", "MEAN"
        );
        for r in rows {
            let _ = writeln!(
                out,
                "{}  {:<28} {:>8} {:>8} {:>9}   {}/{}/{} ms",
                opt(&r["id"]),
                opt(&r["address"]),
                opt(&r["attempts"]),
                percent(&r["success_rate"]),
                r["mean_response_ms"]
                    .as_f64()
                    .map_or("-".into(), |m| format!("{m:.0}ms")),
                opt(&r["lifetime_p50_ms"]),
                opt(&r["lifetime_p95_ms"]),
                opt(&r["lifetime_p99_ms"])
            );
        }
    }
    let sources = v["sources"].as_array().cloned().unwrap_or_default();
    if !sources.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<20} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "SOURCE", "FETCHES", "FAILED", "UNIQUE", "PASSED", "ALIVE24H"
        );
        for s in sources {
            let _ = writeln!(
                out,
                "{:<20} {:>8} {:>8} {:>8} {:>8} {:>8}",
                opt(&s["name"]),
                opt(&s["fetches_ok"]),
                opt(&s["fetches_failed"]),
                opt(&s["unique"]),
                opt(&s["passed"]),
                opt(&s["alive_24h"])
            );
        }
    }
    out
}

/// Renders the API's `{"upstreams": [...]}` as the `pool list` table.
pub(crate) fn render_rows(v: &Value) -> String {
    let rows = v["upstreams"].as_array().cloned().unwrap_or_default();
    proxygate_admin::ops::table_of(&rows)
}

/// Renders the JSON answer of the "refresh" and "sources fetch" requests.
pub(crate) fn render_summary(v: &Value) -> String {
    let mut out = String::new();
    if let Some(rows) = v["sources"].as_array() {
        let _ = writeln!(
            out,
            "{:<20} {:>8} {:>8} {:>8} {:>10} {:>9}  STATUS",
            "SOURCE", "FETCHED", "UNIQUE", "NEW", "CHECKED OK", "IMPORTED"
        );
        for s in rows {
            let _ = writeln!(
                out,
                "{:<20} {:>8} {:>8} {:>8} {:>10} {:>9}  {}",
                opt(&s["name"]),
                opt(&s["fetched"]),
                opt(&s["unique"]),
                opt(&s["new"]),
                opt(&s["checked_ok"]),
                opt(&s["imported"]),
                s["error"]
                    .as_str()
                    .map_or("ok".into(), |e| format!("failed: {e}"))
            );
        }
    }
    if let Some(c) = v.get("checked") {
        let _ = writeln!(
            out,
            "checked {}: {} passed, {} failed in {} ms",
            opt(c),
            opt(&v["passed"]),
            opt(&v["failed"]),
            opt(&v["elapsed_ms"])
        );
    }
    out
}
