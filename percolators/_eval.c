/* percolators._eval: run compiled rule programs (percolators.programs) over one batch.
 *
 * The Python twin is the tree of closures of percolators.matcher (one Python call and one big-int
 * allocation per clause and rule). Here a batch mask is an array of 64-bit words (bit i = document
 * i) and a rule is a flat int32 program; interior nodes (AND / OR / AND-NOT / at-least-k) are word
 * loops, and each leaf is computed once per batch into a memo indexed by leaf id:
 *
 *   - TERM leaves are looked up in batch.terms (key -> int mask), TERMS leaves are the OR of
 *     their keys' masks there;
 *   - GEO leaves compute a geo_distance circle over batch.geo_sorted(field) (matcher.py's
 *     _geo_numpy: the same formula; a point within the tolerance of the limit is decided by the
 *     reference's scalar distance, so libm's last bits never change an answer);
 *   - RANGE leaves bisect batch.field_values(field) as BatchIndex.range_mask does and OR the masks
 *     in between (a bound another type than the values: matcher.py's evaluator decides);
 *   - MEMO leaves call their shared matcher evaluator once with pre = every document (their
 *     result does not depend on pre);
 *   - PRE leaves (phrase, per-document fallback) depend on pre: called with the current pre as
 *     the closures do, never memoised.
 *
 * Program encoding (see programs.py): LEAF id | ALL | NONE |
 *   BOOL total_len msm nreq nopt nnot <nreq required> <nopt optional> <nnot excluded>.
 * A node's result only matters inside its pre (matcher.py's contract); every result here is
 * AND-ed with the rule's pre before use, so evaluation order never changes the answer.
 *
 * No state outlives a call: the memo and scratch buffers belong to one run() call.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
/* The word loops (AND / OR / AND-NOT over a batch's 128 words) are the evaluator's inner loops:
 * setup.py builds with -O2, which does not vectorise loops of unknown length; -O3 does. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("O3")
#endif
#include <stdint.h>
#include <math.h>
#include <string.h>

typedef uint64_t u64;

enum { OP_LEAF = 0, OP_ALL = 1, OP_NONE = 2, OP_BOOL = 3 };
enum { KIND_FREE = 0, KIND_TERM = 1, KIND_MEMO = 2, KIND_PRE = 3, KIND_TERMS = 4, KIND_GEO = 5, KIND_RANGE = 6 };
enum { MEMO_UNKNOWN = 0, MEMO_EMPTY = 1, MEMO_SET = 2, MEMO_SEEN = 3 };
/* Buffers per nesting depth: a child bool's result, the OR accumulator, the OR's pre, a PRE
 * leaf's result. */
enum { SCRATCH_PER_DEPTH = 4, MAX_DEPTH = 256, ARENA_BLOCK = 64 };

/* ----- Python int <-> words ------------------------------------------------------------------ */

#if PY_VERSION_HEX < 0x030C0000 && PYLONG_BITS_IN_DIGIT == 30
#define DIGIT_ACCESS 1
#endif

static int words_from_long_slow(PyObject *v, u64 *out, Py_ssize_t nwords);

/* OR the low bits of the int v into out[0..nwords); returns 1 if v has any of them set. Only the
 * digits v has are visited (a term's mask is often short: its documents come early). */
static int or_long_into(PyObject *v, u64 *out, Py_ssize_t nwords)
{
    if (!PyLong_Check(v)) {
        PyErr_Format(PyExc_TypeError, "a leaf evaluator returned %.100s, not an int", Py_TYPE(v)->tp_name);
        return -1;
    }
#ifdef DIGIT_ACCESS
    Py_ssize_t ndigits = Py_SIZE(v);
    if (ndigits >= 0) {
        const digit *d = ((PyLongObject *)v)->ob_digit;
        Py_ssize_t limit = nwords * 64;
        int any = 0;
        for (Py_ssize_t i = 0; i < ndigits; i++) {
            u64 value = d[i]; /* no test for zero digits: with sparse masks it mispredicts */
            Py_ssize_t bit = i * PyLong_SHIFT;
            if (bit >= limit)
                break;
            Py_ssize_t w = bit >> 6, shift = bit & 63;
            out[w] |= value << shift;
            if (shift > 64 - PyLong_SHIFT && w + 1 < nwords)
                out[w + 1] |= value >> (64 - shift);
            any |= value != 0;
        }
        return any;
    }
#endif
    u64 *tmp = PyMem_Malloc((size_t)nwords * sizeof(u64));
    if (!tmp) {
        PyErr_NoMemory();
        return -1;
    }
    int rc = words_from_long_slow(v, tmp, nwords);
    for (Py_ssize_t i = 0; rc > 0 && i < nwords; i++)
        out[i] |= tmp[i];
    PyMem_Free(tmp);
    return rc;
}

/* Fill out[0..nwords) with the low bits of the non-negative int v; returns 1 if any bit is set. */
static int words_from_long(PyObject *v, u64 *out, Py_ssize_t nwords)
{
    memset(out, 0, (size_t)nwords * sizeof(u64));
    return or_long_into(v, out, nwords);
}

/* Negative ints (a mask never is, but stay exact) or another int layout: the public way. */
static int words_from_long_slow(PyObject *v, u64 *out, Py_ssize_t nwords)
{
    PyObject *big = PyLong_FromSsize_t(nwords * 64);
    if (!big)
        return -1;
    PyObject *one = PyLong_FromLong(1);
    PyObject *top = one ? PyNumber_Lshift(one, big) : NULL;
    Py_XDECREF(one);
    Py_DECREF(big);
    if (!top)
        return -1;
    PyObject *masked = PyNumber_Remainder(v, top); /* non-negative, below 2**(64 * nwords) */
    Py_DECREF(top);
    if (!masked)
        return -1;
    if (!PyLong_Check(masked)) { /* an int subclass's __mod__ can return anything */
        PyErr_Format(PyExc_TypeError, "a mask's %% gave %.100s, not an int", Py_TYPE(masked)->tp_name);
        Py_DECREF(masked);
        return -1;
    }
    int rc = _PyLong_AsByteArray((PyLongObject *)masked, (unsigned char *)out, (size_t)nwords * sizeof(u64), 1, 0
#if PY_VERSION_HEX >= 0x030D0000
                                 , 1
#endif
    );
    Py_DECREF(masked);
    if (rc < 0)
        return -1;
    for (Py_ssize_t i = 0; i < nwords; i++)
        if (out[i])
            return 1;
    return 0;
}

