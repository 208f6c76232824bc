//! The only module that knows PyO3: convert arguments, call the pure core with the GIL released, convert
//! results and errors back. Arrays cross without copies where numpy allows it (inputs are borrowed
//! read-only; outputs hand their Vec to numpy).

use numpy::{IntoPyArray, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::import_exception;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::error::CanopyError as CoreError;
use crate::frontier::Order;
use crate::policy::{policy_rows, Policy, RowsOut};
use crate::tree::{Bounds, CanopyStats, Partial, Root, Tree, TreeConfig, NO_NODE};

// The exception classes live in Python (canopy_rs/errors.py, the one hierarchy); the core raises them.
import_exception!(canopy_rs.errors, InvalidArgumentError);
import_exception!(canopy_rs.errors, ArgumentTypeError);
import_exception!(canopy_rs.errors, BackendOutputError);
import_exception!(canopy_rs.errors, TreeTooLargeError);
import_exception!(canopy_rs.errors, EngineStateError);

fn to_py(e: CoreError) -> PyErr {
    let msg = e.to_string();
    match e {
        CoreError::InvalidArgument { .. } => InvalidArgumentError::new_err(msg),
        // Logits and supports reach the core from a backend's expand().
        CoreError::InvalidLogits { .. } | CoreError::Shape { .. } => BackendOutputError::new_err(msg),
        CoreError::TreeTooLarge { .. } => TreeTooLargeError::new_err(msg),
        CoreError::Protocol(_) => EngineStateError::new_err(msg),
    }
}

/// A Python int for an unsigned core parameter: negative values get the core's own check (as 0).
fn unsigned(v: i64) -> usize {
    usize::try_from(v).unwrap_or(0)
}

#[pyclass(name = "Policy", module = "canopy_rs._core", frozen)]
struct PyPolicy {
    inner: Policy,
}

#[pymethods]
impl PyPolicy {
    #[new]
    #[pyo3(signature = (temperature = 1.0, top_k = None, top_p = 1.0))]
    fn new(temperature: f64, top_k: Option<i64>, top_p: f64) -> PyResult<Self> {
        Ok(Self { inner: Policy::new(temperature, top_k.map(unsigned), top_p).map_err(to_py)? })
    }
    #[getter]
    fn temperature(&self) -> f64 {
        self.inner.temperature
    }
    #[getter]
    fn top_k(&self) -> Option<usize> {
        self.inner.top_k
    }
    #[getter]
    fn top_p(&self) -> f64 {
        self.inner.top_p
    }
    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other.cast::<PyPolicy>().map(|o| o.get().inner == self.inner).unwrap_or(false)
    }
    fn __hash__(&self) -> u64 {
        let p = &self.inner;
        p.temperature.to_bits() ^ p.top_k.unwrap_or(0).rotate_left(17) as u64 ^ p.top_p.to_bits().rotate_left(41)
    }
    fn __repr__(&self) -> String {
        let k = self.inner.top_k.map_or("None".to_string(), |k| k.to_string());
        format!("Policy(temperature={}, top_k={}, top_p={})", self.inner.temperature, k, self.inner.top_p)
    }
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, (f64, Option<usize>, f64))> {
        let p = slf.get().inner;
        Ok((slf.get_type().into_any(), (p.temperature, p.top_k, p.top_p)))
    }
}

/// A 2-D float32/float64 C-contiguous array borrowed from Python.
enum Logits<'py> {
    F32(PyReadonlyArray2<'py, f32>),
    F64(PyReadonlyArray2<'py, f64>),
}

impl<'py> Logits<'py> {
    fn extract(obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        let arr = if let Ok(a) = obj.extract::<PyReadonlyArray2<f32>>() {
            Self::F32(a)
        } else if let Ok(a) = obj.extract::<PyReadonlyArray2<f64>>() {
            Self::F64(a)
        } else {
            return Err(ArgumentTypeError::new_err(
                "logits: expected a 2-D numpy array of float32 or float64 with shape [rows, vocab_size]",
            ));
        };
        let contiguous = match &arr {
            Self::F32(a) => a.is_c_contiguous(),
            Self::F64(a) => a.is_c_contiguous(),
        };
        if !contiguous {
            return Err(InvalidArgumentError::new_err("logits: must be C-contiguous (use numpy.ascontiguousarray)"));
        }
        Ok(arr)
    }
    fn shape(&self) -> (usize, usize) {
        let s = match self {
            Self::F32(a) => a.shape(),
            Self::F64(a) => a.shape(),
        };
        (s[0], s[1])
    }
}

fn slice1<'a, T: numpy::Element>(a: &'a PyReadonlyArray1<'_, T>, name: &str) -> PyResult<&'a [T]> {
    a.as_slice().map_err(|_| InvalidArgumentError::new_err(format!("{name}: must be a contiguous 1-D array")))
}

#[pyfunction]
fn policy_support<'py>(
    py: Python<'py>,
    logits: &Bound<'py, PyAny>,
    policy: &Bound<'py, PyPolicy>,
) -> PyResult<Bound<'py, PyAny>> {
    let p = policy.get().inner;
    let arr = Logits::extract(logits)?;
    let (_, v) = arr.shape();
    let out: Result<RowsOut, CoreError> = match &arr {
        Logits::F32(a) => {
            let s = a.as_slice()?;
            py.detach(|| policy_rows(s, v, &p))
        }
        Logits::F64(a) => {
            let s = a.as_slice()?;
            py.detach(|| policy_rows(s, v, &p))
        }
    };
    csr_to_py(py, out.map_err(to_py)?)
}

