//! Every number, boolean and name that configuration can carry: each either
//! loads into a value the proxy can run with or is refused with an error that
//! names the key, and no error echoes a credential.

mod common;

use std::time::{Duration, Instant};

use bip324_proxy::config::{Cli, Config, ConfigError};
use clap::Parser;
use common::*;
use proptest::prelude::*;

/// Loads `toml` (written to a temporary file) with these flags.
fn load(toml: &str, args: &[&str]) -> Result<Config, ConfigError> {
    let path =
        std::env::temp_dir().join(format!("bip324-proxy-bounds-{}-{}.toml", std::process::id(), rand::random::<u64>()));
    std::fs::write(&path, toml).unwrap();
    let mut all = vec!["bip324-proxy", "--config", path.to_str().unwrap()];
    all.extend_from_slice(args);
    let result = Cli::try_parse_from(all).map_err(|e| ConfigError(e.to_string())).and_then(|cli| Config::load(&cli));
    let _ = std::fs::remove_file(&path);
    result
}

/// Every numeric key: how to set it in TOML, its flag if any, and the range
/// the README documents (inclusive).
const NUMERIC_KEYS: &[(&str, &str, Option<&str>, u64, u64)] = &[
    ("max_sessions", "max_sessions = {}", Some("--max-sessions"), 1, 100_000),
    // Without max_sessions, up to the largest max_sessions (capped at the one chosen at startup).
    ("max_sessions_per_client", "max_sessions_per_client = {}", Some("--max-sessions-per-client"), 1, 100_000),
    ("timeouts.socks", "[timeouts]\nsocks = {}", None, 1, 3600),
    ("timeouts.connect", "[timeouts]\nconnect = {}", Some("--connect-timeout"), 1, 3600),
    ("timeouts.first_message", "[timeouts]\nfirst_message = {}", None, 1, 3600),
    ("timeouts.handshake", "[timeouts]\nhandshake = {}", Some("--handshake-timeout"), 1, 3600),
    ("timeouts.idle", "[timeouts]\nidle = {}", Some("--idle-timeout"), 0, 604_800),
    ("timeouts.write_stall", "[timeouts]\nwrite_stall = {}", None, 1, 3600),
    ("timeouts.shutdown", "[timeouts]\nshutdown = {}", None, 1, 3600),
    ("large_message_budget", "large_message_budget = {}", Some("--large-message-budget"), 8 << 20, 256 << 30),
    ("v1_only_memory.capacity", "[v1_only_memory]\ncapacity = {}", None, 0, 100_000),
    ("v1_only_memory.ttl", "[v1_only_memory]\nttl = {}", None, 1, 2_592_000),
    ("metrics.max_connections", "[metrics]\nmax_connections = {}", None, 1, 1024),
    ("metrics.request_timeout", "[metrics]\nrequest_timeout = {}", None, 1, 600),
    ("shaping.padding_cap", "[shaping]\npadding = \"pow2\"\npadding_cap = {}", None, 4096, 1 << 20),
    ("shaping.padding_budget", "[shaping]\npadding = \"pow2\"\npadding_budget = {}", None, 1024, 1 << 40),
    ("shaping.garbage_max", "[shaping]\ngarbage_max = {}", None, 0, 4095),
    ("shaping.handshake_decoys", "[shaping]\nhandshake_decoys = {}", None, 0, 16),
    ("shaping.handshake_decoy_max", "[shaping]\nhandshake_decoy_max = {}", None, 0, 16_384),
    ("shaping.cover_interval_ms", "[shaping]\ncover = \"constant\"\ncover_interval_ms = {}", None, 10, 3_600_000),
    ("shaping.cover_size_max", "[shaping]\ncover = \"constant\"\ncover_size_max = {}", None, 0, 16_384),
    ("shaping.cover_budget_per_hour", "[shaping]\ncover = \"poisson\"\ncover_budget_per_hour = {}", None, 0, 1 << 40),
    (
        "shaping.cover_global_budget_per_hour",
        "[shaping]\ncover = \"poisson\"\ncover_global_budget_per_hour = {}",
        None,
        0,
        1 << 40,
    ),
    ("shaping.smoothing_rate", "[shaping]\nsmoothing_rate = {}", None, 0, 1 << 30),
    ("shaping.smoothing_burst", "[shaping]\nsmoothing_rate = 1000000\nsmoothing_burst = {}", None, 4096, 16 << 20),
];

