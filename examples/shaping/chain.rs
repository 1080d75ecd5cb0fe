//! The replayed session's material, made here with the `bitcoin` crate from
//! a seed: a regtest chain with transactions between its blocks, and the
//! schedule a relaying node follows (transactions arriving, inv trickles,
//! block arrivals, pings) in compressed time.
//!
//! Transactions are well-formed segwit spends of earlier outputs (P2WPKH
//! inputs with signature-sized witnesses; nobody checks the signatures),
//! 1 to 3 inputs and 1 to 8 outputs, about 190 to 600 bytes. Blocks take the
//! oldest unconfirmed transactions up to `max_block_bytes`, have a BIP34
//! coinbase with a witness commitment, and meet regtest's proof of work
//! (nBits 0x207fffff: about every second nonce does).

use std::collections::HashMap;
use std::time::Duration;

use bitcoin::block::{Header, Version};
use bitcoin::consensus::encode::serialize;
use bitcoin::hashes::Hash;
use bitcoin::p2p::Magic;
use bitcoin::p2p::message::{NetworkMessage, RawNetworkMessage};
use bitcoin::script::{Builder, PushBytesBuf};
use bitcoin::{
    Amount, Block, BlockHash, CompactTarget, OutPoint, ScriptBuf, Sequence, Target, Transaction, TxIn, TxMerkleNode,
    TxOut, Txid, WPubkeyHash, Witness, Wtxid, absolute, transaction,
};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// Regtest's proof-of-work limit: half of all hashes meet it.
const REGTEST_BITS: u32 = 0x207f_ffff;
/// BIP141: the witness commitment's output script starts with OP_RETURN and these 4 bytes.
const WITNESS_COMMITMENT_HEADER: [u8; 4] = [0xaa, 0x21, 0xa9, 0xed];
/// Outputs of earlier history the first transactions spend.
const FUNDING_OUTPUTS: usize = 4096;
/// Core's `MAX_INV_SZ`: entries one inv may carry.
pub const MAX_INV_ENTRIES: usize = 50_000;

/// How the session looks, in compressed time.
#[derive(Debug, Clone)]
pub struct Params {
    pub seed: u64,
    pub blocks: usize,
    /// Mean gap between blocks (exponential), standing for Bitcoin's 600 s.
    pub block_interval: Duration,
    /// Mean transactions arriving per block interval (a Poisson process).
    pub txs_per_block_interval: f64,
    /// Mean gap between inv trickles (exponential).
    pub trickle: Duration,
    /// Gap between pings (Core's PING_INTERVAL, 2 minutes).
    pub ping: Duration,
    pub max_block_bytes: usize,
}

/// A transaction as the client relays it.
pub struct TxEntry {
    pub wtxid: Wtxid,
    /// The whole v1 `tx` message.
    pub frame: Vec<u8>,
}

/// A block as the client relays it.
pub struct BlockEntry {
    /// The v1 `headers` message announcing it.
    pub headers_frame: Vec<u8>,
    /// The whole v1 `block` message.
    pub frame: Vec<u8>,
    /// The transactions it confirms (indices into [`Chain::txs`]).
    pub txs: Vec<usize>,
}

/// What happens at a point of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A transaction reaches the client's mempool (it is announced at the next trickle).
    TxArrives(usize),
    /// The client announces what arrived since the last trickle.
    Trickle,
    /// The client learns of a block and announces it with `headers`.
    Block(usize),
    Ping,
}

pub struct Chain {
    pub txs: Vec<TxEntry>,
    pub blocks: Vec<BlockEntry>,
    /// In time order, offsets from the session's start.
    pub schedule: Vec<(Duration, Event)>,
    pub by_wtxid: HashMap<Wtxid, usize>,
    pub by_hash: HashMap<BlockHash, usize>,
}

impl Chain {
    pub fn total_block_bytes(&self) -> usize {
        self.blocks.iter().map(|b| b.frame.len()).sum()
    }

    pub fn block_sizes(&self) -> impl Iterator<Item = usize> + '_ {
        self.blocks.iter().map(|b| b.frame.len() - 24)
    }
}

/// A v1 message of the regtest network.
pub fn frame(message: NetworkMessage) -> Vec<u8> {
    serialize(&RawNetworkMessage::new(Magic::REGTEST, message))
}

