//! `proxygate user add|remove|list|convert`: the client accounts of a users file (argon2id
//! hashes, never passwords). The file is rewritten whole (a temporary file renamed over it,
//! mode 0600); a running gateway picks changes up on SIGHUP.

use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use proxygate_core::Secret;
use proxygate_gateway::auth::{UsersFileError, hash_password, parse_users, render_users};

use crate::EXIT_CONFIG;

#[derive(Debug, Args)]
pub(crate) struct UserArgs {
    /// The users file (default: the config's auth.users_file).
    #[arg(long, global = true, value_name = "FILE")]
    users_file: Option<PathBuf>,
    /// Config file, for auth.users_file.
    #[arg(long, short = 'c', global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: UserCommand,
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Add an account, or set its password (asked twice without echo on a terminal).
    Add {
        name: String,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Remove an account.
    Remove { name: String },
    /// The accounts' names.
    List,
    /// Hash every plaintext `name:password` line of an older users file, in place.
    Convert,
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("proxygate: {msg}");
    ExitCode::from(code)
}

pub(crate) fn user(args: UserArgs) -> ExitCode {
    let path = match (&args.users_file, &args.config) {
        (Some(p), _) => p.clone(),
        (None, Some(cfg)) => match crate::config::for_command(Some(cfg), None, false) {
            Ok(c) => match c.gateway.auth.users_file {
                Some(p) => p,
                None => return fail(EXIT_CONFIG, "the config sets no auth.users_file"),
            },
            Err(e) => return fail(EXIT_CONFIG, e),
        },
        (None, None) => return fail(EXIT_CONFIG, "give --users-file FILE (or --config)"),
    };
    match args.command {
        UserCommand::Add {
            name,
            password_stdin,
        } => add(&path, &name, password_stdin),
        UserCommand::Remove { name } => edit(&path, |users| {
            if users.remove(&name).is_none() {
                return Err(format!("no account {name:?} in {}", path.display()));
            }
            Ok(format!("removed {name}"))
        }),
        UserCommand::List => match read(&path, true) {
            Ok(users) => {
                let mut names: Vec<&String> = users.keys().collect();
                names.sort();
                for n in names {
                    println!("{n}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(1, e),
        },
        UserCommand::Convert => convert(&path),
    }
}

/// The accounts of `path` (an absent file is empty when `missing_ok`).
fn read(
    path: &Path,
    missing_ok: bool,
) -> Result<std::collections::HashMap<String, String>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_users(&text, &path.display().to_string()).map_err(|e| e.to_string()),
        Err(e) if missing_ok && e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Writes `text` to `path` atomically, mode 0600.
fn write(path: &Path, text: &str) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    let io = |e: std::io::Error| format!("{}: {e}", tmp.display());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

fn edit(
    path: &Path,
    change: impl FnOnce(&mut std::collections::HashMap<String, String>) -> Result<String, String>,
) -> ExitCode {
    let mut users = match read(path, true) {
        Ok(u) => u,
        Err(e) => return fail(1, e),
    };
    let done = match change(&mut users) {
        Ok(d) => d,
        Err(e) => return fail(1, e),
    };
    match write(path, &render_users(&users)) {
        Ok(()) => {
            println!("{done}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, e),
    }
}

fn password(from_stdin: bool) -> Result<Secret, String> {
    if from_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| format!("reading the password: {e}"))?;
        return Ok(Secret::new(line.trim_end_matches(['\r', '\n'])));
    }
    if !std::io::stdin().is_terminal() {
        return Err("no terminal to ask the password on: give --password-stdin".into());
    }
    let first = rpassword::prompt_password("password: ").map_err(|e| e.to_string())?;
    let again = rpassword::prompt_password("again: ").map_err(|e| e.to_string())?;
    if first != again {
        return Err("the two passwords differ".into());
    }
    Ok(Secret::new(first.as_str()))
}

fn add(path: &Path, name: &str, from_stdin: bool) -> ExitCode {
    if name.is_empty() || name.contains([':', '-']) || name.chars().any(char::is_whitespace) {
        return fail(
            EXIT_CONFIG,
            format!(
                "account name {name:?}: no ':' (the file's separator), no '-' (routing hints \
                 follow it in usernames), no spaces"
            ),
        );
    }
    let pw = match password(from_stdin) {
        Ok(p) if p.expose().is_empty() => return fail(EXIT_CONFIG, "an empty password"),
        Ok(p) => p,
        Err(e) => return fail(EXIT_CONFIG, e),
    };
    let hash = hash_password(pw.expose());
    edit(path, |users| {
        let verb = if users.insert(name.to_owned(), hash).is_some() {
            "updated"
        } else {
            "added"
        };
        Ok(format!("{verb} {name}"))
    })
}

fn convert(path: &Path) -> ExitCode {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => return fail(1, format!("{}: {e}", path.display())),
    };
    let mut out = String::new();
    let mut converted = 0;
    for line in text.lines() {
        let t = line.trim();
        match t.split_once(':') {
            Some((name, pw))
                if !t.starts_with('#') && !name.is_empty() && !pw.starts_with("$argon2") =>
            {
                out.push_str(&format!("{name}:{}\n", hash_password(pw)));
                converted += 1;
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    if let Err(e) = parse_users(&out, &path.display().to_string()) {
        let e: UsersFileError = e;
        return fail(1, e);
    }
    match write(path, &out) {
        Ok(()) => {
            println!("converted {converted} plaintext passwords to argon2id hashes");
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, e),
    }
}
