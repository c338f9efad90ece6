//! Configuration plumbing every crate shares. Each crate owns its section of the root config
//! file (a `Config` struct next to its code, `#[serde(default, deny_unknown_fields)]`, with a
//! `validate()`); what they share is here:
//!
//! - [`Problem`]: one problem, as the key's full path (`pool.reputation.base`,
//!   `sources[2].url`) and what is wrong with it.
//! - [`ConfigErrors`]: every problem of one file, printed `file: key: reason` per line.
//! - [`section`]: deserializes one TOML value, naming the failing key in full (the path comes
//!   from the deserializer, through `serde_path_to_error`, never from an error message).

use std::fmt;

use serde::de::DeserializeOwned;

/// One configuration problem: the key's path and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub reason: String,
}

impl Problem {
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// "must be longer than 0", the check every duration key shares.
    pub fn check_nonzero(key: &str, d: std::time::Duration, into: &mut Vec<Problem>) {
        if d.is_zero() {
            into.push(Problem::new(key, "must be longer than 0"));
        }
    }
}

/// Every problem found in one configuration source, ready to print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    /// The file (or `(defaults)`, `(command line)`).
    pub source: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {}: {}", self.source, p.key, p.reason)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Deserializes `value` (the value of key `name` in the root table) as `T`. A failure names
/// the failing key by its full path from the root, e.g. `pool.reputation.base` or
/// `sources[1].kind`.
pub fn section<T: DeserializeOwned>(value: &toml::Value, name: &str) -> Result<T, Problem> {
    serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let inner = e.path().to_string();
        let key = match inner.as_str() {
            "." | "" => name.to_owned(),
            path if path.starts_with('[') => format!("{name}{path}"),
            path => format!("{name}.{path}"),
        };
        Problem::new(key, e.into_inner().message().trim().replace('\n', " "))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Inner {
        base: f64,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Outer {
        max: u32,
        inner: Inner,
    }

    fn key_of<T: DeserializeOwned + std::fmt::Debug>(text: &str, name: &str) -> String {
        let table: toml::Table = text.parse().unwrap();
        section::<T>(&table[name], name).unwrap_err().key
    }

    #[test]
    fn names_the_failing_key_in_full() {
        assert_eq!(key_of::<Outer>("[s]\nmax = \"x\"", "s"), "s.max");
        assert_eq!(key_of::<Outer>("[s]\nbogus = 1", "s"), "s.bogus");
        assert_eq!(
            key_of::<Outer>("[s.inner]\nbase = \"x\"", "s"),
            "s.inner.base"
        );
        assert_eq!(key_of::<Outer>("[s.inner]\nfoo = 1", "s"), "s.inner.foo");
        assert_eq!(
            key_of::<Vec<Outer>>("[[s]]\nmax = 1\n[[s]]\nmaxx = 2", "s"),
            "s[1].maxx"
        );
        assert_eq!(key_of::<Outer>("s = 3", "s"), "s");
    }

    #[test]
    fn prints_one_line_per_problem() {
        let e = ConfigErrors {
            source: "f.toml".into(),
            problems: vec![Problem::new("a.b", "bad"), Problem::new("c", "worse")],
        };
        assert_eq!(e.to_string(), "f.toml: a.b: bad\nf.toml: c: worse");
    }
}