/// An exponential draw with this mean.
pub fn exponential(rng: &mut impl Rng, mean: Duration) -> Duration {
    let u: f64 = rng.r#gen();
    mean.mul_f64(-(1.0 - u).ln())
}

struct Miner {
    rng: StdRng,
    utxos: Vec<(OutPoint, u64)>,
    /// Transactions not yet in a block, by index (taken when confirmed).
    unconfirmed: Vec<Option<Transaction>>,
    mempool: std::collections::VecDeque<usize>,
    tip: BlockHash,
}

impl Miner {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        self.rng.fill_bytes(&mut out);
        out
    }

    fn p2wpkh(&mut self) -> ScriptBuf {
        ScriptBuf::new_p2wpkh(&WPubkeyHash::from_byte_array(self.bytes::<20>()))
    }

    /// A signature-sized witness: a 71- or 72-byte DER-looking signature and
    /// a compressed public key.
    fn witness(&mut self) -> Witness {
        let mut signature = vec![0x30u8; if self.rng.gen_bool(0.5) { 71 } else { 72 }];
        self.rng.fill_bytes(&mut signature[1..]);
        let mut key = [0u8; 33];
        self.rng.fill_bytes(&mut key);
        key[0] = if self.rng.gen_bool(0.5) { 2 } else { 3 };
        Witness::from_slice(&[&signature[..], &key[..]])
    }

    fn spend(&mut self) -> Transaction {
        let inputs = match self.rng.gen_range(0..100) {
            0..60 => 1,
            60..90 => 2,
            _ => 3,
        };
        let outputs = match self.rng.gen_range(0..100) {
            0..15 => 1,
            15..95 => 2,
            _ => self.rng.gen_range(3..=8),
        };
        let mut input = Vec::with_capacity(inputs);
        let mut value = 0u64;
        for _ in 0..inputs.min(self.utxos.len()) {
            let pick = self.rng.gen_range(0..self.utxos.len());
            let (previous_output, amount) = self.utxos.swap_remove(pick);
            value += amount;
            input.push(TxIn {
                previous_output,
                script_sig: ScriptBuf::new(),
                sequence: Sequence::ENABLE_RBF_NO_LOCKTIME,
                witness: self.witness(),
            });
        }
        let fee = 200 + 50 * inputs as u64;
        let each = value.saturating_sub(fee) / outputs as u64;
        let output: Vec<TxOut> =
            (0..outputs).map(|_| TxOut { value: Amount::from_sat(each), script_pubkey: self.p2wpkh() }).collect();
        let tx = Transaction { version: transaction::Version::TWO, lock_time: absolute::LockTime::ZERO, input, output };
        let txid = tx.compute_txid();
        for vout in 0..outputs as u32 {
            self.utxos.push((OutPoint { txid, vout }, each));
        }
        tx
    }

    fn coinbase(&mut self, height: i64, witness_commitment: Option<[u8; 32]>) -> Transaction {
        let script_sig = Builder::new().push_int(height).push_slice(self.bytes::<8>()).into_script();
        let mut output = vec![TxOut { value: Amount::from_sat(5_000_000_000), script_pubkey: self.p2wpkh() }];
        if let Some(commitment) = witness_commitment {
            let mut data = PushBytesBuf::new();
            data.extend_from_slice(&WITNESS_COMMITMENT_HEADER).expect("36 bytes fit a push");
            data.extend_from_slice(&commitment).expect("36 bytes fit a push");
            output.push(TxOut { value: Amount::ZERO, script_pubkey: ScriptBuf::new_op_return(data) });
        }
        Transaction {
            version: transaction::Version::TWO,
            lock_time: absolute::LockTime::ZERO,
            input: vec![TxIn {
                previous_output: OutPoint::null(),
                script_sig,
                sequence: Sequence::MAX,
                // BIP141: the witness reserved value.
                witness: Witness::from_slice(&[[0u8; 32]]),
            }],
            output,
        }
    }

    /// The oldest unconfirmed transactions that fit, under a coinbase, with
    /// the nonce ground until regtest's target is met.
    fn block(&mut self, height: i64, time: u32, max_bytes: usize) -> (Block, Vec<usize>) {
        let mut txdata = vec![self.coinbase(height, None)];
        let mut confirmed = Vec::new();
        let mut size = 80 + 300;
        while let Some(&index) = self.mempool.front() {
            let len = self.unconfirmed[index].as_ref().map_or(0, |tx| tx.total_size());
            if size + len > max_bytes {
                break;
            }
            size += len;
            self.mempool.pop_front();
            if let Some(tx) = self.unconfirmed[index].take() {
                txdata.push(tx);
                confirmed.push(index);
            }
        }
        let header = Header {
            version: Version::from_consensus(0x2000_0000),
            prev_blockhash: self.tip,
            merkle_root: TxMerkleNode::all_zeros(),
            time,
            bits: CompactTarget::from_consensus(REGTEST_BITS),
            nonce: 0,
        };
        let mut block = Block { header, txdata };
        // The coinbase's witness does not enter the witness root (BIP141),
        // so the commitment can be computed before it is added.
        let witness_root = block.witness_root().expect("a coinbase");
        let commitment = Block::compute_witness_commitment(&witness_root, &[0u8; 32]);
        block.txdata[0] = self.coinbase(height, Some(commitment.to_byte_array()));
        block.header.merkle_root = block.compute_merkle_root().expect("a coinbase");
        let target = Target::from_compact(block.header.bits);
        // About every second nonce meets regtest's target.
        let found = (0..=u32::MAX).find(|&nonce| {
            block.header.nonce = nonce;
            block.header.validate_pow(target).is_ok()
        });
        assert!(found.is_some(), "no nonce meets regtest's target");
        self.tip = block.block_hash();
        (block, confirmed)
    }
}

