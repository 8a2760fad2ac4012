/* The streaming top-k's per-block work in C (influence_ops/topk.py; optional: topk.py falls
 * back to numpy, with identical results, when this is not built): a one-pass threshold scan of
 * a score block, and an in-place merge of new entries into the sorted lists (merge, below).
 *
 * scan(S, t, nan, row, col, key) -> (count, rows_hit)
 *
 * S is an (m, b) float64 block (rows may be strided; entries within a row contiguous), t the
 * 2m stacked k-th best keys: proponent row i takes entries with S[i, j] >= -t[i] (key -S),
 * opponent row m + i entries with S[i, j] <= t[m + i] (key S). With nan true, a row whose t is
 * NaN takes every entry. The entries go to the preallocated 1-D outputs row (int64), col
 * (int64), key (float64), stacked rows ascending (all proponent rows, then all opponent rows),
 * columns ascending within a row: the set and order of
 * topk._entries(S, topk._key_mask(S, None, t, nan)). `count` is the true number of entries; if
 * it exceeds the outputs' length, only a part was written and the caller must call again with
 * outputs of at least `count` entries. `rows_hit` counts the stacked rows with an entry.
 *
 * Why it exists: numpy needs two full passes (argmax and argmin) per block to know which rows
 * can change, plus a compare pass per row while most do. This reads S once, testing both
 * thresholds on chunks of 16 entries with OR-reduced vector compares, and rescans a chunk entry
 * by entry only when it has a hit (rare once the lists are full). Proponent entries are written
 * from the front of the outputs and opponent entries from the back, then moved behind them, so
 * one pass yields the stacked order. The GIL is released during the scan.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#ifdef __FAST_MATH__
#error "_topk_scan.c needs IEEE compares (NaN never passes a threshold): no -ffast-math"
#endif
#include <math.h>
#include <stdint.h>
#include <string.h>

#define CHUNK 16

typedef double v4d __attribute__((vector_size(32), aligned(8)));
typedef int64_t v4i __attribute__((vector_size(32)));

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSION
#endif

typedef struct {
    int64_t *row, *col;
    double *key;
    Py_ssize_t cap, front, back; /* entries written from the front / from the back */
} Out;

/* Stores entry (r, c, k) at the front (proponents) or the back (opponents); counts it always,
 * writes it only while the outputs have room. */
static inline void put(Out *o, int front, int64_t r, int64_t c, double k)
{
    Py_ssize_t used = o->front + o->back;
    if (used < o->cap) {
        Py_ssize_t i = front ? o->front : o->cap - 1 - o->back;
        o->row[i] = r;
        o->col[i] = c;
        o->key[i] = k;
    }
    if (front)
        o->front++;
    else
        o->back++;
}

/* Whether any lane of a compare result is set (a macro: passing vectors by value warns about
 * the psABI on targets without AVX). */
#define ANY_LANE(x) ((((x)[0] | (x)[1]) | ((x)[2] | (x)[3])) != 0)

