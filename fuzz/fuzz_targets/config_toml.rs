//! Fuzzes the configuration file parser: `config::parse_file` on arbitrary text (inputs that
//! are not UTF-8 are read lossily, as a file with stray bytes would be after `from_utf8_lossy`),
//! and `network::parse_magic` on the same text, which the config uses for custom networks.
//!
//! A file that parses is also validated the way the binary does it, through `Config::load` with
//! no flags (`from_parts` is private, so the text goes through a scratch file in /dev/shm).
//!
//! Invariants: no panic; errors are one non-empty message without trailing whitespace; a loaded
//! config allows at least one network, has at least one session, an idle timeout that is off or
//! at least Core's 20 minutes, something to serve, and never listens beyond loopback without a
//! client restriction its front end can enforce (`policy::admits`; the status page: without an
//! allow-list);
//! a parsed magic is exactly 4 bytes that print back as the hex given.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use bip324_proxy::config::{self, Cli, Config};
use bip324_proxy::{network, policy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let text = String::from_utf8_lossy(input);
    match config::parse_file(&text) {
        Ok(file) => {
            // Debug formats every field; nothing in a parsed file is left unformattable.
            let _ = format!("{file:?}");
            load(&text);
        }
        Err(error) => check_message(&error.0),
    }

    if let Some(magic) = network::parse_magic(&text) {
        let digits = text.trim_start_matches("0x");
        assert_eq!(digits.len(), 8, "{text:?}");
        assert!(digits.eq_ignore_ascii_case(&magic.iter().map(|b| format!("{b:02x}")).collect::<String>()));
    }
});

fn check_message(message: &str) {
    assert!(!message.is_empty());
    assert_eq!(message.trim_end(), message);
}

/// Validates `text` as the binary would with `--config FILE` and no other flag.
fn load(text: &str) {
    std::fs::write(scratch_path(), text).expect("writing the scratch config");
    let cli = Cli { config: Some(scratch_path().clone()), ..Cli::default() };
    let loaded = Config::load(&cli);
    // Removed at once, so a run leaves nothing behind.
    std::fs::remove_file(scratch_path()).expect("removing the scratch config");
    match loaded {
        Ok(config) => {
            assert!(config.networks.iter().next().is_some(), "no network allowed");
            for network in config.networks.iter() {
                assert_eq!(config.known_networks.by_magic(&network.magic), Some(network));
            }
            assert!(config.max_sessions >= 1);
            assert!(config.timeouts.idle.is_none_or(|idle| idle >= Duration::from_secs(config::MIN_IDLE_TIMEOUT_SECS)));
            // Nothing listens beyond loopback without a client restriction its front end can
            // enforce (credentials protect SOCKS5 only), the status page not without an
            // allow-list; and there is something to serve.
            for (key, addr, front) in config.listener_fronts() {
                let protected = policy::admits(front, false, config.client_restrictions());
                assert!(addr.ip().is_loopback() || protected, "{key} = {addr} ({front:?})");
            }
            if let Some(addr) = config.metrics_listen {
                assert!(addr.ip().is_loopback() || !config.allow.is_empty(), "metrics.listen = {addr}");
            }
            assert!(!config.proxy_listen_addresses().is_empty(), "nothing to serve");
            if let Some(auth) = &config.client_auth {
                assert!((1..=255).contains(&auth.username.len()) && auth.password.len() <= 255);
            }
        }
        Err(error) => check_message(&error.0),
    }
}

/// One scratch file per fuzzing process (libFuzzer's -fork and -jobs run several).
fn scratch_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir =
            if std::path::Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        dir.join(format!("bip324-proxy-fuzz-config-{}.toml", std::process::id()))
    })
}
