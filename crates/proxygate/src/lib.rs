//! The library half of the `proxygate` binary: the root configuration, which the command
//! line and the config-loader fuzz target (`crates/fuzz`) share.

pub mod config;

#[doc(hidden)]
pub mod fuzz {
    //! Entry point of the config-loader fuzz target, not an API.

    /// Parses TOML text as a config file and runs the semantic checks on whatever parsed,
    /// with the upstream files it may name left out (a fuzz input must not read the disk).
    pub fn config(data: &[u8]) {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let (mut cfg, _problems) = crate::config::RootConfig::parse(text);
        cfg.upstreams.files.clear();
        let _ = cfg.validate();
    }
}