/// The value a loaded config holds for `key`.
fn value_of(config: &Config, key: &str) -> u64 {
    let t = &config.timeouts;
    match key {
        "max_sessions" => config.max_sessions as u64,
        "max_sessions_per_client" => config.max_sessions_per_client as u64,
        "timeouts.socks" => t.socks.as_secs(),
        "timeouts.connect" => t.connect.as_secs(),
        "timeouts.first_message" => t.first_message.as_secs(),
        "timeouts.handshake" => t.handshake.as_secs(),
        "timeouts.idle" => t.idle.map_or(0, |d| d.as_secs()),
        "timeouts.write_stall" => t.write_stall.as_secs(),
        "timeouts.shutdown" => t.shutdown.as_secs(),
        "large_message_budget" => config.large_message_budget,
        "v1_only_memory.capacity" => config.v1_only_memory.0 as u64,
        "v1_only_memory.ttl" => config.v1_only_memory.1.as_secs(),
        "metrics.max_connections" => config.metrics_max_connections as u64,
        "metrics.request_timeout" => config.metrics_request_timeout.as_secs(),
        "shaping.padding_cap" => config.shaping.padding.map_or(65536, |p| p.cap as u64),
        "shaping.padding_budget" => config.shaping.padding.map_or(64 << 20, |p| p.budget),
        "shaping.garbage_max" => *config.shaping.handshake.garbage.end() as u64,
        "shaping.handshake_decoys" => config.shaping.handshake.decoys as u64,
        "shaping.handshake_decoy_max" => *config.shaping.handshake.decoy_contents.end() as u64,
        "shaping.cover_interval_ms" => config.shaping.cover.as_ref().map_or(0, |c| c.interval.as_millis() as u64),
        "shaping.cover_size_max" => config.shaping.cover.as_ref().map_or(0, |c| *c.contents.end() as u64),
        "shaping.cover_budget_per_hour" => config.shaping.cover.as_ref().map_or(0, |c| c.budget_per_hour),
        "shaping.cover_global_budget_per_hour" => config.shaping.cover.as_ref().map_or(0, |c| c.global_budget_per_hour),
        "shaping.smoothing_rate" => config.shaping.smoothing.map_or(0, |p| p.rate),
        "shaping.smoothing_burst" => config.shaping.smoothing.map_or(0, |p| p.burst),
        other => panic!("unknown key {other}"),
    }
}

/// Ok with the value in its documented range and every duration usable as a
/// deadline, or an error naming the key.
fn check(key: &str, value: u64, result: Result<Config, ConfigError>) {
    let (_, _, _, min, max) = NUMERIC_KEYS.iter().find(|k| k.0 == key).unwrap();
    match result {
        Ok(config) => {
            let held = value_of(&config, key);
            assert_eq!(held, value, "{key}");
            assert!((*min..=*max).contains(&held), "{key} = {value} accepted outside {min}..={max}");
            let t = &config.timeouts;
            for d in [
                t.socks,
                t.connect,
                t.first_message,
                t.handshake,
                t.write_stall,
                t.shutdown,
                t.idle.unwrap_or_default(),
            ] {
                assert!(Instant::now().checked_add(d * 4).is_some(), "{key} = {value}: {d:?} overflows a deadline");
            }
            assert!(config.max_sessions <= tokio::sync::Semaphore::MAX_PERMITS);
            assert!(config.max_sessions_per_client <= config.max_sessions);
        }
        Err(e) => {
            let key_text = key.rsplit('.').next().unwrap();
            assert!(e.0.contains(key_text), "{key} = {value}: error does not name the key: {e}");
            // Only an idle timeout below Core's own has a reason of its own.
            let in_range = (*min..=*max).contains(&value) && !(key == "timeouts.idle" && value > 0 && value < 1200);
            assert!(!in_range, "{key} = {value} is documented as valid but refused: {e}");
        }
    }
}

fn any_value() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..5, 0u64..=2_000_000, Just(u64::MAX), Just(u64::MAX / 2), any::<u64>(), Just(1u64 << 53)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_numeric_key_loads_sane_or_names_itself(index in 0..NUMERIC_KEYS.len(), value in any_value()) {
        let (key, toml, flag, _, _) = NUMERIC_KEYS[index];
        // TOML integers are signed 64-bit: larger values must be refused too.
        check_toml(key, toml, value);
        if let Some(flag) = flag {
            check(key, value, load("", &[flag, &value.to_string()]));
        }
    }
}

