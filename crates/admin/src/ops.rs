//! [`Op`]: the operator commands as the CLI runs them, and [`execute`], which runs one on a
//! [`Catalog`] and renders what the CLI prints ([`Reply`]). The same code answers
//! `proxygate pool ...` on a stopped data dir and, through the control socket, inside the
//! running gateway; the HTTP API calls the catalog's typed operations directly.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, OpError, Row};

/// One operator command. Serialized as JSON over the control socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    Add {
        urls: Vec<String>,
    },
    Import {
        text: String,
    },
    List {
        json: bool,
    },
    Show {
        id: String,
        json: bool,
    },
    Remove {
        id: String,
    },
    Disable {
        id: String,
    },
    Enable {
        id: String,
    },
    Export {
        decrypt: bool,
    },
    Strategy {
        name: Option<String>,
        reset: bool,
    },
    /// The sources and their quality (answered as JSON).
    SourcesList,
    /// Fetch sources now (answered as JSON: a summary per source).
    SourcesFetch {
        names: Vec<String>,
        check: bool,
        import: bool,
    },
    /// Check pool members now (answered as JSON).
    Check {
        ids: Vec<String>,
    },
}

impl Op {
    /// The request of a source operation to the [`crate::api::Actions`], or `None` for a
    /// catalog operation.
    pub fn action_request(&self) -> Option<(ActionKind, serde_json::Value)> {
        match self {
            Op::SourcesList => Some((ActionKind::Sources, serde_json::Value::Null)),
            Op::SourcesFetch {
                names,
                check,
                import,
            } => Some((
                ActionKind::Fetch,
                serde_json::json!({ "sources": names, "check": check, "import": import }),
            )),
            Op::Check { ids } => Some((ActionKind::Refresh, serde_json::json!({ "ids": ids }))),
            _ => None,
        }
    }
}

/// Which of the [`crate::api::Actions`] an operation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionKind {
    Sources,
    Fetch,
    Refresh,
}

/// What a command prints and its exit code.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub code: u8,
    pub stdout: String,
    pub stderr: String,
}

impl Reply {
    pub fn ok(stdout: String) -> Reply {
        Reply {
            code: 0,
            stdout,
            stderr: String::new(),
        }
    }

    /// An error, each line of its message prefixed `proxygate: `.
    pub fn error(e: &OpError) -> Reply {
        let mut stderr = String::new();
        for line in e.to_string().lines() {
            let _ = writeln!(stderr, "proxygate: {line}");
        }
        Reply {
            code: e.exit_code(),
            stdout: String::new(),
            stderr,
        }
    }
}

impl Op {
    /// Whether the command changes anything (and so is logged as an operator action).
    fn mutates(&self) -> bool {
        !matches!(
            self,
            Op::List { .. }
                | Op::Show { .. }
                | Op::Export { .. }
                | Op::Strategy {
                    name: None,
                    reset: false
                }
        )
    }
}

/// Runs `op` and renders its output as the CLI prints it.
pub fn execute(catalog: &mut Catalog, op: &Op) -> Reply {
    let reply = run(catalog, op).unwrap_or_else(|e| Reply::error(&e));
    if op.mutates() && reply.code == 0 {
        // An audit line: what changed (ids and counts, never a URL).
        let summary = reply.stdout.lines().next().unwrap_or_default();
        tracing::info!(live = catalog.is_live(), "operator: {summary}");
    }
    reply
}