fn csr_to_py(py: Python<'_>, csr: RowsOut) -> PyResult<Bound<'_, PyAny>> {
    let RowsOut { offsets, tokens, logprobs, entropy } = csr;
    let offsets: Vec<i64> = offsets.into_iter().map(|x| x as i64).collect();
    let tokens: Vec<i64> = tokens.into_iter().map(i64::from).collect();
    Ok((offsets.into_pyarray(py), tokens.into_pyarray(py), logprobs.into_pyarray(py), entropy.into_pyarray(py))
        .into_pyobject(py)?
        .into_any())
}

#[pyfunction]
fn normalise_support<'py>(
    py: Python<'py>,
    offsets: PyReadonlyArray1<'py, i64>,
    tokens: PyReadonlyArray1<'py, i64>,
    logprobs: PyReadonlyArray1<'py, f64>,
    vocab_size: usize,
) -> PyResult<Bound<'py, PyAny>> {
    let (o, t, l) = (slice1(&offsets, "offsets")?, slice1(&tokens, "tokens")?, slice1(&logprobs, "logprobs")?);
    let csr = py.detach(|| crate::policy::normalise_support(o, t, l, vocab_size)).map_err(to_py)?;
    csr_to_py(py, csr)
}

#[pyclass(name = "Tree", module = "canopy_rs._core")]
struct PyTree {
    inner: Tree,
}