/* The int whose bits are words[0..nwords) (little-endian words on a little-endian machine). */
static PyObject *long_from_words(const u64 *words, Py_ssize_t nwords)
{
    Py_ssize_t top = nwords;
    while (top > 0 && !words[top - 1])
        top--;
    if (!top)
        return PyLong_FromLong(0);
#ifdef DIGIT_ACCESS
    Py_ssize_t nbits = (top - 1) * 64 + (64 - __builtin_clzll(words[top - 1]));
    Py_ssize_t ndigits = (nbits + PyLong_SHIFT - 1) / PyLong_SHIFT;
    PyLongObject *v = _PyLong_New(ndigits);
    if (!v)
        return NULL;
    digit *d = v->ob_digit;
    for (Py_ssize_t i = 0; i < ndigits; i++) {
        Py_ssize_t bit = i * PyLong_SHIFT, w = bit >> 6, shift = bit & 63;
        u64 value = words[w] >> shift;
        if (shift > 64 - PyLong_SHIFT && w + 1 < top)
            value |= words[w + 1] << (64 - shift);
        d[i] = (digit)(value & PyLong_MASK);
    }
    return (PyObject *)v; /* the top digit holds the top bit: already normalised */
#else
    return _PyLong_FromByteArray((const unsigned char *)words, (size_t)top * sizeof(u64), 1, 0);
#endif
}

/* ----- the evaluation context ------------------------------------------------------------------ */

typedef struct Block {
    struct Block *next;
    Py_ssize_t used;
    u64 words[];
} Block;

/* A term's int mask converted to words once per call, however many leaves use it (at 10,000
 * rules ~28,000 key lookups of terms leaves hit ~500 distinct terms). Keyed by the int object,
 * which the cache holds a reference to. */
typedef struct {
    PyObject *key;
    u64 *words; /* NULL: the int has none of the batch's bits */
} CacheSlot;

/* Open addressing by object address, a power of two in size; holds a reference to each key. */
typedef struct {
    CacheSlot *slots;
    size_t cap, used;
} PtrTable;

typedef struct {
    Py_ssize_t nwords;
    PtrTable ints;        /* a term's int mask -> its words */
    PtrTable keys;        /* a (field, value) key object of the leaf table -> the words of its mask in
                           * batch.terms: the leaf table shares one key object per term
                           * (LeafTable.term_key), so ~28,000 lookups of terms leaves at 10,000 rules
                           * hash ~500 tuples once each instead of every time */
    PyObject *batch;      /* borrowed */
    PyObject *terms;      /* owned: batch.terms (a leaf callback may rebind the attribute) */
    PyObject *full_int;   /* owned: batch.all */
    PyObject *payloads;   /* borrowed: the leaf table's payloads */
    char *kinds;          /* copy of the leaf table's kinds */
    Py_ssize_t nleaves;
    unsigned char *state; /* per leaf: MEMO_* */
    u64 **memo;           /* per leaf: its mask when MEMO_SET */
    Block *blocks;        /* arena of memo buffers */
    u64 *scratch[MAX_DEPTH]; /* SCRATCH_PER_DEPTH buffers each, allocated on first use */
    u64 *full;            /* every document of the batch */
    PyObject *cos_of;     /* owned: the lats array (geo_sorted) whose cosines cos_lat holds */
    double *cos_lat;      /* cos(lat in radians) of each of its points: the same for every circle */
} Ctx;

static u64 *arena_alloc(Ctx *c)
{
    Block *b = c->blocks;
    if (!b || b->used == ARENA_BLOCK) {
        b = PyMem_Malloc(sizeof(Block) + (size_t)ARENA_BLOCK * (size_t)c->nwords * sizeof(u64));
        if (!b) {
            PyErr_NoMemory();
            return NULL;
        }
        b->next = c->blocks;
        b->used = 0;
        c->blocks = b;
    }
    return b->words + (b->used++) * c->nwords;
}

static u64 *scratch(Ctx *c, int depth, int which)
{
    if (depth >= MAX_DEPTH) {
        PyErr_SetString(PyExc_RecursionError, "rule program nested too deeply");
        return NULL;
    }
    if (!c->scratch[depth]) {
        c->scratch[depth] = PyMem_Malloc((size_t)SCRATCH_PER_DEPTH * (size_t)c->nwords * sizeof(u64));
        if (!c->scratch[depth]) {
            PyErr_NoMemory();
            return NULL;
        }
    }
    return c->scratch[depth] + which * c->nwords;
}

static size_t slot_of(CacheSlot *table, size_t cap, PyObject *key)
{
    size_t i = ((uintptr_t)key >> 4) * (size_t)0x9E3779B97F4A7C15ULL & (cap - 1);
    while (table[i].key && table[i].key != key)
        i = (i + 1) & (cap - 1);
    return i;
}

static void ptr_free(PtrTable *t)
{
    for (size_t i = 0; i < t->cap; i++)
        Py_XDECREF(t->slots[i].key);
    PyMem_Free(t->slots);
    t->slots = NULL;
    t->cap = t->used = 0;
}

static void ctx_free(Ctx *c)
{
    ptr_free(&c->ints);
    ptr_free(&c->keys);
    while (c->blocks) {
        Block *next = c->blocks->next;
        PyMem_Free(c->blocks);
        c->blocks = next;
    }
    for (int i = 0; i < MAX_DEPTH; i++)
        PyMem_Free(c->scratch[i]);
    PyMem_Free(c->kinds);
    PyMem_Free(c->state);
    PyMem_Free(c->memo);
    PyMem_Free(c->full);
    PyMem_Free(c->cos_lat);
    Py_XDECREF(c->cos_of);
    Py_XDECREF(c->full_int);
    Py_XDECREF(c->terms);
}

/* ----- leaves ---------------------------------------------------------------------------------- */

/* Call a leaf evaluator with pre (as an int) and store its result in out. */
static int call_leaf(Ctx *c, PyObject *f, PyObject *pre_int, u64 *out)
{
    PyObject *args[2] = {c->batch, pre_int};
    PyObject *got = PyObject_Vectorcall(f, args, 2, NULL);
    if (!got)
        return -1;
    int rc = words_from_long(got, out, c->nwords);
    Py_DECREF(got);
    return rc;
}

