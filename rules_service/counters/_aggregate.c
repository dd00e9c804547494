/*
 * C twin of the emit step of rules_service.counters.aggregate.aggregate_masks (the Python code is
 * the reference; tests compare both on the same inputs).
 *
 * Why: the stream turns ~60 (bid, rule) matches per bid into counter updates; in Python the
 * per-pair work (picking user ids, building sets, counting dimension values per rule) cost
 * ~30 us per bid. Here each rule's mask is walked word by word and the CounterBatch's sets and
 * dicts are filled directly.
 *
 * emit(users, matches, dims, rule_ids, mask_bytes, n_words, uids, hour_codes, hours, days,
 *      doc_codes, width, code_dims, code_values, count_matches) -> None
 *
 *   users, matches, dims: the CounterBatch's dicts, updated in place (as aggregate() does);
 *   rule_ids: list of str, one per mask; mask_bytes: the masks as n_words little-endian uint64
 *     each, concatenated in rule order;
 *   uids: list, the user id (str) of each document;
 *   hour_codes: bytes of int32 per document, the index into hours/days (-1: ignore the document);
 *   hours, days: lists of int, the distinct event hours and their UTC days;
 *   doc_codes: bytes of int32, a documents x width matrix of (dimension, value) codes, -1 = none
 *     (empty bytes and width 0: no dimensions);
 *   code_dims, code_values: lists of str, the dimension and the value of each code;
 *   count_matches: add matched counts and dimension counts (False: users only, a replay).
 *
 * pack_members(members, cache, miss) -> bytes
 *
 *   The concatenation of cache[m] (bytes) for each m in the iterable members; miss(m) computes and
 *   caches an absent one. The twin of b"".join(map(cache_dict.__getitem__, members)) in
 *   redis_store (a dict subclass with __missing__): one C loop instead of a call per member.
 *
 * No state is kept between calls; the scratch buffers are allocated per call.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    PyObject *users, *matches, *dims;
    PyObject *uids;        /* tuple copy: Python code (__hash__, __eq__) may change the caller's lists */
    const int32_t *hour_codes;
    Py_ssize_t n_docs;
    PyObject *hours, *days; /* tuple copies */
    Py_ssize_t n_hours;
    const int32_t *doc_codes;
    Py_ssize_t width;
    PyObject *code_dims, *code_values; /* tuple copies */
    Py_ssize_t n_codes;
    int count_matches;
    PyObject *s_hour, *s_day; /* "hour", "day" */
    /* scratch */
    Py_ssize_t *docs;      /* documents of the current rule, grouped by hour */
    Py_ssize_t *group_len; /* per hour: documents of the current rule */
    Py_ssize_t *group_at;  /* per hour: write position while grouping */
    Py_ssize_t *counts;    /* per code: count for the current (rule, hour) */
    Py_ssize_t *touched;   /* codes with a non-zero count */
    int32_t *dim_of;       /* per code: the number of its dimension (distinct objects of code_dims) */
    Py_ssize_t n_dims;
    PyObject **targets;    /* per dimension number: its dims dict of the current group, or NULL */
    int32_t *looked_up;    /* dimension numbers with a target in the current group */
} Ctx;

/* users[key] |= uids[docs]: a new set when the key is absent (one set per key, never shared). */
static int add_users(Ctx *c, PyObject *key, const Py_ssize_t *docs, Py_ssize_t n) {
    PyObject *set = PyDict_GetItemWithError(c->users, key); /* borrowed */
    if (set == NULL) {
        if (PyErr_Occurred()) return -1;
        set = PySet_New(NULL);
        if (set == NULL) return -1;
        if (PyDict_SetItem(c->users, key, set) < 0) {
            Py_DECREF(set);
            return -1;
        }
    } else if (!PySet_Check(set)) { /* PySet_Add would fail as a SystemError, or grow a frozenset */
        PyErr_Format(PyExc_TypeError, "emit: users[%R] is a %.100s, not a set", key, Py_TYPE(set)->tp_name);
        return -1;
    } else {
        Py_INCREF(set); /* our own reference: a user id's __hash__ may drop it from users */
    }
    int rc = 0;
    for (Py_ssize_t i = 0; i < n && rc == 0; i++) rc = PySet_Add(set, PyTuple_GET_ITEM(c->uids, docs[i]));
    Py_DECREF(set);
    return rc;
}

