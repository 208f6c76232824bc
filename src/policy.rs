//! The decoding policy: temperature -> top-k -> top-p -> renormalise, applied to one logits row in f64, and
//! to batches of rows (`policy_rows`, and `normalise_support` for a support a backend computed itself),
//! gathered in CSR form (`RowsOut`).
//!
//! Semantics (`docs/definitions.md`, "The canopy and the policy"; shared with the torch implementation in
//! `python/canopy_rs/backends/torch_policy.py` and the plain-Python reference in `tests/reference.py`):
//! * `z = logit / temperature`.
//! * top-k keeps every token whose logit is >= the k-th largest (ties at the threshold kept, so possibly more
//!   than k tokens). Selecting on the logits rather than on `z` is the same set, since `x / T` is monotone
//!   for `T > 0`.
//! * top-p sorts the kept tokens by `z` descending (ties by token id), and keeps the smallest prefix whose
//!   cumulative probability reaches `p * (1 - 1e-12)` (the relative slack makes exact boundaries, such as a
//!   uniform row and `p = 0.5`, independent of summation order). The first token is always kept.
//! * the kept set is renormalised; tokens whose f64 probability underflows to 0 are not in the support.
//!
//! The support is emitted in ascending token order with its log-probabilities; the row's entropy (nats) is
//! returned.

use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};

use rayon::prelude::*;

use crate::error::{invalid, CanopyError, Result};
use crate::stats::Neumaier;

/// Relative slack on the top-p threshold (see the module docs).
pub const TOP_P_SLACK: f64 = 1e-12;
/// Above this k, top-k uses a selection on a copy of the row instead of the streaming insertion buffer.
const STREAMING_TOP_K_MAX: usize = 64;
/// Rows with vocab * k at most this use k branch-free max passes instead (tiny vocabularies, where the
/// streaming buffer's insertions are frequent and unpredictable).
const MAX_PASSES_WORK: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: f64,
}

impl Policy {
    pub fn new(temperature: f64, top_k: Option<usize>, top_p: f64) -> Result<Self> {
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(invalid(
                "temperature",
                format!("must be a finite number > 0, got {temperature} (use a small value such as 1e-3 for near-greedy decoding)"),
            ));
        }
        if top_k == Some(0) {
            return Err(invalid("top_k", "must be >= 1, or None to disable top-k"));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(invalid("top_p", format!("must be in (0, 1], got {top_p} (1.0 disables top-p)")));
        }
        Ok(Self { temperature, top_k, top_p })
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self { temperature: 1.0, top_k: None, top_p: 1.0 }
    }
}

/// A logits element type the policy reads (f32 or f64); converted to f64 on the fly.
pub trait Logit: Copy + Send + Sync + 'static {
    fn to_f64(self) -> f64;
}
impl Logit for f32 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
}
impl Logit for f64 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
}

/// Reusable per-thread buffers, so rows allocate nothing in the steady state.
#[derive(Default)]
pub struct Scratch {
    top: Vec<f64>,
    cand_z: Vec<f64>,
    cand_tok: Vec<u32>,
    order: Vec<u32>,
    keep: Vec<bool>,
}

/// Apply `policy` to one row. Appends the support (ascending token ids) to `tokens`/`logprobs` and returns
/// the entropy of the policy distribution in nats.
pub fn apply_row<T: Logit>(
    row: &[T],
    policy: &Policy,
    row_index: usize,
    scratch: &mut Scratch,
    tokens: &mut Vec<u32>,
    logprobs: &mut Vec<f64>,
) -> Result<f64> {
    let threshold = select_threshold(row, policy, row_index, scratch)?;
    // Kept candidates in token order.
    scratch.cand_z.clear();
    scratch.cand_tok.clear();
    for (i, &v) in row.iter().enumerate() {
        let x = v.to_f64();
        if x >= threshold {
            scratch.cand_z.push(x / policy.temperature);
            scratch.cand_tok.push(i as u32);
        }
    }
    if policy.top_p < 1.0 && scratch.cand_z.len() > 1 {
        apply_top_p(policy.top_p, scratch);
    }
    Ok(emit_normalised(&scratch.cand_z, &scratch.cand_tok, tokens, logprobs))
}