/* Room for one more key (at most half full). */
static int ptr_reserve(PtrTable *t)
{
    if ((t->used + 1) * 2 <= t->cap)
        return 0;
    size_t cap = t->cap ? t->cap * 2 : 1024;
    CacheSlot *table = PyMem_Calloc(cap, sizeof(CacheSlot));
    if (!table) {
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; i < t->cap; i++)
        if (t->slots[i].key)
            table[slot_of(table, cap, t->slots[i].key)] = t->slots[i];
    PyMem_Free(t->slots);
    t->slots = table;
    t->cap = cap;
    return 0;
}

/* The words of a term's int mask (converted on first use): 0 empty, 1 with *words set, -1 error. */
static int term_words(Ctx *c, PyObject *v, const u64 **words)
{
    PtrTable *t = &c->ints;
    if (ptr_reserve(t) < 0)
        return -1;
    size_t i = slot_of(t->slots, t->cap, v);
    if (!t->slots[i].key) {
        u64 *mem = arena_alloc(c);
        if (!mem)
            return -1;
        /* v is borrowed from a dict or list, and the conversion may run Python code (an int
         * subclass's __mod__) that removes it from there: hold it first */
        Py_INCREF(v);
        int rc = words_from_long(v, mem, c->nwords);
        if (rc < 0) {
            Py_DECREF(v);
            return -1;
        }
        /* (that code cannot reach this table: i is still v's slot) */
        t->slots[i].key = v;
        t->slots[i].words = rc ? mem : NULL;
        t->used++;
    }
    *words = t->slots[i].words;
    return *words != NULL;
}

/* The words of the mask of a (field, value) key in batch.terms: 0 absent or empty, 1 with *words
 * set, -1 error. Memoised by the key object (see Ctx.keys). */
static int key_words(Ctx *c, PyObject *key, const u64 **words)
{
    PtrTable *t = &c->keys;
    if (ptr_reserve(t) < 0)
        return -1;
    size_t i = slot_of(t->slots, t->cap, key);
    if (t->slots[i].key) {
        *words = t->slots[i].words;
        return *words != NULL;
    }
    /* held: the lookup (a value's __eq__) and the conversion may run Python code that drops the
     * payload holding it */
    Py_INCREF(key);
    PyObject *got = PyDict_GetItemWithError(c->terms, key); /* borrowed */
    int rc = got ? term_words(c, got, words) : (PyErr_Occurred() ? -1 : 0);
    if (rc < 0) {
        Py_DECREF(key);
        return -1;
    }
    if (!rc)
        *words = NULL;
    i = slot_of(t->slots, t->cap, key); /* (nothing else adds to this table meanwhile; stay safe) */
    t->slots[i].key = key;
    t->slots[i].words = (u64 *)*words;
    t->used++;
    return rc;
}

/* OR of the masks of a tuple of keys in batch.terms (matcher.py's _terms). */
static int terms_mask(Ctx *c, PyObject *keys, u64 *out)
{
    if (!PyTuple_Check(keys)) {
        PyErr_SetString(PyExc_TypeError, "a TERMS leaf's payload must be a tuple of keys");
        return -1;
    }
    int any = 0;
    memset(out, 0, (size_t)c->nwords * sizeof(u64));
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(keys); i++) {
        const u64 *words;
        int rc = key_words(c, PyTuple_GET_ITEM(keys, i), &words);
        if (rc < 0)
            return -1;
        if (rc) {
            for (Py_ssize_t w = 0; w < c->nwords; w++)
                out[w] |= words[w];
            any = 1;
        }
    }
    return any;
}

static const double PI = 3.14159265358979323846;
static const double EARTH_MEAN_RADIUS_M = 6371008.7714;

/* A contiguous numpy array (or any buffer) of 8-byte items. */
static int get_array8(PyObject *obj, Py_buffer *view, Py_ssize_t n_expected)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (view->itemsize != 8 || (n_expected >= 0 && view->len / 8 != n_expected)) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_TypeError, "geo_sorted must give arrays of 8-byte items of one length");
        return -1;
    }
    return 0;
}

static double circle_distance(double lat, double lon, double clat, double clon, double rlat1, double cos1, int plane)
{
    if (plane) {
        double x = (lon - clon) * (PI / 180.0) * cos((lat + clat) / 2.0 * (PI / 180.0));
        double y = (lat - clat) * (PI / 180.0);
        return sqrt(x * x + y * y) * EARTH_MEAN_RADIUS_M;
    }
    double rlat2 = lat * (PI / 180.0);
    double a = sin((rlat2 - rlat1) / 2), b = sin((lon - clon) * (PI / 180.0) / 2);
    double h = a * a + cos1 * cos(rlat2) * b * b;
    double r = sqrt(h);
    return 2 * EARTH_MEAN_RADIUS_M * asin(r < 1.0 ? r : 1.0);
}

/* cos(lat * PI / 180) of each of the n sorted lats of the array object arr (computed once per call
 * and field: every circle's haversine needs it, and it is a third of the trigonometry). The value is
 * the very one circle_distance computes, so nothing can change. NULL on error. */
static const double *lat_cosines(Ctx *c, PyObject *arr, const double *la, Py_ssize_t n)
{
    if (c->cos_of != arr) {
        double *got = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(double));
        if (!got) {
            PyErr_NoMemory();
            return NULL;
        }
        for (Py_ssize_t i = 0; i < n; i++)
            got[i] = cos(la[i] * (PI / 180.0));
        PyMem_Free(c->cos_lat);
        Py_XSETREF(c->cos_of, Py_NewRef(arr));
        c->cos_lat = got;
    }
    return c->cos_lat;
}

/* Squared-sine (haversine) or squared-angle (plane) bounds of a circle: a point whose h is below
 * inner is inside by more than the tolerance, above outer outside by more than it; in between
 * (or NaN) circle_distance and the reference decide as before. The relative margin (1e-9, a
 * distance error of ~5e-10 relative, against the tolerance's 1e-7) dwarfs the rounding of sin,
 * sqrt and asin, so a point decided by a bound gets the answer the distance would give it. */
typedef struct {
    double inner, outer;
} Bounds;