/* dict[key] += n. An exact int total is added in C (the usual case); anything else (a big int,
 * a caller's float) through PyNumber_Add, as Python's ``+`` would. */
static int add_count(PyObject *dict, PyObject *key, Py_ssize_t n) {
    PyObject *found = PyDict_GetItemWithError(dict, key); /* borrowed */
    PyObject *total;
    if (found == NULL) {
        if (PyErr_Occurred()) return -1;
        total = PyLong_FromSsize_t(n);
    } else {
        int overflow = 0;
        long long old = PyLong_CheckExact(found) ? PyLong_AsLongLongAndOverflow(found, &overflow) : -1;
        if (PyLong_CheckExact(found) && !overflow && old <= PY_SSIZE_T_MAX - n && old >= PY_SSIZE_T_MIN) {
            total = PyLong_FromSsize_t((Py_ssize_t)old + n); /* n >= 0: only the top can overflow */
        } else {
            PyObject *add = PyLong_FromSsize_t(n);
            if (add == NULL) return -1;
            Py_INCREF(found); /* a non-int total's __add__ may remove it from the dict */
            total = PyNumber_Add(found, add);
            Py_DECREF(found);
            Py_DECREF(add);
        }
    }
    if (total == NULL) return -1;
    int rc = PyDict_SetItem(dict, key, total);
    Py_DECREF(total);
    return rc;
}

static PyObject *bucket_key(PyObject *rid, PyObject *granularity, PyObject *bucket) {
    return PyTuple_Pack(3, rid, granularity, bucket);
}

/* dims[(rid, day, dimension)], created empty when absent: a new (strong) reference, or NULL. */
static PyObject *dimension_target(Ctx *c, PyObject *rid, PyObject *day, PyObject *dimension) {
    PyObject *dkey = PyTuple_Pack(3, rid, day, dimension);
    if (dkey == NULL) return NULL;
    PyObject *target = PyDict_GetItemWithError(c->dims, dkey); /* borrowed */
    if (target == NULL) {
        if (!PyErr_Occurred()) {
            target = PyDict_New();
            if (target != NULL && PyDict_SetItem(c->dims, dkey, target) < 0) Py_CLEAR(target);
        }
    } else if (!PyDict_Check(target)) {
        PyErr_Format(PyExc_TypeError, "emit: dimensions[%R] is a %.100s, not a dict", dkey, Py_TYPE(target)->tp_name);
        target = NULL;
    } else {
        Py_INCREF(target); /* our own reference: a value's __hash__ may drop it from dims */
    }
    Py_DECREF(dkey);
    return target;
}

/* The counts of one (rule, hour) group: matches and dimension values. A group touches a few
 * dimensions but many values (cities): each dimension's target dict is looked up once per group
 * (dim_of[code] numbers the distinct dimensions), not once per value. */
static int add_counts(Ctx *c, PyObject *rid, PyObject *hour_key, PyObject *day_key, PyObject *day,
                      const Py_ssize_t *docs, Py_ssize_t n) {
    if (add_count(c->matches, hour_key, n) < 0 || add_count(c->matches, day_key, n) < 0) return -1;
    if (c->width == 0) return 0;
    Py_ssize_t n_touched = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const int32_t *row = c->doc_codes + docs[i] * c->width;
        for (Py_ssize_t j = 0; j < c->width && row[j] >= 0; j++) {
            if (c->counts[row[j]]++ == 0) c->touched[n_touched++] = row[j];
        }
    }
    int rc = 0;
    Py_ssize_t n_looked_up = 0;
    for (Py_ssize_t t = 0; t < n_touched; t++) {
        Py_ssize_t code = c->touched[t];
        Py_ssize_t count = c->counts[code];
        c->counts[code] = 0; /* ready for the next group, also on errors */
        if (rc < 0) continue;
        PyObject **target = &c->targets[c->dim_of[code]];
        if (*target == NULL) {
            *target = dimension_target(c, rid, day, PyTuple_GET_ITEM(c->code_dims, code));
            if (*target == NULL) { rc = -1; continue; }
            c->looked_up[n_looked_up++] = c->dim_of[code];
        }
        if (add_count(*target, PyTuple_GET_ITEM(c->code_values, code), count) < 0) rc = -1;
    }
    for (Py_ssize_t d = 0; d < n_looked_up; d++) Py_CLEAR(c->targets[c->looked_up[d]]);
    return rc;
}

