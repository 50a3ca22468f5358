"""One faiss index over L2-normalised float32 embeddings, scored by inner
product (which, on unit vectors, is the cosine similarity).

Three kinds, from exact to approximate:

* ``exact``: ``IndexFlatIP``, brute force; right for up to ~1e5 items.
* ``hnsw``: ``IndexHNSWFlat``, a graph over the full vectors; fast and
  accurate, but keeps every vector plus the graph in memory.
* ``ivfpq``: ``IndexIVFPQ``, inverted lists of product-quantised codes; the
  smallest index, whose recall comes from ``refine`` (exact re-scoring of
  ``k * refine`` candidates) and ``nprobe``.

faiss's own OpenMP thread count is left alone: the caller's
``OMP_NUM_THREADS`` decides.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import faiss
import numpy as np
import torch

INDEX_KINDS = ("exact", "hnsw", "ivfpq")
DEVICES = ("cpu", "cuda")
# faiss's k-means warns below 39 training points per centroid; the IVF lists
# are sized so that it never has to.
MIN_POINTS_PER_LIST = 39


class VectorIndexError(ValueError):
    """Bad index parameters, embeddings or queries."""


@dataclass
class IndexParams:
    """How a :class:`VectorIndex` is built and searched.

    ``nlist = 0`` picks about ``4 * sqrt(n)`` inverted lists, fewer if that
    would leave under 39 training points per list. ``pq_m = 0`` picks the
    largest divisor of the dimension ``d`` that is ``<= d // 2``, i.e. the
    finest product quantiser whose sub-vectors still have >= 2 dimensions
    (``d / 2`` bytes per vector for even ``d``). ``refine > 0`` (ivfpq only)
    keeps the full vectors too and re-scores the top ``k * refine``
    candidates exactly. ``device="cuda"`` searches an exact index on the GPU
    (needs a GPU build of faiss; never required).
    """

    kind: str = "exact"
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    nlist: int = 0
    pq_m: int = 0
    pq_bits: int = 8
    nprobe: int = 16
    refine: int = 0
    device: str = "cpu"

    def __post_init__(self):
        if self.kind not in INDEX_KINDS:
            raise VectorIndexError(f"index kind {self.kind!r} is unknown; expected one of {INDEX_KINDS}")
        if self.device not in DEVICES:
            raise VectorIndexError(f"index device {self.device!r} is unknown; expected one of {DEVICES}")
        if self.device == "cuda" and self.kind != "exact":
            raise VectorIndexError(f"index device 'cuda' is only supported for kind 'exact', not {self.kind!r}")
        minimum = {"hnsw_m": 2, "ef_construction": 1, "ef_search": 1, "nlist": 0, "pq_m": 0, "pq_bits": 1,
                   "nprobe": 1, "refine": 0}
        for name, low in minimum.items():
            value = getattr(self, name)
            # bool is an int subclass; True as a list count is a mistake, not a 1.
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise VectorIndexError(f"index option {name} must be an integer >= {low}, got {value!r}")
        if self.pq_bits > 16:
            raise VectorIndexError(f"index option pq_bits must be <= 16, got {self.pq_bits}")

    def to_dict(self) -> dict:
        """The parameters as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> IndexParams:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        if not isinstance(d, dict):
            raise VectorIndexError(f"index params must be a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise VectorIndexError(f"index params: unknown options {unknown}")
        return cls(**d)


def auto_nlist(n: int) -> int:
    """Number of IVF lists for ``n`` vectors: ~4*sqrt(n), >= 39 points per list."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // MIN_POINTS_PER_LIST))


def auto_pq_m(dim: int) -> int:
    """Largest divisor of ``dim`` that is ``<= dim // 2`` (1 if there is none)."""
    return next((m for m in range(dim // 2, 0, -1) if dim % m == 0), 1)


def as_float32(x: np.ndarray | torch.Tensor, what: str, dim: int | None = None) -> np.ndarray:
    """``x`` [n, d] as a contiguous float32 numpy array with L2-normalised rows.

    Raises :class:`VectorIndexError` naming ``what`` if ``x`` is not 2-D,
    not floating point, not finite, or (when ``dim`` is given) not ``d == dim``.
    """
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise VectorIndexError(f"{what} must be floating point, got {x.dtype}")
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise VectorIndexError(f"{what} must be floating point, got {x.dtype}")
    if x.ndim != 2:
        raise VectorIndexError(f"{what} must be 2-D [n, d], got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise VectorIndexError(f"{what} have dimension {x.shape[1]}, expected [n, {dim}] (the index's dim)")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise VectorIndexError(f"{what} hold NaN or infinite values")
    # Normalised here so that scores are cosines whatever the caller passes;
    # a zero row stays zero instead of becoming NaN.
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


class VectorIndex:
    """A faiss inner-product index over ``ntotal`` unit vectors of size ``dim``.

    Build with :meth:`build`, or restore with :meth:`from_bytes`.
    """

    def __init__(self, index: faiss.Index, params: IndexParams):
        self._index = index  # the CPU index: what is serialised
        self._params = IndexParams(**params.to_dict())  # own copy: the knobs below change it
        self._search_index = index
        self._gpu = None
        self.ef_search = self._params.ef_search
        self.nprobe = self._params.nprobe
        if self._params.kind == "ivfpq" and self._params.refine > 0:
            faiss.downcast_index(index).k_factor = float(self._params.refine)
        if self._params.device == "cuda":
            self._to_gpu()

    @classmethod
    def build(cls, embeddings: np.ndarray | torch.Tensor, params: IndexParams | None = None) -> VectorIndex:
        """Index ``embeddings`` [n, d] (float, finite); row ``i`` is item ``i``."""
        params = params or IndexParams()
        x = as_float32(embeddings, "embeddings")
        n, d = x.shape
        if n == 0:
            raise VectorIndexError("embeddings are empty: there is nothing to index")
        if params.kind == "exact":
            index = faiss.IndexFlatIP(d)
        elif params.kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = params.ef_construction
        else:
            index = _ivfpq(x, params)
        index.add(x)
        return cls(index, params)

    def _to_gpu(self) -> None:
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
            raise VectorIndexError("index device 'cuda' needs a GPU build of faiss (faiss-gpu) and a visible GPU; "
                                   "this faiss has none, use device 'cpu'")
        self._gpu = faiss.StandardGpuResources()  # must outlive the GPU index
        self._search_index = faiss.index_cpu_to_gpu(self._gpu, 0, self._index)

    @property
    def ntotal(self) -> int:
        """Number of indexed vectors."""
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        """Vector dimension ``d``."""
        return int(self._index.d)

    @property
    def params(self) -> IndexParams:
        """The parameters, including the current ``ef_search``/``nprobe``."""
        return self._params

    @property
    def ef_search(self) -> int:
        """HNSW breadth of search (larger: slower, higher recall)."""
        return self._params.ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        self._params = IndexParams(**{**self._params.to_dict(), "ef_search": value})
        if self._params.kind == "hnsw":
            faiss.downcast_index(self._index).hnsw.efSearch = value

    @property
    def nprobe(self) -> int:
        """IVF lists visited per query (larger: slower, higher recall)."""
        return self._params.nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._params = IndexParams(**{**self._params.to_dict(), "nprobe": value})
        if self._params.kind == "ivfpq":
            faiss.extract_index_ivf(self._index).nprobe = value

    def search(self, queries: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best rows for each query [q, d].

        Returns ``(scores, rows)``: float32 [q, k] cosine similarities,
        best first, and int64 [q, k] row numbers. An IVF-PQ search whose
        probed lists hold fewer than ``k`` items finds fewer: the missing
        places are row ``-1`` with score ``-inf`` (raise ``nprobe``).
        """
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k <= 0:
            raise VectorIndexError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        if k > self.ntotal:
            raise VectorIndexError(f"k={k} is larger than the index, which holds only {self.ntotal} items")
        q = as_float32(queries, "queries", dim=self.dim)
        scores, rows = self._search_index.search(q, k)
        scores, rows = scores.astype(np.float32, copy=False), rows.astype(np.int64, copy=False)
        scores[rows < 0] = -np.inf  # faiss marks "not found" with -FLT_MAX: say it plainly
        return scores, rows

    def to_bytes(self) -> bytes:
        """The (CPU) index serialised by faiss."""
        return faiss.serialize_index(self._index).tobytes()

    def memory_bytes(self) -> int:
        """Size of the serialised index in bytes: what it occupies on disk,
        and close to what it occupies in memory."""
        return len(self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes, params: IndexParams) -> VectorIndex:
        """Restore an index written by :meth:`to_bytes` and built with ``params``.

        Raises :class:`VectorIndexError` if faiss cannot read ``data`` or the
        index is not of ``params.kind`` with inner-product scoring.
        """
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as e:
            raise VectorIndexError(f"faiss cannot read the index ({str(e).splitlines()[0][-200:]})") from None
        expected = {"exact": (faiss.IndexFlatIP, faiss.IndexFlat), "hnsw": (faiss.IndexHNSWFlat,),
                    "ivfpq": (faiss.IndexRefineFlat,) if params.refine > 0 else (faiss.IndexIVFPQ,)}[params.kind]
        if not isinstance(index, expected) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise VectorIndexError(f"the index is a {type(index).__name__}, not the inner-product "
                                   f"{params.kind!r} index its params describe")
        return cls(index, params)


def _ivfpq(x: np.ndarray, params: IndexParams) -> faiss.Index:
    """An untrained-then-trained IVF-PQ (optionally refined) index for ``x`` [n, d]."""
    n, d = x.shape
    nlist = params.nlist or auto_nlist(n)
    pq_m = params.pq_m or auto_pq_m(d)
    if d % pq_m:
        raise VectorIndexError(f"index option pq_m={pq_m} must divide the embedding dimension {d}")
    codebook = 2 ** params.pq_bits
    need = max(MIN_POINTS_PER_LIST * nlist, codebook)
    if n < need:
        raise VectorIndexError(f"ivfpq needs at least {need} embeddings (39 per list for nlist={nlist}, "
                               f"{codebook} for the pq_bits={params.pq_bits} codebooks), got {n}; "
                               "use index kind 'exact' or 'hnsw' for a collection this small")
    quantizer = faiss.IndexFlatIP(d)
    ivf = faiss.IndexIVFPQ(quantizer, d, nlist, pq_m, params.pq_bits, faiss.METRIC_INNER_PRODUCT)
    # The codebooks may see fewer than faiss's preferred 39 points per
    # centroid (at least 1 is checked above); silence its per-sub-quantizer warning.
    ivf.pq.cp.min_points_per_centroid = 1
    index = faiss.IndexRefineFlat(ivf) if params.refine > 0 else ivf
    # Train on at most 256 points per list: more costs time, not accuracy.
    sample = x
    if n > 256 * nlist:
        pick = np.random.default_rng(0).choice(n, 256 * nlist, replace=False)
        sample = np.ascontiguousarray(x[np.sort(pick)])
    index.train(sample)
    return index