static Bounds circle_bounds(double limit, double tol, int plane)
{
    Bounds b = {-1.0, INFINITY};
    double d_in = limit - tol, d_out = limit + tol;
    if (plane) {
        if (d_in > 0)
            b.inner = (d_in / EARTH_MEAN_RADIUS_M) * (d_in / EARTH_MEAN_RADIUS_M) * (1 - 1e-9);
        b.outer = (d_out / EARTH_MEAN_RADIUS_M) * (d_out / EARTH_MEAN_RADIUS_M) * (1 + 1e-9);
        return b;
    }
    double a_in = d_in / (2 * EARTH_MEAN_RADIUS_M), a_out = d_out / (2 * EARTH_MEAN_RADIUS_M);
    if (d_in > 0 && a_in < PI / 2 * 0.99)
        b.inner = sin(a_in) * sin(a_in) * (1 - 1e-9);
    if (a_out < PI / 2 * 0.99)
        b.outer = sin(a_out) * sin(a_out) * (1 + 1e-9);
    return b;
}

/* The documents with a point in the circle of a GEO leaf (payload: matcher.geo_circle_spec). */
static int geo_mask(Ctx *c, PyObject *spec, u64 *out)
{
    PyObject *name, *box, *exact;
    double clat, clon, limit, tol, box4[4] = {0, 0, 0, 0};
    int plane;
    if (!PyArg_ParseTuple(spec, "OOddddpO", &name, &box, &clat, &clon, &limit, &tol, &plane, &exact))
        return -1;
    if (box != Py_None && !PyArg_ParseTuple(box, "dddd", &box4[0], &box4[1], &box4[2], &box4[3]))
        return -1;
    PyObject *arrays = PyObject_CallMethod(c->batch, "geo_sorted", "O", name);
    if (!arrays)
        return -1;
    Py_buffer lats = {0}, lons = {0}, poss = {0};
    int rc = -1, any = 0;
    if (!PyTuple_Check(arrays) || PyTuple_GET_SIZE(arrays) != 3) {
        PyErr_SetString(PyExc_TypeError, "geo_sorted must give (lats, lons, positions)");
        goto done;
    }
    if (get_array8(PyTuple_GET_ITEM(arrays, 0), &lats, -1) < 0)
        goto done;
    Py_ssize_t n = lats.len / 8;
    if (get_array8(PyTuple_GET_ITEM(arrays, 1), &lons, n) < 0 || get_array8(PyTuple_GET_ITEM(arrays, 2), &poss, n) < 0)
        goto done;
    const double *la = lats.buf, *lo = lons.buf;
    const int64_t *pos = poss.buf;
    Py_ssize_t start = 0, stop = n;
    if (box != Py_None) { /* the box's band of latitudes (numpy's searchsorted left / right) */
        Py_ssize_t lo_i = 0, hi_i = n;
        while (lo_i < hi_i) {
            Py_ssize_t mid = (lo_i + hi_i) / 2;
            if (la[mid] < box4[0]) lo_i = mid + 1; else hi_i = mid;
        }
        start = lo_i;
        hi_i = n;
        while (lo_i < hi_i) {
            Py_ssize_t mid = (lo_i + hi_i) / 2;
            if (la[mid] <= box4[1]) lo_i = mid + 1; else hi_i = mid;
        }
        stop = lo_i;
    }
    double rlat1 = clat * (PI / 180.0), cos1 = cos(rlat1);
    const double *cos_lat = plane ? NULL : lat_cosines(c, PyTuple_GET_ITEM(arrays, 0), la, n);
    if (!plane && !cos_lat)
        goto done;
    Bounds bounds = circle_bounds(limit, tol, plane);
    memset(out, 0, (size_t)c->nwords * sizeof(u64));
    for (Py_ssize_t i = start; i < stop; i++) {
        if (box != Py_None && !(lo[i] >= box4[2] && lo[i] <= box4[3]))
            continue;
        int64_t p = pos[i];
        if (p < 0 || p >= (int64_t)c->nwords * 64)
            continue;
        double h; /* circle_distance's haversine, or its plane distance squared over R**2 */
        if (plane) {
            double x = (lo[i] - clon) * (PI / 180.0) * cos((la[i] + clat) / 2.0 * (PI / 180.0));
            double y = (la[i] - clat) * (PI / 180.0);
            h = x * x + y * y;
        } else {
            double a = sin((la[i] * (PI / 180.0) - rlat1) / 2), b = sin((lo[i] - clon) * (PI / 180.0) / 2);
            h = a * a + cos1 * cos_lat[i] * b * b;
        }
        int inside = 1;
        if (!(h < bounds.inner)) { /* (NaN: here) */
            if (h > bounds.outer)
                continue;
            double gap = circle_distance(la[i], lo[i], clat, clon, rlat1, cos1, plane) - limit;
            inside = gap < -tol;
            if (!inside && !(fabs(gap) > tol)) { /* too close to call (or NaN): the reference decides */
                PyObject *verdict = PyObject_CallFunction(exact, "dd", la[i], lo[i]);
                if (!verdict)
                    goto done;
                inside = PyObject_IsTrue(verdict);
                Py_DECREF(verdict);
                if (inside < 0)
                    goto done;
            }
        }
        if (inside) {
            out[p >> 6] |= (u64)1 << (p & 63);
            any = 1;
        }
    }
    rc = any;
done:
    if (lats.obj)
        PyBuffer_Release(&lats);
    if (lons.obj)
        PyBuffer_Release(&lons);
    if (poss.obj)
        PyBuffer_Release(&poss);
    Py_DECREF(arrays);
    return rc;
}

