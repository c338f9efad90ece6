#![no_main]
//! A judge's answer page, read and classified as the checker does.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(view) = proxygate_sources::judge::read(text) {
        let ours = [std::net::IpAddr::from([127, 0, 0, 1])];
        let _ = proxygate_sources::judge::classify(&view, &ours, &[]);
    }
});