MULTIVERSION
static void scan_rows(const char *S, Py_ssize_t m, Py_ssize_t b, Py_ssize_t rs,
                      const char *t, Py_ssize_t ts, int nan, Out *o, Py_ssize_t *rows_hit)
{
    Py_ssize_t hit = 0;
    for (Py_ssize_t i = 0; i < m; i++) {
        const double *p = (const double *)(S + i * rs);
        const double tp = *(const double *)(t + i * ts), to = *(const double *)(t + (m + i) * ts);
        const int allp = nan && isnan(tp), allo = nan && isnan(to);
        const double lo = -tp, hi = to; /* proponent: s >= lo; opponent: s <= hi */
        const Py_ssize_t f0 = o->front, b0 = o->back;
        const v4d vlo = {lo, lo, lo, lo}, vhi = {hi, hi, hi, hi};
        Py_ssize_t j = 0;
        for (; j + CHUNK <= b; j += CHUNK) {
            int hp = allp, ho = allo;
            if (!(hp && ho)) {
                const v4d a0 = *(const v4d *)(p + j), a1 = *(const v4d *)(p + j + 4);
                const v4d a2 = *(const v4d *)(p + j + 8), a3 = *(const v4d *)(p + j + 12);
                const v4i gp = (a0 >= vlo) | (a1 >= vlo) | (a2 >= vlo) | (a3 >= vlo);
                const v4i go = (a0 <= vhi) | (a1 <= vhi) | (a2 <= vhi) | (a3 <= vhi);
                if (ANY_LANE(gp | go)) {
                    hp |= ANY_LANE(gp);
                    ho |= ANY_LANE(go);
                }
            }
            if ((hp || ho) && o->front + o->back + 2 * CHUNK <= o->cap) {
                /* Room for the whole chunk on both sides: write every entry, advance past the
                 * hits only (no branch to mispredict when half the entries hit). */
                Py_ssize_t f = o->front, z = o->cap - 1 - o->back;
                if (hp)
                    for (Py_ssize_t u = j; u < j + CHUNK; u++) {
                        o->row[f] = i, o->col[f] = u, o->key[f] = -p[u];
                        f += allp | (p[u] >= lo);
                    }
                if (ho)
                    for (Py_ssize_t u = j; u < j + CHUNK; u++) {
                        o->row[z] = m + i, o->col[z] = u, o->key[z] = p[u];
                        z -= allo | (p[u] <= hi);
                    }
                o->front = f, o->back = o->cap - 1 - z;
                continue;
            }
            if (hp)
                for (Py_ssize_t u = j; u < j + CHUNK; u++)
                    if (allp || p[u] >= lo)
                        put(o, 1, i, u, -p[u]);
            if (ho)
                for (Py_ssize_t u = j; u < j + CHUNK; u++)
                    if (allo || p[u] <= hi)
                        put(o, 0, m + i, u, p[u]);
        }
        for (Py_ssize_t u = j; u < b; u++) { /* the last b % CHUNK entries */
            if (allp || p[u] >= lo)
                put(o, 1, i, u, -p[u]);
            if (allo || p[u] <= hi)
                put(o, 0, m + i, u, p[u]);
        }
        hit += (o->front > f0) + (o->back > b0);
    }
    *rows_hit = hit;
}

/* Reverses n entries starting at index s (the back region was filled last to first). */
static void reverse(Out *o, Py_ssize_t s, Py_ssize_t n)
{
    for (Py_ssize_t a = s, z = s + n - 1; a < z; a++, z--) {
        int64_t r = o->row[a], c = o->col[a];
        double k = o->key[a];
        o->row[a] = o->row[z], o->col[a] = o->col[z], o->key[a] = o->key[z];
        o->row[z] = r, o->col[z] = c, o->key[z] = k;
    }
}

/* Up to 6 buffers held by one call, released together. */
typedef struct {
    const char *fn;
    Py_buffer v[6];
    int n;
} Buffers;

static void release(Buffers *bs)
{
    while (bs->n > 0)
        PyBuffer_Release(&bs->v[--bs->n]);
}

/* Gets the next buffer: `ndim` dimensions of 8-byte items of one of the struct `formats`
 * ("d": float64, "lq": int64, "?B": 1-byte flags). Returns NULL (exception set) otherwise. */
static Py_buffer *get(Buffers *bs, PyObject *obj, int flags, const char *what, int ndim,
                      const char *formats)
{
    Py_buffer *view = &bs->v[bs->n];
    if (PyObject_GetBuffer(obj, view, flags | PyBUF_FORMAT) < 0)
        return NULL;
    bs->n++;
    const char *f = view->format ? view->format : "B";
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (f[0] == '<')
        f++;
#endif
    if (f[0] == '=' || f[0] == '@')
        f++;
    const Py_ssize_t itemsize = formats[0] == '?' ? 1 : 8;
    if (view->ndim != ndim || view->itemsize != itemsize || strlen(f) != 1
        || !strchr(formats, f[0])) {
        PyErr_Format(PyExc_ValueError, "_topk_scan.%s: %s must be a %d-D array of %s, got "
                     "ndim=%d, format '%s'", bs->fn, what, ndim,
                     formats[0] == 'd' ? "float64" : formats[0] == '?' ? "bool" : "int64",
                     view->ndim, view->format ? view->format : "B");
        return NULL;
    }
    return view;
}

#define OUT (PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS)

