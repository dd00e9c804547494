/* percolators._walk: the C twin of FastIndexer.index_batch's fast path (percolators/fast_index.py).
 *
 * walk(documents, start, plan, docs, slots, index, date_fallback) -> int
 *
 * Walks documents[start:], one plain-JSON dict at a time, with the batch plan built by
 * FastIndexer._c_plan; for each document it handles completely it appends a LazyDoc (its
 * IndexedDoc, built on first read, see below; ``index``: FastIndexer.index) to ``docs``, its input
 * index to ``slots`` and its batch position (len(docs) before the append) to the postings of each
 * value. It stops at the first
 * document it cannot handle (not an exact dict, or any value the Python fast walk would give up
 * on with _Slow) and returns that document's index, or len(documents) when all are done; Python
 * then indexes that one document the full way and calls again with start = index + 1. Nothing
 * of a document it stops at has been posted: a document's postings are applied only once its
 * whole walk succeeded, which leaves the postings exactly as the Python walk's post-then-undo.
 *
 * Plan entries (dict: key -> tuple):
 *   (0, subplan)                          an object field
 *   (kind, path, low, high, post)        a leaf: kind 1 keyword, 2 integer, 3 date, 4 geo_point,
 *                                         5 anything else (always the slow path unless empty);
 *                                         low/high: the integer bounds; post: the field's postings
 *                                         (dict value -> [positions]; geo: list of (pos, lat, lon))
 *                                         or None when the field is not indexed in this batch.
 * date_fallback(text) -> int | None: the Python date parser, used for non-ASCII text only (Python's
 *   \d matches every Unicode digit; porting that is not worth it for a case JSON never has).
 *
 * masks(postings) -> (terms, field_masks): BatchIndex.__init__'s loop (percolators/batch.py):
 *   for each field -> value -> positions, the int with those bits set, keyed (field, value) in
 *   ``terms`` and value in ``field_masks[field]`` (fields without values left out).
 * mask_of(positions) -> int: percolators.batch.mask_of for a list of ints.
 *
 * No global mutable state: only interned constant strings, created once at import.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>

enum { K_OBJECT = 0, K_KEYWORD = 1, K_INTEGER = 2, K_DATE = 3, K_GEO = 4, K_OTHER = 5 };
enum { OK = 0, SLOW = 1, FAIL = -1 };

/* percolators.geo quantize: Lucene's 32-bit encoding step, 180 / 2**32 and 360 / 2**32 */
#define LAT_DECODE (180.0 / 4294967296.0)
#define LON_DECODE (360.0 / 4294967296.0)
#define MS_PER_DAY 86400000LL

static PyObject *str_lat, *str_lon, *str_dot; /* immutable constants */

typedef struct {
    PyObject *post;  /* the field's postings */
    PyObject *items; /* one indexed value (single), or a tuple of them */
    int geo, single;
} Pending; /* owns its two references: nothing here relies on the plan or values staying put */

typedef struct {
    PyObject *values; /* NULL: post only (batch walk); else the document's values dict to fill */
    PyObject *date_fallback;
    Pending *pending; /* postings to apply once the document is known to be plain */
    Py_ssize_t npending, cap;
} Walk;

/* ----- dates: "YYYY-MM-DDTHH:MM:SS[.mmm]Z" exactly like FastIndexer._date --------------------- */

static int two(const unsigned char *s, int *out)
{
    if (s[0] < '0' || s[0] > '9' || s[1] < '0' || s[1] > '9')
        return 0;
    *out = (s[0] - '0') * 10 + (s[1] - '0');
    return 1;
}