/// Validates the row and returns the smallest logit that survives top-k (or the smallest finite value
/// when top-k keeps everything). One pass for small k: validation and the streaming top-k share the loop.
fn select_threshold<T: Logit>(row: &[T], policy: &Policy, row_index: usize, scratch: &mut Scratch) -> Result<f64> {
    let k = policy.top_k.unwrap_or(usize::MAX).min(row.len());
    if k < row.len() && row.len() * k <= MAX_PASSES_WORK {
        return threshold_by_max_passes(row, k, row_index);
    }
    let streaming = k < row.len() && k <= STREAMING_TOP_K_MAX;
    // `top[..len]` holds the k largest values seen so far (unordered) in a stack array; `floor` is their
    // minimum once k are held, at `floor_at`. Most elements are rejected by one comparison against it; an
    // accepted one replaces the minimum, which is then recomputed over k values (no shifting).
    let mut top = [f64::NEG_INFINITY; STREAMING_TOP_K_MAX];
    let mut len = 0usize;
    let mut floor = f64::NEG_INFINITY;
    let mut floor_at = 0usize;
    let mut finite = 0usize;
    let mut bad = false;
    for &v in row {
        let x = v.to_f64();
        // count_finite's checks, fused into this pass so a wide row is read once.
        bad |= !(x < f64::INFINITY);
        finite += (x > f64::NEG_INFINITY) as usize;
        if streaming && x > floor {
            if len < k {
                top[len] = x;
                len += 1;
                if len < k {
                    continue;
                }
            } else {
                top[floor_at] = x;
            }
            floor = top[0];
            floor_at = 0;
            for (i, &t) in top[1..k].iter().enumerate() {
                if t < floor {
                    floor = t;
                    floor_at = i + 1;
                }
            }
        }
    }
    if bad || finite == 0 {
        return Err(invalid_row(row, row_index));
    }
    if k >= finite {
        return Ok(f64::MIN); // every finite logit is kept (-inf never is: -inf < f64::MIN)
    }
    if streaming {
        // `floor` is the k-th largest; values equal to it are kept by the caller's `>=`, so ties survive.
        return Ok(floor);
    }
    let all = &mut scratch.top;
    all.clear();
    all.extend(row.iter().map(|v| v.to_f64()));
    let (_, kth, _) = all.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    Ok(*kth)
}

/// The k-th largest logit (with multiplicity) by repeated max passes: each pass finds the largest value
/// below the previous one and counts its copies, until k are covered. Branch-free inner loops.
fn threshold_by_max_passes<T: Logit>(row: &[T], k: usize, row_index: usize) -> Result<f64> {
    let finite = count_finite(row, row_index)?;
    if k >= finite {
        return Ok(f64::MIN);
    }
    let mut above = f64::INFINITY;
    let mut covered = 0usize;
    loop {
        let mut m = f64::NEG_INFINITY;
        for &v in row {
            let x = v.to_f64();
            let c = if x < above { x } else { f64::NEG_INFINITY };
            m = if c > m { c } else { m };
        }
        for &v in row {
            covered += (v.to_f64() == m) as usize;
        }
        if covered >= k {
            return Ok(m);
        }
        above = m;
    }
}

/// Validates a row (no NaN, no +inf, not all -inf) and counts its finite entries.
fn count_finite<T: Logit>(row: &[T], row_index: usize) -> Result<usize> {
    let mut finite = 0usize;
    let mut bad = false;
    for &v in row {
        let x = v.to_f64();
        // NaN and +inf are the only values for which this fails (-inf passes and is counted out).
        bad |= !(x < f64::INFINITY);
        finite += (x > f64::NEG_INFINITY) as usize;
    }
    if bad || finite == 0 {
        return Err(invalid_row(row, row_index));
    }
    Ok(finite)
}

