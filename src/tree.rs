//! The canopy: a node arena and a frontier (`src/frontier.rs`), expanded in batches.
//!
//! The driver (Python) repeatedly takes a batch of frontier nodes (`next_batch`), runs the model on them,
//! and hands back either logits rows (`ingest_logits`: the policy is applied here, rows in parallel) or a
//! support the backend computed itself (`ingest_support`). Ingestion records each node's entropy, creates
//! its internal children (new frontier nodes) and folds its leaf children into the accumulators, in row
//! order, so results do not depend on the thread count.
//!
//! Leaves (last token an EOS id, or depth == max_new_tokens) are aggregated on creation and, unless
//! `record_nodes` is set, never stored: memory is proportional to the internal nodes.

use std::collections::HashMap;

use rayon::prelude::*;

use crate::error::{invalid, CanopyError, Result};
use crate::frontier::{Frontier, Order};
use crate::policy::{apply_row, check_csr, normalise_support_row, parallel, Logit, Policy, Scratch, ELEMENTS_PER_TASK};
use crate::stats::{correlation, entropy_of, LeafMoments, Neumaier};

pub const NO_NODE: u32 = u32::MAX;

#[derive(Debug, Clone)]
pub struct TreeConfig {
    pub vocab_size: usize,
    pub eos_token_ids: Vec<u32>,
    pub max_new_tokens: u32,
    pub policy: Policy,
    pub order: Order,
    pub max_nodes: usize,
    pub record_nodes: bool,
    /// Largest policy support the certified upper bound may assume; checked on every expanded node.
    pub support_cap: usize,
    /// Depth-first only, without `record_nodes`: recycle the arena slots of finished subtrees, so the arena
    /// holds only the live path and its pending children (O(depth x support)) however large the canopy.
    pub streaming: bool,
    /// Enumerate only the subtree below this prefix (a shard); `None` is the whole canopy.
    pub root: Option<Root>,
}

/// The root of a shard: a prefix of generated tokens with its reach and path entropy, as the run that
/// split the canopy computed them. The shard's sums are in the whole canopy's units (pi includes the
/// prefix's reach), so they add to the other shards' and the head's.
#[derive(Debug, Clone, PartialEq)]
pub struct Root {
    pub prefix: Vec<u32>,
    pub log_reach: f64,
    pub path_entropy: f64,
}

impl TreeConfig {
    pub fn validate(&self) -> Result<()> {
        if self.vocab_size == 0 || self.vocab_size > u32::MAX as usize - 1 {
            return Err(invalid("vocab_size", format!("must be in [1, 2^32 - 2], got {}", self.vocab_size)));
        }
        if self.eos_token_ids.is_empty() {
            return Err(invalid("eos_token_ids", "needs at least one EOS id (a leaf ends in an EOS id or at max_new_tokens)"));
        }
        for &e in &self.eos_token_ids {
            if e as usize >= self.vocab_size {
                return Err(invalid(
                    "eos_token_ids",
                    format!("EOS id {e} is outside the vocabulary [0, vocab_size={})", self.vocab_size),
                ));
            }
        }
        // Depths are u32 and the bounds add one to them.
        if self.max_new_tokens == 0 || self.max_new_tokens > u32::MAX / 2 {
            return Err(invalid("max_new_tokens", format!("must be in [1, 2^31 - 1], got {}", self.max_new_tokens)));
        }
        if self.max_nodes == 0 {
            return Err(invalid("max_nodes", "must be >= 1"));
        }
        if self.support_cap == 0 || self.support_cap > self.vocab_size {
            return Err(invalid("support_cap", format!("must be in [1, vocab_size={}]", self.vocab_size)));
        }
        if self.streaming && (self.order != Order::DepthFirst || self.record_nodes) {
            return Err(invalid(
                "streaming",
                "needs order='depth-first' without record_nodes (other orders and the node arrays keep the arena)",
            ));
        }
        if let Some(r) = &self.root {
            if r.prefix.len() >= self.max_new_tokens as usize {
                return Err(invalid(
                    "root",
                    format!(
                        "a prefix of {} tokens is not an internal node when max_new_tokens={}",
                        r.prefix.len(),
                        self.max_new_tokens
                    ),
                ));
            }
            if let Some(&t) =
                r.prefix.iter().find(|&&t| t as usize >= self.vocab_size || self.eos_token_ids.contains(&t))
            {
                return Err(invalid("root", format!("prefix token {t} is an EOS id or outside the vocabulary")));
            }
            if !(r.log_reach <= 0.0) || !(r.path_entropy >= 0.0) || !r.path_entropy.is_finite() {
                return Err(invalid(
                    "root",
                    format!(
                        "needs log_reach <= 0 and a finite path_entropy >= 0, got {} and {}",
                        r.log_reach, r.path_entropy
                    ),
                ));
            }
            if self.record_nodes {
                return Err(invalid("root", "a shard does not record nodes (its node ids start below the prefix)"));
            }
        }
        Ok(())
    }
}

/// A batch handed to the driver.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub node_ids: Vec<i64>,
    pub parent_ids: Vec<i64>,
    pub tokens: Vec<i64>,
    pub depths: Vec<i64>,
}

/// Exact population values over the leaf distribution (defined in `docs/definitions.md`; re-derived by brute
/// force in `tests/reference.py`).
#[derive(Debug, Clone)]
pub struct CanopyStats {
    pub ce_star: f64,
    pub ce_star_leaves: f64,
    pub total_mass: f64,
    pub length_entropy: f64,
    pub content_entropy: f64,
    pub expected_length: f64,
    pub entropy_rate: f64,
    pub length_var: f64,
    pub rate_var: f64,
    pub length_rate_cov: f64,
    pub length_rate_corr: f64,
    pub gen_ppl: f64,
    pub branching_factor: f64,
    pub truncation_prob: f64,
    pub length_pmf: Vec<f64>,
    /// Sum of pi(u) h(u) over internal nodes at each depth 0..max_new_tokens-1.
    pub entropy_by_depth: Vec<f64>,
    pub num_internal_nodes: u64,
    pub num_leaves: u64,
    pub max_support: u64,
    pub engine_calls: u64,
}

/// Certified brackets for a partially expanded canopy (`docs/definitions.md`, "Certified bounds").
#[derive(Debug, Clone)]
pub struct Bounds {
    pub ce_star_lower: f64,
    pub ce_star_upper: f64,
    pub expected_length_lower: f64,
    pub expected_length_upper: f64,
    pub truncation_prob_lower: f64,
    pub truncation_prob_upper: f64,
    /// Probability mass of the leaves reached so far.
    pub explored_mass: f64,
    /// Probability mass of the unexpanded internal nodes (explored + frontier = 1).
    pub frontier_mass: f64,
    pub num_expanded: u64,
    pub frontier_size: u64,
    pub num_nodes: u64,
}

/// Leaf aggregates of one chunk of rows (or of the whole tree).
#[derive(Debug, Clone)]
struct LeafAcc {
    count: u64,
    mass: Neumaier,
    plogp: Neumaier,
    length: Neumaier,
    pmf: Vec<Neumaier>,
    truncated: Neumaier,
    moments: LeafMoments,
}

impl LeafAcc {
    fn new(max_new_tokens: usize) -> Self {
        Self {
            count: 0,
            mass: Neumaier::default(),
            plogp: Neumaier::default(),
            length: Neumaier::default(),
            pmf: vec![Neumaier::default(); max_new_tokens + 1],
            truncated: Neumaier::default(),
            moments: LeafMoments::default(),
        }
    }

    #[inline]
    fn add(&mut self, log_reach: f64, n: u32, path_entropy: f64, eos: bool) {
        let p = log_reach.exp();
        self.count += 1;
        self.mass.add(p);
        if p > 0.0 {
            self.plogp.add(p * log_reach);
        }
        self.length.add(p * n as f64);
        self.pmf[n as usize].add(p);
        if !eos {
            self.truncated.add(p);
        }
        self.moments.add(p, n as f64, path_entropy / n as f64);
    }