fn check_toml(key: &str, toml: &str, value: u64) {
    let text = toml.replace("{}", &value.to_string());
    let result = load(&text, &[]);
    if value > i64::MAX as u64 {
        let e = result.expect_err("beyond TOML's integer range");
        assert!(e.0.contains(key.rsplit('.').next().unwrap()) || e.0.contains("line"), "{e}");
    } else {
        check(key, value, result);
    }
}

#[test]
fn documented_range_ends_load_and_one_past_them_names_the_key() {
    for (key, toml, _, min, max) in NUMERIC_KEYS {
        for value in [*min, *max] {
            let value = if *key == "timeouts.idle" && value == 0 { 0 } else { value };
            check(key, value, load(&toml.replace("{}", &value.to_string()), &[]));
            assert!(load(&toml.replace("{}", &value.to_string()), &[]).is_ok(), "{key} = {value}");
        }
        let err = load(&toml.replace("{}", &(max + 1).to_string()), &[]).unwrap_err();
        assert!(err.0.contains(key), "{key}: {err}");
        if *min > 0 {
            let err = load(&toml.replace("{}", &(min - 1).to_string()), &[]).unwrap_err();
            assert!(err.0.contains(key), "{key}: {err}");
        }
    }
}

#[test]
fn huge_timeouts_and_session_limits_are_refused_before_listening() {
    for (args, key) in [
        (vec!["--connect-timeout", "18446744073709551615"], "timeouts.connect"),
        (vec!["--handshake-timeout", "18446744073709551000"], "timeouts.handshake"),
        (vec!["--idle-timeout", "18446744073709551615"], "timeouts.idle"),
        (vec!["--max-sessions", "2305843009213693952"], "max_sessions"),
    ] {
        let err = load("", &args).unwrap_err();
        assert!(err.0.contains(key), "{args:?}: {err}");
    }
    let err = load("[timeouts]\nsocks = 9223372036854775807\n", &[]).unwrap_err();
    assert!(err.0.contains("timeouts.socks"), "{err}");
}

#[test]
fn custom_network_names_are_short_lowercase_words() {
    for name in [
        "\"\"",
        "\"my net\"",
        "\"tab\\there\"",
        "\"bell\\u0007\"",
        "\"Upper\"",
        "\"é\"",
        &format!("\"{}\"", "a".repeat(33)),
    ] {
        let err = load(&format!("[custom_networks]\n{name} = \"a1b2c3d4\"\n"), &[]).unwrap_err();
        assert!(err.0.contains("custom_networks"), "{name}: {err}");
        assert!(!err.0.chars().any(|c| c.is_control()), "{name}: control characters echoed: {err:?}");
    }
    for name in ["mysignet", "signet-2", "a_b", &"a".repeat(32), "0"] {
        let config = load(&format!("[custom_networks]\n\"{name}\" = \"a1b2c3d4\"\n"), &[]).unwrap();
        assert!(config.known_networks.iter().any(|n| n.name == name), "{name}");
    }
}

#[test]
fn allow_list_admitting_every_address_is_no_restriction() {
    let public = ["--listen", "0.0.0.0:1324"];
    for allow in [
        "allow = [\"0.0.0.0/0\"]",
        "allow = [\"::/0\"]",
        "allow = [\"0.0.0.0/1\", \"128.0.0.0/1\"]",
        "allow = [\"10.0.0.0/8\", \"0.0.0.0/0\"]",
        "allow = [\"::/1\", \"8000::/1\"]",
        "allow = [\"0.0.0.0/2\", \"64.0.0.0/2\", \"128.0.0.0/2\", \"192.0.0.0/2\"]",
    ] {
        let err = load(allow, &public).unwrap_err();
        assert!(err.0.contains("allow"), "{allow}: {err}");
        // Client authentication is a real restriction, for SOCKS5 only:
        // transparent mode (on by default) cannot ask for credentials.
        let with_auth = format!("{allow}\n[client_auth]\nusername = \"u\"\npassword = \"p\"\n");
        let err = load(&with_auth, &public).unwrap_err();
        assert!(err.0.contains("transparent = false"), "{allow}: {err}");
        let with_auth = format!("transparent = false\n{with_auth}");
        assert!(load(&with_auth, &public).is_ok(), "{allow} with client_auth");
        // The metrics listener has no authentication: refused either way.
        let err = load(&with_auth, &["--metrics-listen", "0.0.0.0:9324"]).unwrap_err();
        assert!(err.0.contains("metrics.listen"), "{allow}: {err}");
        // On loopback an allow-list is not required, so it is not checked.
        assert!(load(allow, &[]).is_ok(), "{allow} on loopback");
    }
    assert!(load("allow = [\"0.0.0.0/1\", \"::/0\"]\n", &public).is_err());
    assert!(load("allow = [\"0.0.0.0/1\", \"10.0.0.0/8\"]\n", &public).is_ok());
}