static PyObject *scan(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "_topk_scan.scan(S, t, nan, row, col, key) takes 6 "
                        "arguments");
        return NULL;
    }
    int nan = PyObject_IsTrue(args[2]);
    if (nan < 0)
        return NULL;
    Buffers bs = {.fn = "scan"};
    Py_buffer *vs, *vt, *vr, *vc, *vk;
    if (!(vs = get(&bs, args[0], PyBUF_STRIDES, "S", 2, "d"))
        || !(vt = get(&bs, args[1], PyBUF_STRIDES, "t", 1, "d"))
        || !(vr = get(&bs, args[3], OUT, "row", 1, "lq"))
        || !(vc = get(&bs, args[4], OUT, "col", 1, "lq"))
        || !(vk = get(&bs, args[5], OUT, "key", 1, "d")))
        goto fail;
    const Py_ssize_t m = vs->shape[0], b = vs->shape[1];
    if (b > 1 && vs->strides[1] != 8) {
        PyErr_SetString(PyExc_ValueError, "_topk_scan.scan: the entries of a row of S must be "
                        "contiguous (copy it with numpy.ascontiguousarray)");
        goto fail;
    }
    if (vt->shape[0] != 2 * m) {
        PyErr_Format(PyExc_ValueError, "_topk_scan.scan: t must hold 2m = %zd keys, got %zd",
                     2 * m, vt->shape[0]);
        goto fail;
    }
    Py_ssize_t cap = vr->shape[0];
    if (vc->shape[0] < cap)
        cap = vc->shape[0];
    if (vk->shape[0] < cap)
        cap = vk->shape[0];
    Out o = {(int64_t *)vr->buf, (int64_t *)vc->buf, (double *)vk->buf, cap, 0, 0};
    Py_ssize_t rows_hit = 0;
    Py_BEGIN_ALLOW_THREADS
    scan_rows((const char *)vs->buf, m, b, vs->strides[0], (const char *)vt->buf,
              vt->strides[0], nan, &o, &rows_hit);
    if (o.front + o.back <= cap && o.back > 0) { /* opponents behind the proponents */
        reverse(&o, cap - o.back, o.back);
        if (cap - o.back != o.front) {
            memmove(o.row + o.front, o.row + cap - o.back, o.back * sizeof(int64_t));
            memmove(o.col + o.front, o.col + cap - o.back, o.back * sizeof(int64_t));
            memmove(o.key + o.front, o.key + cap - o.back, o.back * sizeof(double));
        }
    }
    Py_END_ALLOW_THREADS
    release(&bs);
    return Py_BuildValue("nn", o.front + o.back, rows_hit);
fail:
    release(&bs);
    return NULL;
}

/* merge(key, code, row, ekey, ecode, tied) -> number of tied lists
 *
 * Merges new entries (row, ekey, ecode; rows in any order) into the full lists key/code
 * (n, k), sorted by (key, id), in place: each list keeps its k best. An entry enters when its
 * key is below the k-th; the last entry falls off, and cannot come back, since later entries
 * enter only below the k-th. Entries of the lists keep their order, so ties already decided by
 * id stay decided. What the floats cannot decide is left to the caller's id-aware merge
 * (topk._best): a list where a new entry's key equals a key in it, or whose k-th key is NaN (NaN
 * ranks after numbers, by id), is left as it was and flagged in `tied` (n bools, all false on
 * entry). Every list written here is what _best gives. Touched lists are worked on in a scratch
 * copy so that a list flagged half way is still the caller's original. */