/* bisect.bisect_left (right = 0) / bisect_right (right = 1) of x in the list values. */
static Py_ssize_t bisect(PyObject *values, PyObject *x, int right)
{
    Py_ssize_t lo = 0, hi = PyList_GET_SIZE(values);
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (mid >= PyList_GET_SIZE(values)) { /* shrunk by a comparison (Python code) */
            PyErr_SetString(PyExc_RuntimeError, "batch values changed during a range lookup");
            return -2;
        }
        PyObject *item = PyList_GET_ITEM(values, mid);
        Py_INCREF(item);
        int below = right ? PyObject_RichCompareBool(x, item, Py_LT) : PyObject_RichCompareBool(item, x, Py_LT);
        Py_DECREF(item);
        if (below < 0)
            return -2;
        if (right ? below : !below)
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

/* A RANGE leaf (payload: field, low, low_inclusive, high, high_inclusive, node or None when the
 * bounds are fixed, matcher.py's evaluator): BatchIndex.range_mask over the sorted values. */
static int range_leaf(Ctx *c, PyObject *spec, u64 *out)
{
    PyObject *name, *low, *high, *node, *fallback, *resolved = NULL, *fv = NULL, *low_r = NULL, *high_r = NULL;
    int low_inc, high_inc, rc = -1;
    if (!PyArg_ParseTuple(spec, "OOpOpOO", &name, &low, &low_inc, &high, &high_inc, &node, &fallback))
        return -1;
    if (node != Py_None) { /* date math on now: the bounds of this batch */
        resolved = PyObject_CallMethod(c->batch, "resolved", "O", node);
        if (!resolved || !(low = low_r = PyObject_GetAttrString(resolved, "low")) ||
            !(high = high_r = PyObject_GetAttrString(resolved, "high")))
            goto done;
        PyObject *li = PyObject_GetAttrString(resolved, "low_inclusive");
        PyObject *hi = li ? PyObject_GetAttrString(resolved, "high_inclusive") : NULL;
        low_inc = li ? PyObject_IsTrue(li) : -1;
        high_inc = hi ? PyObject_IsTrue(hi) : -1;
        Py_XDECREF(li);
        Py_XDECREF(hi);
        if (low_inc < 0 || high_inc < 0)
            goto done;
    }
    fv = PyObject_CallMethod(c->batch, "field_values", "O", name);
    if (!fv)
        goto done;
    PyObject *values, *masks;
    if (!PyArg_ParseTuple(fv, "O!O!", &PyList_Type, &values, &PyList_Type, &masks))
        goto done;
    Py_ssize_t n = PyList_GET_SIZE(values), start = 0, stop = n;
    if (low != Py_None)
        start = bisect(values, low, !low_inc);
    if (start >= 0 && high != Py_None)
        stop = bisect(values, high, high_inc);
    if (start < 0 || stop < 0) {
        if (!PyErr_ExceptionMatches(PyExc_TypeError))
            goto done;
        PyErr_Clear(); /* values and bound of different types: the Python evaluator compares one by one */
        rc = call_leaf(c, fallback, c->full_int, out);
        goto done;
    }
    if (stop > PyList_GET_SIZE(masks))
        stop = PyList_GET_SIZE(masks);
    memset(out, 0, (size_t)c->nwords * sizeof(u64));
    rc = 0;
    for (Py_ssize_t i = start; i < stop && i < PyList_GET_SIZE(masks); i++) { /* (term_words may run code) */
        const u64 *words;
        int got = term_words(c, PyList_GET_ITEM(masks, i), &words);
        if (got < 0) {
            rc = -1;
            goto done;
        }
        if (got) {
            for (Py_ssize_t w = 0; w < c->nwords; w++)
                out[w] |= words[w];
            rc = 1;
        }
    }
done:
    Py_XDECREF(resolved);
    Py_XDECREF(low_r);
    Py_XDECREF(high_r);
    Py_XDECREF(fv);
    return rc;
}

static int leaf_of_payload(Ctx *c, int32_t id, PyObject *payload, const u64 *pre, u64 *tmp, const u64 **buf);

/* A leaf's mask: 0 when empty, 1 with *buf set (bits outside pre may be set), -1 on error.
 * tmp receives a PRE leaf's result. */
static int leaf_mask(Ctx *c, int32_t id, const u64 *pre, u64 *tmp, const u64 **buf)
{
    if (id < 0 || id >= c->nleaves) {
        PyErr_Format(PyExc_ValueError, "rule program refers to leaf %d of %zd", (int)id, c->nleaves);
        return -1;
    }
    unsigned char st = c->state[id];
    if (st == MEMO_EMPTY)
        return 0;
    if (st == MEMO_SET) {
        *buf = c->memo[id];
        return 1;
    }
    PyObject *payload = PyList_GetItem(c->payloads, id);
    if (!payload)
        return -1;
    /* held for the whole leaf: every kind can run Python code (a method of the batch, a key's
     * __hash__, an evaluator) that may replace the list's item and free it with its contents */
    Py_INCREF(payload);
    int rc = leaf_of_payload(c, id, payload, pre, tmp, buf);
    Py_DECREF(payload);
    return rc;
}

static int leaf_of_payload(Ctx *c, int32_t id, PyObject *payload, const u64 *pre, u64 *tmp, const u64 **buf)
{
    char kind = c->kinds[id];
    if (kind == KIND_PRE) {
        PyObject *pre_int = long_from_words(pre, c->nwords);
        if (!pre_int)
            return -1;
        int rc = call_leaf(c, payload, pre_int, tmp);
        Py_DECREF(pre_int);
        if (rc > 0)
            *buf = tmp;
        return rc;
    }
    if (kind == KIND_TERM) {
        const u64 *words = NULL;
        int rc = key_words(c, payload, &words);
        if (rc < 0)
            return -1;
        c->state[id] = rc ? MEMO_SET : MEMO_EMPTY;
        c->memo[id] = (u64 *)words; /* the cache's words: never written through a memo */
        *buf = words;
        return rc;
    }
    if (kind == KIND_TERMS && c->state[id] == MEMO_UNKNOWN) {
        /* Most terms leaves belong to one rule (at 100,000 rules: 75,000 distinct value sets):
         * memoising each would write and re-read a batch-sized buffer per leaf (75 MB per batch).
         * The first use computes into scratch; only a leaf used again is memoised. */
        c->state[id] = MEMO_SEEN;
        int rc = terms_mask(c, payload, tmp);
        if (rc > 0)
            *buf = tmp;
        return rc;
    }
    u64 *mem = arena_alloc(c);
    if (!mem)
        return -1;
    int rc;
    if (kind == KIND_TERMS) {
        rc = terms_mask(c, payload, mem);
    } else if (kind == KIND_RANGE) {
        rc = range_leaf(c, payload, mem);
    } else if (kind == KIND_GEO) {
        rc = geo_mask(c, payload, mem);
    } else if (kind == KIND_MEMO) {
        rc = call_leaf(c, payload, c->full_int, mem);
    } else {
        PyErr_Format(PyExc_ValueError, "rule program refers to a free leaf slot %d", (int)id);
        return -1;
    }
    if (rc < 0)
        return -1;
    /* (an unused arena slot when empty: cheaper than a second allocation path) */
    c->state[id] = rc ? MEMO_SET : MEMO_EMPTY;
    c->memo[id] = mem;
    *buf = mem;
    return rc;
}

/* ----- word loops ------------------------------------------------------------------------------- */

static inline int and_into(u64 *dst, const u64 *src, Py_ssize_t n)
{
    u64 any = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        any |= (dst[i] &= src[i]);
    return any != 0;
}

static inline int andnot_into(u64 *dst, const u64 *src, Py_ssize_t n)
{
    u64 any = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        any |= (dst[i] &= ~src[i]);
    return any != 0;
}

static inline int and_to(u64 *dst, const u64 *a, const u64 *b, Py_ssize_t n)
{
    u64 any = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        any |= (dst[i] = a[i] & b[i]);
    return any != 0;
}

static inline int andnot_to(u64 *dst, const u64 *a, const u64 *b, Py_ssize_t n)
{
    u64 any = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        any |= (dst[i] = a[i] & ~b[i]);
    return any != 0;
}

/* ----- nodes ------------------------------------------------------------------------------------ */

static int node_len(const int32_t *code, Py_ssize_t pc, Py_ssize_t end, Py_ssize_t *len)
{
    if (pc >= end)
        goto bad;
    switch (code[pc]) {
    case OP_LEAF:
        *len = 2;
        break;
    case OP_ALL:
    case OP_NONE:
        *len = 1;
        break;
    case OP_BOOL:
        if (pc + 6 > end || code[pc + 1] < 6)
            goto bad;
        *len = code[pc + 1];
        break;
    default:
        goto bad;
    }
    if (pc + *len > end)
        goto bad;
    return 0;
bad:
    PyErr_SetString(PyExc_ValueError, "malformed rule program");
    return -1;
}

static int eval_bool(Ctx *c, const int32_t *code, Py_ssize_t pc, Py_ssize_t end, const u64 *pre, u64 *out, int depth);

/* A node's mask for the documents of pre: 0 when empty, 1 with *buf set (bits outside pre may be
 * set), -1 on error. Scratch buffers of this depth hold what the node computes. */
static int node_mask(Ctx *c, const int32_t *code, Py_ssize_t pc, Py_ssize_t end, const u64 *pre, int depth,
                     const u64 **buf)
{
    Py_ssize_t len;
    if (node_len(code, pc, end, &len) < 0)
        return -1;
    switch (code[pc]) {
    case OP_LEAF: {
        u64 *tmp = scratch(c, depth, 3);
        if (!tmp)
            return -1;
        return leaf_mask(c, code[pc + 1], pre, tmp, buf);
    }
    case OP_ALL:
        *buf = pre;
        return 1;
    case OP_NONE:
        return 0;
    default: {
        u64 *out = scratch(c, depth, 0);
        if (!out)
            return -1;
        int rc = eval_bool(c, code, pc, pc + len, pre, out, depth + 1);
        if (rc > 0)
            *buf = out;
        return rc;
    }
    }
}

/* Bits set in at least k (2 <= k <= n) of the n optional children, within mask: acc[j] holds the
 * documents seen in at least j children so far. */
static int at_least(Ctx *c, const int32_t *code, Py_ssize_t *pc, Py_ssize_t end, int32_t k, int32_t n, u64 *mask,
                    int depth)
{
    Py_ssize_t nw = c->nwords;
    if (k > n) { /* more than there are: nothing (and no k + 1 buffers for a huge k) */
        memset(mask, 0, (size_t)nw * sizeof(u64));
        return 0;
    }
    u64 *acc = PyMem_Calloc((size_t)k + 1, (size_t)nw * sizeof(u64));
    if (!acc) {
        PyErr_NoMemory();
        return -1;
    }
    int rc = 0;
    for (int32_t i = 0; i < n; i++) {
        Py_ssize_t len;
        const u64 *got;
        if (node_len(code, *pc, end, &len) < 0 || (rc = node_mask(c, code, *pc, end, mask, depth, &got)) < 0) {
            rc = -1;
            goto done;
        }
        *pc += len;
        if (!rc)
            continue;
        for (int32_t j = k; j >= 1; j--) {
            u64 *to = acc + (size_t)j * nw;
            const u64 *below = j > 1 ? acc + (size_t)(j - 1) * nw : mask;
            for (Py_ssize_t w = 0; w < nw; w++)
                to[w] |= below[w] & got[w];
        }
    }
    rc = and_into(mask, acc + (size_t)k * nw, nw);
done:
    PyMem_Free(acc);
    return rc;
}

/* A bool node at pc (up to end) into out: matcher.py's bool_eval / bool_msm / and_terms. */
static int eval_bool(Ctx *c, const int32_t *code, Py_ssize_t pc, Py_ssize_t end, const u64 *pre, u64 *out, int depth)
{
    Py_ssize_t nw = c->nwords, len;
    int32_t msm = code[pc + 2], nreq = code[pc + 3], nopt = code[pc + 4], nnot = code[pc + 5];
    const u64 *got;
    int rc;
    pc += 6;
    memcpy(out, pre, (size_t)nw * sizeof(u64));
    for (int32_t i = 0; i < nreq; i++) {
        if (node_len(code, pc, end, &len) < 0 || (rc = node_mask(c, code, pc, end, out, depth, &got)) < 0)
            return -1;
        if (!rc || !and_into(out, got, nw))
            return 0;
        pc += len;
    }
    if (nopt > 0 && msm <= 1) {
        u64 *any = scratch(c, depth, 1), *todo = scratch(c, depth, 2);
        if (!any || !todo)
            return -1;
        memset(any, 0, (size_t)nw * sizeof(u64));
        for (int32_t i = 0; i < nopt; i++) {
            if (node_len(code, pc, end, &len) < 0)
                return -1;
            /* only the documents no earlier option matched (an empty todo: nothing to learn) */
            if (andnot_to(todo, out, any, nw)) {
                if ((rc = node_mask(c, code, pc, end, todo, depth, &got)) < 0)
                    return -1;
                if (rc)
                    for (Py_ssize_t w = 0; w < nw; w++)
                        any[w] |= got[w];
            }
            pc += len;
        }
        if (!and_into(out, any, nw))
            return 0;
    } else if (nopt > 0) {
        if ((rc = at_least(c, code, &pc, end, msm, nopt, out, depth)) <= 0)
            return rc;
    }
    for (int32_t i = 0; i < nnot; i++) {
        if (node_len(code, pc, end, &len) < 0 || (rc = node_mask(c, code, pc, end, out, depth, &got)) < 0)
            return -1;
        if (rc && !andnot_into(out, got, nw))
            return 0;
        pc += len;
    }
    return 1;
}

/* ----- run --------------------------------------------------------------------------------------- */

/* Scattering rule-major (each rule's documents' lists in turn) touches lists all over the batch
 * for every rule, a cache miss per match, and grows every list a dozen times. Instead the masks
 * of the matching rules are gathered (in rule order) into chunks of CHUNK_RULES rules stored
 * word-major (row w: word w of each rule's mask); at the end each document's count is known, its
 * list is allocated at its exact size, and the lists are filled 64 documents (one row) at a time,
 * so the lists being written stay in cache. (The numpy scatter it replaces held the same
 * rules x batch bytes.) */
enum { CHUNK_RULES = 256 };

typedef struct Chunk {
    struct Chunk *next;
    Py_ssize_t count;
    PyObject *ids[CHUNK_RULES];     /* owned */
    Py_ssize_t matches[CHUNK_RULES]; /* documents in each rule's mask */
    u64 rows[];                     /* nwords rows of CHUNK_RULES words */
} Chunk;

typedef struct {
    Py_ssize_t size, nwords;
    Chunk *first, *last;
} Gather;

static int gather_add(Gather *g, PyObject *rule_id, const u64 *mask)
{
    Chunk *ch = g->last;
    if (!ch || ch->count == CHUNK_RULES) {
        ch = PyMem_Malloc(sizeof(Chunk) + (size_t)g->nwords * CHUNK_RULES * sizeof(u64));
        if (!ch) {
            PyErr_NoMemory();
            return -1;
        }
        ch->next = NULL;
        ch->count = 0;
        if (g->last)
            g->last->next = ch;
        else
            g->first = ch;
        g->last = ch;
    }
    Py_ssize_t j = ch->count++, matches = 0;
    for (Py_ssize_t w = 0; w < g->nwords; w++) {
        u64 bits = mask[w];
        Py_ssize_t left = g->size - w * 64; /* no document beyond the batch (size 0: one word, none) */
        if (left < 64)
            bits &= left > 0 ? ((u64)1 << left) - 1 : 0;
        ch->rows[w * CHUNK_RULES + j] = bits;
        matches += __builtin_popcountll(bits);
    }
    Py_INCREF(rule_id);
    ch->ids[j] = rule_id;
    ch->matches[j] = matches;
    return 0;
}

static void gather_free(Gather *g)
{
    while (g->first) {
        Chunk *next = g->first->next;
        for (Py_ssize_t j = 0; j < g->first->count; j++)
            Py_DECREF(g->first->ids[j]);
        PyMem_Free(g->first);
        g->first = next;
    }
    g->last = NULL;
}

/* The per-document lists of the gathered rules (a new list of size lists). */
static PyObject *gather_lists(Gather *g)
{
    Py_ssize_t size = g->size, nwords = g->nwords;
    Py_ssize_t *fill = PyMem_Calloc((size_t)nwords * 64, sizeof(Py_ssize_t));
    PyObject *lists = PyList_New(size);
    if (!fill || !lists) {
        if (!fill)
            PyErr_NoMemory();
        goto fail;
    }
    for (Chunk *ch = g->first; ch; ch = ch->next) /* counts */
        for (Py_ssize_t w = 0; w < nwords; w++) {
            const u64 *row = ch->rows + w * CHUNK_RULES;
            for (Py_ssize_t j = 0; j < ch->count; j++)
                for (u64 bits = row[j]; bits; bits &= bits - 1)
                    fill[w * 64 + __builtin_ctzll(bits)]++;
        }
    for (Py_ssize_t d = 0; d < size; d++) {
        PyObject *list = PyList_New(fill[d]);
        if (!list)
            goto fail;
        PyList_SET_ITEM(lists, d, list);
        fill[d] = 0;
    }
    /* Each id's references for all its documents at once: touching the id objects once per
     * match, all over memory at 100,000 rules, cost more than the rest of the scatter. Nothing
     * can fail from here on, so the lists get exactly these references. */
    for (Chunk *ch = g->first; ch; ch = ch->next)
        for (Py_ssize_t j = 0; j < ch->count; j++)
            Py_SET_REFCNT(ch->ids[j], Py_REFCNT(ch->ids[j]) + ch->matches[j]);
    for (Py_ssize_t w = 0; w < nwords; w++) /* a row (64 documents) at a time, rules in order */
        for (Chunk *ch = g->first; ch; ch = ch->next) {
            const u64 *row = ch->rows + w * CHUNK_RULES;
            for (Py_ssize_t j = 0; j < ch->count; j++)
                for (u64 bits = row[j]; bits; bits &= bits - 1) {
                    Py_ssize_t doc = w * 64 + __builtin_ctzll(bits);
                    PyListObject *list = (PyListObject *)PyList_GET_ITEM(lists, doc);
                    list->ob_item[fill[doc]++] = ch->ids[j];
                }
        }
    PyMem_Free(fill);
    return lists;
fail:
    PyMem_Free(fill);
    Py_XDECREF(lists);
    return NULL;
}

static int ctx_init(Ctx *c, PyObject *batch, PyObject *kinds, PyObject *payloads, Py_ssize_t size)
{
    memset(c, 0, sizeof(*c));
    c->batch = batch;
    c->payloads = payloads;
    c->nwords = size > 0 ? size / 64 + (size % 64 != 0) : 1;
    /* our own reference: a leaf evaluator (Python) may rebind batch.terms, freeing the dict */
    c->terms = PyObject_GetAttrString(batch, "terms");
    if (!c->terms)
        return -1;
    if (!PyDict_Check(c->terms)) {
        PyErr_SetString(PyExc_TypeError, "batch.terms must be a dict");
        return -1;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(kinds, &view, PyBUF_SIMPLE) < 0)
        return -1;
    c->nleaves = view.len;
    c->kinds = PyMem_Malloc((size_t)view.len + 1);
    if (c->kinds)
        memcpy(c->kinds, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    c->state = PyMem_Calloc((size_t)c->nleaves + 1, 1);
    c->memo = PyMem_Calloc((size_t)c->nleaves + 1, sizeof(u64 *));
    c->full = PyMem_Calloc((size_t)c->nwords, sizeof(u64));
    if (!c->kinds || !c->state || !c->memo || !c->full) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t d = 0; d < size; d++)
        c->full[d >> 6] |= (u64)1 << (d & 63);
    c->full_int = long_from_words(c->full, c->nwords);
    return c->full_int ? 0 : -1;
}

/* One rule's program code[0..end): 1 when it matches some document (result in out), 0 when not,
 * -1 on error. */
static int run_rule(Ctx *c, const int32_t *code, Py_ssize_t end, u64 *out)
{
    const u64 *got;
    int rc = node_mask(c, code, 0, end, c->full, 0, &got);
    if (rc <= 0)
        return rc;
    return and_to(out, got, c->full, c->nwords);
}

PyDoc_STRVAR(run_doc,
"run(rule_ids, code, offsets, candidates, kinds, payloads, batch, size, to_lists=False)\n\n"
"Evaluate the program of each of rule_ids (a tuple), in order, over the batch of size documents\n"
"(only the ids in candidates unless it is None). The programs are packed: rule i's is the int32\n"
"code[offsets[i]:offsets[i + 1]] (offsets: int64, one more than rule_ids). kinds/payloads: the\n"
"leaf table. Returns (matched ids, masks as ints), or with to_lists, per document the list of the\n"
"matching rule ids (in the given order).");

static PyObject *run(PyObject *self, PyObject *args)
{
    PyObject *ids, *candidates, *kinds, *payloads, *batch;
    Py_buffer code = {0}, offsets = {0};
    Py_ssize_t size;
    int to_lists = 0;
    /* ids is a tuple: its items cannot change under us, so they are read without a reference
     * each (a reference per rule per batch, on 100,000 objects all over memory, was a tenth of
     * the evaluation) */
    if (!PyArg_ParseTuple(args, "O!y*y*OOO!On|p", &PyTuple_Type, &ids, &code, &offsets, &candidates, &kinds,
                          &PyList_Type, &payloads, &batch, &size, &to_lists))
        return NULL;
    Ctx c;
    Gather g = {size, 0, NULL, NULL};
    PyObject *matched = NULL, *masks = NULL, *result = NULL;
    u64 *out = NULL;
    memset(&c, 0, sizeof(c));
    Py_ssize_t nrules = PyTuple_GET_SIZE(ids);
    const int64_t *offs = offsets.buf;
    const int32_t *prog = code.buf;
    Py_ssize_t ncode = code.len / 4;
    if (offsets.len != (nrules + 1) * 8 || code.len % 4 || offs[0] != 0 || offs[nrules] != ncode) {
        PyErr_SetString(PyExc_ValueError, "offsets must be int64, one per rule plus the end of code");
        goto done;
    }
    if (candidates != Py_None && !PyAnySet_Check(candidates)) {
        PyErr_SetString(PyExc_TypeError, "candidates must be a set or None");
        goto done;
    }
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "size must be >= 0");
        goto done;
    }
    if (ctx_init(&c, batch, kinds, payloads, size) < 0)
        goto done;
    g.nwords = c.nwords;
    out = PyMem_Malloc((size_t)c.nwords * sizeof(u64));
    matched = PyList_New(0);
    masks = PyList_New(0);
    if (!out || !matched || !masks) {
        if (!out)
            PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; size > 0 && i < nrules; i++) {
        PyObject *rule_id = PyTuple_GET_ITEM(ids, i); /* borrowed: ids holds it */
        Py_ssize_t start = (Py_ssize_t)offs[i], end = (Py_ssize_t)offs[i + 1];
        if (start < 0 || end < start || end > ncode) {
            PyErr_SetString(PyExc_ValueError, "offsets must not decrease");
            goto done;
        }
        int rc = 1;
        if (candidates != Py_None)
            rc = PySet_Contains(candidates, rule_id);
        if (rc > 0)
            rc = run_rule(&c, prog + start, end - start, out);
        if (rc > 0) {
            if (to_lists) {
                rc = gather_add(&g, rule_id, out);
            } else {
                PyObject *mask = long_from_words(out, c.nwords);
                rc = mask && PyList_Append(matched, rule_id) == 0 && PyList_Append(masks, mask) == 0 ? 0 : -1;
                Py_XDECREF(mask);
            }
        }
        if (rc < 0)
            goto done;
    }
    result = to_lists ? gather_lists(&g) : PyTuple_Pack(2, matched, masks);