/// The error for a row that failed validation (NaN, +inf, or all -inf).
fn invalid_row<T: Logit>(row: &[T], row_index: usize) -> CanopyError {
    let message = if row.iter().any(|v| v.to_f64().is_nan()) {
        "contains NaN; check the model's numerics (dtype overflow?) before computing entropies"
    } else if row.iter().any(|v| v.to_f64() == f64::INFINITY) {
        "contains +inf; logits must be finite or -inf (masked)"
    } else {
        "is all -inf: no token has positive probability under the policy"
    };
    CanopyError::InvalidLogits { row: row_index, message: message.into() }
}

/// Keeps the smallest prefix (by z descending, ties by token id) whose probability reaches p.
fn apply_top_p(top_p: f64, scratch: &mut Scratch) {
    let n = scratch.cand_z.len();
    let z = &scratch.cand_z;
    let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut total = Neumaier::default();
    for &zi in z {
        total.add((zi - max).exp());
    }
    let total = total.value();
    let order = &mut scratch.order;
    order.clear();
    order.extend(0..n as u32);
    // Candidates are in token order, so a stable sort on z descending breaks ties by token id.
    order.sort_by(|&a, &b| z[b as usize].total_cmp(&z[a as usize]));
    let target = top_p * (1.0 - TOP_P_SLACK);
    let keep = &mut scratch.keep;
    keep.clear();
    keep.resize(n, false);
    let mut cum = 0.0;
    for &i in order.iter() {
        keep[i as usize] = true;
        cum += (z[i as usize] - max).exp() / total;
        if cum >= target {
            break;
        }
    }
    let mut w = 0;
    for r in 0..n {
        if keep[r] {
            scratch.cand_z[w] = scratch.cand_z[r];
            scratch.cand_tok[w] = scratch.cand_tok[r];
            w += 1;
        }
    }
    scratch.cand_z.truncate(w);
    scratch.cand_tok.truncate(w);
}

/// Softmax of `z` over the candidates in f64; appends the non-zero-probability entries and returns the
/// entropy. `z` are unnormalised log-weights. One exp per candidate (reused for p and the entropy).
pub(crate) fn emit_normalised(z: &[f64], tok: &[u32], tokens: &mut Vec<u32>, logprobs: &mut Vec<f64>) -> f64 {
    let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = Neumaier::default();
    for &zi in z {
        sum.add((zi - max).exp());
    }
    let sum = sum.value();
    let log_sum = sum.ln();
    let mut entropy = Neumaier::default();
    for (&zi, &t) in z.iter().zip(tok) {
        let shifted = zi - max;
        let p = shifted.exp() / sum;
        if p > 0.0 {
            let lp = shifted - log_sum;
            tokens.push(t);
            logprobs.push(lp);
            entropy.add(-p * lp);
        }
    }
    entropy.value().max(0.0)
}

/// Validates one backend-supplied support row (tokens distinct and in range, log-probs finite, mass 1
/// within 1e-4) and renormalises it exactly.
pub fn normalise_support_row(
    row_tokens: &[i64],
    row_logprobs: &[f64],
    vocab_size: usize,
    row_index: usize,
    tokens: &mut Vec<u32>,
    logprobs: &mut Vec<f64>,
) -> Result<f64> {
    let bad = |message: String| CanopyError::InvalidLogits { row: row_index, message };
    if row_tokens.is_empty() {
        return Err(bad("support is empty: every row needs at least one token".into()));
    }
    let mut mass = Neumaier::default();
    let mut z = Vec::with_capacity(row_tokens.len());
    let mut tok = Vec::with_capacity(row_tokens.len());
    // Sort by token: the emitted support is in ascending token order like apply_row's, and duplicates
    // become neighbours.
    let mut idx: Vec<usize> = (0..row_tokens.len()).collect();
    idx.sort_by_key(|&i| row_tokens[i]);
    for (j, &i) in idx.iter().enumerate() {
        let t = row_tokens[i];
        if t < 0 || t as usize >= vocab_size {
            return Err(bad(format!("token id {t} is outside [0, vocab_size={vocab_size})")));
        }
        if j > 0 && row_tokens[idx[j - 1]] == t {
            return Err(bad(format!("token id {t} appears twice in the support")));
        }
        let lp = row_logprobs[i];
        if !lp.is_finite() || lp > 1e-6 {
            return Err(bad(format!("log-probability {lp} for token {t} must be finite and <= 0")));
        }
        mass.add(lp.exp());
        z.push(lp);
        tok.push(t as u32);
    }
    let mass = mass.value();
    if (mass - 1.0).abs() > 1e-4 {
        return Err(bad(format!("support probabilities sum to {mass}, not 1 (send the renormalised policy)")));
    }
    Ok(emit_normalised(&z, &tok, tokens, logprobs))
}