static PyObject *merge(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "_topk_scan.merge(key, code, row, ekey, ecode, tied) "
                        "takes 6 arguments");
        return NULL;
    }
    Buffers bs = {.fn = "merge"};
    Py_buffer *vk, *vc, *vr, *vek, *vec, *vt;
    if (!(vk = get(&bs, args[0], OUT, "key", 2, "d"))
        || !(vc = get(&bs, args[1], OUT, "code", 2, "lq"))
        || !(vr = get(&bs, args[2], PyBUF_C_CONTIGUOUS, "row", 1, "lq"))
        || !(vek = get(&bs, args[3], PyBUF_C_CONTIGUOUS, "ekey", 1, "d"))
        || !(vec = get(&bs, args[4], PyBUF_C_CONTIGUOUS, "ecode", 1, "lq"))
        || !(vt = get(&bs, args[5], OUT, "tied", 1, "?B")))
        goto fail;
    const Py_ssize_t n = vk->shape[0], k = vk->shape[1], ne = vr->shape[0];
    if (vc->shape[0] != n || vc->shape[1] != k || vt->shape[0] != n || k < 1
        || vek->shape[0] != ne || vec->shape[0] != ne) {
        PyErr_SetString(PyExc_ValueError, "_topk_scan.merge: key and code must be (n, k >= 1), "
                        "tied (n,), row, ekey and ecode of one length");
        goto fail;
    }
    double *key = vk->buf;
    int64_t *code = vc->buf;
    const int64_t *row = vr->buf, *ecode = vec->buf;
    const double *ekey = vek->buf;
    char *tied = vt->buf;
    for (Py_ssize_t e = 0; e < ne; e++)
        if (row[e] < 0 || row[e] >= n) {
            PyErr_Format(PyExc_IndexError, "_topk_scan.merge: row %lld out of range for %zd "
                         "lists", (long long)row[e], n);
            goto fail;
        }
    const Py_ssize_t rows = ne < n ? ne : n; /* at most this many lists are touched */
    double *sk = PyMem_RawMalloc(sizeof(double) * k * rows + 1);
    int64_t *sc = PyMem_RawMalloc(sizeof(int64_t) * k * rows + 1);
    int64_t *order = PyMem_RawMalloc(sizeof(int64_t) * rows + 1); /* list of each scratch row */
    int64_t *slot = PyMem_RawMalloc(sizeof(int64_t) * n + 1);     /* scratch row of a list */
    if (!sk || !sc || !slot || !order) {
        PyMem_RawFree(sk), PyMem_RawFree(sc), PyMem_RawFree(slot), PyMem_RawFree(order);
        PyErr_NoMemory();
        goto fail;
    }
    Py_ssize_t n_tied = 0, used = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++)
        slot[i] = -1;
    for (Py_ssize_t e = 0; e < ne; e++) {
        const int64_t i = row[e];
        const double x = ekey[e];
        if (slot[i] < 0) { /* the list's first entry: copy the list to scratch */
            slot[i] = used;
            order[used] = i;
            memcpy(sk + used * k, key + i * k, sizeof(double) * k);
            memcpy(sc + used * k, code + i * k, sizeof(int64_t) * k);
            tied[i] = isnan(key[i * k + k - 1]); /* NaN sorts last: any NaN shows here */
            used++;
        }
        double *bk = sk + slot[i] * k;
        int64_t *bc = sc + slot[i] * k;
        if (tied[i] || !(x <= bk[k - 1])) /* decided by ids later, or does not enter */
            continue;
        Py_ssize_t p = k - 1;
        while (p > 0 && bk[p - 1] > x)
            p--;
        if (x == bk[k - 1] || (p > 0 && bk[p - 1] == x)) {
            tied[i] = 1;
            continue;
        }
        memmove(bk + p + 1, bk + p, sizeof(double) * (k - 1 - p));
        memmove(bc + p + 1, bc + p, sizeof(int64_t) * (k - 1 - p));
        bk[p] = x;
        bc[p] = ecode[e];
    }
    for (Py_ssize_t s = 0; s < used; s++) {
        const int64_t i = order[s];
        if (tied[i]) {
            n_tied++;
            continue;
        }
        memcpy(key + i * k, sk + s * k, sizeof(double) * k);
        memcpy(code + i * k, sc + s * k, sizeof(int64_t) * k);
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(sk), PyMem_RawFree(sc), PyMem_RawFree(slot), PyMem_RawFree(order);
    release(&bs);
    return PyLong_FromSsize_t(n_tied);
fail:
    release(&bs);
    return NULL;
}

static PyMethodDef methods[] = {
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL,
     "scan(S, t, nan, row, col, key) -> (count, rows_hit): the entries of the (m, b) float64 "
     "block S that reach the stacked thresholds t, in one pass (see influence_ops/topk.py)."},
    {"merge", (PyCFunction)(void (*)(void))merge, METH_FASTCALL,
     "merge(key, code, row, ekey, ecode, tied) -> n_tied: new entries into the full sorted "
     "lists, in place; lists that need the ids to break a tie are left as they were and "
     "flagged in tied."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_topk_scan",
    "One-pass threshold scan of a score block for influence_ops.topk (optional; topk falls "
    "back to numpy without it).", -1, methods,
};

PyMODINIT_FUNC PyInit__topk_scan(void)
{
    return PyModule_Create(&module);
}
