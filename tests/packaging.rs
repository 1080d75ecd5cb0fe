//! The shipped packaging agrees with itself: the Docker image's user, its
//! environment and default configuration, the configurations used inside
//! containers, and the Debian package's layout against the systemd unit's
//! command line. scripts/container-check and scripts/deb-check run the real
//! thing; these catch drift between the files on every `cargo test`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use bip324_proxy::config::{Cli, Config};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn load(path: &Path) -> Config {
    let cli = Cli { config: Some(path.to_owned()), ..Cli::default() };
    Config::load(&cli).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Instructions of the Dockerfile's final stage, as (keyword, arguments).
fn runtime_stage() -> Vec<(String, String)> {
    let text = read("Dockerfile").replace("\\\n", " ");
    let stages: Vec<&str> = text.split("\nFROM ").collect();
    let last = stages.last().expect("a FROM line");
    last.lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.trim().split_once(' ').map(|(k, a)| (k.to_uppercase(), a.trim().to_owned())))
        .collect()
}

/// The address `bip324-proxy healthcheck` connects to for this listen address.
fn health_check_address(listen: SocketAddr) -> IpAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    }
}

#[test]
fn every_shipped_config_loads() {
    let mut seen = 0;
    for entry in std::fs::read_dir(repo("config")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            load(&path);
            seen += 1;
        }
    }
    assert!(seen >= 4, "config/*.toml: {seen} files");
}

/// A configuration that runs inside a container listens on all interfaces
/// and must allow the address the image's HEALTHCHECK connects from, or the
/// container never becomes healthy ("early eof").
#[test]
fn container_configs_allow_the_health_check() {
    for name in ["config/container.toml", "config/docker.toml"] {
        let config = load(&repo(name));
        let listen = config.tcp_listen().next().expect("a TCP listen address");
        assert!(listen.ip().is_unspecified(), "{name}: a container must listen on all interfaces");
        let from = health_check_address(listen);
        assert!(config.allow.iter().any(|net| net.contains(&from)), "{name}: {from} is not allowed");
    }
}

/// The image's default configuration is the file it copies, and nothing in
/// the image's environment overrides a key of a file mounted over it.
#[test]
fn image_environment_leaves_the_config_file_in_charge() {
    let stage = runtime_stage();
    let copied = stage
        .iter()
        .find(|(k, a)| k == "COPY" && a.starts_with("config/"))
        .map(|(_, a)| a.split_whitespace().collect::<Vec<_>>())
        .expect("the image copies a default configuration");
    let [source, destination] = copied.as_slice() else { panic!("COPY {copied:?}") };
    assert_eq!(*source, "config/container.toml");
    let env: Vec<&str> = stage.iter().filter(|(k, _)| k == "ENV").flat_map(|(_, a)| a.split_whitespace()).collect();
    let ours: Vec<&str> = env.iter().copied().filter(|kv| kv.starts_with("BIP324_PROXY_")).collect();
    assert_eq!(ours, vec![format!("BIP324_PROXY_CONFIG={destination}").as_str()]);
    let config = load(&repo(source));
    let listen = config.tcp_listen().next().expect("a TCP listen address");
    let exposed = stage.iter().find(|(k, _)| k == "EXPOSE").map(|(_, a)| a.as_str());
    assert_eq!(exposed, Some(listen.port().to_string().as_str()));
}

/// Kubernetes' runAsNonRoot can only verify a numeric user; the uid and gid
/// must be the ones the image creates.
#[test]
fn image_user_is_the_numeric_uid_and_gid_it_creates() {
    let stage = runtime_stage();
    let user = stage.iter().find(|(k, _)| k == "USER").map(|(_, a)| a.clone()).expect("a USER line");
    let (uid, gid) = user.split_once(':').expect("USER uid:gid");
    assert!(uid.parse::<u32>().is_ok_and(|u| u != 0) && gid.parse::<u32>().is_ok_and(|g| g != 0), "USER {user}");
    let run: String = stage.iter().filter(|(k, _)| k == "RUN").map(|(_, a)| a.as_str()).collect();
    assert!(run.contains(&format!("groupadd --system --gid {gid} ")), "{run}");
    assert!(run.contains(&format!("--uid {uid} --gid {gid} ")), "{run}");
}

/// The unit's ExecStart names the binary and configuration where the Debian
/// package puts them, and runs as a DynamicUser (the package creates none).
#[test]
fn debian_package_layout_matches_the_unit() {
    let manifest: toml::Table = toml::from_str(&read("Cargo.toml")).unwrap();
    let assets = manifest["package"]["metadata"]["deb"]["assets"].as_array().expect("deb assets");
    let destination_of = |source: &str| -> String {
        let asset = assets.iter().find(|a| a[0].as_str() == Some(source)).unwrap_or_else(|| panic!("{source}"));
        let dest = asset[1].as_str().unwrap();
        let file = Path::new(source).file_name().unwrap().to_str().unwrap();
        let full = if dest.ends_with('/') { format!("/{dest}{file}") } else { format!("/{dest}") };
        full.replace("//", "/")
    };
    let unit = read("config/bip324-proxy.service");
    let exec: Vec<&str> = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap().split(' ').collect();
    assert_eq!(
        exec,
        [
            destination_of("target/release/bip324-proxy").as_str(),
            "--config",
            &destination_of("config/bip324-proxy.toml")
        ]
    );
    assert!(unit.lines().any(|l| l == "DynamicUser=yes"));
}
