"""Streaming top-k of proponents and opponents per query, mergeable in any order.

The combiner interface of tensorflow/transform and TFDV, without Beam: ``create``, ``add``
(a whole ``(m, b)`` score block), ``merge`` (mutates and returns the first accumulator),
``extract``; :class:`TopKCombiner` has the same under Beam ``CombineFn`` names. Example ids are
strings (zero-pad numeric ids so that string order is numeric order). Order is by score, **ties
broken by example id** (ascending), so the result does not depend on how the training set was
split into blocks or in which order blocks merge.

**k larger than half the data.** Each list holds ``min(k, n_seen)`` entries. When
``2 * min(k, n_seen) > n_seen`` the two lists of every query necessarily share
``2 * min(k, n_seen) - n_seen`` examples; ``extract()`` then sets ``"k_exceeds_half": True`` so
that writers can warn. (With exactly equal scores the lists can share an example even when the
flag is False: ties go to the smaller id in both lists.)

**NaN scores** rank after every number in both lists (among themselves by id).

How it keeps up with the matrix products
----------------------------------------
The old version ranked string ids (``np.unique``) and lexsorted every ``(m, b)`` block. Now the
work per block beyond one or two passes over it is proportional to the lists that change, and
string ids are only compared where scores tie exactly.

* Both lists are one ``(2m, <=k)`` array of ascending *keys*, best first (rows ``0..m-1``:
  ``-score`` of the proponents; rows ``m..2m-1``: the opponents' scores) and an array of integer
  *codes* into a table of ids, so a step on both lists is one numpy call and entries move as
  numbers. The table is a list of the blocks' id arrays, concatenated only when strings are
  needed (exact ties, ``extract``, pickling) and compacted to the live ids now and then.
* **Compiled path** (``_topk_scan.c``, built by setup.py when a C compiler is there; without
  one, or if it fails to load, the numpy path below runs, with identical results). Adding a
  block to full lists is one read of it: a vectorised compare of every entry with both of its
  query's k-th best keys, which returns the entries that can enter (``_scan``). They are
  staged and merged into the lists by insertion, in C, in place (``_merge_compiled``); only a
  list where a new key exactly equals one of its keys, or that holds NaN, goes to the id-aware
  merge below. Staged entries are merged a batch at a time (once there are as many as lists, at
  least 256), or at once while most lists still change (the first blocks).
* **numpy path.** Adding a block to full lists is one ``argmax`` and one ``argmin`` pass over
  it (numpy's fastest full passes). A list whose k-th best beats the block's best for that
  query is left alone; after the first blocks almost all are. The rows of the others are
  compared with the k-th best and their entries are staged; staged entries are merged into the
  lists a batch at a time, which spreads the fixed cost of a merge over blocks. The k-th best
  used meanwhile may be a little stale, which only lets a few more entries through. While most
  lists still change (the first blocks), one threshold pass finds the entries instead, and they
  are merged at once.
* A numpy merge sorts the float keys; a row with a single new entry is an insertion. Rows whose
  first ``k + 1`` keys are not all distinct (or NaN) are re-sorted with the string ids.
* Merging two accumulators touches only ``(2m, 2k)`` arrays, and skips lists where the other's
  best is worse than this one's k-th best.
* The first block ``add``-ed to an empty accumulator is kept **by reference**, not looked at,
  until the accumulator gets a second block, is merged into another one, is extracted or
  pickled (or :meth:`TopKCombiner.compact`). The pipeline makes one accumulator per block and a
  combiner merges them as they arrive; so the block is ranked against the combiner's running
  k-th best, with skipping, instead of fully on its own. **Do not write into** ``scores`` (or a
  string array of ``ids``: it joins the id table as it is, not copied) after passing it to
  ``add``. A pickled accumulator (sent between workers) holds only its ``O(m k)``
  lists and their ids.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import pathlib
from typing import Callable, Iterable, Optional

import numpy as np

_DENSE = 0.4  # above this share of lists changing per block: merge at once (numpy: threshold pass)


def _load_kernel():
    """The compiled scan ``influence_ops/_topk_scan.c`` (built by setup.py when a C compiler is
    there), or None: then everything runs on the numpy path, with the same results.

    Loaded from the file next to this one when the relative import fails, so that a script
    that loads topk.py by path (benchmarks/bench_topk.py: the package ``__init__`` imports
    TensorFlow) gets it too. Returns ``(module or None, why it is missing)``.
    """
    try:
        from . import _topk_scan
        return _topk_scan, ""
    except ImportError as e:
        why = f"{type(e).__name__}: {e}"
    here = pathlib.Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_topk_scan{suffix}"
        if path.is_file():
            spec = importlib.util.spec_from_file_location("_topk_scan", path)
            try:
                mod = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(mod)
                return mod, ""
            except ImportError as e:
                return None, f"{path.name}: {type(e).__name__}: {e}"
    return None, f"{why}; no _topk_scan*.so in {here} (built by setup.py: needs a C compiler)"


_kernel, _KERNEL_MISSING = _load_kernel()


def _select(key: np.ndarray, code: np.ndarray, kk: int, names: Callable[[], np.ndarray]):
    """Per row, the ``kk`` best entries: ``key`` ascending, ties by id ascending.

    ``key`` and ``code`` (ids: ``names()[code]``) are ``(n, c)`` with ``c >= kk``; entries with
    ``code < 0`` are padding (key ``+inf``) and every row holds at least ``kk`` real entries. A
    float sort decides every row whose first ``kk + 1`` sorted keys are distinct (and not NaN);
    only the other rows are re-sorted with the string ids. Returns ``(keys, codes)``.
    """
    n, c = key.shape
    w = min(kk + 1, c)
    if c > 4 * w + 8:
        part = np.argpartition(key, w - 1, axis=1)[:, :w]
        order = np.take_along_axis(part, np.argsort(np.take_along_axis(key, part, 1), axis=1), 1)
    else:
        order = np.argsort(key, axis=1)[:, :w]
    sk = np.take_along_axis(key, order, 1)
    sc = np.take_along_axis(code, order, 1)
    if w > 1:
        # Keys ascending: a zero or NaN step is a tie, NaN, or padding after +inf; padding up
        # front always shows as one (every row has kk real entries, padding sorts with +inf).
        with np.errstate(invalid="ignore"):  # inf - inf
            fix = ~(np.diff(sk, axis=1) > 0).all(axis=1)
        if fix.any():
            fr = np.flatnonzero(fix)
            fk, fc = key[fr], code[fr]
            # Primary: real before padding; then key (NaN last); then id. lexsort is stable.
            o = np.lexsort((names()[np.maximum(fc, 0)], fk, fc < 0), axis=1)[:, :w]
            sk[fr] = np.take_along_axis(fk, o, 1)
            sc[fr] = np.take_along_axis(fc, o, 1)
    return sk[:, :kk], sc[:, :kk]


def _insert(base_key, base_code, x, xc):
    """Inserts one new entry per row into sorted ``(n, k)`` lists; the last entry drops out.
    Returns ``(keys, codes, write, tied)``: only rows ``write`` changed; rows ``tied`` (an exact
    tie between ``x`` and the list, or NaN) are wrong here and must be redone (``_best``)."""
    n, k = base_key.shape
    p = (base_key < x[:, None]).sum(axis=1)  # insertion position; k: x does not enter
    tied = (base_key == x[:, None]).any(axis=1) | np.isnan(x) | np.isnan(base_key[:, -1])
    write = (p < k) & ~tied
    p = np.minimum(p, k - 1)
    j = np.arange(k)
    src = j - (j > p[:, None])  # entries after the new one move down by one
    nr = np.arange(n)
    key = base_key[nr[:, None], src]
    code = base_code[nr[:, None], src]
    key[nr, p] = x
    code[nr, p] = xc
    return key, code, write, tied


def _best(base_key, base_code, r, ecode, ekey, kk, names, split=True):
    """Per row ``i``, the ``kk`` best of its current entries ``base_key[i]``/``base_code[i]``
    (``(n, kb)``, kb may be 0) and its new entries ``(r, ecode, ekey)`` (rows ascending). Every
    row must hold at least ``kk`` entries in all.

    Entries are padded to the longest row; a few rows much longer than the rest are done apart so
    that they do not widen every row.
    """
    n, kb = base_key.shape
    counts = np.bincount(r, minlength=n)
    w = max(int(counts.max()) if r.size else 0, 1)
    cap = -(-3 * r.size // (2 * max(n, 1))) + 4
    if split and n > 64 and w > 2 * cap:
        heavy = counts > cap
        out_key, out_code = np.empty((n, kk)), np.empty((n, kk), dtype=np.int64)
        for sel in (~heavy, heavy):
            rows, e = np.flatnonzero(sel), sel[r]
            lr = (np.cumsum(sel) - 1)[r[e]]
            out_key[rows], out_code[rows] = _best(base_key[rows], base_code[rows], lr, ecode[e],
                                                  ekey[e], kk, names, split=False)
        return out_key, out_code
    pos = kb + np.arange(r.size) - np.repeat(np.cumsum(counts) - counts, counts)
    key = np.full((n, kb + w), np.inf)
    key[:, :kb] = base_key
    key[r, pos] = ekey
    code = np.full((n, kb + w), -1, dtype=np.int64)
    code[:, :kb] = base_code
    code[r, pos] = ecode
    return _select(key, code, kk, names)


def _key_mask(S: np.ndarray, rows: Optional[np.ndarray], tkey: np.ndarray, nan=True):
    """Entries at least as good as ``tkey`` (key <= tkey) on stacked rows ``rows`` (None: all
    ``2m``); rows with a NaN ``tkey`` take every entry (checked if ``nan``)."""
    m, b = S.shape
    if rows is None:
        mask = np.empty((2 * m, b), dtype=bool)
        np.greater_equal(S, -tkey[:m, None], out=mask[:m])  # proponents: -score <= tkey
        np.less_equal(S, tkey[m:, None], out=mask[m:])
    else:
        sub = S.take(rows % m, axis=0)
        np.negative(sub, out=sub, where=(rows < m)[:, None])
        mask = sub <= tkey[:, None]
    if nan:
        mask[np.isnan(tkey)] = True
    return mask


def _entries(S: np.ndarray, mask: np.ndarray, rows: Optional[np.ndarray] = None):
    """``(row, column, key)`` of the True entries of ``mask``, rows ascending; ``mask`` covers
    stacked rows ``rows`` (None: all ``2m``) and ``row`` indexes the mask's rows."""
    m, b = S.shape
    r, col = np.divmod(np.flatnonzero(mask), b)
    sr = r if rows is None else rows[r]
    pro = sr < m
    vals = S[np.where(pro, sr, sr - m), col]
    return r, col, np.where(pro, -vals, vals)