/* days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil) */
static long long days_from_civil(long long y, int m, int d)
{
    y -= m <= 2;
    long long era = (y >= 0 ? y : y - 399) / 400;
    long long yoe = y - era * 400;
    long long doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
    long long doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static int days_in_month(int y, int m)
{
    static const int days[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (m == 2 && ((y % 4 == 0 && y % 100 != 0) || y % 400 == 0))
        return 29;
    return days[m - 1];
}

/* 1: *out is the epoch millis; 0: not this format (the slow path decides) */
static int parse_ascii_date(const unsigned char *s, Py_ssize_t n, long long *out)
{
    int c1, c2, mon, day, hour, min, sec, ms = 0;
    if (n != 20 && n != 24)
        return 0;
    if (!two(s, &c1) || !two(s + 2, &c2) || s[4] != '-' || !two(s + 5, &mon) || s[7] != '-' ||
        !two(s + 8, &day) || s[10] != 'T' || !two(s + 11, &hour) || s[13] != ':' || !two(s + 14, &min) ||
        s[16] != ':' || !two(s + 17, &sec))
        return 0;
    if (n == 24) {
        int hi;
        if (s[19] != '.' || !two(s + 20, &hi) || s[22] < '0' || s[22] > '9' || s[23] != 'Z')
            return 0;
        ms = hi * 10 + (s[22] - '0');
    } else if (s[19] != 'Z') {
        return 0;
    }
    int year = c1 * 100 + c2;
    /* datetime() refuses year 0, month 0/13, day past the month; then the time is checked */
    if (year < 1 || mon < 1 || mon > 12 || day < 1 || day > days_in_month(year, mon))
        return 0;
    if (hour > 23 || min > 59 || sec > 59)
        return 0;
    *out = days_from_civil(year, mon, day) * MS_PER_DAY + ((hour * 60LL + min) * 60 + sec) * 1000 + ms;
    return 1;
}

/* the indexed date (new ref) in *out, or SLOW / FAIL */
static int date_value(Walk *w, PyObject *text, PyObject **out)
{
    if (!PyUnicode_IS_ASCII(text)) {
        PyObject *got = PyObject_CallOneArg(w->date_fallback, text);
        if (got == NULL)
            return FAIL;
        if (got == Py_None) {
            Py_DECREF(got);
            return SLOW;
        }
        *out = got;
        return OK;
    }
    long long millis;
    if (!parse_ascii_date(PyUnicode_1BYTE_DATA(text), PyUnicode_GET_LENGTH(text), &millis))
        return SLOW;
    *out = PyLong_FromLongLong(millis);
    return *out == NULL ? FAIL : OK;
}

/* ----- scalars --------------------------------------------------------------------------------- */

static int int_in_bounds(PyObject *value, PyObject *entry)
{
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (overflow)
        return 0; /* beyond 64 bits: beyond every integer type's bounds */
    if (v == -1 && PyErr_Occurred())
        return -1;
    /* the bounds with the overflow-reporting conversion: PyLong_AsLongLong of a multi-digit int
     * (every type's bounds) goes through a byte array, a fifth of the walk's integer work; a bound
     * beyond 64 bits is below or above every v */
    int low_over, high_over;
    long long low = PyLong_AsLongLongAndOverflow(PyTuple_GET_ITEM(entry, 2), &low_over);
    if (low == -1 && PyErr_Occurred())
        return -1;
    long long high = PyLong_AsLongLongAndOverflow(PyTuple_GET_ITEM(entry, 3), &high_over);
    if (high == -1 && PyErr_Occurred())
        return -1;
    int above_low = low_over ? low_over < 0 : low <= v;
    int below_high = high_over ? high_over > 0 : v <= high;
    return above_low && below_high;
}

/* {"lat": float, "lon": float} in range -> quantised (lat, lon) */
static int geo_value(PyObject *value, PyObject **out)
{
    if (!PyDict_CheckExact(value) || PyDict_GET_SIZE(value) != 2)
        return SLOW;
    PyObject *lat = PyDict_GetItemWithError(value, str_lat);
    if (lat == NULL)
        return PyErr_Occurred() ? FAIL : SLOW;
    if (!PyFloat_CheckExact(lat))
        return SLOW;
    /* read now: the "lon" lookup may run a key's __eq__, which can remove (free) lat */
    double a = PyFloat_AS_DOUBLE(lat);
    PyObject *lon = PyDict_GetItemWithError(value, str_lon);
    if (lon == NULL)
        return PyErr_Occurred() ? FAIL : SLOW;
    if (!PyFloat_CheckExact(lon))
        return SLOW;
    double o = PyFloat_AS_DOUBLE(lon);
    if (!(-90.0 <= a && a <= 90.0 && -180.0 <= o && o <= 180.0))
        return SLOW;
    /* quantize(): floor to the 32-bit cell (exact in a double), times the cell size */
    double qa = a != 90.0 ? floor(a / LAT_DECODE) : 2147483647.0;
    double qo = o != 180.0 ? floor(o / LON_DECODE) : 2147483647.0;
    *out = Py_BuildValue("(dd)", qa * LAT_DECODE, qo * LON_DECODE);
    return *out == NULL ? FAIL : OK;
}

/* FastIndexer._scalar: the indexed value (new ref) of one value of a leaf field */
static int scalar(Walk *w, long kind, PyObject *entry, PyObject *value, PyObject **out)
{
    switch (kind) {
    case K_KEYWORD:
        if (!PyUnicode_CheckExact(value))
            return SLOW;
        *out = Py_NewRef(value);
        return OK;
    case K_INTEGER: {
        if (!PyLong_CheckExact(value))
            return SLOW;
        int in = int_in_bounds(value, entry);
        if (in <= 0)
            return in < 0 ? FAIL : SLOW;
        *out = Py_NewRef(value);
        return OK;
    }
    case K_DATE:
        if (!PyUnicode_CheckExact(value))
            return SLOW;
        return date_value(w, value, out);
    case K_GEO:
        return geo_value(value, out);
    default:
        return SLOW;
    }
}

/* ----- values -------------------------------------------------------------------------------- */

/* tuple(dict.fromkeys(items)) of n >= 1 owned refs, which it steals (a new tuple, or NULL) */
static PyObject *distinct(PyObject **items, Py_ssize_t n)
{
    PyObject *out = NULL, *seen = NULL;
    Py_ssize_t kept = 0;
    if (n > 16 && (seen = PyDict_New()) == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        int dup = 0;
        if (seen != NULL) { /* long lists: hash lookups, like dict.fromkeys */
            dup = PyDict_Contains(seen, items[i]);
            if (dup == 0 && PyDict_SetItem(seen, items[i], Py_None) < 0)
                dup = -1;
        } else {
            for (Py_ssize_t j = 0; j < kept && dup == 0; j++)
                dup = PyObject_RichCompareBool(items[j], items[i], Py_EQ);
        }
        if (dup < 0)
            goto done;
        if (dup) {
            Py_CLEAR(items[i]);
        } else {
            PyObject *keep = items[i];
            items[i] = NULL;
            items[kept++] = keep;
        }
    }
    out = PyTuple_New(kept);
    if (out != NULL) {
        for (Py_ssize_t i = 0; i < kept; i++) {
            PyTuple_SET_ITEM(out, i, items[i]);
            items[i] = NULL;
        }
    }
done:
    for (Py_ssize_t i = 0; i < n; i++)
        Py_XDECREF(items[i]);
    Py_XDECREF(seen);
    return out;
}

/* the items of a non-empty list value (new tuple) in *out, or SLOW / FAIL */
static int list_items(Walk *w, long kind, PyObject *entry, PyObject *list, PyObject **out)
{
    Py_ssize_t n = PyList_GET_SIZE(list);
    PyObject *small[16], **items = small;
    Py_ssize_t got = 0;
    int status = OK;
    if (n > 16 && (items = PyMem_New(PyObject *, n)) == NULL) {
        PyErr_NoMemory();
        return FAIL;
    }
    if (kind == K_KEYWORD) { /* every item a str, else the slow path */
        for (Py_ssize_t i = 0; i < n; i++)
            if (!PyUnicode_CheckExact(PyList_GET_ITEM(list, i)))
                status = SLOW;
    }
    for (Py_ssize_t i = 0; i < n && status == OK; i++) {
        if (PyList_GET_SIZE(list) != n) { /* changed by the date parser: stop before reading past it */
            status = SLOW;
            break;
        }
        PyObject *item = PyList_GET_ITEM(list, i);
        Py_INCREF(item); /* the list may change under arbitrary code (a str subclass's __eq__) */
        status = scalar(w, kind, entry, item, &items[got]);
        Py_DECREF(item);
        if (status == OK)
            got++;
    }
    if (status == OK && n != PyList_GET_SIZE(list))
        status = SLOW; /* mutated while walked: let the Python path see it */
    if (status != OK) {
        for (Py_ssize_t i = 0; i < got; i++)
            Py_DECREF(items[i]);
    } else {
        *out = distinct(items, got);
        if (*out == NULL)
            status = FAIL;
    }
    if (items != small)
        PyMem_Free(items);
    return status;
}

static int push_pending(Walk *w, PyObject *post, PyObject *items, int geo, int single)
{
    if (w->npending == w->cap) {
        Py_ssize_t cap = w->cap ? w->cap * 2 : 32;
        Pending *grown = PyMem_Resize(w->pending, Pending, cap);
        if (grown == NULL) {
            PyErr_NoMemory();
            return FAIL;
        }
        w->pending = grown;
        w->cap = cap;
    }
    w->pending[w->npending++] = (Pending){Py_NewRef(post), Py_NewRef(items), geo, single};
    return OK;
}

static void clear_pending(Walk *w)
{
    for (Py_ssize_t i = 0; i < w->npending; i++) {
        Py_DECREF(w->pending[i].post);
        Py_DECREF(w->pending[i].items);
    }
    w->npending = 0;
}

/* one mapped leaf's value: values[path] = items (when collecting values), or its postings queued */
static int leaf(Walk *w, long kind, PyObject *entry, PyObject *value)
{
    PyObject *post = PyTuple_GET_ITEM(entry, 4);
    PyObject *items = NULL, *one = NULL;
    int status = OK;
    if (PyUnicode_CheckExact(value) && kind == K_KEYWORD) {
        one = Py_NewRef(value);
    } else if (PyList_CheckExact(value)) {
        if (PyList_GET_SIZE(value) == 0)
            return OK; /* [] indexes nothing */
        status = list_items(w, kind, entry, value, &items);
    } else {
        status = scalar(w, kind, entry, value, &one);
    }
    if (status != OK)
        return status;
    if (w->values == NULL) { /* the batch walk: postings only, no 1-tuples */
        if (post != Py_None)
            status = one != NULL ? push_pending(w, post, one, kind == K_GEO, 1)
                                 : push_pending(w, post, items, kind == K_GEO, 0);
        Py_XDECREF(one);
        Py_XDECREF(items);
        return status;
    }
    if (one != NULL) {
        items = PyTuple_Pack(1, one);
        Py_DECREF(one);
        if (items == NULL)
            return FAIL;
    }
    status = PyDict_SetItem(w->values, PyTuple_GET_ITEM(entry, 1), items) < 0 ? FAIL : OK;
    Py_DECREF(items);
    return status;
}

/* the kind of a plan entry, checking its shape (a malformed plan is a TypeError, not a crash) */
static long plan_kind(PyObject *entry)
{
    if (PyTuple_CheckExact(entry) && PyTuple_GET_SIZE(entry) >= 2) {
        long kind = PyLong_AsLong(PyTuple_GET_ITEM(entry, 0));
        if (kind == -1 && PyErr_Occurred())
            return -1;
        if (kind == K_OBJECT ? PyDict_CheckExact(PyTuple_GET_ITEM(entry, 1))
                             : kind > K_OBJECT && kind <= K_OTHER && PyTuple_GET_SIZE(entry) == 5)
            return kind;
    }
    PyErr_SetString(PyExc_TypeError, "malformed walk plan entry");
    return -1;
}

/* FastIndexer._walk_post over one (sub)object, without posting (see apply_pending) */
static int walk_obj(Walk *w, PyObject *obj, PyObject *plan)
{
    Py_ssize_t it = 0;
    PyObject *key, *value;
    while (PyDict_Next(obj, &it, &key, &value)) {
        int status;
        Py_INCREF(key);
        Py_INCREF(value);
        PyObject *entry = PyDict_GetItemWithError(plan, key);
        if (entry == NULL) {
            if (PyErr_Occurred()) {
                status = FAIL;
            } else if (PyUnicode_CheckExact(key)) {
                Py_ssize_t at = PyUnicode_FindChar(key, '.', 0, PyUnicode_GET_LENGTH(key), 1);
                status = at == -2 ? FAIL : at >= 0 ? SLOW : OK; /* dotted: slow; else unmapped */
            } else { /* `"." in key`, whatever that does for this type (even raising) */
                int dotted = PySequence_Contains(key, str_dot);
                status = dotted < 0 ? FAIL : dotted ? SLOW : OK;
            }
        } else {
            Py_INCREF(entry);
            long kind = plan_kind(entry);
            if (kind < 0)
                status = FAIL;
            else if (kind == K_OBJECT)
                status = PyDict_CheckExact(value) ? walk_obj(w, value, PyTuple_GET_ITEM(entry, 1)) : SLOW;
            else
                status = leaf(w, kind, entry, value);
            Py_DECREF(entry);
        }
        Py_DECREF(key);
        Py_DECREF(value);
        if (status != OK)
            return status;
    }
    return OK;
}

/* ----- postings -------------------------------------------------------------------------------- */

static int post_value(PyObject *post, PyObject *item, PyObject *pos)
{
    PyObject *got = PyDict_GetItemWithError(post, item);
    if (got != NULL)
        return PyList_Append(got, pos);
    if (PyErr_Occurred())
        return FAIL;
    PyObject *fresh = PyList_New(1);
    if (fresh == NULL)
        return FAIL;
    PyList_SET_ITEM(fresh, 0, Py_NewRef(pos));
    int rc = PyDict_SetItem(post, item, fresh);
    Py_DECREF(fresh);
    return rc;
}

static int post_point(PyObject *post, PyObject *point, PyObject *pos)
{
    PyObject *entry = PyTuple_Pack(3, pos, PyTuple_GET_ITEM(point, 0), PyTuple_GET_ITEM(point, 1));
    if (entry == NULL)
        return FAIL;
    int rc = PyList_Append(post, entry);
    Py_DECREF(entry);
    return rc;
}

static int apply_pending(Walk *w, PyObject *pos)
{
    for (Py_ssize_t i = 0; i < w->npending; i++) {
        Pending *p = &w->pending[i];
        if (p->geo ? !PyList_CheckExact(p->post) : !PyDict_CheckExact(p->post)) {
            PyErr_SetString(PyExc_TypeError, "plan postings: a list for geo_point fields, else a dict");
            return FAIL;
        }
        Py_ssize_t n = p->single ? 1 : PyTuple_GET_SIZE(p->items);
        for (Py_ssize_t j = 0; j < n; j++) {
            PyObject *item = p->single ? p->items : PyTuple_GET_ITEM(p->items, j);
            if ((p->geo ? post_point(p->post, item, pos) : post_value(p->post, item, pos)) < 0)
                return FAIL;
        }
    }
    return OK;
}

/* ----- one document, the batch ---------------------------------------------------------------- */

/* ----- LazyDoc: the IndexedDoc of a document the batch walk indexed, built on first use ----------
 *
 * The batch walk only posts: the per-document values dict (and its tuples, its present frozenset)
 * are what the rules' C evaluation never reads, yet cost as much as the walk itself. A LazyDoc
 * keeps the document and the plan instead and fills values/present/phrases, exactly as the Python
 * walk would, when first read (a per-document evaluator, ``exists``, explain). The document must
 * not change while its LazyDoc lives (it lives for one percolate call).
 */

typedef struct {
    PyObject_HEAD
    PyObject *source;   /* the plain document */
    PyObject *plan;     /* the walk plan it was indexed with */
    PyObject *fallback; /* FastIndexer.index: for a document changed since (the slow path decides) */
    PyObject *date_fallback;
    PyObject *values, *present, *phrases; /* NULL until first read */
} LazyDoc;

static PyTypeObject LazyDocType;

static int lazy_fill(LazyDoc *self)
{
    if (self->values != NULL)
        return 0;
    Walk w = {PyDict_New(), self->date_fallback, NULL, 0, 0};
    if (w.values == NULL)
        return -1;
    PyObject *values = NULL, *present = NULL, *phrases = NULL;
    int status = walk_obj(&w, self->source, self->plan);
    clear_pending(&w);
    PyMem_Free(w.pending);
    if (status == OK) {
        values = w.values;
        present = PyFrozenSet_New(w.values);
        phrases = PyDict_New();
    } else {
        Py_DECREF(w.values);
        if (status == FAIL)
            return -1;
        PyObject *indexed = PyObject_CallOneArg(self->fallback, self->source);
        if (indexed == NULL)
            return -1;
        values = PyObject_GetAttrString(indexed, "values");
        present = PyObject_GetAttrString(indexed, "present");
        phrases = PyObject_GetAttrString(indexed, "phrases");
        Py_DECREF(indexed);
    }
    if (values == NULL || present == NULL || phrases == NULL || self->values != NULL) {
        /* an error, or Python code run by the walk (the date parser, a key's __eq__, the full
         * indexer) read this document and filled it first: keep that one, drop ours */
        Py_XDECREF(values);
        Py_XDECREF(present);
        Py_XDECREF(phrases);
        return self->values != NULL ? 0 : -1;
    }
    self->values = values;
    self->present = present;
    self->phrases = phrases;
    return 0;
}

static PyObject *lazy_values(LazyDoc *self, void *closure)
{
    return lazy_fill(self) < 0 ? NULL : Py_NewRef(self->values);
}

static PyObject *lazy_present(LazyDoc *self, void *closure)
{
    return lazy_fill(self) < 0 ? NULL : Py_NewRef(self->present);
}

static PyObject *lazy_phrases(LazyDoc *self, void *closure)
{
    return lazy_fill(self) < 0 ? NULL : Py_NewRef(self->phrases);
}

static PyObject *lazy_repr(LazyDoc *self)
{
    if (lazy_fill(self) < 0)
        return NULL;
    return PyUnicode_FromFormat("IndexedDoc(values=%R)", self->values);
}

static int lazy_traverse(LazyDoc *self, visitproc visit, void *arg)
{
    Py_VISIT(self->source);
    Py_VISIT(self->plan);
    Py_VISIT(self->fallback);
    Py_VISIT(self->date_fallback);
    Py_VISIT(self->values);
    Py_VISIT(self->present);
    Py_VISIT(self->phrases);
    return 0;
}

static int lazy_clear(LazyDoc *self)
{
    Py_CLEAR(self->source);
    Py_CLEAR(self->plan);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->date_fallback);
    Py_CLEAR(self->values);
    Py_CLEAR(self->present);
    Py_CLEAR(self->phrases);
    return 0;
}

static void lazy_dealloc(LazyDoc *self)
{
    PyObject_GC_UnTrack(self);
    lazy_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyGetSetDef lazy_getset[] = {
    {"values", (getter)lazy_values, NULL, "leaf field path -> tuple of indexed values", NULL},
    {"present", (getter)lazy_present, NULL, "the leaf fields with at least one indexed value", NULL},
    {"phrases", (getter)lazy_phrases, NULL, "text field path -> token tuples (none on this path)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject LazyDocType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "percolators._walk.LazyDoc",
    .tp_basicsize = sizeof(LazyDoc),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The IndexedDoc of a document indexed by the batch walk, built on first read.",
    .tp_dealloc = (destructor)lazy_dealloc,
    .tp_traverse = (traverseproc)lazy_traverse,
    .tp_clear = (inquiry)lazy_clear,
    .tp_repr = (reprfunc)lazy_repr,
    .tp_getset = lazy_getset,
};

static PyObject *lazy_new(PyObject *source, PyObject *plan, PyObject *fallback, PyObject *date_fallback)
{
    LazyDoc *doc = PyObject_GC_New(LazyDoc, &LazyDocType);
    if (doc == NULL)
        return NULL;
    doc->source = Py_NewRef(source);
    doc->plan = Py_NewRef(plan);
    doc->fallback = Py_NewRef(fallback);
    doc->date_fallback = Py_NewRef(date_fallback);
    doc->values = doc->present = doc->phrases = NULL;
    PyObject_GC_Track(doc);
    return (PyObject *)doc;
}

/* ----- one document, the batch ---------------------------------------------------------------- */

/* SLOW, FAIL, or OK with the document appended to docs/slots and posted at position len(docs) */
static int walk_doc(Walk *w, PyObject *doc, PyObject *plan, PyObject *docs, PyObject *slots, Py_ssize_t slot,
                    PyObject *fallback)
{
    clear_pending(w);
    int status = walk_obj(w, doc, plan);
    PyObject *pos = NULL, *slot_obj = NULL, *indexed = NULL;
    if (status == OK) {
        pos = PyLong_FromSsize_t(PyList_GET_SIZE(docs));
        slot_obj = PyLong_FromSsize_t(slot);
        status = pos == NULL || slot_obj == NULL ? FAIL : apply_pending(w, pos);
    }
    if (status == OK)
        status = (indexed = lazy_new(doc, plan, fallback, w->date_fallback)) == NULL ? FAIL : OK;
    if (status == OK)
        status = PyList_Append(docs, indexed) < 0 || PyList_Append(slots, slot_obj) < 0 ? FAIL : OK;
    Py_XDECREF(indexed);
    Py_XDECREF(pos);
    Py_XDECREF(slot_obj);
    clear_pending(w);
    return status;
}

static PyObject *walk(PyObject *self, PyObject *args)
{
    PyObject *documents, *plan, *docs, *slots, *fallback, *date_fallback;
    Py_ssize_t start;
    if (!PyArg_ParseTuple(args, "OnO!O!O!OO:walk", &documents, &start, &PyDict_Type, &plan, &PyList_Type, &docs,
                          &PyList_Type, &slots, &fallback, &date_fallback))
        return NULL;
    PyObject *seq = PySequence_Fast(documents, "documents must be a sequence");
    if (seq == NULL)
        return NULL;
    Walk w = {NULL, date_fallback, NULL, 0, 0};
    Py_ssize_t i = start < 0 ? 0 : start;
    int status = OK;
    for (; i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *doc = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyDict_CheckExact(doc))
            break;
        Py_INCREF(doc);
        status = walk_doc(&w, doc, plan, docs, slots, i, fallback);
        Py_DECREF(doc);
        if (status != OK)
            break;
    }
    PyMem_Free(w.pending);
    Py_DECREF(seq);
    return status == FAIL ? NULL : PyLong_FromSsize_t(i);
}

/* ----- bitmasks of batch positions ------------------------------------------------------------ */

typedef struct {
    unsigned char *bytes; /* scratch little-endian bit buffer, reused from mask to mask */
    Py_ssize_t cap;
} Bits;

static PyObject *int_from_bytes(const unsigned char *bytes, Py_ssize_t n)
{
#if PY_VERSION_HEX >= 0x030D0000
    return PyLong_FromUnsignedNativeBytes(bytes, n, Py_ASNATIVEBYTES_LITTLE_ENDIAN | Py_ASNATIVEBYTES_UNSIGNED_BUFFER);
#else
    return _PyLong_FromByteArray(bytes, (size_t)n, 1, 0);
#endif
}

/* a position: a non-negative int small enough for a batch (bigger ones: Python's business) */
static int position(PyObject *item, Py_ssize_t *out)
{
    if (!PyLong_Check(item)) {
        PyErr_SetString(PyExc_TypeError, "batch positions must be ints");
        return -1;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(item);
    if (pos == -1 && PyErr_Occurred())
        return -1;
    if (pos < 0 || pos > ((Py_ssize_t)1 << 34)) {
        PyErr_SetString(PyExc_ValueError, "batch position out of range");
        return -1;
    }
    *out = pos;
    return 0;
}

/* the int with bit p set for each p in the list (duplicates allowed) */
static PyObject *list_mask(PyObject *positions, Bits *bits)
{
    Py_ssize_t n = PyList_GET_SIZE(positions), top = 0, pos;
    if (n == 0)
        return PyLong_FromLong(0);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (position(PyList_GET_ITEM(positions, i), &pos) < 0)
            return NULL;
        if (pos > top)
            top = pos;
    }
    if (n == 1) { /* 1 << pos: a digit-level shift, much cheaper than converting bytes */
        if (top < 63)
            return PyLong_FromUnsignedLongLong(1ULL << top);
        PyObject *one = PyLong_FromLong(1), *mask = NULL;
        if (one != NULL)
            mask = PyNumber_Lshift(one, PyList_GET_ITEM(positions, 0));
        Py_XDECREF(one);
        return mask;
    }
    Py_ssize_t size = (top >> 3) + 1;
    if (size > bits->cap) {
        unsigned char *grown = PyMem_Realloc(bits->bytes, (size_t)size);
        if (grown == NULL)
            return PyErr_NoMemory();
        bits->bytes = grown;
        bits->cap = size;
    }
    memset(bits->bytes, 0, (size_t)size);
    for (Py_ssize_t i = 0; i < n; i++) {
        pos = PyLong_AsSsize_t(PyList_GET_ITEM(positions, i)); /* checked above */
        bits->bytes[pos >> 3] |= (unsigned char)(1u << (pos & 7));
    }
    return int_from_bytes(bits->bytes, size);
}

static PyObject *mask_of(PyObject *self, PyObject *positions)
{
    if (!PyList_Check(positions)) {
        PyErr_SetString(PyExc_TypeError, "mask_of takes a list of positions");
        return NULL;
    }
    Bits bits = {NULL, 0};
    PyObject *mask = list_mask(positions, &bits);
    PyMem_Free(bits.bytes);
    return mask;
}

/* one field's value -> mask dict, each mask also in terms[(name, value)] */
static PyObject *field_masks_of(PyObject *name, PyObject *by_value, PyObject *terms, Bits *bits)
{
    PyObject *out = PyDict_New(), *value, *positions;
    Py_ssize_t it = 0;
    if (out == NULL)
        return NULL;
    while (PyDict_Next(by_value, &it, &value, &positions)) {
        if (!PyList_Check(positions)) {
            PyErr_SetString(PyExc_TypeError, "postings: value -> list of positions");
            goto fail;
        }
        PyObject *mask = list_mask(positions, bits), *key = NULL;
        int rc = -1;
        if (mask != NULL && (key = PyTuple_Pack(2, name, value)) != NULL)
            rc = PyDict_SetItem(out, value, mask) < 0 || PyDict_SetItem(terms, key, mask) < 0 ? -1 : 0;
        Py_XDECREF(key);
        Py_XDECREF(mask);
        if (rc < 0)
            goto fail;
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

static PyObject *masks(PyObject *self, PyObject *postings)
{
    if (!PyDict_Check(postings)) {
        PyErr_SetString(PyExc_TypeError, "masks takes the postings dict");
        return NULL;
    }
    PyObject *terms = PyDict_New(), *fields = PyDict_New(), *name, *by_value;
    Bits bits = {NULL, 0};
    Py_ssize_t it = 0;
    int ok = terms != NULL && fields != NULL;
    while (ok && PyDict_Next(postings, &it, &name, &by_value)) {
        if (!PyDict_Check(by_value)) {
            PyErr_SetString(PyExc_TypeError, "postings: field -> dict of values");
            ok = 0;
            break;
        }
        Py_INCREF(name);
        Py_INCREF(by_value);
        PyObject *masks_of = field_masks_of(name, by_value, terms, &bits);
        ok = masks_of != NULL && (PyDict_GET_SIZE(masks_of) == 0 || PyDict_SetItem(fields, name, masks_of) == 0);
        Py_XDECREF(masks_of);
        Py_DECREF(name);
        Py_DECREF(by_value);
    }
    PyMem_Free(bits.bytes);
    if (!ok) {
        Py_XDECREF(terms);
        Py_XDECREF(fields);
        return NULL;
    }
    PyObject *out = PyTuple_Pack(2, terms, fields);
    Py_DECREF(terms);
    Py_DECREF(fields);
    return out;
}

static PyMethodDef methods[] = {
    {"masks", masks, METH_O, "masks(postings) -> (terms, field_masks), as BatchIndex.__init__ builds them"},
    {"mask_of", mask_of, METH_O, "mask_of(positions) -> int with those bits set"},
    {"walk", walk, METH_VARARGS,
     "walk(documents, start, plan, docs, slots, index, date_fallback) -> index of the first document "
     "left to the full indexer (len(documents): none)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "percolators._walk",
                                    "C twin of percolators.fast_index.FastIndexer.index_batch's fast path.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__walk(void)
{
    if (str_lat == NULL) {
        str_lat = PyUnicode_InternFromString("lat");
        str_lon = PyUnicode_InternFromString("lon");
        str_dot = PyUnicode_InternFromString(".");
        if (str_lat == NULL || str_lon == NULL || str_dot == NULL)
            return NULL;
    }
    if (PyType_Ready(&LazyDocType) < 0)
        return NULL;
    PyObject *mod = PyModule_Create(&module);
    if (mod != NULL && PyModule_AddObjectRef(mod, "LazyDoc", (PyObject *)&LazyDocType) < 0)
        Py_CLEAR(mod);
    return mod;
}