/// Makes the chain and the schedule for `params`.
pub fn build(params: &Params) -> Chain {
    let mut rng = StdRng::seed_from_u64(params.seed);
    let funding = Txid::from_byte_array(rng.r#gen());
    let utxos = (0..FUNDING_OUTPUTS as u32).map(|vout| (OutPoint { txid: funding, vout }, 1_000_000)).collect();
    let mut miner = Miner {
        rng: StdRng::seed_from_u64(params.seed ^ 0x5eed),
        utxos,
        unconfirmed: Vec::new(),
        mempool: Default::default(),
        tip: BlockHash::all_zeros(),
    };
    let tx_gap = params.block_interval.div_f64(params.txs_per_block_interval.max(1e-9));
    let mut next_tx = exponential(&mut rng, tx_gap);
    let mut next_trickle = exponential(&mut rng, params.trickle);
    let mut next_block = exponential(&mut rng, params.block_interval);
    let mut next_ping = params.ping;
    let mut chain = Chain {
        txs: Vec::new(),
        blocks: Vec::new(),
        schedule: Vec::new(),
        by_wtxid: HashMap::new(),
        by_hash: HashMap::new(),
    };
    // Block times in seconds, as if uncompressed (600 s per mean interval).
    let real_seconds = |at: Duration| (at.as_secs_f64() / params.block_interval.as_secs_f64() * 600.0) as u32;
    while chain.blocks.len() < params.blocks {
        let at = next_tx.min(next_trickle).min(next_block).min(next_ping);
        if at == next_block {
            let height = chain.blocks.len() as i64 + 1;
            let (block, txs) = miner.block(height, 1_700_000_000 + real_seconds(at), params.max_block_bytes);
            let hash = block.block_hash();
            chain.by_hash.insert(hash, chain.blocks.len());
            chain.schedule.push((at, Event::Block(chain.blocks.len())));
            chain.blocks.push(BlockEntry {
                headers_frame: frame(NetworkMessage::Headers(vec![block.header])),
                frame: frame(NetworkMessage::Block(block)),
                txs,
            });
            next_block = at + exponential(&mut rng, params.block_interval);
        } else if at == next_tx {
            let tx = miner.spend();
            let index = chain.txs.len();
            let wtxid = tx.compute_wtxid();
            chain.by_wtxid.insert(wtxid, index);
            chain.txs.push(TxEntry { wtxid, frame: frame(NetworkMessage::Tx(tx.clone())) });
            miner.unconfirmed.push(Some(tx));
            miner.mempool.push_back(index);
            chain.schedule.push((at, Event::TxArrives(index)));
            next_tx = at + exponential(&mut rng, tx_gap);
        } else if at == next_trickle {
            chain.schedule.push((at, Event::Trickle));
            next_trickle = at + exponential(&mut rng, params.trickle);
        } else {
            chain.schedule.push((at, Event::Ping));
            next_ping = at + params.ping;
        }
    }
    chain
}