// Batches of rows: the policy (or a backend's own support) applied row by row, gathered in CSR form.

/// Whether row batches may run on the rayon pool. Cleared in a forked child (see `python.rs`), whose copy
/// of the pool has no threads: waiting on it would hang.
static PARALLEL: AtomicBool = AtomicBool::new(true);

pub fn set_parallel(enabled: bool) {
    PARALLEL.store(enabled, AtomicOrdering::Relaxed);
}

pub(crate) fn parallel() -> bool {
    PARALLEL.load(AtomicOrdering::Relaxed)
}
/// Rows per parallel task aim at this many logits, so tiny vocabularies are not split into tiny tasks.
pub(crate) const ELEMENTS_PER_TASK: usize = 1 << 15;

/// The policy's output for a batch, in CSR form, in row order: row `i`'s support is
/// `tokens[offsets[i]..offsets[i + 1]]` (ascending token ids) with `logprobs` alongside, and `entropy[i]`
/// is its entropy in nats.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RowsOut {
    pub offsets: Vec<usize>,
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f64>,
    pub entropy: Vec<f64>,
}

/// Applies the policy to `rows` rows of width `vocab` (row-major), in parallel over fixed-size chunks.
/// Output is identical for any thread count.
pub fn policy_rows<T: Logit>(logits: &[T], vocab: usize, policy: &Policy) -> Result<RowsOut> {
    if vocab == 0 || logits.len() % vocab != 0 {
        return Err(CanopyError::Shape {
            param: "logits",
            message: format!("length {} is not a multiple of vocab_size {vocab}", logits.len()),
        });
    }
    let rows = logits.len() / vocab;
    let rows_per_task = (ELEMENTS_PER_TASK / vocab).max(1);
    let run_chunk = |(chunk_index, chunk): (usize, &[T])| -> Result<RowsOut> {
        let mut scratch = Scratch::default();
        let mut out = RowsOut::default();
        out.offsets.push(0);
        for (j, row) in chunk.chunks_exact(vocab).enumerate() {
            let h = apply_row(row, policy, chunk_index * rows_per_task + j, &mut scratch, &mut out.tokens, &mut out.logprobs)?;
            out.entropy.push(h);
            out.offsets.push(out.tokens.len());
        }
        Ok(out)
    };
    let chunks: Vec<Result<RowsOut>> = if rows > rows_per_task && parallel() {
        logits.par_chunks(rows_per_task * vocab).enumerate().map(run_chunk).collect()
    } else {
        logits.chunks(rows_per_task * vocab).enumerate().map(run_chunk).collect()
    };
    let mut merged = RowsOut { offsets: Vec::with_capacity(rows + 1), ..Default::default() };
    merged.offsets.push(0);
    for chunk in chunks {
        let chunk = chunk?;
        let base = merged.tokens.len();
        merged.offsets.extend(chunk.offsets[1..].iter().map(|o| o + base));
        merged.tokens.extend_from_slice(&chunk.tokens);
        merged.logprobs.extend_from_slice(&chunk.logprobs);
        merged.entropy.extend_from_slice(&chunk.entropy);
    }
    Ok(merged)
}