/* One (rule, hour) group: users to the hour and day sketches, then the counts. */
static int emit_group(Ctx *c, PyObject *rid, Py_ssize_t h, const Py_ssize_t *docs, Py_ssize_t n) {
    PyObject *hour = PyTuple_GET_ITEM(c->hours, h), *day = PyTuple_GET_ITEM(c->days, h);
    PyObject *hour_key = bucket_key(rid, c->s_hour, hour);
    PyObject *day_key = bucket_key(rid, c->s_day, day);
    int rc = -1;
    if (hour_key == NULL || day_key == NULL) goto done;
    if (add_users(c, hour_key, docs, n) < 0 || add_users(c, day_key, docs, n) < 0) goto done;
    if (c->count_matches && add_counts(c, rid, hour_key, day_key, day, docs, n) < 0) goto done;
    rc = 0;
done:
    Py_XDECREF(hour_key);
    Py_XDECREF(day_key);
    return rc;
}

/* Every document of one rule's mask, grouped by hour (stable: document order within an hour). */
static int emit_rule(Ctx *c, PyObject *rid, const char *words, Py_ssize_t n_words) {
    Py_ssize_t n = 0;
    for (Py_ssize_t h = 0; h < c->n_hours; h++) c->group_len[h] = 0;
    for (Py_ssize_t w = 0; w < n_words; w++) {
        uint64_t word;
        memcpy(&word, words + w * 8, 8); /* a buffer may be any alignment (a memoryview slice) */
        while (word) {
            Py_ssize_t i = w * 64 + __builtin_ctzll(word);
            word &= word - 1;
            if (i >= c->n_docs) {
                PyErr_Format(PyExc_ValueError, "a mask has bits beyond the %zd documents", c->n_docs);
                return -1;
            }
            int32_t code = c->hour_codes[i];
            if (code < 0) continue; /* not a document to count (the caller checked) */
            c->group_len[code]++;
            c->docs[c->n_docs + n++] = i; /* second half: in document order */
        }
    }
    if (n == 0) return 0;
    if (c->n_hours == 1) return emit_group(c, rid, 0, c->docs + c->n_docs, n);
    Py_ssize_t at = 0;
    for (Py_ssize_t h = 0; h < c->n_hours; h++) {
        c->group_at[h] = at;
        at += c->group_len[h];
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        Py_ssize_t i = c->docs[c->n_docs + k];
        c->docs[c->group_at[c->hour_codes[i]]++] = i;
    }
    at = 0;
    for (Py_ssize_t h = 0; h < c->n_hours; h++) {
        if (c->group_len[h] && emit_group(c, rid, h, c->docs + at, c->group_len[h]) < 0) return -1;
        at += c->group_len[h];
    }
    return 0;
}

/* dim_of[code]: the same number for codes whose dimension is the same object (the usual case: the
 * caller's dimension strings). Looked for among the last few numbers only, so a caller passing a new
 * string per code costs a lookup per code (still correct: equal keys find the same dict), not a
 * quadratic search. */
#define DIMS_SEARCHED 32
static void number_dimensions(Ctx *c) {
    c->n_dims = 0;
    for (Py_ssize_t code = 0; code < c->n_codes; code++) {
        PyObject *dimension = PyTuple_GET_ITEM(c->code_dims, code);
        Py_ssize_t d = c->n_dims - 1;
        while (d >= 0 && d >= c->n_dims - DIMS_SEARCHED && c->targets[d] != dimension) d--;
        if (d < 0 || d < c->n_dims - DIMS_SEARCHED) {
            d = c->n_dims++;
            c->targets[d] = dimension; /* borrowed, only while numbering; cleared below */
        }
        c->dim_of[code] = (int32_t)d;
    }
    for (Py_ssize_t d = 0; d < c->n_dims; d++) c->targets[d] = NULL;
}

/* A tuple copy of a list argument: the lists are read while Python code (a key's __hash__ or
 * __eq__) runs, which could shrink them under a borrowed pointer. */
static PyObject *frozen(PyObject *list) { return PyList_AsTuple(list); }

/* A private, aligned copy of an int32 buffer of n items (the caller's bytes-like object could
 * change while Python code runs, after its codes were checked), or NULL. */