    fn merge(&mut self, other: &Self) {
        self.count += other.count;
        self.mass.merge(&other.mass);
        self.plogp.merge(&other.plogp);
        self.length.merge(&other.length);
        for (a, b) in self.pmf.iter_mut().zip(&other.pmf) {
            a.merge(b);
        }
        self.truncated.merge(&other.truncated);
        self.moments.merge(&other.moments);
    }
}

#[derive(Debug, Clone, Copy)]
struct Child {
    row: u32,
    token: u32,
    log_reach: f64,
    leaf: bool,
}

/// What the parallel phase produces for a chunk of rows.
struct ChunkOut {
    entropy: Vec<f64>,
    support: Vec<u32>,
    /// Internal children (and leaves too when recording nodes), in row order.
    children: Vec<Child>,
    leaves: LeafAcc,
}

impl ChunkOut {
    fn new(max_new_tokens: usize) -> Self {
        Self { entropy: Vec::new(), support: Vec::new(), children: Vec::new(), leaves: LeafAcc::new(max_new_tokens) }
    }
}

/// One arena slot (one push per child keeps ingestion cache-friendly).
#[derive(Debug, Clone, Copy)]
struct Node {
    parent: u32,
    token: u32,
    depth: u32,
    /// Internal children not yet expanded: the node's state can be released when this reaches 0.
    pending_children: u32,
    log_reach: f64,
    /// Sum of the step entropies of the node's strict ancestors (the path entropy before this node).
    path_entropy: f64,
    /// h(u) once expanded; NaN before; 0 for recorded leaves.
    entropy: f64,
    is_leaf: bool,
    /// An ancestor of a shard's root: expanded only to bring the backend's state down the prefix; it adds
    /// nothing to the sums (the run that split the canopy counted it).
    ghost: bool,
}

/// Per-node columns for users who want node-level data.
pub struct NodeArrays {
    pub parent: Vec<u32>,
    pub token: Vec<u32>,
    pub depth: Vec<u32>,
    pub log_reach: Vec<f64>,
    pub entropy: Vec<f64>,
    pub is_leaf: Vec<bool>,
}

pub struct Tree {
    cfg: TreeConfig,
    is_eos: Vec<bool>,
    /// Arena, indexed by slot. Leaves are stored only with `record_nodes`. A node's id is its creation
    /// index (the arena path's ids exactly); without streaming that is its slot, while streaming recycles
    /// slots and maps the live nodes' ids to them.
    nodes: Vec<Node>,
    /// Streaming only, per slot: the node's id and its internal children still holding a slot (the node is
    /// freed when it is expanded and this reaches 0); the live nodes' slots by id.
    serial: Vec<u64>,
    live_children: Vec<u32>,
    slot_by_id: HashMap<u64, u32>,
    free: Vec<u32>,
    /// Nodes created (ghosts and recorded leaves included); `nodes.len()` without streaming.
    created: u64,
    frontier: Frontier,
    in_flight: Vec<u32>,
    released: Vec<i64>,
    // Accumulators.
    chain: Neumaier,
    chain_by_depth: Vec<Neumaier>,
    leaves: LeafAcc,
    num_expanded: u64,
    max_support: u64,
    engine_calls: u64,
}

impl Tree {
    pub fn new(cfg: TreeConfig) -> Result<Self> {
        cfg.validate()?;
        let mut is_eos = vec![false; cfg.vocab_size];
        for &e in &cfg.eos_token_ids {
            is_eos[e as usize] = true;
        }
        let t = cfg.max_new_tokens as usize;
        let mut tree = Self {
            frontier: Frontier::new(cfg.order),
            is_eos,
            nodes: Vec::new(),
            serial: Vec::new(),
            live_children: Vec::new(),
            slot_by_id: HashMap::new(),
            free: Vec::new(),
            created: 0,
            in_flight: Vec::new(),
            released: Vec::new(),
            chain: Neumaier::default(),
            chain_by_depth: vec![Neumaier::default(); t],
            leaves: LeafAcc::new(t),
            num_expanded: 0,
            max_support: 0,
            engine_calls: 0,
            cfg,
        };
        let root = match &tree.cfg.root {
            None => tree.push_node(NO_NODE, NO_NODE, 0, 0.0, 0.0, false),
            Some(r) if r.prefix.is_empty() => tree.push_node(NO_NODE, NO_NODE, 0, r.log_reach, r.path_entropy, false),
            // The canopy's root, expanded first as a ghost; its path down to the shard root follows.
            Some(r) => {
                let lr = r.log_reach;
                let id = tree.push_node(NO_NODE, NO_NODE, 0, lr, 0.0, false);
                tree.nodes[id as usize].ghost = true;
                id
            }
        };
        let lr = tree.nodes[root as usize].log_reach;
        tree.frontier.push(root, lr);
        Ok(tree)
    }

    fn push_node(&mut self, parent: u32, token: u32, depth: u32, log_reach: f64, path_entropy: f64, leaf: bool) -> u32 {
        let node = Node {
            parent,
            token,
            depth,
            pending_children: 0,
            log_reach,
            path_entropy,
            entropy: if leaf { 0.0 } else { f64::NAN },
            is_leaf: leaf,
            ghost: false,
        };
        let serial = self.created;
        self.created += 1;
        if self.cfg.streaming {
            if parent != NO_NODE {
                self.live_children[parent as usize] += 1;
            }
            let slot = match self.free.pop() {
                Some(slot) => {
                    self.nodes[slot as usize] = node;
                    self.live_children[slot as usize] = 0;
                    self.serial[slot as usize] = serial;
                    slot
                }
                None => {
                    self.nodes.push(node);
                    self.serial.push(serial);
                    self.live_children.push(0);
                    (self.nodes.len() - 1) as u32
                }
            };
            self.slot_by_id.insert(serial, slot);
            return slot;
        }
        let id = self.nodes.len() as u32;
        assert!(id != NO_NODE, "the arena is full (2^32 - 1 nodes)");
        self.nodes.push(node);
        id
    }

    /// Streaming: gives back the slot of an expanded node whose internal children are all freed, then of
    /// each ancestor this leaves with no live child.
    fn free_subtree(&mut self, mut u: u32) {
        loop {
            let i = u as usize;
            self.slot_by_id.remove(&self.serial[i]);
            self.free.push(u);
            let p = self.nodes[i].parent;
            if p == NO_NODE {
                return;
            }
            self.live_children[p as usize] -= 1;
            if self.live_children[p as usize] != 0 {
                return;
            }
            u = p;
        }
    }

    /// The id the driver and the backend see for a slot.
    pub fn node_id(&self, slot: u32) -> i64 {
        if slot == NO_NODE {
            -1
        } else if self.cfg.streaming {
            self.serial[slot as usize] as i64
        } else {
            slot as i64
        }
    }

    /// The slot of a live node's id.
    fn slot_of(&self, id: i64) -> Option<usize> {
        if id < 0 {
            return None;
        }
        if self.cfg.streaming {
            return self.slot_by_id.get(&(id as u64)).map(|&s| s as usize);
        }
        (id < self.nodes.len() as i64).then_some(id as usize)
    }

    /// Nothing left to expand (a beam may leave pruned frontier nodes behind).
    pub fn is_done(&self) -> bool {
        self.frontier.expandable() == 0 && self.in_flight.is_empty()
    }
    pub fn num_expanded(&self) -> u64 {
        self.num_expanded
    }
    pub fn num_nodes(&self) -> usize {
        self.nodes.len()
    }
    pub fn frontier_size(&self) -> usize {
        self.frontier.len() + self.in_flight.len()
    }
    /// Nodes created so far, leaves included (what `max_nodes` limits).
    pub fn nodes_reached(&self) -> usize {
        self.created as usize + if self.cfg.record_nodes { 0 } else { self.leaves.count as usize }
    }
    /// Arena slots in use (streaming: the live path and its pending children).
    pub fn live_nodes(&self) -> usize {
        self.nodes.len() - self.free.len()
    }

