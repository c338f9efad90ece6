#![no_main]
//! The core's text parsers: upstream URLs, request-target authorities, hosts, routing usernames.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((pick, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match pick % 4 {
        0 => {
            if let Ok(u) = proxygate_core::Upstream::parse(text) {
                // What parses prints back to something that parses to the same upstream.
                let again = proxygate_core::Upstream::parse(&u.to_string());
                assert!(again.is_ok(), "{text:?} -> {u} does not parse again");
            }
        }
        1 => {
            let _ = proxygate_core::Target::parse_authority(text);
        }
        2 => {
            let _ = proxygate_core::Host::parse(text);
        }
        _ => {
            let _ = proxygate_core::Route::parse(text);
        }
    }
});