static int32_t *copy_codes(const Py_buffer *view, Py_ssize_t n) {
    int32_t *out = PyMem_New(int32_t, n + 1);
    if (out == NULL) return NULL;
    memcpy(out, view->buf, (size_t)n * 4);
    return out;
}

static PyObject *emit(PyObject *self, PyObject *args) {
    Ctx c;
    memset(&c, 0, sizeof c);
    PyObject *rule_list, *uid_list, *hour_list, *day_list, *dim_list, *value_list, *rule_ids = NULL;
    Py_buffer masks, hour_codes, doc_codes;
    Py_ssize_t n_words;
    int32_t *hour_copy = NULL, *code_copy = NULL;
    if (!PyArg_ParseTuple(args, "O!O!O!O!y*nO!y*O!O!y*nO!O!p:emit", &PyDict_Type, &c.users, &PyDict_Type,
                          &c.matches, &PyDict_Type, &c.dims, &PyList_Type, &rule_list, &masks, &n_words,
                          &PyList_Type, &uid_list, &hour_codes, &PyList_Type, &hour_list, &PyList_Type, &day_list,
                          &doc_codes, &c.width, &PyList_Type, &dim_list, &PyList_Type, &value_list,
                          &c.count_matches))
        return NULL;
    PyObject *result = NULL;
    rule_ids = frozen(rule_list);
    c.uids = rule_ids ? frozen(uid_list) : NULL;
    c.hours = c.uids ? frozen(hour_list) : NULL;
    c.days = c.hours ? frozen(day_list) : NULL;
    c.code_dims = c.days ? frozen(dim_list) : NULL;
    c.code_values = c.code_dims ? frozen(value_list) : NULL;
    if (c.code_values == NULL) goto done;
    Py_ssize_t n_rules = PyTuple_GET_SIZE(rule_ids);
    c.n_docs = PyTuple_GET_SIZE(c.uids);
    c.n_hours = PyTuple_GET_SIZE(c.hours);
    c.n_codes = PyTuple_GET_SIZE(c.code_dims);
    /* sizes are products of caller-given numbers: compare by division, never multiply first */
    if (n_words < 0 || c.width < 0 || n_words > PY_SSIZE_T_MAX / 64 ||
        (n_rules && masks.len / 8 / n_rules != n_words) || masks.len != (Py_ssize_t)((size_t)n_rules * n_words * 8) ||
        hour_codes.len != c.n_docs * 4 || PyTuple_GET_SIZE(c.days) != c.n_hours ||
        PyTuple_GET_SIZE(c.code_values) != c.n_codes || (c.width && doc_codes.len / 4 / c.width != c.n_docs) ||
        doc_codes.len != (Py_ssize_t)((size_t)c.n_docs * c.width * 4) || n_words * 64 < c.n_docs) {
        PyErr_SetString(PyExc_ValueError, "emit: inconsistent sizes");
        goto done;
    }
    hour_copy = copy_codes(&hour_codes, c.n_docs);
    code_copy = copy_codes(&doc_codes, c.n_docs * c.width);
    if (hour_copy == NULL || code_copy == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    c.hour_codes = hour_copy;
    c.doc_codes = code_copy;
    for (Py_ssize_t i = 0; i < c.n_docs; i++) { /* codes index the tuples: check once, trust after */
        if (c.hour_codes[i] >= c.n_hours) {
            PyErr_SetString(PyExc_ValueError, "emit: hour code out of range");
            goto done;
        }
    }
    for (Py_ssize_t i = 0; i < c.n_docs * c.width; i++) {
        if (c.doc_codes[i] >= c.n_codes) {
            PyErr_SetString(PyExc_ValueError, "emit: dimension code out of range");
            goto done;
        }
    }
    c.docs = PyMem_New(Py_ssize_t, 2 * c.n_docs + 1);
    c.group_len = PyMem_New(Py_ssize_t, c.n_hours + 1);
    c.group_at = PyMem_New(Py_ssize_t, c.n_hours + 1);
    c.counts = PyMem_Calloc(c.n_codes + 1, sizeof(Py_ssize_t));
    c.touched = PyMem_New(Py_ssize_t, c.n_codes + 1);
    c.dim_of = PyMem_New(int32_t, c.n_codes + 1);
    c.looked_up = PyMem_New(int32_t, c.n_codes + 1);
    c.targets = PyMem_Calloc(c.n_codes + 1, sizeof(PyObject *));
    c.s_hour = PyUnicode_InternFromString("hour");
    c.s_day = PyUnicode_InternFromString("day");
    if (!c.docs || !c.group_len || !c.group_at || !c.counts || !c.touched || !c.dim_of || !c.looked_up ||
        !c.targets || !c.s_hour || !c.s_day) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        goto done;
    }
    number_dimensions(&c);
    const char *words = masks.buf; /* little-endian words (checked at import), read with memcpy */
    for (Py_ssize_t k = 0; k < n_rules; k++) {
        if (emit_rule(&c, PyTuple_GET_ITEM(rule_ids, k), words + k * n_words * 8, n_words) < 0) goto done;
    }
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(hour_copy);
    PyMem_Free(code_copy);
    PyMem_Free(c.docs);
    PyMem_Free(c.group_len);
    PyMem_Free(c.group_at);
    PyMem_Free(c.counts);
    PyMem_Free(c.touched);
    PyMem_Free(c.dim_of);
    PyMem_Free(c.looked_up);
    PyMem_Free(c.targets); /* all NULL again: each group clears what it looked up */
    Py_XDECREF(c.s_hour);
    Py_XDECREF(c.s_day);
    Py_XDECREF(rule_ids);
    Py_XDECREF(c.uids);
    Py_XDECREF(c.hours);
    Py_XDECREF(c.days);
    Py_XDECREF(c.code_dims);
    Py_XDECREF(c.code_values);
    PyBuffer_Release(&masks);
    PyBuffer_Release(&hour_codes);
    PyBuffer_Release(&doc_codes);
    return result;
}