#[pymethods]
impl PyTree {
    #[new]
    #[pyo3(signature = (vocab_size, eos_token_ids, max_new_tokens, policy, order = "depth-first", max_nodes = 10_000_000, record_nodes = false, support_cap = None, beam_width = None, streaming = false, root = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        vocab_size: i64,
        eos_token_ids: Vec<u32>,
        max_new_tokens: i64,
        policy: &Bound<'_, PyPolicy>,
        order: &str,
        max_nodes: i64,
        record_nodes: bool,
        support_cap: Option<i64>,
        beam_width: Option<i64>,
        streaming: bool,
        root: Option<(Vec<u32>, f64, f64)>,
    ) -> PyResult<Self> {
        // Range checks are the core's (TreeConfig::validate); only the conversion to unsigned is here.
        let cfg = TreeConfig {
            vocab_size: unsigned(vocab_size),
            eos_token_ids,
            max_new_tokens: u32::try_from(unsigned(max_new_tokens)).unwrap_or(u32::MAX),
            policy: policy.get().inner,
            order: Order::parse(order, beam_width.map(unsigned)).map_err(to_py)?,
            max_nodes: unsigned(max_nodes),
            record_nodes,
            support_cap: support_cap.map_or(unsigned(vocab_size), unsigned),
            streaming,
            root: root.map(|(prefix, log_reach, path_entropy)| Root { prefix, log_reach, path_entropy }),
        };
        Ok(Self { inner: Tree::new(cfg).map_err(to_py)? })
    }

    fn next_batch<'py>(&mut self, py: Python<'py>, max_rows: i64) -> PyResult<Bound<'py, PyAny>> {
        let b = self.inner.next_batch(unsigned(max_rows)).map_err(to_py)?;
        Ok((
            b.node_ids.into_pyarray(py),
            b.parent_ids.into_pyarray(py),
            b.tokens.into_pyarray(py),
            b.depths.into_pyarray(py),
        )
            .into_pyobject(py)?
            .into_any())
    }

    fn prefixes(&self, node_ids: PyReadonlyArray1<'_, i64>) -> PyResult<Vec<Vec<u32>>> {
        let ids = node_ids.as_array();
        // A negative id maps past the arena, so the core reports it as an id that does not exist.
        ids.iter().map(|&i| self.inner.prefix(i).map_err(to_py)).collect()
    }

    fn ingest_logits(&mut self, py: Python<'_>, logits: &Bound<'_, PyAny>) -> PyResult<()> {
        let arr = Logits::extract(logits)?;
        let (rows, v) = arr.shape();
        let tree = &mut self.inner;
        match &arr {
            Logits::F32(a) => {
                let s = a.as_slice()?;
                py.detach(|| tree.ingest_logits(s, rows, v))
            }
            Logits::F64(a) => {
                let s = a.as_slice()?;
                py.detach(|| tree.ingest_logits(s, rows, v))
            }
        }
        .map_err(to_py)
    }

    fn ingest_support(
        &mut self,
        py: Python<'_>,
        offsets: PyReadonlyArray1<'_, i64>,
        tokens: PyReadonlyArray1<'_, i64>,
        logprobs: PyReadonlyArray1<'_, f64>,
    ) -> PyResult<()> {
        let (o, t, l) = (slice1(&offsets, "offsets")?, slice1(&tokens, "tokens")?, slice1(&logprobs, "logprobs")?);
        let tree = &mut self.inner;
        py.detach(|| tree.ingest_support(o, t, l)).map_err(to_py)
    }

    fn take_released<'py>(&mut self, py: Python<'py>) -> Bound<'py, numpy::PyArray1<i64>> {
        self.inner.take_released().into_pyarray(py)
    }

    fn frontier_roots(&self) -> PyResult<Vec<(Vec<u32>, f64, f64)>> {
        let roots = self.inner.frontier_roots().map_err(to_py)?;
        Ok(roots.into_iter().map(|r| (r.prefix, r.log_reach, r.path_entropy)).collect())
    }

    #[pyo3(signature = (with_frontier = true))]
    fn partial(&self, with_frontier: bool) -> PyPartial {
        PyPartial { inner: self.inner.partial(with_frontier) }
    }

    fn frontier<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let ids = self.inner.frontier_ids();
        let n = ids.len();
        let (mut node_ids, mut parents, mut tokens, mut depths, mut log_reach) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for id in ids {
            let (p, t, d, lr) = self.inner.node(id);
            node_ids.push(self.inner.node_id(id));
            parents.push(self.inner.node_id(p));
            tokens.push(if t == NO_NODE { -1 } else { t as i64 });
            depths.push(d as i64);
            log_reach.push(lr);
        }
        Ok((
            node_ids.into_pyarray(py),
            parents.into_pyarray(py),
            tokens.into_pyarray(py),
            depths.into_pyarray(py),
            log_reach.into_pyarray(py),
        )
            .into_pyobject(py)?
            .into_any())
    }

    #[getter]
    fn is_done(&self) -> bool {
        self.inner.is_done()
    }
    #[getter]
    fn num_expanded(&self) -> u64 {
        self.inner.num_expanded()
    }
    #[getter]
    fn num_nodes(&self) -> usize {
        self.inner.num_nodes()
    }
    #[getter]
    fn frontier_size(&self) -> usize {
        self.inner.frontier_size()
    }
    #[getter]
    fn live_nodes(&self) -> usize {
        self.inner.live_nodes()
    }

    fn bounds<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let b = py.detach(|| self.inner.bounds());
        bounds_dict(py, b)
    }

    fn result<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        stats_dict(py, self.inner.stats().map_err(to_py)?)
    }

    fn nodes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let a = self.inner.node_arrays();
        let to_i64 = |v: &[u32]| -> Vec<i64> { v.iter().map(|&x| if x == NO_NODE { -1 } else { x as i64 }).collect() };
        let d = PyDict::new(py);
        d.set_item("parent", to_i64(&a.parent).into_pyarray(py))?;
        d.set_item("token", to_i64(&a.token).into_pyarray(py))?;
        d.set_item("depth", to_i64(&a.depth).into_pyarray(py))?;
        d.set_item("log_reach", a.log_reach.into_pyarray(py))?;
        d.set_item("entropy", a.entropy.into_pyarray(py))?;
        d.set_item("is_leaf", a.is_leaf.into_pyarray(py))?;
        Ok(d)
    }
}

