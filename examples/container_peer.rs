//! Both ends of one v2 session through a bip324-proxy that runs somewhere
//! else (a container): a BIP324 responder built on the `bip324` crate listens
//! on `--bind`, and a v1 client asks the proxy at `--proxy` (SOCKS5) to
//! CONNECT to it, sends VERSION and waits for it to come back. The responder
//! completes the handshake as responder and echoes the packet's contents.
//! Exit 0 when the echoed VERSION arrived, non-zero with the reason
//! otherwise. `scripts/container-check` runs it against the Docker image.
//!
//! Run: `cargo run --example container_peer -- --bind 172.17.0.1 --proxy 127.0.0.1:1324`

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bip324::Role;
use bip324::futures::Protocol;
use bip324::io::Payload;
use bitcoin::consensus::encode;
use bitcoin::p2p::message::{NetworkMessage, RawNetworkMessage};
use bitcoin::p2p::message_network::VersionMessage;
use bitcoin::p2p::{Address, Magic, ServiceFlags};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Upper bound for the whole exchange.
const DEADLINE: Duration = Duration::from_secs(30);

/// One v1 client -> proxy -> BIP324 responder session, checked end to end.
#[derive(Debug, Parser)]
struct Args {
    /// Address the responder listens on (port chosen by the system); the
    /// proxy must be able to reach it, e.g. the Docker bridge's gateway.
    #[arg(long)]
    bind: IpAddr,
    /// The proxy's SOCKS5 address.
    #[arg(long)]
    proxy: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(SocketAddr::new(args.bind, 0)).await.context("binding the responder")?;
    let node = listener.local_addr()?;
    eprintln!("responder listening on {node}");
    let exchange = async {
        let (echoed, responded) = tokio::join!(client(args.proxy, node), respond(listener));
        responded.context("responder")?;
        echoed.context("client")
    };
    let message = tokio::time::timeout(DEADLINE, exchange).await.context("no echo within 30 s")??;
    println!("v2 session through {}: {} bytes echoed", args.proxy, message.len());
    Ok(())
}

/// Accepts one connection, completes the BIP324 handshake as responder and
/// echoes the first genuine packet.
async fn respond(listener: TcpListener) -> anyhow::Result<()> {
    let (stream, from) = listener.accept().await?;
    eprintln!("responder: connection from {from}");
    let (reader, writer) = stream.into_split();
    let mut protocol =
        Protocol::new(Magic::REGTEST.to_bytes(), Role::Responder, None, None, BufReader::new(reader), writer)
            .await
            .context("BIP324 handshake")?;
    eprintln!("responder: BIP324 handshake complete");
    loop {
        let packet = protocol.read().await.context("reading a packet")?;
        if packet.packet_type() == bip324::PacketType::Genuine {
            protocol.write(&Payload::genuine(packet.contents().to_vec())).await.context("echoing")?;
            return Ok(());
        }
    }
}

/// SOCKS5 CONNECT to `node` through `proxy`, VERSION out, the echo back.
async fn client(proxy: SocketAddr, node: SocketAddr) -> anyhow::Result<Vec<u8>> {
    let IpAddr::V4(ip) = node.ip() else { bail!("an IPv4 responder address is expected") };
    let mut stream = TcpStream::connect(proxy).await.context("connecting to the proxy")?;
    stream.write_all(&[0x05, 0x01, 0x00]).await?;
    let mut choice = [0u8; 2];
    stream.read_exact(&mut choice).await.context("reading the method choice")?;
    ensure!(choice == [0x05, 0x00], "the proxy chose {choice:02x?}");
    let mut request = vec![0x05, 0x01, 0x00, 0x01];
    request.extend_from_slice(&ip.octets());
    request.extend_from_slice(&node.port().to_be_bytes());
    stream.write_all(&request).await?;
    let mut reply = [0u8; 4];
    stream.read_exact(&mut reply).await.context("reading the CONNECT reply")?;
    ensure!(reply[1] == 0x00, "the proxy refused the CONNECT with reply {:#04x}", reply[1]);
    // The bound address and port (RFC 1928 section 6), unused.
    let bound_len = match reply[3] {
        0x01 => 4 + 2,
        0x04 => 16 + 2,
        other => bail!("unexpected address type {other:#04x} in the CONNECT reply"),
    };
    let mut bound = [0u8; 18];
    stream.read_exact(&mut bound[..bound_len]).await.context("reading the bound address")?;

    let version = VersionMessage::new(
        ServiceFlags::NONE,
        1_700_000_000,
        Address::new(&node, ServiceFlags::NONE),
        Address::new(&SocketAddr::from(([0, 0, 0, 0], 0)), ServiceFlags::NONE),
        rand::random(),
        "/container-check:0.1/".to_owned(),
        0,
    );
    let sent = encode::serialize(&RawNetworkMessage::new(Magic::REGTEST, NetworkMessage::Version(version)));
    stream.write_all(&sent).await?;
    let mut echoed = vec![0u8; sent.len()];
    stream.read_exact(&mut echoed).await.context("reading the echoed VERSION")?;
    ensure!(echoed == sent, "the echoed VERSION differs from the one sent");
    Ok(echoed)
}