def _scan(S: np.ndarray, tkey: np.ndarray, nan: bool, expect: int):
    """``_entries(S, _key_mask(S, None, tkey, nan))`` in one compiled pass over ``S`` (needs
    the kernel), plus the number of stacked rows with an entry.

    ``expect`` (a guess of the entry count) sizes the outputs; when more entries reach the
    thresholds, the scan runs again with room for all of them.
    """
    if S.shape[1] > 1 and S.strides[1] != S.itemsize:
        S = np.ascontiguousarray(S)  # the kernel needs each row contiguous
    cap = int(expect)
    while True:
        r, col, ekey = np.empty(cap, np.intp), np.empty(cap, np.intp), np.empty(cap)
        n, hit = _kernel.scan(S, tkey, nan, r, col, ekey)
        if n <= cap:
            return r[:n], col[:n], ekey[:n], hit
        cap = n


def _block_best(S: np.ndarray, ids: np.ndarray, kk: int):
    """The ``kk`` best of each list for one block on its own: stacked ``(keys, columns)``,
    ``(2m, kk)``.

    Thresholds come from a sorted column sample: first its j-th best with j set to let ~2 kk
    entries per row through; rows that get fewer than kk retry with a larger j, up to the
    sample's kk-th best, which is a valid bound (only NaN rows then fall back to the whole row).
    """
    m, b = S.shape
    names = lambda: ids  # noqa: E731 - codes here are columns
    if b <= max(64, 4 * kk):
        return _select(np.concatenate([-S, S]), np.broadcast_to(np.arange(b), (2 * m, b)), kk,
                       names)
    step = max(1, b // max(64, 4 * kk))
    ss = np.sort(S[:, ::step], axis=1)  # NaN last
    c = ss.shape[1]
    ladder = sorted({min(kk, max(1, -(-f * kk * c // b))) for f in (2, 4)} | {kk})
    out_key, out_col = np.empty((2 * m, kk)), np.empty((2 * m, kk), dtype=np.int64)
    none_key, none_code = np.empty((2 * m, 0)), np.empty((2 * m, 0), dtype=np.int64)
    todo = np.arange(2 * m)
    for j in ladder:
        tkey = np.concatenate([-ss[:, c - j], ss[:, j - 1]])
        sub = None if todo.size == 2 * m else todo
        done = None
        if sub is None and j < kk and _kernel is not None:
            r, col, ekey, _ = _scan(S, tkey, True, 2 * (2 * m * j * b // c) + 4096)
            # Compiled merge into lists of placeholders (key +inf, code -1): every list that
            # the floats decide; a placeholder left means fewer than kk numbers got through.
            key, code = np.full((2 * m, kk), np.inf), np.full((2 * m, kk), -1, dtype=np.int64)
            tied = np.zeros(2 * m, dtype=bool)
            _kernel.merge(key, code, r, ekey, col, tied)
            done = ~tied & (code[:, -1] >= 0)
            out_key[done], out_col[done] = key[done], code[done]
        else:
            mask = _key_mask(S, sub, tkey if sub is None else tkey[todo])
            if j == kk:
                mask[mask.sum(axis=1) < kk] = True  # NaN rows: the whole row
            r, col, ekey = _entries(S, mask, sub)
        ok = np.bincount(r, minlength=todo.size) >= kk
        rest = ok if done is None else ok & ~done  # rows for _best
        if not rest.all():
            e = rest[r]
            r, col, ekey = (np.cumsum(rest) - 1)[r[e]], col[e], ekey[e]
        rows = todo[rest]
        if rows.size:
            out_key[rows], out_col[rows] = _best(none_key[:rows.size], none_code[:rows.size],
                                                 r, col, ekey, kk, names)
        todo = todo[~ok]
        if todo.size == 0:
            break
    return out_key, out_col


class TopKAccumulator:
    """Top-k proponents (largest scores) and opponents (smallest) for m queries.

    Arrays (``extract()`` or the properties): ``pro_scores``/``pro_ids`` and
    ``opp_scores``/``opp_ids`` of shape ``(m, min(k, n_seen))``, best first. ``n_queries=None``
    means "taken from the first block or merged accumulator".
    """

    def __init__(self, k: int, n_queries: Optional[int], pro_scores=None, pro_ids=None,
                 opp_scores=None, opp_ids=None, n_seen: int = 0):
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = int(k)
        self.n_queries = None if n_queries is None else int(n_queries)
        self.n_seen = int(n_seen)
        # The state is: the lists, plus staged entries, plus pending blocks.
        self._key = self._code = None  # stacked lists (2m, <=k): keys ascending, id codes
        self._names, self._n_names = [], 0  # id table: codes index the concatenated arrays
        self._owned = True  # False while key/code may be shared: copy before writing
        self._nan = False  # whether a NaN key may be in the lists
        self._hot = None  # share of lists the last block changed (only picks the faster path)
        self._found = 0  # entries the last block let through (sizes the compiled scan's output)
        self._offsets = None  # flat offsets of the stacked rows in a block (cached)
        # Entries found in recent blocks, not merged into the lists yet: parts (stacked rows
        # ascending, keys, codes).
        self._stage, self._staged = [], 0
        # Blocks (scores, ids) not looked at yet, kept by reference.
        self._pending, self._pending_cols = [], 0
        if pro_scores is not None:
            key = np.concatenate([-np.asarray(pro_scores, np.float64),
                                  np.asarray(opp_scores, np.float64)])
            ids = np.concatenate([np.asarray(pro_ids), np.asarray(opp_ids)]).astype(str)
            self._key, self._code = key, self._add_names(ids.ravel()) + np.arange(
                ids.size).reshape(ids.shape)
            self._nan = bool(np.isnan(key).any())

    # -- public interface -------------------------------------------------------------------

    def add(self, scores: np.ndarray, ids: np.ndarray) -> "TopKAccumulator":
        """Adds a block: ``scores`` ``(m, b)`` for train examples ``ids`` ``(b,)``.

        ``scores`` (and ``ids`` when they are already strings) may be kept by reference until
        later (see the module docstring): do not modify them afterwards.
        """
        scores = np.asarray(scores, dtype=np.float64)
        if self.n_queries is None and scores.ndim == 2:
            self.n_queries = scores.shape[0]
        if scores.ndim != 2 or scores.shape[0] != self.n_queries:
            raise ValueError(f"scores must be (n_queries={self.n_queries}, b), got {scores.shape}")
        ids = np.asarray(ids)
        if ids.dtype.kind != "U":
            ids = ids.astype(str)  # ids are strings everywhere (Parquet schema)
        if ids.shape != (scores.shape[1],):
            raise ValueError(f"ids must be ({scores.shape[1]},), got {ids.shape}")
        if scores.shape[1] == 0:
            return self
        self._pending.append((scores, ids))
        self._pending_cols += scores.shape[1]
        self.n_seen += scores.shape[1]
        self._drain(when_full=True)
        return self

    def merge(self, other: "TopKAccumulator") -> "TopKAccumulator":
        """Merges ``other`` into self (self is mutated and returned; ``other`` is not)."""
        if other.n_seen == 0:
            return self
        if other.k != self.k or (self.n_queries is not None
                                 and other.n_queries != self.n_queries):
            raise ValueError("cannot merge accumulators of different k or query count")
        if self.n_queries is None:
            self.n_queries = other.n_queries
        if other._key is not None:
            off = self._n_names
            if self._key is None:  # take other's lists; both copy before writing from now on
                self._key, self._code, self._hot = other._key, other._code, other._hot
                self._owned = other._owned = False
                self._names, self._n_names = list(other._names), other._n_names
            else:
                self._names = self._names + other._names
                self._n_names += other._n_names
                self._merge_lists(other._key, other._code + off)
            self._nan |= other._nan
            # Other's staged entries are entries here too (lists only get better).
            self._stage += [(r, ek, c + off) for r, ek, c in other._stage]
            self._staged += other._staged
            self._flush(when_full=True)
        self._pending = self._pending + other._pending
        self._pending_cols += other._pending_cols
        self.n_seen += other.n_seen
        self._drain(when_full=True)
        return self

    def extract(self):
        """Returns dict of arrays: proponents and opponents, best first, ``(m, min(k, n_seen))``;
        plus ``"k_exceeds_half"``: True when ``2 * min(k, n_seen) > n_seen``, i.e. each query's
        two lists necessarily share examples."""
        self._settle()
        if self._key is None:
            empty = np.zeros((self.n_queries or 0, 0))
            return {"pro_scores": empty, "pro_ids": empty.astype(str),
                    "opp_scores": empty, "opp_ids": empty.astype(str), "k_exceeds_half": False}
        m = self.n_queries
        ids = self._table()[self._code]
        self._owned = False  # the caller gets a view of our keys
        return {"pro_scores": -self._key[:m], "pro_ids": ids[:m],
                "opp_scores": self._key[m:], "opp_ids": ids[m:],
                "k_exceeds_half": self.k_exceeds_half}

    @property
    def k_exceeds_half(self) -> bool:
        return bool(2 * min(self.k, self.n_seen) > self.n_seen)

    @property
    def pro_scores(self):
        return None if self.n_seen == 0 else self.extract()["pro_scores"]

    @property
    def pro_ids(self):
        return None if self.n_seen == 0 else self.extract()["pro_ids"]

    @property
    def opp_scores(self):
        return None if self.n_seen == 0 else self.extract()["opp_scores"]

    @property
    def opp_ids(self):
        return None if self.n_seen == 0 else self.extract()["opp_ids"]

    def __getstate__(self):
        self._settle()
        self._compact()
        return {"k": self.k, "n_queries": self.n_queries, "n_seen": self.n_seen,
                "key": self._key, "code": self._code, "names": self._table()}

    def __setstate__(self, state):
        self.__init__(state["k"], state["n_queries"], n_seen=state["n_seen"])
        self._key, self._code = state["key"], state["code"]
        if self._key is not None:
            self._add_names(state["names"])
            self._nan = bool(np.isnan(self._key).any())

    def __repr__(self):
        width = 0 if self._key is None else self._key.shape[1]
        return (f"TopKAccumulator(k={self.k}, n_queries={self.n_queries}, n_seen={self.n_seen}, "
                f"kept={width}, staged={self._staged}, pending_blocks={len(self._pending)})")

    # -- internals --------------------------------------------------------------------------

    def _add_names(self, ids: np.ndarray) -> int:
        """Appends ids to the table; returns the code of the first."""
        off = self._n_names
        self._names = self._names + [ids]
        self._n_names += ids.size
        return off

    def _table(self) -> np.ndarray:
        if len(self._names) != 1:
            self._names = [np.concatenate(self._names) if self._names else np.zeros(0, str)]
        return self._names[0]

    def _compact(self):
        """Keeps only the ids the lists use (call with nothing staged)."""
        if self._key is None or self._n_names <= self._code.size:
            return
        live, code = np.unique(self._code, return_inverse=True)
        self._names, self._n_names = [self._table()[live]], live.size
        if not self._owned:
            self._key = self._key.copy()
        self._code, self._owned = code.reshape(self._key.shape), True

    def _drain(self, when_full=False):
        """Looks at the pending blocks, one by one (if ``when_full``: not a lone first block, so
        that per-block partials stay cheap until they are merged)."""
        if when_full and self._key is None and len(self._pending) == 1:
            return
        n_before = self.n_seen - self._pending_cols
        for S, ids in self._pending:
            if self._key is None:
                self._key, col = _block_best(S, ids, min(self.k, S.shape[1]))
                self._code = col + self._add_names(ids)
                self._owned, self._hot = True, None
                self._nan = bool(np.isnan(self._key).any())
            else:
                self._absorb(S, ids, n_before)
            n_before += S.shape[1]
        self._pending, self._pending_cols = [], 0

    def _settle(self):
        self._drain()
        self._flush()

    def _write(self, rows: np.ndarray, key: np.ndarray, code: np.ndarray):
        if not self._owned:
            self._key, self._code, self._owned = self._key.copy(), self._code.copy(), True
        self._key[rows] = key
        self._code[rows] = code
        if not self._nan and np.isnan(key).any():
            self._nan = True

    def _absorb(self, S: np.ndarray, ids: np.ndarray, n_before: int):
        """Adds block ``S`` (ids ``ids``) to the lists (which hold ``n_before`` examples)."""
        m, b = S.shape
        k = self.k
        if self._key.shape[1] < k:  # not full yet: rank the block, then merge lists
            key, col = _block_best(S, ids, min(k, b))
            self._nan |= bool(np.isnan(key).any())
            self._merge_lists(key, col + self._add_names(ids))
            return
        t = self._key[:, k - 1]  # k-th best key per list (not counting staged entries)
        hot = self._hot
        if hot is None:  # unknown: what a block in random order would change
            hot = 1.0 - (n_before / (n_before + b)) ** k
        if _kernel is not None:  # one compiled pass finds the entries, whatever the share
            # Sized for ~twice what a block in random order lets through (k b / n_before per
            # list) or the last block found; _scan runs again if more get through.
            expect = max(2 * m * k * b // max(n_before, 1), self._found)
            r, col, ekey, hit = _scan(S, t, self._nan, 2 * expect + 4096)
            self._hot, self._found = hit / (2 * m), r.size
            if r.size:
                self._stage.append((r, ekey, col + self._add_names(ids)))
                self._staged += r.size
                self._flush(when_full=hot <= _DENSE)  # most lists change: merge at once
            return
        if hot > _DENSE:  # most lists will change (first blocks): one threshold pass
            r, col, ekey = _entries(S, _key_mask(S, None, t, self._nan))
            self._hot = np.count_nonzero(np.bincount(r, minlength=2 * m)) / (2 * m)
            self._stage.append((r, ekey, col + self._add_names(ids)))
            self._staged += r.size
            self._flush()
            return
        # Few lists can change: each query's block best (argmax, argmin) against its k-th best;
        # the rows of the lists that can change are compared with it entry by entry.
        a1 = np.concatenate([S.argmax(axis=1), S.argmin(axis=1)])
        if S.flags.c_contiguous:
            if self._offsets is None or self._offsets[0] != (m, b):
                self._offsets = ((m, b), np.arange(0, 2 * m * b, b) % (m * b))
            e1 = S.ravel().take(a1 + self._offsets[1])
        else:
            e1 = S[np.arange(2 * m) % m, a1]
        e1[:m] *= -1  # keys
        rows = np.flatnonzero(~(e1 > t))  # can enter (NaN either side: look closer)
        self._hot = rows.size / (2 * m)
        if rows.size:
            G = S.take(rows % m, axis=0)
            t = t[rows]
            npro = np.searchsorted(rows, m)  # rows ascending: proponent lists first
            mask = np.empty(G.shape, dtype=bool)
            np.greater_equal(G[:npro], -t[:npro, None], out=mask[:npro])  # -score <= key
            np.less_equal(G[npro:], t[npro:, None], out=mask[npro:])
            if self._nan:
                mask[np.isnan(t)] = True
            r, col = np.divmod(np.flatnonzero(mask), b)
            ekey = G[r, col]
            ekey[:np.searchsorted(r, npro)] *= -1
            self._stage.append((rows[r], ekey, col + self._add_names(ids)))
            self._staged += r.size
            self._flush(when_full=True)

    def _flush(self, when_full=False):
        """Merges the staged entries into the lists (if ``when_full``: only once there are as
        many as lists, at least 256, or many parts)."""
        if not self._stage or (when_full and self._staged < max(self._key.shape[0], 256)
                               and len(self._stage) < 64):
            return
        parts, self._stage, self._staged = self._stage, [], 0
        if len(parts) == 1:
            r, ekey, code = parts[0]
        else:
            r, ekey, code = (np.concatenate(x) for x in zip(*parts))
        if _kernel is not None:
            # Compiled: every list the floats decide, in place; the others below, by id.
            r, ekey, code = self._merge_compiled(r, ekey, code)
        else:
            if len(parts) > 1:
                o = np.argsort(r, kind="stable")
                r, ekey, code = r[o], ekey[o], code[o]
            # A row with a single entry: insert it (unless it ties).
            one = np.bincount(r, minlength=self._key.shape[0])[r] == 1
            if one.any():
                rows = r[one]
                key, new, write, tied = _insert(self._key[rows], self._code[rows], ekey[one],
                                                code[one])
                self._write(rows[write], key[write], new[write])
                one[np.flatnonzero(one)[tied]] = False
                r, ekey, code = r[~one], ekey[~one], code[~one]
        if r.size:
            act = np.zeros(self._key.shape[0], dtype=bool)
            act[r] = True
            rows = np.flatnonzero(act)
            key, new = _best(self._key[rows], self._code[rows], (np.cumsum(act) - 1)[r], code,
                             ekey, self.k, self._table)
            self._write(rows, key, new)
        # Compacting gathers the id strings (~0.3 ms at m = 100, ~20% of the top-k there when
        # it ran every ~24 blocks); the table may hold ~40k dead ids (~1.5 MB for 9-char ids).
        if self._n_names > 4 * self._code.size + 32768:
            self._compact()

    def _merge_compiled(self, r, ekey, code):
        """Merges entries ``(r, ekey, code)`` (rows in any order) into the lists with the
        compiled merge; returns the entries of the lists it leaves to ``_best`` (exact ties with
        a new key, NaN), rows ascending."""
        if not (self._owned and self._key.flags.c_contiguous and self._code.flags.c_contiguous):
            self._key, self._code = np.array(self._key, order="C"), np.array(self._code, order="C")
            self._owned = True
        tied = np.zeros(self._key.shape[0], dtype=bool)
        if _kernel.merge(self._key, self._code, r, ekey, code, tied) == 0:
            return r[:0], ekey[:0], code[:0]
        e = tied[r]
        r, ekey, code = r[e], ekey[e], code[e]
        o = np.argsort(r, kind="stable")
        return r[o], ekey[o], code[o]

    def _merge_lists(self, okey, ocode):
        """Merges stacked sorted lists ``okey``/``ocode`` (codes in our table) into ours."""
        ka, kb = self._key.shape[1], okey.shape[1]
        if kb == 0:
            return
        kk = min(self.k, ka + kb)
        if ka == self.k:  # full: lists where other's best is worse than our k-th are done
            rows = np.flatnonzero(~(okey[:, 0] > self._key[:, -1]))
            if rows.size:
                key, code = _select(np.concatenate([self._key[rows], okey[rows]], axis=1),
                                    np.concatenate([self._code[rows], ocode[rows]], axis=1),
                                    kk, self._table)
                self._write(rows, key, code)
        else:
            self._key, self._code = _select(np.concatenate([self._key, okey], axis=1),
                                            np.concatenate([self._code, ocode], axis=1), kk,
                                            self._table)
            self._owned = True


class TopKCombiner:
    """Beam-free combiner: elements are per-block :class:`TopKAccumulator` partials.

    Method names are those of ``apache_beam.CombineFn`` so a pipeline can wrap it generically.
    ``n_queries=None``: taken from the first partial. ``compact`` finishes any deferred work,
    so an accumulator sent between workers holds only ``O(m k)`` arrays.
    """

    def __init__(self, k: int, n_queries: Optional[int] = None):
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k, self.n_queries = int(k), n_queries

    def create_accumulator(self) -> TopKAccumulator:
        return TopKAccumulator(k=self.k, n_queries=self.n_queries)

    def add_input(self, acc: TopKAccumulator, partial: TopKAccumulator) -> TopKAccumulator:
        return acc.merge(partial)

    def add_inputs(self, acc: TopKAccumulator, partials: Iterable[TopKAccumulator]):
        for p in partials:
            acc = acc.merge(p)
        return acc

    def merge_accumulators(self, accs: Iterable[TopKAccumulator]) -> TopKAccumulator:
        """Merges all into the first (mutated and returned); the others are not modified."""
        it = iter(accs)
        first = next(it, None)
        if first is None:
            return self.create_accumulator()
        for a in it:
            first.merge(a)
        return first

    def compact(self, acc: TopKAccumulator) -> TopKAccumulator:
        acc._settle()
        acc._compact()
        return acc

    def extract_output(self, acc: TopKAccumulator) -> dict:
        return acc.extract()


def top_k(scores: np.ndarray, ids: np.ndarray, k: int):
    """One-shot top-k over a full ``(m, n)`` score matrix."""
    return TopKAccumulator(k=k, n_queries=scores.shape[0]).add(scores, ids).extract()