    /// Pops up to `max_rows` frontier nodes for the driver to evaluate.
    pub fn next_batch(&mut self, max_rows: usize) -> Result<Batch> {
        if !self.in_flight.is_empty() {
            return Err(CanopyError::Protocol("next_batch called before the previous batch was ingested".into()));
        }
        if max_rows == 0 {
            return Err(invalid("batch_size", "must be >= 1"));
        }
        for &u in self.frontier.start_batch() {
            let p = self.nodes[u as usize].parent as usize;
            self.nodes[p].pending_children -= 1;
            if self.nodes[p].pending_children == 0 {
                self.released.push(p as i64); // a beam never streams: the id is the slot
            }
        }
        let mut b = Batch::default();
        while self.in_flight.len() < max_rows {
            let Some(id) = self.frontier.pop() else { break };
            self.in_flight.push(id);
            let i = id as usize;
            b.node_ids.push(self.node_id(id));
            b.parent_ids.push(self.node_id(self.nodes[i].parent));
            b.tokens.push(if self.nodes[i].token == NO_NODE { -1 } else { self.nodes[i].token as i64 });
            b.depths.push(self.nodes[i].depth as i64);
        }
        Ok(b)
    }

    /// The generated tokens of each node (prompt excluded).
    pub fn prefix(&self, id: i64) -> Result<Vec<u32>> {
        let Some(slot) = self.slot_of(id) else {
            return Err(invalid("node_ids", format!("node id {id} does not exist (num_nodes={})", self.nodes.len())));
        };
        let mut out = Vec::with_capacity(self.nodes[slot].depth as usize);
        let mut u = slot as u32;
        while self.nodes[u as usize].parent != NO_NODE {
            out.push(self.nodes[u as usize].token);
            u = self.nodes[u as usize].parent;
        }
        out.reverse();
        Ok(out)
    }

    pub fn ingest_logits<T: Logit>(&mut self, logits: &[T], rows: usize, vocab: usize) -> Result<()> {
        self.check_rows(rows)?;
        if vocab != self.cfg.vocab_size || logits.len() < rows * vocab {
            let e = CanopyError::Shape {
                param: "logits",
                message: format!(
                    "has {vocab} columns but vocab_size is {}; pass the model's full vocabulary width",
                    self.cfg.vocab_size
                ),
            };
            return Err(self.requeue_on_error(e));
        }
        let policy = self.cfg.policy;
        let rows_per_task = (ELEMENTS_PER_TASK / vocab).max(1);
        let chunks = self.expand_rows(rows, rows_per_task, |r, scratch, tokens, logprobs| {
            apply_row(&logits[r * vocab..(r + 1) * vocab], &policy, r, scratch, tokens, logprobs)
        });
        self.commit(chunks)
    }

    pub fn ingest_support(&mut self, offsets: &[i64], tokens: &[i64], logprobs: &[f64]) -> Result<()> {
        self.check_rows(offsets.len().saturating_sub(1))?;
        if let Err(e) = check_csr(offsets, tokens, logprobs) {
            return Err(self.requeue_on_error(e));
        }
        let vocab = self.cfg.vocab_size;
        let rows = offsets.len() - 1;
        let rows_per_task = (ELEMENTS_PER_TASK * rows / tokens.len().max(1)).max(1);
        let chunks = self.expand_rows(rows, rows_per_task, |r, _, out_tokens, out_logprobs| {
            let (a, b) = (offsets[r] as usize, offsets[r + 1] as usize);
            normalise_support_row(&tokens[a..b], &logprobs[a..b], vocab, r, out_tokens, out_logprobs)
        });
        self.commit(chunks)
    }

    fn check_rows(&mut self, rows: usize) -> Result<()> {
        if self.in_flight.is_empty() {
            return Err(CanopyError::Protocol("ingest called without a pending batch (call next_batch first)".into()));
        }
        if rows != self.in_flight.len() {
            let e = CanopyError::Shape {
                param: "logits",
                message: format!("has {rows} rows but the batch has {} nodes", self.in_flight.len()),
            };
            return Err(self.requeue_on_error(e));
        }
        Ok(())
    }

    /// A failed ingestion leaves the batch's nodes on the frontier, so bounds stay valid.
    fn requeue_on_error(&mut self, e: CanopyError) -> CanopyError {
        for id in std::mem::take(&mut self.in_flight) {
            self.frontier.requeue(id, self.nodes[id as usize].log_reach);
        }
        e
    }

    /// The parallel half of ingestion: per chunk of rows, the policy support of each row, its leaf
    /// children folded into a chunk accumulator, its internal children listed. Reads the tree only.
    fn expand_rows<F>(&self, rows: usize, rows_per_task: usize, row_support: F) -> Result<Vec<ChunkOut>>
    where
        F: Fn(usize, &mut Scratch, &mut Vec<u32>, &mut Vec<f64>) -> Result<f64> + Sync,
    {
        let t_max = self.cfg.max_new_tokens;
        let record = self.cfg.record_nodes;
        let run_chunk = |start: usize| -> Result<ChunkOut> {
            let end = (start + rows_per_task).min(rows);
            let mut out = ChunkOut::new(t_max as usize);
            let mut scratch = Scratch::default();
            let (mut tokens, mut logprobs) = (Vec::new(), Vec::new());
            for r in start..end {
                tokens.clear();
                logprobs.clear();
                let h = row_support(r, &mut scratch, &mut tokens, &mut logprobs)?;
                let node = &self.nodes[self.in_flight[r] as usize];
                let child_depth = node.depth + 1;
                let child_path = node.path_entropy + h;
                out.entropy.push(h);
                out.support.push(tokens.len() as u32);
                for (&tok, &lp) in tokens.iter().zip(&logprobs) {
                    let child_lr = node.log_reach + lp;
                    let eos = self.is_eos[tok as usize];
                    let leaf = eos || child_depth == t_max;
                    if leaf {
                        out.leaves.add(child_lr, child_depth, child_path, eos);
                    }
                    if record || !leaf {
                        out.children.push(Child { row: r as u32, token: tok, log_reach: child_lr, leaf });
                    }
                }
            }
            Ok(out)
        };
        let starts: Vec<usize> = (0..rows).step_by(rows_per_task).collect();
        if starts.len() > 1 && parallel() {
            starts.into_par_iter().map(run_chunk).collect()
        } else {
            starts.into_iter().map(run_chunk).collect()
        }
    }

