//! The config loader: any file text gives settings or a list of problems, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = tokengate::config::parse(text, &[], std::path::Path::new("/nonexistent"));
});