fn bounds_dict(py: Python<'_>, b: Bounds) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("ce_star_lower", b.ce_star_lower)?;
    d.set_item("ce_star_upper", b.ce_star_upper)?;
    d.set_item("expected_length_lower", b.expected_length_lower)?;
    d.set_item("expected_length_upper", b.expected_length_upper)?;
    d.set_item("truncation_prob_lower", b.truncation_prob_lower)?;
    d.set_item("truncation_prob_upper", b.truncation_prob_upper)?;
    d.set_item("explored_mass", b.explored_mass)?;
    d.set_item("frontier_mass", b.frontier_mass)?;
    d.set_item("num_expanded", b.num_expanded)?;
    d.set_item("frontier_size", b.frontier_size)?;
    d.set_item("num_nodes", b.num_nodes)?;
    Ok(d)
}

fn stats_dict(py: Python<'_>, s: CanopyStats) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("ce_star", s.ce_star)?;
    d.set_item("ce_star_leaves", s.ce_star_leaves)?;
    d.set_item("total_mass", s.total_mass)?;
    d.set_item("length_entropy", s.length_entropy)?;
    d.set_item("content_entropy", s.content_entropy)?;
    d.set_item("expected_length", s.expected_length)?;
    d.set_item("entropy_rate", s.entropy_rate)?;
    d.set_item("length_var", s.length_var)?;
    d.set_item("rate_var", s.rate_var)?;
    d.set_item("length_rate_cov", s.length_rate_cov)?;
    d.set_item("length_rate_corr", s.length_rate_corr)?;
    d.set_item("gen_ppl", s.gen_ppl)?;
    d.set_item("branching_factor", s.branching_factor)?;
    d.set_item("truncation_prob", s.truncation_prob)?;
    d.set_item("length_pmf", s.length_pmf.into_pyarray(py))?;
    d.set_item("entropy_by_depth", s.entropy_by_depth.into_pyarray(py))?;
    d.set_item("num_internal_nodes", s.num_internal_nodes)?;
    d.set_item("num_leaves", s.num_leaves)?;
    d.set_item("max_support", s.max_support)?;
    d.set_item("engine_calls", s.engine_calls)?;
    Ok(d)
}

/// The sums of a run over part of a canopy (`Tree.partial()`); partials of disjoint parts merge into the
/// canopy's values. Picklable (a flat float64 array), so shards can run in other processes.
#[pyclass(name = "Partial", module = "canopy_rs._core", frozen)]
struct PyPartial {
    inner: Partial,
}

#[pymethods]
impl PyPartial {
    #[staticmethod]
    fn from_array(values: PyReadonlyArray1<'_, f64>) -> PyResult<Self> {
        let v = slice1(&values, "values")?;
        Ok(Self { inner: Partial::from_slice(v).map_err(to_py)? })
    }
    fn to_array<'py>(&self, py: Python<'py>) -> Bound<'py, numpy::PyArray1<f64>> {
        self.inner.to_vec().into_pyarray(py)
    }
    fn merge(&self, other: &Bound<'_, PyPartial>) -> PyResult<Self> {
        let mut p = self.inner.clone();
        p.merge(&other.get().inner).map_err(to_py)?;
        Ok(Self { inner: p })
    }
    #[getter]
    fn max_new_tokens(&self) -> u32 {
        self.inner.max_new_tokens()
    }
    fn bounds<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        bounds_dict(py, self.inner.bounds())
    }
    fn result<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        stats_dict(py, self.inner.stats().map_err(to_py)?)
    }
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, numpy::PyArray1<f64>>,))> {
        let py = slf.py();
        let f = slf.get_type().getattr("from_array")?;
        Ok((f, (slf.get().inner.to_vec().into_pyarray(py),)))
    }
}

extern "C" fn after_fork_in_child() {
    crate::policy::set_parallel(false);
}

#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // A forked child (DataLoader workers, multiprocessing) inherits the rayon pool without its threads:
    // it computes sequentially instead of hanging.
    #[cfg(unix)]
    unsafe {
        libc::pthread_atfork(None, None, Some(after_fork_in_child));
    }
    // A dedicated size for the rayon pool, like TOKENIZERS_PARALLELISM; the global pool is built lazily, so
    // a failure here only means another library built it first.
    if let Some(n) = std::env::var("CANOPY_NUM_THREADS").ok().and_then(|v| v.parse::<usize>().ok()) {
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build_global();
    }
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<PyPolicy>()?;
    m.add_class::<PyTree>()?;
    m.add_class::<PyPartial>()?;
    m.add_function(wrap_pyfunction!(policy_support, m)?)?;
    m.add_function(wrap_pyfunction!(normalise_support, m)?)?;
    Ok(())
}