/// Validates and renormalises a backend-supplied CSR support.
pub fn normalise_support(offsets: &[i64], tokens: &[i64], logprobs: &[f64], vocab_size: usize) -> Result<RowsOut> {
    check_csr(offsets, tokens, logprobs)?;
    let mut out = RowsOut::default();
    out.offsets.push(0);
    for (row, w) in offsets.windows(2).enumerate() {
        let (a, b) = (w[0] as usize, w[1] as usize);
        let h = normalise_support_row(&tokens[a..b], &logprobs[a..b], vocab_size, row, &mut out.tokens, &mut out.logprobs)?;
        out.entropy.push(h);
        out.offsets.push(out.tokens.len());
    }
    Ok(out)
}

/// Validates the CSR layout of a backend-supplied support.
pub(crate) fn check_csr(offsets: &[i64], tokens: &[i64], logprobs: &[f64]) -> Result<()> {
    let shape = |message: String| CanopyError::Shape { param: "support", message };
    if offsets.is_empty() || offsets[0] != 0 {
        return Err(shape("offsets must start at 0 and have one entry per row plus one".into()));
    }
    if tokens.len() != logprobs.len() {
        return Err(shape(format!("tokens ({}) and logprobs ({}) differ in length", tokens.len(), logprobs.len())));
    }
    if *offsets.last().unwrap() as usize != tokens.len() || offsets.windows(2).any(|w| w[1] < w[0]) {
        return Err(shape("offsets must be non-decreasing and end at len(tokens)".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(row: &[f64], policy: Policy) -> (Vec<u32>, Vec<f64>, f64) {
        let mut s = Scratch::default();
        let (mut t, mut l) = (vec![], vec![]);
        let h = apply_row(row, &policy, 0, &mut s, &mut t, &mut l).unwrap();
        (t, l, h)
    }

    #[test]
    fn uniform_full_support_has_log_v_entropy() {
        let (t, _, h) = run(&[0.5; 8], Policy::default());
        assert_eq!(t.len(), 8);
        assert!((h - 8f64.ln()).abs() < 1e-14);
    }

    #[test]
    fn top_k_keeps_ties_at_threshold() {
        let p = Policy::new(1.0, Some(2), 1.0).unwrap();
        let (t, _, _) = run(&[3.0, 1.0, 2.0, 2.0, 0.0], p);
        assert_eq!(t, vec![0, 2, 3]);
    }

    #[test]
    fn top_p_keeps_crossing_token_and_first() {
        // probs ~ [0.5, 0.3, 0.2]: p = 0.6 keeps {0, 1}; p = 0.01 keeps {0}.
        let row = [0.5f64.ln(), 0.3f64.ln(), 0.2f64.ln()];
        let (t, l, _) = run(&row, Policy::new(1.0, None, 0.6).unwrap());
        assert_eq!(t, vec![0, 1]);
        assert!((l[0] - (0.5f64 / 0.8).ln()).abs() < 1e-14);
        let (t, _, h) = run(&row, Policy::new(1.0, None, 0.01).unwrap());
        assert_eq!(t, vec![0]);
        assert_eq!(h, 0.0);
    }

    #[test]
    fn top_p_exact_boundary_on_uniform_row() {
        let (t, _, _) = run(&[0.0; 4], Policy::new(1.0, None, 0.5).unwrap());
        assert_eq!(t, vec![0, 1]);
    }

    #[test]
    fn temperature_scales_before_softmax() {
        let row = [1.0, 0.0];
        let (_, l, _) = run(&row, Policy::new(2.0, None, 1.0).unwrap());
        let p0 = 1.0 / (1.0 + (-0.5f64).exp());
        assert!((l[0].exp() - p0).abs() < 1e-15);
    }

    #[test]
    fn neg_inf_is_masked_and_bad_rows_fail() {
        let (t, _, _) = run(&[f64::NEG_INFINITY, 0.0, 0.0], Policy::default());
        assert_eq!(t, vec![1, 2]);
        let mut s = Scratch::default();
        let (mut t, mut l) = (vec![], vec![]);
        for row in [[f64::NAN, 0.0], [f64::INFINITY, 0.0], [f64::NEG_INFINITY, f64::NEG_INFINITY]] {
            assert!(apply_row(&row, &Policy::default(), 3, &mut s, &mut t, &mut l).is_err());
        }
    }

    #[test]
    fn large_k_selection_matches_streaming() {
        let row: Vec<f64> = (0..500).map(|i| ((i * 7919) % 101) as f64 * 0.1).collect();
        for k in [1, 5, 64, 65, 200, 499] {
            let (a, _, ha) = run(&row, Policy::new(0.7, Some(k), 1.0).unwrap());
            let mut sorted = row.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let thr = sorted[k - 1];
            let expect: Vec<u32> = (0..row.len() as u32).filter(|&i| row[i as usize] >= thr).collect();
            assert_eq!(a, expect, "k={k}");
            assert!(ha.is_finite());
        }
    }

    #[test]
    fn max_passes_and_streaming_agree_with_sorting() {
        let mut state = 7u64;
        for trial in 0..300 {
            let v = 2 + trial % 40;
            let row: Vec<f64> = (0..v)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((state >> 60) as f64) * 0.5 // 16 levels: many ties
                })
                .collect();
            let mut sorted = row.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            for k in 1..v {
                let expect = sorted[k - 1];
                assert_eq!(threshold_by_max_passes(&row, k, 0).unwrap(), expect, "passes v={v} k={k}");
                let p = Policy::new(1.0, Some(k), 1.0).unwrap();
                if v * k > MAX_PASSES_WORK {
                    assert_eq!(select_threshold(&row, &p, 0, &mut Scratch::default()).unwrap(), expect);
                }
            }
        }
    }

    #[test]
    fn batches_return_csr_rows() {
        let logits = [0.0, 1.0, 2.0, f64::NEG_INFINITY, 0.0, 0.0];
        let out = policy_rows(&logits, 3, &Policy::default()).unwrap();
        assert_eq!(out.offsets, vec![0, 3, 5]);
        assert_eq!(out.tokens, vec![0, 1, 2, 1, 2]);
        assert!((out.entropy[1] - 2f64.ln()).abs() < 1e-14);
        let offsets: Vec<i64> = out.offsets.iter().map(|&o| o as i64).collect();
        let tokens: Vec<i64> = out.tokens.iter().map(|&t| t as i64).collect();
        let again = normalise_support(&offsets, &tokens, &out.logprobs, 3).unwrap();
        assert_eq!((&again.offsets, &again.tokens), (&out.offsets, &out.tokens));
        for (a, b) in again.logprobs.iter().zip(&out.logprobs).chain(again.entropy.iter().zip(&out.entropy)) {
            assert!((a - b).abs() < 1e-14);
        }
        assert!(normalise_support(&[0, 2], &tokens[..1], &out.logprobs[..1], 3).is_err());
    }

    #[test]
    fn multi_chunk_batch_matches_row_by_row() {
        let vocab = 3;
        let rows = 2 * ELEMENTS_PER_TASK / vocab + 5;
        let logits: Vec<f64> = (0..rows * vocab).map(|i| ((i * 7919) % 13) as f64 * 0.3).collect();
        let policy = Policy::new(0.8, Some(2), 0.9).unwrap();
        let out = policy_rows(&logits, vocab, &policy).unwrap();
        assert_eq!(out.offsets.len(), rows + 1);
        for r in [0, rows / 2, rows - 1] {
            let (t, l, h) = run(&logits[r * vocab..(r + 1) * vocab], policy);
            let (a, b) = (out.offsets[r], out.offsets[r + 1]);
            assert_eq!((&out.tokens[a..b], &out.logprobs[a..b], out.entropy[r]), (&t[..], &l[..], h));
        }
    }

    #[test]
    fn bad_policy_values_are_rejected() {
        assert!(Policy::new(0.0, None, 1.0).is_err());
        assert!(Policy::new(f64::NAN, None, 1.0).is_err());
        assert!(Policy::new(1.0, Some(0), 1.0).is_err());
        assert!(Policy::new(1.0, None, 0.0).is_err());
        assert!(Policy::new(1.0, None, 1.5).is_err());
    }
}