    /// The sequential half: checks the budgets, then merges chunk results in row order (so the sums do
    /// not depend on the thread count), pushes internal children and tracks which states can be released.
    fn commit(&mut self, chunks: Result<Vec<ChunkOut>>) -> Result<()> {
        let chunks = match chunks {
            Ok(c) => c,
            Err(e) => return Err(self.requeue_on_error(e)),
        };
        // A ghost (an ancestor of a shard's root) is the only node on the frontier when it is popped, so it
        // is alone in its batch.
        if self.nodes[self.in_flight[0] as usize].ghost {
            return self.commit_ghost(chunks);
        }
        let supports = chunks.iter().flat_map(|c| c.support.iter().copied());
        let new_nodes: usize = supports.clone().map(|s| s as usize).sum();
        if let Some((row, size)) = supports.enumerate().find(|&(_, s)| s as usize > self.cfg.support_cap) {
            // The certified bound assumed at most support_cap children: refuse rather than lie.
            let e = invalid(
                "support_cap",
                format!(
                    "node {} has {size} tokens in its policy support, more than support_cap={} (ties at the \
                     top-k threshold keep extra tokens); raise support_cap or leave it unset",
                    self.in_flight[row], self.cfg.support_cap
                ),
            );
            return Err(self.requeue_on_error(e));
        }
        if self.nodes_reached() + new_nodes > self.cfg.max_nodes {
            let depth = self.in_flight.iter().map(|&u| self.nodes[u as usize].depth).max().unwrap_or(0);
            let reached = self.nodes_reached() + new_nodes;
            let e = CanopyError::TreeTooLarge {
                max_nodes: self.cfg.max_nodes,
                reached,
                expanded: self.num_expanded as usize,
                depth,
            };
            return Err(self.requeue_on_error(e));
        }
        let batch = std::mem::take(&mut self.in_flight);
        let mut row = 0usize;
        for chunk in chunks {
            self.leaves.merge(&chunk.leaves);
            let mut children = chunk.children.iter().peekable();
            for (&h, &support) in chunk.entropy.iter().zip(&chunk.support) {
                let u = batch[row];
                let node = self.nodes[u as usize];
                let reach = node.log_reach.exp();
                self.nodes[u as usize].entropy = h;
                self.chain.add(reach * h);
                self.chain_by_depth[node.depth as usize].add(reach * h);
                self.num_expanded += 1;
                self.max_support = self.max_support.max(support as u64);
                let mut internal_children = 0u32;
                while let Some(c) = children.next_if(|c| c.row as usize == row) {
                    let id = self.push_node(u, c.token, node.depth + 1, c.log_reach, node.path_entropy + h, c.leaf);
                    if !c.leaf {
                        self.frontier.push(id, c.log_reach);
                        internal_children += 1;
                    }
                }
                self.nodes[u as usize].pending_children = internal_children;
                if internal_children == 0 {
                    self.released.push(self.node_id(u));
                }
                self.child_expanded(node.parent);
                if internal_children == 0 && self.cfg.streaming {
                    self.free_subtree(u);
                }
                row += 1;
            }
        }
        self.engine_calls += 1;
        Ok(())
    }

    /// One more of `parent`'s internal children was expanded: its state is released after the last one.
    fn child_expanded(&mut self, parent: u32) {
        if parent != NO_NODE {
            let pc = &mut self.nodes[parent as usize].pending_children;
            *pc -= 1;
            if *pc == 0 {
                self.released.push(self.node_id(parent));
            }
        }
    }

    /// A ghost's row only takes the backend one token down the shard's prefix: its entropy, leaves and
    /// other children belong to the run that split the canopy, so nothing is added here.
    fn commit_ghost(&mut self, chunks: Vec<ChunkOut>) -> Result<()> {
        let u = self.in_flight[0];
        let node = self.nodes[u as usize];
        let root = self.cfg.root.clone().expect("ghosts exist only below a shard root");
        let depth = node.depth as usize;
        let token = root.prefix[depth];
        if !chunks.iter().flat_map(|c| &c.children).any(|c| c.token == token && !c.leaf) {
            let e = invalid(
                "root",
                format!("prefix token {token} at depth {depth} is not in the policy support of its parent"),
            );
            return Err(self.requeue_on_error(e));
        }
        self.in_flight.clear();
        let is_root = depth + 1 == root.prefix.len();
        let path = if is_root { root.path_entropy } else { 0.0 };
        let id = self.push_node(u, token, node.depth + 1, root.log_reach, path, false);
        self.nodes[id as usize].ghost = !is_root;
        self.frontier.push(id, root.log_reach);
        self.nodes[u as usize].pending_children = 1;
        self.child_expanded(node.parent);
        self.engine_calls += 1;
        Ok(())
    }

    pub fn take_released(&mut self) -> Vec<i64> {
        std::mem::take(&mut self.released)
    }

    /// Unexpanded internal nodes (the batch in flight included).
    pub fn frontier_ids(&self) -> Vec<u32> {
        let mut ids = self.frontier.ids();
        ids.extend_from_slice(&self.in_flight);
        ids
    }

    pub fn node(&self, id: u32) -> (u32, u32, u32, f64) {
        let i = id as usize;
        (self.nodes[i].parent, self.nodes[i].token, self.nodes[i].depth, self.nodes[i].log_reach)
    }

    /// The frontier's nodes as shard roots: (prefix, log_reach, path_entropy) each, most probable first
    /// (ties to the older node). Only between batches.
    pub fn frontier_roots(&self) -> Result<Vec<Root>> {
        let mut ids = self.frontier_ids();
        ids.sort_by(|&a, &b| {
            self.nodes[b as usize].log_reach.total_cmp(&self.nodes[a as usize].log_reach).then(a.cmp(&b))
        });
        ids.iter()
            .map(|&u| {
                let n = &self.nodes[u as usize];
                if n.ghost {
                    return Err(CanopyError::Protocol("the shard's prefix is not expanded yet".into()));
                }
                Ok(Root { prefix: self.prefix(self.node_id(u))?, log_reach: n.log_reach, path_entropy: n.path_entropy })
            })
            .collect()
    }

    /// The run's sums so far, to merge with other runs over disjoint parts of the canopy. With
    /// `with_frontier` the unexpanded nodes' bound terms are included; without, they are left to the runs
    /// that will expand them (the head of a split canopy hands its frontier to the shards).
    pub fn partial(&self, with_frontier: bool) -> Partial {
        let t = self.cfg.max_new_tokens as f64;
        let log_s = (self.cfg.support_cap as f64).ln();
        let mut p = Partial::new(self.cfg.max_new_tokens);
        if with_frontier {
            for id in self.frontier_ids() {
                let i = id as usize;
                let q = self.nodes[i].log_reach.exp();
                // A ghost stands for the shard's root (its reach is the root's): bound at the root's depth.
                let d = match (&self.cfg.root, self.nodes[i].ghost) {
                    (Some(r), true) => r.prefix.len() as f64,
                    _ => self.nodes[i].depth as f64,
                };
                p.frontier_mass.add(q);
                p.gap.add(q * (t - d) * log_s);
                p.len_lo.add(q * (d + 1.0));
                p.len_hi.add(q * t);
            }
            p.frontier_size = self.frontier_size() as u64;
        }
        p.chain = self.chain;
        p.chain_by_depth = self.chain_by_depth.clone();
        p.leaves = self.leaves.clone();
        p.num_expanded = self.num_expanded;
        p.max_support = self.max_support;
        p.engine_calls = self.engine_calls;
        p.num_nodes = self.nodes.len() as u64;
        p
    }

    /// Certified brackets. Proof sketch: CE*_max = sum over internal u of pi(u) h(u) with h >= 0, so the
    /// expanded nodes' sum is a lower bound; an unexpanded node u at depth d heads a subtree whose leaf
    /// entropy is at most log(#leaves) <= (T - d) log S (S = support_cap), contributing pi(u) times that.
    pub fn bounds(&self) -> Bounds {
        self.partial(true).bounds()
    }

    /// Exact values; only once the whole canopy is expanded.
    pub fn stats(&self) -> Result<CanopyStats> {
        self.partial(true).stats()
    }

    /// Per-node columns (leaves included only with `record_nodes`).
    pub fn node_arrays(&self) -> NodeArrays {
        let n = &self.nodes;
        NodeArrays {
            parent: n.iter().map(|x| x.parent).collect(),
            token: n.iter().map(|x| x.token).collect(),
            depth: n.iter().map(|x| x.depth).collect(),
            log_reach: n.iter().map(|x| x.log_reach).collect(),
            entropy: n.iter().map(|x| x.entropy).collect(),
            is_leaf: n.iter().map(|x| x.is_leaf).collect(),
        }
    }
}

