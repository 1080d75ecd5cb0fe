//! A client with no proxy option at all, carried through the proxy by
//! Debian's proxychains4 (LD_PRELOAD hooks connect() and speaks SOCKS5 to us).

mod common;

use std::process::Stdio;

use common::*;

/// A plain-socket v1 client: connect, send the VERSION it is given (hex),
/// print the command of the first message it gets back.
const CLIENT: &str = r#"
import socket, sys
host, port, version = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
s = socket.create_connection((host, port), timeout=15)
s.sendall(version)
header = b""
while len(header) < 24:
    chunk = s.recv(24 - len(header))
    if not chunk:
        sys.exit("closed")
    header += chunk
print(header[4:16].rstrip(b"\0").decode())
"#;

#[tokio::test]
async fn client_without_proxy_support_through_proxychains4() {
    let (proxychains4, python3) = (programs::installed("proxychains4"), programs::installed("python3"));
    let node = spawn_v2_node(V2NodeOptions::default()).await;
    let proxy = spawn_proxy(&[]).await;
    let conf = std::env::temp_dir().join(format!("bip324-proxy-proxychains-{}.conf", std::process::id()));
    std::fs::write(
        &conf,
        format!(
            "strict_chain\nquiet_mode\ntcp_read_time_out 15000\ntcp_connect_time_out 8000\n[ProxyList]\nsocks5 127.0.0.1 {}\n",
            proxy.addr.port()
        ),
    )
    .unwrap();
    let version = hex::encode(version_message(REGTEST, node.addr));
    let output = tokio::process::Command::new(proxychains4)
        .args(["-q", "-f", conf.to_str().unwrap()])
        .arg(python3)
        .args(["-c", CLIENT])
        .args([node.addr.ip().to_string(), node.addr.port().to_string(), version])
        .stdin(Stdio::null())
        .output();
    let output = tokio::time::timeout(WAIT, output).await.expect("client finishes").expect("proxychains4 runs");
    let _ = std::fs::remove_file(conf);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "stdout: {stdout}\nstderr: {}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(stdout.trim(), "version");
    // It went through the proxy and was carried over BIP324.
    assert_eq!(node.log.session_ids.lock().unwrap().len(), 1);
}