#[test]
fn config_errors_never_echo_credentials() {
    let secret = "hunter2secret";
    let cases: Vec<(String, Vec<String>)> = vec![
        (String::new(), vec!["--upstream".into(), format!("user:{secret}@127.0.0.1:9050")]),
        (String::new(), vec!["--upstream".into(), format!("user:{secret}@127.0.0.1")]),
        (String::new(), vec!["--upstream".into(), format!("{secret}@127.0.0.1:9050")]),
        (String::new(), vec!["--upstream".into(), format!("socks5://u:{secret}@tor:9050")]),
        (format!("[upstream]\nsocks5 = \"u:{secret}@tor:9050\"\n"), vec![]),
        (format!("[[route]]\nlisten = \"127.0.0.1:0\"\ntarget = \"u:{secret}@node:8333\"\n"), vec![]),
        (format!("[[route]]\nlisten = \"u:{secret}@127.0.0.1:0\"\ntarget = \"node:8333\"\n"), vec![]),
        (String::new(), vec!["--listen".into(), format!("u:{secret}@127.0.0.1:1")]),
        (String::new(), vec!["--metrics-listen".into(), format!("u:{secret}@127.0.0.1:1")]),
        // TOML syntax and type errors on credential lines.
        (format!("[client_auth]\nusername = \"u\"\npassword = \"{secret}\n"), vec![]),
        (format!("[client_auth]\nusername = \"u\"\npassword = {secret}\n"), vec![]),
        ("[client_auth]\nusername = \"u\"\npassword = 98765432123\n".into(), vec![]),
        (
            format!(
                "[upstream]\nsocks5 = \"tor:9050\"\nisolation = \"fixed\"\nusername = \"u\"\npassword = '{secret}\n"
            ),
            vec![],
        ),
        (format!("[client_auth]\nusername = \"{secret}\"\n"), vec![]),
    ];
    for (toml, args) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = load(&toml, &args).expect_err(&format!("{toml:?} {args:?} must be refused"));
        assert!(!err.0.contains(secret) && !err.0.contains("98765432123"), "credential echoed: {err}");
    }
}

