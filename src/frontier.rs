//! The frontier: the unexpanded internal nodes of a canopy, in the order the tree (`src/tree.rs`) expands
//! them: depth-first (a stack), breadth-first (a queue), best-first (a max-heap on reach probability) or
//! beam (depth by depth, keeping only the most probable nodes of each depth).

use std::collections::{BinaryHeap, VecDeque};

use crate::error::{invalid, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Most recently created first: the least live state (the default for exact enumeration).
    DepthFirst,
    BreadthFirst,
    /// Highest reach probability first (what the budgeted bracket uses).
    BestFirst,
    /// Level by level, expanding only the given number of highest-reach nodes per depth; the rest stay
    /// frontier nodes for good, so the bracket still covers them.
    Beam(usize),
}

impl Order {
    pub fn parse(s: &str, beam_width: Option<usize>) -> Result<Self> {
        let order = match s {
            "depth-first" => Self::DepthFirst,
            "breadth-first" => Self::BreadthFirst,
            "best-first" => Self::BestFirst,
            "beam" => match beam_width {
                Some(w) if w >= 1 => return Ok(Self::Beam(w)),
                Some(w) => return Err(invalid("beam_width", format!("must be >= 1, got {w}"))),
                None => return Err(invalid("beam_width", "order='beam' needs beam_width (nodes kept per depth)")),
            },
            _ => {
                return Err(invalid(
                    "order",
                    format!("unknown order {s:?}; use 'depth-first', 'breadth-first', 'best-first' or 'beam'"),
                ))
            }
        };
        if beam_width.is_some() {
            return Err(invalid("beam_width", format!("only applies to order='beam' (order is {s:?}); drop it")));
        }
        Ok(order)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct HeapItem {
    log_reach: f64,
    id: u32,
}
impl Eq for HeapItem {}
impl Ord for HeapItem {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Max-heap on reach probability; among equals the older (smaller) id first.
        self.log_reach.total_cmp(&other.log_reach).then_with(|| other.id.cmp(&self.id))
    }
}
impl PartialOrd for HeapItem {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

pub(crate) enum Frontier {
    Stack(Vec<u32>),
    Queue(VecDeque<u32>),
    Heap(BinaryHeap<HeapItem>),
    Beam(Beam),
}

/// Depth-synchronous frontier: `level` holds the kept nodes of the current depth (popped from the back),
/// `next` collects the children of that depth, `pruned` the nodes never to be expanded.
pub(crate) struct Beam {
    width: usize,
    level: Vec<u32>,
    next: Vec<HeapItem>,
    pruned: Vec<u32>,
}

impl Beam {
    /// Starts the next depth once the current one is finished (the tree calls it only with nothing in
    /// flight, so `next` is complete): keeps the `width` highest-reach nodes, ties to the older id.
    /// Returns the nodes it pruned.
    fn advance(&mut self) -> &[u32] {
        let start = self.pruned.len();
        if self.level.is_empty() && !self.next.is_empty() {
            let mut next = std::mem::take(&mut self.next);
            next.sort_unstable_by(|a, b| b.cmp(a));
            let keep = self.width.min(next.len());
            self.pruned.extend(next[keep..].iter().map(|i| i.id));
            self.level.extend(next[..keep].iter().rev().map(|i| i.id));
        }
        &self.pruned[start..]
    }
}

impl Frontier {
    pub(crate) fn new(order: Order) -> Self {
        match order {
            Order::DepthFirst => Self::Stack(Vec::new()),
            Order::BreadthFirst => Self::Queue(VecDeque::new()),
            Order::BestFirst => Self::Heap(BinaryHeap::new()),
            Order::Beam(width) => Self::Beam(Beam { width, level: Vec::new(), next: Vec::new(), pruned: Vec::new() }),
        }
    }
    /// A newly created node (for the beam: a node of the next depth).
    pub(crate) fn push(&mut self, id: u32, log_reach: f64) {
        match self {
            Self::Stack(s) => s.push(id),
            Self::Queue(q) => q.push_back(id),
            Self::Heap(h) => h.push(HeapItem { log_reach, id }),
            Self::Beam(b) => b.next.push(HeapItem { log_reach, id }),
        }
    }
    /// A popped node put back after a failed ingestion (for the beam: still of the current depth).
    pub(crate) fn requeue(&mut self, id: u32, log_reach: f64) {
        match self {
            Self::Beam(b) => b.level.push(id),
            _ => self.push(id, log_reach),
        }
    }
    pub(crate) fn pop(&mut self) -> Option<u32> {
        match self {
            Self::Stack(s) => s.pop(),
            Self::Queue(q) => q.pop_front(),
            Self::Heap(h) => h.pop().map(|i| i.id),
            Self::Beam(b) => b.level.pop(),
        }
    }
    /// Called only with nothing in flight; a beam batch never mixes depths.
    /// Returns the nodes the beam pruned, which will never need their parent's state.
    pub(crate) fn start_batch(&mut self) -> &[u32] {
        match self {
            Self::Beam(b) => b.advance(),
            _ => &[],
        }
    }
    /// Nodes that will still be expanded.
    pub(crate) fn expandable(&self) -> usize {
        match self {
            Self::Beam(b) => b.level.len() + b.next.len(),
            _ => self.len(),
        }
    }
    /// All unexpanded internal nodes, pruned ones included.
    pub(crate) fn len(&self) -> usize {
        match self {
            Self::Stack(s) => s.len(),
            Self::Queue(q) => q.len(),
            Self::Heap(h) => h.len(),
            Self::Beam(b) => b.level.len() + b.next.len() + b.pruned.len(),
        }
    }
    pub(crate) fn ids(&self) -> Vec<u32> {
        match self {
            Self::Stack(s) => s.clone(),
            Self::Queue(q) => q.iter().copied().collect(),
            Self::Heap(h) => h.iter().map(|i| i.id).collect(),
            Self::Beam(b) => b.level.iter().chain(&b.pruned).copied().chain(b.next.iter().map(|i| i.id)).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beam_width_is_validated() {
        assert!(matches!(Order::parse("beam", Some(2)), Ok(Order::Beam(2))));
        assert!(Order::parse("beam", None).is_err());
        assert!(Order::parse("beam", Some(0)).is_err());
        assert!(Order::parse("best-first", Some(2)).is_err());
    }
}