/// The sums of one run over part of a canopy (the head of a split canopy, or a shard below a prefix).
/// Runs over disjoint parts merge by adding their sums (compensated sums, length pmf, leaf moments), so
/// the merged partial gives the same values as one run, up to the order of summation.
#[derive(Debug, Clone)]
pub struct Partial {
    max_new_tokens: u32,
    chain: Neumaier,
    chain_by_depth: Vec<Neumaier>,
    leaves: LeafAcc,
    num_expanded: u64,
    max_support: u64,
    engine_calls: u64,
    num_nodes: u64,
    frontier_size: u64,
    frontier_mass: Neumaier,
    gap: Neumaier,
    len_lo: Neumaier,
    len_hi: Neumaier,
}

impl Partial {
    pub fn new(max_new_tokens: u32) -> Self {
        let t = max_new_tokens as usize;
        Self {
            max_new_tokens,
            chain: Neumaier::default(),
            chain_by_depth: vec![Neumaier::default(); t],
            leaves: LeafAcc::new(t),
            num_expanded: 0,
            max_support: 0,
            engine_calls: 0,
            num_nodes: 0,
            frontier_size: 0,
            frontier_mass: Neumaier::default(),
            gap: Neumaier::default(),
            len_lo: Neumaier::default(),
            len_hi: Neumaier::default(),
        }
    }

    /// Adds another run's sums (a disjoint part of the same canopy).
    pub fn merge(&mut self, o: &Self) -> Result<()> {
        if o.max_new_tokens != self.max_new_tokens {
            return Err(invalid(
                "partial",
                format!("cannot merge canopies cut at max_new_tokens={} and {}", self.max_new_tokens, o.max_new_tokens),
            ));
        }
        self.chain.merge(&o.chain);
        for (a, b) in self.chain_by_depth.iter_mut().zip(&o.chain_by_depth) {
            a.merge(b);
        }
        self.leaves.merge(&o.leaves);
        self.num_expanded += o.num_expanded;
        self.max_support = self.max_support.max(o.max_support);
        self.engine_calls += o.engine_calls;
        self.num_nodes += o.num_nodes;
        self.frontier_size += o.frontier_size;
        self.frontier_mass.merge(&o.frontier_mass);
        self.gap.merge(&o.gap);
        self.len_lo.merge(&o.len_lo);
        self.len_hi.merge(&o.len_hi);
        Ok(())
    }

    pub fn max_new_tokens(&self) -> u32 {
        self.max_new_tokens
    }

    /// Flat f64 layout (counts are exact below 2^53): a header of counts, the compensated sums as
    /// (sum, compensation) pairs, the leaf moments, then the per-depth and per-length sums.
    pub fn to_vec(&self) -> Vec<f64> {
        let l = &self.leaves;
        let mut v = vec![
            self.max_new_tokens as f64,
            self.num_expanded as f64,
            self.max_support as f64,
            self.engine_calls as f64,
            self.num_nodes as f64,
            self.frontier_size as f64,
            l.count as f64,
        ];
        for n in [
            &self.chain,
            &self.frontier_mass,
            &self.gap,
            &self.len_lo,
            &self.len_hi,
            &l.mass,
            &l.plogp,
            &l.length,
            &l.truncated,
        ] {
            v.extend(n.parts());
        }
        v.extend(l.moments.parts());
        for n in self.chain_by_depth.iter().chain(&l.pmf) {
            v.extend(n.parts());
        }
        v
    }

    pub fn from_slice(v: &[f64]) -> Result<Self> {
        let bad = || invalid("partial", "not a Partial's array (wrong length or header)");
        let t = *v.first().ok_or_else(bad)?;
        if !(t >= 1.0 && t <= (u32::MAX / 2) as f64 && t.fract() == 0.0) {
            return Err(bad());
        }
        let t = t as usize;
        if v.len() != 7 + 18 + 6 + 2 * t + 2 * (t + 1) {
            return Err(bad());
        }
        let mut p = Self::new(t as u32);
        p.num_expanded = v[1] as u64;
        p.max_support = v[2] as u64;
        p.engine_calls = v[3] as u64;
        p.num_nodes = v[4] as u64;
        p.frontier_size = v[5] as u64;
        p.leaves.count = v[6] as u64;
        let pair = |i: usize| Neumaier::from_parts([v[i], v[i + 1]]);
        let mut i = 7;
        for n in [&mut p.chain, &mut p.frontier_mass, &mut p.gap, &mut p.len_lo, &mut p.len_hi] {
            *n = pair(i);
            i += 2;
        }
        for n in [&mut p.leaves.mass, &mut p.leaves.plogp, &mut p.leaves.length, &mut p.leaves.truncated] {
            *n = pair(i);
            i += 2;
        }
        p.leaves.moments = LeafMoments::from_parts([v[i], v[i + 1], v[i + 2], v[i + 3], v[i + 4], v[i + 5]]);
        i += 6;
        for n in p.chain_by_depth.iter_mut().chain(p.leaves.pmf.iter_mut()) {
            *n = pair(i);
            i += 2;
        }
        Ok(p)
    }

    pub fn bounds(&self) -> Bounds {
        let lower = self.chain.value();
        let explored_len = self.leaves.length.value();
        let truncated = self.leaves.truncated.value();
        let mass = self.frontier_mass.value();
        Bounds {
            ce_star_lower: lower,
            ce_star_upper: lower + self.gap.value(),
            expected_length_lower: explored_len + self.len_lo.value(),
            expected_length_upper: explored_len + self.len_hi.value(),
            truncation_prob_lower: truncated,
            truncation_prob_upper: truncated + mass,
            explored_mass: self.leaves.mass.value(),
            frontier_mass: mass,
            num_expanded: self.num_expanded,
            frontier_size: self.frontier_size,
            num_nodes: self.num_nodes,
        }
    }