static PyObject *pack_members(PyObject *self, PyObject *args) {
    PyObject *members, *cache, *miss;
    if (!PyArg_ParseTuple(args, "OO!O:pack_members", &members, &PyDict_Type, &cache, &miss)) return NULL;
    /* a tuple copy: miss() runs Python code, which must not be able to resize what we walk */
    PyObject *seq = PySequence_Tuple(members);
    if (seq == NULL) return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    PyObject **items = &PyTuple_GET_ITEM(seq, 0);
    PyObject **parts = PyMem_New(PyObject *, n + 1); /* strong references */
    Py_ssize_t got = 0, total = 0;
    PyObject *result = NULL;
    if (parts == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; got < n; got++) {
        PyObject *part = PyDict_GetItemWithError(cache, items[got]); /* borrowed */
        if (part != NULL) {
            Py_INCREF(part);
        } else {
            if (PyErr_Occurred()) goto done;
            part = PyObject_CallOneArg(miss, items[got]); /* new reference */
            if (part == NULL) goto done;
        }
        if (!PyBytes_Check(part)) {
            PyErr_SetString(PyExc_TypeError, "pack_members: a cached member is not bytes");
            Py_DECREF(part);
            goto done;
        }
        parts[got] = part;
        if (PyBytes_GET_SIZE(part) > PY_SSIZE_T_MAX - total) { /* as bytes.join: no wrap-around */
            got++;
            PyErr_SetString(PyExc_OverflowError, "pack_members: join() result is too long");
            goto done;
        }
        total += PyBytes_GET_SIZE(part);
    }
    result = PyBytes_FromStringAndSize(NULL, total);
    if (result == NULL) goto done;
    char *out = PyBytes_AS_STRING(result);
    for (Py_ssize_t i = 0; i < n; i++) {
        memcpy(out, PyBytes_AS_STRING(parts[i]), PyBytes_GET_SIZE(parts[i]));
        out += PyBytes_GET_SIZE(parts[i]);
    }
done:
    for (Py_ssize_t i = 0; i < got; i++) Py_DECREF(parts[i]);
    PyMem_Free(parts);
    Py_DECREF(seq);
    return result;
}

static PyMethodDef methods[] = {
    {"pack_members", pack_members, METH_VARARGS, "Concatenate the cached bytes of each member (see the module)."},
    {"emit", emit, METH_VARARGS, "Fill a CounterBatch's dicts from per-rule document masks (see the module)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_aggregate",
    .m_doc = "C twin of aggregate_masks' emit step.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__aggregate(void) {
    const uint16_t one = 1;
    if (*(const uint8_t *)&one != 1) { /* the masks are little-endian words */
        PyErr_SetString(PyExc_ImportError, "_aggregate needs a little-endian host");
        return NULL;
    }
    return PyModule_Create(&module);
}