#[test]
fn static_route_or_upstream_pointing_at_our_own_listener_is_refused() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let any = format!("0.0.0.0:{port}");
    let allow = "allow = [\"127.0.0.0/8\"]\n";
    for (toml, args, key) in [
        (
            format!("[[route]]\nlisten = \"127.0.0.1:0\"\ntarget = \"127.0.0.1:{port}\"\n"),
            vec!["--listen", &listen],
            "route[0].target",
        ),
        (
            format!("{allow}[[route]]\nlisten = \"127.0.0.1:0\"\ntarget = \"127.0.0.1:{port}\"\n"),
            vec!["--listen", &any],
            "route[0].target",
        ),
        (
            format!("{allow}[[route]]\nlisten = \"127.0.0.1:0\"\ntarget = \"localhost:{port}\"\n"),
            vec!["--listen", &any],
            "route[0].target",
        ),
        (
            format!("[[route]]\nlisten = \"127.0.0.1:{port}\"\ntarget = \"127.0.0.1:{port}\"\n"),
            vec![],
            "route[0].target",
        ),
        (
            format!("[[route]]\nlisten = \"127.0.0.1:0\"\ntarget = \"[::ffff:127.0.0.1]:{port}\"\n"),
            vec!["--listen", &listen],
            "route[0].target",
        ),
        (format!("[upstream]\nsocks5 = \"127.0.0.1:{port}\"\n"), vec!["--listen", &listen], "upstream.socks5"),
        (format!("[upstream]\nsocks5 = \"localhost:{port}\"\n"), vec!["--listen", &listen], "upstream.socks5"),
        (format!("{allow}[upstream]\nsocks5 = \"127.0.0.1:{port}\"\n"), vec!["--listen", &any], "upstream.socks5"),
        (format!("[upstream]\nsocks5 = \"127.0.0.1:{port}\"\n"), vec!["--metrics-listen", &listen], "upstream.socks5"),
        (
            format!("[[route]]\nlisten = \"127.0.0.1:0\"\ntarget = \"127.0.0.1:{port}\"\n"),
            vec!["--metrics-listen", &listen],
            "route[0].target",
        ),
        (
            format!("transparent_listen = \"127.0.0.1:{port}\"\n[upstream]\nsocks5 = \"127.0.0.1:{port}\"\n"),
            vec![],
            "upstream.socks5",
        ),
    ] {
        let err = load(&toml, &args).expect_err(&format!("{toml:?} {args:?}"));
        assert!(err.0.contains(key), "{toml:?} {args:?}: {err}");
    }
    // [::] takes IPv4 connections as well (dual stack).
    let err = load(
        &format!("[upstream]\nsocks5 = \"127.0.0.1:{port}\"\n"),
        &["--listen", &format!("[::]:{port}"), "--allow", "::1"],
    )
    .unwrap_err();
    assert!(err.0.contains("upstream.socks5"), "{err}");
    // Another port, or another loopback address on the same port, is someone else.
    assert!(load(&format!("[upstream]\nsocks5 = \"127.0.0.1:{}\"\n", port ^ 1), &["--listen", &listen]).is_ok());
    assert!(load(&format!("[upstream]\nsocks5 = \"127.0.0.2:{port}\"\n"), &["--listen", &listen]).is_ok());
    // Through the upstream, a route target is the upstream's to reach, not ours.
    let via_upstream = format!(
        "[upstream]\nsocks5 = \"127.0.0.1:9050\"\n[[route]]\nlisten = \"127.0.0.1:0\"\ntarget = \"127.0.0.1:{port}\"\n"
    );
    assert!(load(&via_upstream, &["--listen", &listen]).is_ok());
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn boolean_environment_variables_take_the_usual_spellings() {
    for (value, expected) in [
        ("1", true),
        ("true", true),
        ("TRUE", true),
        ("yes", true),
        ("Yes", true),
        ("on", true),
        ("ON", true),
        ("0", false),
        ("false", false),
        ("False", false),
        ("no", false),
        ("NO", false),
        ("off", false),
        ("Off", false),
    ] {
        for variable in ["BIP324_PROXY_PASSTHROUGH", "BIP324_PROXY_ALLOW_PRIVATE_TARGETS"] {
            let field = if variable.ends_with("PASSTHROUGH") { "passthrough" } else { "allow_private_targets" };
            let mut proxy = start_binary(&[], "info", &[(variable, value)]);
            let line = proxy.wait_for(&["listening"]).await;
            assert!(line.contains(&format!("{field}={expected}")), "{variable}={value}: {line}");
        }
    }
    for value in ["maybe", "2", "y e s", "truee"] {
        for variable in ["BIP324_PROXY_PASSTHROUGH", "BIP324_PROXY_ALLOW_PRIVATE_TARGETS"] {
            let (status, log) = run_binary_env(&["--listen", "127.0.0.1:0"], &[(variable, value)]).await;
            assert!(!status.success(), "{variable}={value} accepted");
            assert!(log.contains(variable), "{variable}={value}: {log}");
            assert!(log.contains("yes/no") && log.contains("on/off") && log.contains("1/0"), "{log}");
        }
    }
    // The flags take the same words.
    let mut proxy = start_binary(&["--allow-private-targets=no", "--passthrough", "off"], "info", &[]);
    let line = proxy.wait_for(&["listening"]).await;
    assert!(line.contains("allow_private_targets=false") && line.contains("passthrough=false"), "{line}");
    let mut proxy = start_binary(&["--allow-private-targets"], "info", &[]);
    let line = proxy.wait_for(&["listening"]).await;
    assert!(line.contains("allow_private_targets=true"), "{line}");
}

#[test]
fn durations_in_range_never_overflow_a_deadline() {
    // The largest of every range, added to now, as the session and listener code do.
    let config = load(
        "[timeouts]\nsocks = 3600\nconnect = 3600\nfirst_message = 3600\nhandshake = 3600\nidle = 604800\nwrite_stall = 3600\n\
         shutdown = 3600\n",
        &[],
    )
    .unwrap();
    let t = &config.timeouts;
    assert!(Instant::now().checked_add(t.idle.unwrap() + Duration::from_secs(3600 * 5)).is_some());
    assert!(Instant::now().checked_add(t.write_stall * 4).is_some());
}