    /// Exact values; only when no unexpanded node is left.
    pub fn stats(&self) -> Result<CanopyStats> {
        if self.frontier_size > 0 {
            return Err(CanopyError::Protocol(format!(
                "the canopy is not fully expanded ({} frontier nodes left); use bounds() for a bracket",
                self.frontier_size
            )));
        }
        let m = &self.leaves.moments;
        let ce = self.chain.value();
        let pmf: Vec<f64> = self.leaves.pmf.iter().map(|s| s.value()).collect();
        let length_entropy = entropy_of(&pmf);
        // E[N] and Var(N) by two passes over the length pmf: N takes at most T values, so this is exact to
        // rounding and immune to the running-mean drift of the streamed moments. Lengths are taken relative
        // to the shortest one, so a single length gives a variance of exactly 0.
        let mass: f64 = self.leaves.mass.value();
        let shortest = pmf.iter().position(|&p| p > 0.0).unwrap_or(0);
        let mut shift_mean = Neumaier::default();
        for (n, p) in pmf.iter().enumerate().skip(shortest) {
            shift_mean.add((n - shortest) as f64 * p);
        }
        let shift_mean = shift_mean.value() / mass;
        let mut var_n = Neumaier::default();
        for (n, p) in pmf.iter().enumerate().skip(shortest) {
            var_n.add(p * ((n - shortest) as f64 - shift_mean).powi(2));
        }
        let var_n = var_n.value().max(0.0) / mass;
        let mean_n = shortest as f64 + shift_mean;
        let (var_r, cov) = (m.var_r(), m.cov());
        Ok(CanopyStats {
            ce_star: ce,
            ce_star_leaves: -self.leaves.plogp.value(),
            total_mass: self.leaves.mass.value(),
            length_entropy,
            content_entropy: ce - length_entropy,
            expected_length: mean_n,
            entropy_rate: m.mean_r(),
            length_var: var_n,
            rate_var: var_r,
            length_rate_cov: cov,
            length_rate_corr: correlation(var_n, var_r, cov, m.mean_r()),
            gen_ppl: (ce / mean_n).exp(),
            branching_factor: m.mean_r().exp(),
            truncation_prob: self.leaves.truncated.value(),
            length_pmf: pmf,
            entropy_by_depth: self.chain_by_depth.iter().map(|s| s.value()).collect(),
            num_internal_nodes: self.num_expanded,
            num_leaves: self.leaves.count,
            max_support: self.max_support,
            engine_calls: self.engine_calls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// i.i.d. steps: EOS (token 0) with probability q, else uniform over k other tokens.
    fn iid_logits(q: f64, k: usize) -> Vec<f64> {
        let mut row = vec![((1.0 - q) / k as f64).ln(); k + 1];
        row[0] = q.ln();
        row
    }

    fn run(cfg: TreeConfig, row: &[f64], batch: usize) -> Tree {
        let v = cfg.vocab_size;
        let mut tree = Tree::new(cfg).unwrap();
        while !tree.is_done() {
            let b = tree.next_batch(batch).unwrap();
            let logits: Vec<f64> = b.node_ids.iter().flat_map(|_| row.iter().copied()).collect();
            tree.ingest_logits(&logits, b.node_ids.len(), v).unwrap();
        }
        tree
    }

    fn cfg(v: usize, t: u32, order: Order) -> TreeConfig {
        TreeConfig {
            vocab_size: v,
            eos_token_ids: vec![0],
            max_new_tokens: t,
            policy: Policy::default(),
            order,
            max_nodes: 10_000_000,
            record_nodes: false,
            support_cap: v,
            streaming: false,
            root: None,
        }
    }

    #[test]
    fn iid_closed_form() {
        let (q, k, t) = (0.3f64, 3usize, 6u32);
        let h = -q * q.ln() - (1.0 - q) * ((1.0 - q) / k as f64).ln();
        let expect: f64 = (0..t).map(|i| (1.0 - q).powi(i as i32) * h).sum();
        for order in [Order::DepthFirst, Order::BreadthFirst, Order::BestFirst] {
            let tree = run(cfg(k + 1, t, order), &iid_logits(q, k), 7);
            let s = tree.stats().unwrap();
            assert!((s.ce_star - expect).abs() < 1e-12, "{order:?}");
            assert!((s.ce_star_leaves - expect).abs() < 1e-12);
            assert!((s.total_mass - 1.0).abs() < 1e-12);
            assert!((s.truncation_prob - (1.0 - q).powi(t as i32)).abs() < 1e-12);
            // CE = H(N) + H(Y|N) and CE = E[N]E[r] + Cov.
            assert!((s.ce_star - (s.expected_length * s.entropy_rate + s.length_rate_cov)).abs() < 1e-12);
        }
    }

    #[test]
    fn bounds_bracket_and_collapse() {
        let row = iid_logits(0.2, 2);
        let c = cfg(3, 5, Order::BestFirst);
        let exact = run(c.clone(), &row, 4).stats().unwrap().ce_star;
        let mut tree = Tree::new(c).unwrap();
        let mut last_width = f64::INFINITY;
        while !tree.is_done() {
            let b = tree.bounds();
            assert!(b.ce_star_lower <= exact + 1e-12 && exact <= b.ce_star_upper + 1e-12);
            let width = b.ce_star_upper - b.ce_star_lower;
            assert!(width <= last_width + 1e-12);
            last_width = width;
            let batch = tree.next_batch(2).unwrap();
            let logits: Vec<f64> = batch.node_ids.iter().flat_map(|_| row.iter().copied()).collect();
            tree.ingest_logits(&logits, batch.node_ids.len(), 3).unwrap();
        }
        let b = tree.bounds();
        assert_eq!(b.ce_star_lower, b.ce_star_upper);
        assert!((b.ce_star_lower - exact).abs() < 1e-12);
    }

    /// Runs a model whose next-token logits depend on the last token and the depth, so reaches differ.
    fn run_varied(cfg: TreeConfig, batch: usize) -> (Tree, Vec<Vec<u32>>) {
        let v = cfg.vocab_size;
        let mut tree = Tree::new(cfg).unwrap();
        let mut expanded_by_depth: Vec<Vec<u32>> = Vec::new();
        while !tree.is_done() {
            let b = tree.next_batch(batch).unwrap();
            if matches!(tree.cfg.order, Order::Beam(_)) {
                assert!(b.depths.windows(2).all(|w| w[0] == w[1]), "a beam batch mixes depths");
            }
            let mut logits = Vec::new();
            for (i, (&tok, &d)) in b.tokens.iter().zip(&b.depths).enumerate() {
                let d_idx = d as usize;
                if expanded_by_depth.len() <= d_idx {
                    expanded_by_depth.resize(d_idx + 1, Vec::new());
                }
                expanded_by_depth[d_idx].push(b.node_ids[i] as u32);
                logits.extend((0..v).map(|j| (((tok + 1) as usize * 7 + j * 3 + d_idx) % 5) as f64 * 0.7));
            }
            tree.ingest_logits(&logits, b.node_ids.len(), v).unwrap();
        }
        (tree, expanded_by_depth)
    }

    #[test]
    fn beam_keeps_width_per_depth_and_brackets() {
        let exact = run_varied(cfg(4, 5, Order::DepthFirst), 3).0.stats().unwrap().ce_star;
        for width in [1, 2, 3] {
            let (tree, by_depth) = run_varied(cfg(4, 5, Order::Beam(width)), 2);
            assert!(by_depth.iter().all(|ids| ids.len() <= width), "width {width}: {by_depth:?}");
            // The kept nodes are the most probable of their depth.
            for ids in &by_depth {
                let min_kept = ids.iter().map(|&u| tree.nodes[u as usize].log_reach).fold(f64::INFINITY, f64::min);
                let d = tree.nodes[ids[0] as usize].depth;
                for u in tree.frontier_ids() {
                    if tree.nodes[u as usize].depth == d {
                        assert!(tree.nodes[u as usize].log_reach <= min_kept);
                    }
                }
            }
            let b = tree.bounds();
            assert!(b.frontier_size > 0 && b.ce_star_lower < b.ce_star_upper);
            assert!(b.ce_star_lower <= exact + 1e-12 && exact <= b.ce_star_upper + 1e-12, "width {width}");
            assert!(tree.stats().is_err(), "pruned nodes remain, so no exact value");
            // Ties go to the older node, so reruns expand the same nodes.
            assert_eq!(run_varied(cfg(4, 5, Order::Beam(width)), 2).1, by_depth);
        }
    }

    #[test]
    fn beam_wider_than_every_level_is_exact() {
        let exact = run_varied(cfg(3, 4, Order::DepthFirst), 3).0.stats().unwrap();
        // 2 internal children per node (token 0 is EOS): at most 2^3 nodes at depth 3.
        let (tree, _) = run_varied(cfg(3, 4, Order::Beam(8)), 3);
        let s = tree.stats().unwrap();
        assert!((s.ce_star - exact.ce_star).abs() < 1e-12);
        let b = tree.bounds();
        assert_eq!(b.ce_star_lower, b.ce_star_upper);
    }

    #[test]
    fn beam_releases_every_expanded_node_once() {
        let mut tree = Tree::new(cfg(3, 4, Order::Beam(2))).unwrap();
        let row = [0.0; 3];
        let (mut expanded, mut released) = (vec![], vec![]);
        while !tree.is_done() {
            let b = tree.next_batch(1).unwrap();
            expanded.extend(b.node_ids.iter().copied());
            let logits: Vec<f64> = b.node_ids.iter().flat_map(|_| row.iter().copied()).collect();
            tree.ingest_logits(&logits, b.node_ids.len(), 3).unwrap();
            released.extend(tree.take_released());
        }
        expanded.sort();
        released.sort();
        assert_eq!(released, expanded);
        assert!(tree.frontier_size() > 0);
    }

    #[test]
    fn node_budget_is_enforced_before_growth() {
        let mut c = cfg(4, 8, Order::BreadthFirst);
        c.max_nodes = 50;
        let mut tree = Tree::new(c).unwrap();
        let row = [0.0; 4];
        let err = loop {
            let b = tree.next_batch(16).unwrap();
            let logits: Vec<f64> = b.node_ids.iter().flat_map(|_| row.iter().copied()).collect();
            if let Err(e) = tree.ingest_logits(&logits, b.node_ids.len(), 4) {
                break e;
            }
        };
        assert!(matches!(err, CanopyError::TreeTooLarge { max_nodes: 50, .. }));
        assert!(tree.nodes_reached() <= 50);
        // The failed batch went back to the frontier, so the bracket is still valid.
        assert!(tree.bounds().frontier_mass > 0.0);
    }

    #[test]
    fn release_happens_after_all_internal_children() {
        let mut tree = Tree::new(cfg(3, 3, Order::BreadthFirst)).unwrap();
        let row = [0.0; 3];
        let mut released = vec![];
        while !tree.is_done() {
            let b = tree.next_batch(100).unwrap();
            let logits: Vec<f64> = b.node_ids.iter().flat_map(|_| row.iter().copied()).collect();
            tree.ingest_logits(&logits, b.node_ids.len(), 3).unwrap();
            released.extend(tree.take_released());
        }
        released.sort();
        // Every internal node (1 + 2 + 4) is released exactly once.
        assert_eq!(released, (0..7).collect::<Vec<i64>>());
    }

    #[test]
    fn protocol_errors_are_reported() {
        let mut tree = Tree::new(cfg(3, 2, Order::DepthFirst)).unwrap();
        assert!(matches!(tree.ingest_logits(&[0.0f64; 3], 1, 3), Err(CanopyError::Protocol(_))));
        tree.next_batch(1).unwrap();
        assert!(matches!(tree.next_batch(1), Err(CanopyError::Protocol(_))));
        assert!(matches!(tree.ingest_logits(&[0.0f64; 4], 1, 4), Err(CanopyError::Shape { .. })));
    }

    #[test]
    fn streaming_matches_arena_in_bounded_memory() {
        for t in [3u32, 5, 7] {
            let arena = run_varied(cfg(4, t, Order::DepthFirst), 3).0;
            let mut c = cfg(4, t, Order::DepthFirst);
            c.streaming = true;
            let (stream, _) = run_varied(c, 3);
            let (a, b) = (arena.stats().unwrap(), stream.stats().unwrap());
            assert_eq!(a.ce_star.to_bits(), b.ce_star.to_bits());
            assert_eq!(a.length_pmf, b.length_pmf);
            assert_eq!(a.length_rate_cov.to_bits(), b.length_rate_cov.to_bits());
            assert_eq!((a.num_internal_nodes, a.num_leaves), (b.num_internal_nodes, b.num_leaves));
            // The arena holds the live paths of one batch (3 rows) and their pending children.
            assert!(stream.nodes.len() <= (t as usize) * 4 * 3 + 1, "depth {t}: {} slots", stream.nodes.len());
            if t == 7 {
                assert!(stream.nodes.len() * 10 < arena.nodes.len(), "{} vs {}", stream.nodes.len(), arena.nodes.len());
            }
            assert_eq!(stream.live_nodes(), 0);
            assert_eq!(arena.nodes.len() as u64, a.num_internal_nodes);
        }
    }

    #[test]
    fn streaming_ids_are_never_reused() {
        let mut c = cfg(3, 6, Order::DepthFirst);
        c.streaming = true;
        let mut tree = Tree::new(c).unwrap();
        let mut seen = std::collections::HashSet::new();
        while !tree.is_done() {
            let b = tree.next_batch(2).unwrap();
            for &id in &b.node_ids {
                assert!(id >= 0 && seen.insert(id), "id {id} given twice");
                let p = tree.prefix(id).unwrap();
                assert_eq!(p.len() as i64, b.depths[b.node_ids.iter().position(|&x| x == id).unwrap()]);
            }
            let logits = vec![0.0f64; 3 * b.node_ids.len()];
            tree.ingest_logits(&logits, b.node_ids.len(), 3).unwrap();
            tree.take_released();
        }
        assert!(tree.nodes.len() < 20 && seen.len() > 60);
    }

    #[test]
    fn shards_merge_into_one_run() {
        let full = run_varied(cfg(4, 5, Order::DepthFirst), 3).0.stats().unwrap();
        for split_depth in [1u32, 2] {
            let mut head = Tree::new(cfg(4, 5, Order::BreadthFirst)).unwrap();
            loop {
                let shallow =
                    head.frontier_ids().iter().filter(|&&u| head.nodes[u as usize].depth < split_depth).count();
                if shallow == 0 {
                    break;
                }
                let b = head.next_batch(shallow).unwrap();
                let logits: Vec<f64> = b
                    .tokens
                    .iter()
                    .zip(&b.depths)
                    .flat_map(|(&tok, &d)| {
                        (0..4).map(move |j| (((tok + 1) as usize * 7 + j * 3 + d as usize) % 5) as f64 * 0.7)
                    })
                    .collect();
                head.ingest_logits(&logits, b.node_ids.len(), 4).unwrap();
            }
            let mut merged = head.partial(false);
            for root in head.frontier_roots().unwrap() {
                let mut c = cfg(4, 5, Order::DepthFirst);
                c.streaming = true;
                c.root = Some(root);
                let shard = run_varied(c, 2).0.partial(true);
                let restored = Partial::from_slice(&shard.to_vec()).unwrap();
                merged.merge(&restored).unwrap();
            }
            let m = merged.stats().unwrap();
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * a.abs().max(1.0);
            assert!(close(m.ce_star, full.ce_star) && close(m.ce_star_leaves, full.ce_star_leaves));
            assert!(close(m.length_rate_cov, full.length_rate_cov) && close(m.rate_var, full.rate_var));
            assert!(close(m.expected_length, full.expected_length) && close(m.entropy_rate, full.entropy_rate));
            assert!(m.length_pmf.iter().zip(&full.length_pmf).all(|(a, b)| close(*a, *b)));
            assert!(m.entropy_by_depth.iter().zip(&full.entropy_by_depth).all(|(a, b)| close(*a, *b)));
            assert_eq!((m.num_internal_nodes, m.num_leaves), (full.num_internal_nodes, full.num_leaves));
        }
    }

    #[test]
    fn streaming_gives_the_arena_paths_ids() {
        let ids = |streaming: bool| {
            let mut c = cfg(3, 6, Order::DepthFirst);
            c.streaming = streaming;
            let mut tree = Tree::new(c).unwrap();
            let (mut ids, mut parents, mut released) = (vec![], vec![], vec![]);
            while !tree.is_done() {
                let b = tree.next_batch(3).unwrap();
                ids.extend(b.node_ids.iter().copied());
                parents.extend(b.parent_ids.iter().copied());
                let logits = vec![0.0f64; 3 * b.node_ids.len()];
                tree.ingest_logits(&logits, b.node_ids.len(), 3).unwrap();
                released.extend(tree.take_released());
            }
            (ids, parents, released)
        };
        assert_eq!(ids(true), ids(false));
    }

    // --- against an independent brute force --------------------------------------------------------
    // A recursive enumeration over token sequences with its own softmax / top-k / temperature code (no
    // Tree, no policy.rs): every leaf's probability, length and path entropy, then the population values.

    /// Logits that depend on the whole prefix (a small hash), distinct within a row (no top-k ties).
    fn prefix_logits(prefix: &[u32], v: usize) -> Vec<f64> {
        let mut h: u64 = 1469598103934665603;
        for &t in prefix {
            h = (h ^ (t as u64 + 1)).wrapping_mul(1099511628211);
        }
        (0..v)
            .map(|j| {
                let x = (h ^ (j as u64).wrapping_mul(0x9E3779B97F4A7C15)).wrapping_mul(0xBF58476D1CE4E5B9) >> 40;
                2.5 * (x as f64 / (1u64 << 24) as f64) + 1e-6 * j as f64
            })
            .collect()
    }

    /// token -> probability: temperature, then the k largest logits, then softmax (top_p = 1).
    fn brute_policy(logits: &[f64], temperature: f64, top_k: Option<usize>) -> Vec<(u32, f64)> {
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap());
        idx.truncate(top_k.unwrap_or(logits.len()));
        let m = logits[idx[0]] / temperature;
        let z: f64 = idx.iter().map(|&i| (logits[i] / temperature - m).exp()).sum();
        idx.iter().map(|&i| (i as u32, (logits[i] / temperature - m).exp() / z)).collect()
    }

    struct BruteLeaf {
        p: f64,
        len: usize,
        path_h: f64,
        eos: bool,
    }

    fn brute_enumerate(prefix: &mut Vec<u32>, p: f64, path_h: f64, v: usize, t: usize, temp: f64,
                       top_k: Option<usize>, leaves: &mut Vec<BruteLeaf>, chain: &mut f64, internal: &mut u64) {
        *internal += 1;
        let q = brute_policy(&prefix_logits(prefix, v), temp, top_k);
        let h: f64 = q.iter().map(|&(_, x)| -x * x.ln()).sum();
        *chain += p * h;
        for (tok, x) in q {
            prefix.push(tok);
            if tok == 0 || prefix.len() == t {
                leaves.push(BruteLeaf { p: p * x, len: prefix.len(), path_h: path_h + h, eos: tok == 0 });
            } else {
                brute_enumerate(prefix, p * x, path_h + h, v, t, temp, top_k, leaves, chain, internal);
            }
            prefix.pop();
        }
    }

    /// Runs the engine on `prefix_logits`, tracking each node's prefix from its parent's.
    fn run_prefix_model(cfg: TreeConfig, batch: usize) -> Tree {
        let v = cfg.vocab_size;
        let mut prefixes: std::collections::HashMap<i64, Vec<u32>> = std::collections::HashMap::new();
        let mut tree = Tree::new(cfg).unwrap();
        while !tree.is_done() {
            let b = tree.next_batch(batch).unwrap();
            let mut logits = Vec::new();
            for i in 0..b.node_ids.len() {
                let mut pre = if b.parent_ids[i] < 0 { vec![] } else { prefixes[&b.parent_ids[i]].clone() };
                if b.parent_ids[i] >= 0 {
                    pre.push(b.tokens[i] as u32);
                }
                logits.extend(prefix_logits(&pre, v));
                prefixes.insert(b.node_ids[i], pre);
            }
            tree.ingest_logits(&logits, b.node_ids.len(), v).unwrap();
        }
        tree
    }

    #[test]
    fn exact_values_match_brute_force() {
        for (v, t, temp, top_k) in [(3usize, 5usize, 1.0f64, None), (4, 4, 0.6, Some(3)), (5, 4, 1.7, Some(2)),
                                    (6, 3, 1.0, None)] {
            let (mut leaves, mut chain, mut internal) = (Vec::new(), 0.0f64, 0u64);
            brute_enumerate(&mut vec![], 1.0, 0.0, v, t, temp, top_k, &mut leaves, &mut chain, &mut internal);
            let mass: f64 = leaves.iter().map(|l| l.p).sum();
            let en: f64 = leaves.iter().map(|l| l.p * l.len as f64).sum();
            let ce_leaves: f64 = leaves.iter().map(|l| -l.p * l.p.ln()).sum();
            let rate: f64 = leaves.iter().map(|l| l.p * l.path_h / l.len as f64).sum();
            let trunc: f64 = leaves.iter().filter(|l| !l.eos).map(|l| l.p).sum();
            let mut pmf = vec![0.0; t + 1];
            for l in &leaves {
                pmf[l.len] += l.p;
            }
            for order in [Order::DepthFirst, Order::BreadthFirst, Order::BestFirst] {
                let mut c = cfg(v, t as u32, order);
                c.policy = Policy::new(temp, top_k, 1.0).unwrap();
                let s = run_prefix_model(c, 3).stats().unwrap();
                let ctx = format!("v={v} t={t} temp={temp} top_k={top_k:?} {order:?}");
                assert!((s.ce_star - chain).abs() < 1e-12, "{ctx}: {} vs {chain}", s.ce_star);
                assert!((s.ce_star_leaves - ce_leaves).abs() < 1e-12, "{ctx}");
                assert!((s.total_mass - mass).abs() < 1e-12 && (mass - 1.0).abs() < 1e-12, "{ctx}");
                assert!((s.expected_length - en).abs() < 1e-12, "{ctx}");
                assert!((s.entropy_rate - rate).abs() < 1e-12, "{ctx}");
                assert!((s.truncation_prob - trunc).abs() < 1e-12, "{ctx}");
                assert!(s.length_pmf.iter().zip(&pmf).all(|(a, b)| (a - b).abs() < 1e-12), "{ctx}");
                assert_eq!((s.num_internal_nodes, s.num_leaves), (internal, leaves.len() as u64), "{ctx}");
                // CE*_max = -sum pi log pi over leaves (the chain rule) in the brute force too.
                assert!((chain - ce_leaves).abs() < 1e-12, "{ctx}");
            }
        }
    }

    #[test]
    fn brackets_and_beams_contain_brute_force() {
        let (v, t) = (4usize, 5usize);
        let (mut leaves, mut chain, mut internal) = (Vec::new(), 0.0f64, 0u64);
        brute_enumerate(&mut vec![], 1.0, 0.0, v, t, 1.0, None, &mut leaves, &mut chain, &mut internal);
        let en: f64 = leaves.iter().map(|l| l.p * l.len as f64).sum();
        for order in [Order::BestFirst, Order::BreadthFirst, Order::Beam(1), Order::Beam(3)] {
            let mut prefixes: std::collections::HashMap<i64, Vec<u32>> = std::collections::HashMap::new();
            let mut tree = Tree::new(cfg(v, t as u32, order)).unwrap();
            let mut last = f64::INFINITY;
            loop {
                let b = tree.bounds();
                assert!(b.ce_star_lower <= chain + 1e-12 && chain <= b.ce_star_upper + 1e-12, "{order:?}");
                assert!(b.expected_length_lower <= en + 1e-12 && en <= b.expected_length_upper + 1e-12, "{order:?}");
                assert!(b.ce_star_upper - b.ce_star_lower <= last + 1e-12, "{order:?}");
                last = b.ce_star_upper - b.ce_star_lower;
                if tree.is_done() {
                    break;
                }
                let batch = tree.next_batch(2).unwrap();
                if batch.node_ids.is_empty() {
                    break; // a beam that pruned the rest
                }
                let mut logits = Vec::new();
                for i in 0..batch.node_ids.len() {
                    let mut pre = if batch.parent_ids[i] < 0 { vec![] } else { prefixes[&batch.parent_ids[i]].clone() };
                    if batch.parent_ids[i] >= 0 {
                        pre.push(batch.tokens[i] as u32);
                    }
                    logits.extend(prefix_logits(&pre, v));
                    prefixes.insert(batch.node_ids[i], pre);
                }
                tree.ingest_logits(&logits, batch.node_ids.len(), v).unwrap();
            }
            if matches!(order, Order::BestFirst | Order::BreadthFirst) {
                assert!(last == 0.0 && (tree.bounds().ce_star_lower - chain).abs() < 1e-12, "{order:?}");
            }
        }
    }
}