done:
    gather_free(&g);
    PyMem_Free(out);
    Py_XDECREF(matched);
    Py_XDECREF(masks);
    ctx_free(&c);
    PyBuffer_Release(&code);
    PyBuffer_Release(&offsets);
    return result;
}

/* ----- scatter ------------------------------------------------------------------------------------ */

PyDoc_STRVAR(scatter_doc,
"scatter(matched, masks, size) -> lists\n\n"
"Per document 0..size-1, the ids of matched (in their order) whose mask (an int) has its bit.");

static PyObject *scatter(PyObject *self, PyObject *args)
{
    PyObject *matched, *masks;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "OOn", &matched, &masks, &size))
        return NULL;
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "size must be >= 0");
        return NULL;
    }
    Py_ssize_t nwords = size > 0 ? size / 64 + (size % 64 != 0) : 1; /* (size + 63 could overflow) */
    Gather g = {size, nwords, NULL, NULL};
    PyObject *result = NULL;
    /* tuple copies: converting a mask may run Python code (an int subclass's __mod__) that
     * changes the caller's lists */
    PyObject *ids = PySequence_Tuple(matched);
    PyObject *ms = ids ? PySequence_Tuple(masks) : NULL;
    u64 *words = PyMem_Malloc((size_t)nwords * sizeof(u64));
    if (!ms || !words) {
        if (!words)
            PyErr_NoMemory();
        goto done;
    }
    if (PyTuple_GET_SIZE(ids) != PyTuple_GET_SIZE(ms)) {
        PyErr_SetString(PyExc_ValueError, "matched and masks differ in length");
        goto done;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(ids); i++) {
        int rc = words_from_long(PyTuple_GET_ITEM(ms, i), words, nwords);
        if (rc < 0 || (rc && gather_add(&g, PyTuple_GET_ITEM(ids, i), words) < 0))
            goto done;
    }
    result = gather_lists(&g);
done:
    gather_free(&g);
    PyMem_Free(words);
    Py_XDECREF(ids);
    Py_XDECREF(ms);
    return result;
}

static PyMethodDef methods[] = {
    {"run", run, METH_VARARGS, run_doc},
    {"scatter", scatter, METH_VARARGS, scatter_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "percolators._eval",
    "Rule programs over a batch, and masks scattered to per-document lists (see percolators.programs).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__eval(void)
{
    return PyModule_Create(&module);
}
