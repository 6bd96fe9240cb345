//! A config file (`[profiles.NAME]`), then `-o key=value` overrides, one a
//! line, after a NUL byte; every profile is resolved and validated.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use noyau_config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (toml, overrides) = text.split_once('\0').unwrap_or((text, ""));
    let overrides: Vec<String> = overrides.lines().map(str::to_string).collect();
    for o in &overrides {
        let value = o.split_once('=').map_or(o.as_str(), |(_, v)| v);
        let _ = noyau_config::parse_time(value);
        let _ = noyau_config::parse_size(value);
    }
    let mut c = Config::default();
    if c.add_str(Path::new("fuzz.toml"), toml).is_err() {
        return;
    }
    let _ = c.profile(None, &overrides);
    for name in c.names() {
        if let Ok(p) = c.profile(Some(&name), &overrides) {
            let _ = p.time_secs();
        }
    }
});
