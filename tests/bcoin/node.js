// One real bcoin full node (v1-only) on regtest, for tests/bcoin_sync.rs.
//
//   node node.js [--blocks=N] [--proxy=HOST:PORT --only=HOST:PORT]
//
// With --blocks it listens on 127.0.0.1 (a port the system picks) and mines
// N blocks; with --proxy and --only it connects only to that address, through
// that SOCKS5 proxy, and does not listen. Chain in memory, no workers, no
// HTTP server, no DNS, no UPnP, no outbound peers but --only: nothing leaves
// the machine.
//
// Machine-readable lines on stdout, one per event:
//   READY port=P height=H tip=HASH   (port 0 when not listening)
//   PEER addr=A outbound=B services=0xS version=V agent=X
//   TIP height=H hash=HASH           (every block connected after READY)
//   ERROR message=M
// The process runs until it is killed or its stdin closes.
'use strict';

process.env.NODE_BACKEND = 'js';

const bcoin = require('bcoin');

function option(name) {
  const prefix = `--${name}=`;
  const arg = process.argv.find(a => a.startsWith(prefix));
  return arg === undefined ? null : arg.slice(prefix.length);
}

function say(line) {
  process.stdout.write(line + '\n');
}

async function main() {
  const blocks = Number(option('blocks') || 0);
  const proxy = option('proxy');
  const only = option('only');
  const source = blocks > 0;

  const node = new bcoin.FullNode({
    network: 'regtest',
    memory: true,
    workers: false,
    logLevel: process.env.BCOIN_LOG_LEVEL || 'none',
    listen: source,
    host: '127.0.0.1',
    port: 48444,
    publicHost: '127.0.0.1',
    proxy: proxy || undefined,
    only: only ? [only] : undefined,
    maxOutbound: only ? 1 : 8,
    seeds: [],
    upnp: false
  });

  // The system picks the port (bcoin's options accept only 1..65535).
  node.pool.options.port = 0;
  // These would make DNS or UPnP queries; the chain stays on loopback.
  node.pool.discoverExternal = async () => {};
  node.pool.discoverGateway = async () => false;
  node.pool.discoverSeeds = async () => {};
  // Outbound peers only from --only (none without it), never from addresses
  // learned from peers.
  node.pool.getHost = function getHost() {
    return this.hosts.nodes.find(addr => !this.peers.has(addr.hostname)) || null;
  };
  // No HTTP server: the test reads this process's stdout instead.
  node.http.open = async () => {};
  node.http.close = async () => {};

  node.on('error', (err) => say(`ERROR message=${JSON.stringify(String(err.message))}`));

  node.pool.on('peer open', (peer) => {
    say(`PEER addr=${peer.hostname()} outbound=${peer.outbound} `
      + `services=0x${peer.services.toString(16)} version=${peer.version} `
      + `agent=${JSON.stringify(peer.agent)}`);
  });

  await node.open();

  if (source) {
    const key = bcoin.KeyRing.generate();
    const address = key.getAddress().toString('regtest');
    await node.rpc.execute({ method: 'generatetoaddress', params: [blocks, address] });
  }

  let ready = false;
  node.chain.on('connect', (entry) => {
    if (ready)
      say(`TIP height=${entry.height} hash=${entry.rhash()}`);
  });

  await node.connect();
  node.startSync();

  const server = node.pool.server;
  const port = source && server.address() ? server.address().port : 0;
  ready = true;
  say(`READY port=${port} height=${node.chain.height} tip=${node.chain.tip.rhash()}`);

  const stop = async () => {
    try {
      await node.close();
    } finally {
      process.exit(0);
    }
  };
  process.stdin.on('end', stop);
  process.stdin.resume();
  process.on('SIGTERM', stop);
}

main().catch((err) => {
  say(`ERROR message=${JSON.stringify(String(err.stack || err))}`);
  process.exit(1);
});