fn run(c: &mut Catalog, op: &Op) -> Result<Reply, OpError> {
    let out = match op {
        Op::SourcesList | Op::SourcesFetch { .. } | Op::Check { .. } => {
            return Err(OpError::Conflict(
                "a source operation needs the sources runtime".into(),
            ));
        }
        Op::Add { urls } => {
            let a = c.add(urls)?;
            let mut out = format!("added {}, updated {}\n", a.added, a.updated);
            for id in a.ids {
                let _ = writeln!(out, "{id}");
            }
            out
        }
        Op::Import { text } => {
            let a = c.import(text)?;
            format!("imported: added {}, updated {}\n", a.added, a.updated)
        }
        Op::List { json: true } => pretty(&c.rows()?),
        Op::List { json: false } => table(&c.rows()?),
        Op::Show { id, json } => {
            let row = c.show(c.resolve(id)?)?;
            if *json {
                pretty(&row)
            } else {
                key_values(&serde_json::to_value(&row).unwrap_or_default())
            }
        }
        Op::Remove { id } => format!("removed {}\n", c.remove(c.resolve(id)?)?),
        Op::Disable { id } => format!("disabled {}\n", c.set_disabled(c.resolve(id)?, true)?),
        Op::Enable { id } => format!("enabled {}\n", c.set_disabled(c.resolve(id)?, false)?),
        Op::Export { decrypt } => c.export(*decrypt)?,
        Op::Strategy { name: None, reset } if !reset => {
            let v = c.strategy()?;
            match v.strategy {
                Some(s) => format!("{s}\n"),
                None => "(none set: the config's pool.strategy applies)\n".into(),
            }
        }
        Op::Strategy { name, .. } => {
            let v = c.set_strategy(name.as_deref())?;
            match (name, v.live) {
                (Some(_), true) => {
                    format!("strategy set to {}, live\n", v.strategy.unwrap_or_default())
                }
                (Some(n), false) => {
                    format!("strategy set to {n}; it applies from the next start\n")
                }
                (None, true) => format!(
                    "strategy reset: {} (from the config), live\n",
                    v.configured.unwrap_or_default()
                ),
                (None, false) => {
                    "strategy reset: the config's pool.strategy applies from the next start\n"
                        .into()
                }
            }
        }
    };
    Ok(Reply::ok(out))
}

/// Pretty JSON and a newline.
pub fn pretty<T: Serialize>(value: &T) -> String {
    format!(
        "{}\n",
        serde_json::to_string_pretty(value).unwrap_or_default()
    )
}

/// A JSON object as aligned `key value` lines (`-` for null).
pub fn key_values(value: &serde_json::Value) -> String {
    let mut out = String::new();
    if let serde_json::Value::Object(map) = value {
        for (k, v) in map {
            let v = match v {
                serde_json::Value::Null => "-".to_owned(),
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let _ = writeln!(out, "{k:<26} {v}");
        }
    }
    out
}

/// The `pool list` table.
pub fn table(rows: &[Row]) -> String {
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| serde_json::to_value(r).unwrap_or_default())
        .collect();
    table_of(&rows)
}

/// The `pool list` table of rows as the API serializes them (the CLI's `--admin` path prints
/// the same table from the API's JSON).
pub fn table_of(rows: &[serde_json::Value]) -> String {
    use serde_json::Value;
    let cell = |v: &Value| match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut out = format!(
        "{:<16}  {:<7}  {:<28}  {:<7}  {:>3}  {:>7}  {:>9}  {:>7}  {:<9}  {:<20}  {}\n",
        "ID",
        "SCHEME",
        "ADDRESS",
        "COUNTRY",
        "REP",
        "SUCCESS",
        "LATENCY",
        "USES",
        "TIER",
        "EXIT (SHARED BY)",
        "STATE"
    );
    for r in rows {
        // The exit IP, and how many members share it when more than itself.
        let exit = match (r["exit_ip"].as_str(), r["exit_group_size"].as_u64()) {
            (Some(ip), Some(n)) if n > 1 => format!("{ip} ({n})"),
            (Some(ip), _) => ip.to_owned(),
            (None, _) => "-".to_owned(),
        };
        let _ = writeln!(
            out,
            "{:<16}  {:<7}  {:<28}  {:<7}  {:>3}  {:>7}  {:>9}  {:>7}  {:<9}  {:<20}  {}",
            cell(&r["id"]),
            cell(&r["scheme"]),
            cell(&r["address"]),
            cell(&r["country"]),
            cell(&r["reputation"]),
            r["success_rate"]
                .as_f64()
                .map_or("-".into(), |s| format!("{:.1}%", s * 100.0)),
            r["avg_latency_ms"]
                .as_f64()
                .map_or("-".into(), |ms| format!("{ms:.0}ms")),
            cell(&r["uses"]),
            cell(&r["tier"]),
            exit,
            cell(&r["state"])
        );
    }
    out
}
