/*
 * C twin of the per-entry loops of RedisCounters.encode_batch (rules_service/counters/redis_store.py;
 * the Python code is the reference, tests compare both byte for byte).
 *
 * Why: a stream window of ~4,000 bids has ~3,400 sketches of ~140 members and ~50,000 hash fields;
 * the Python loops (a dict lookup and a bytes object per member and per field, then joins) cost
 * ~13 us of consumer CPU per bid. Here each member's bulk is found by object identity in a
 * per-call table and copied straight into its PFADD, and each HINCRBY is written into one body.
 *
 * encode(users, matches, dimensions, cutoff, known, sketch_heads, sketch_miss, match_heads,
 *        match_miss, dimension_heads, dimension_miss, members, field_caches, field_cache)
 *   -> (pfadds, sketch_expires, sketch_deadlines, body, n_body, hash_deadlines) or None
 *
 *   users, matches, dimensions: the CounterBatch's dicts (dimension days already whole days);
 *   cutoff: int, a bucket whose deadline is <= cutoff is past its retention and skipped (the
 *     caller passes floor(now): for an integer deadline, deadline <= now <=> deadline <= floor(now));
 *   known: dict, key bulk -> deadline of the keys whose EXPIREAT is known to be set (read only);
 *   sketch_heads, match_heads, dimension_heads: the client's head caches (dicts), read directly;
 *     on a miss, sketch_miss(bucket_key), match_miss(bucket_key), dimension_miss((rid, day))
 *     compute, cache and return the head (the same tuples the Python path uses);
 *   members: the client's _SketchMembers (a dict subclass whose __missing__ computes a bulk),
 *     subscripted on a miss of the per-call identity table;
 *   field_caches: dict dimension -> _FieldBulks (value -> field bulk, __missing__ computes it);
 *     field_cache(dimension) creates and returns an absent one.
 *
 * None means "not handled here, use the Python path": an input outside the common shape (a count
 * or bucket that is not a plain int, a negative count, a dimension day not at midnight, a count
 * beyond 64 bits...). Nothing is written before that answer except the caches, whose contents do
 * not depend on who fills them, so the Python path then produces exactly what it always would.
 *
 * Output order and merging follow the Python code exactly: PFADDs and sketch EXPIREATs in the
 * order of users; hashes in the order first seen (matches, then dimensions); within a hash the
 * fields in the order first seen, a repeated match field adding up, a repeated dimension field
 * replacing the earlier count (dict.update), zero dimension counts dropped, hashes without fields
 * skipped; the EXPIREAT of a hash not in known after its HINCRBYs.
 *
 * No state is kept between calls; the tables are allocated per call and hold strong references
 * to everything they point to (callbacks run Python code that may clear the caches).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define BAIL 1 /* return code: not handled here (see above); -1: an exception is set; 0: ok */

static const char HINCRBY[] = "*4\r\n$7\r\nHINCRBY\r\n";
static const char EXPIREAT[] = "*3\r\n$8\r\nEXPIREAT\r\n";
#define HINCRBY_LEN ((Py_ssize_t)sizeof HINCRBY - 1)
#define EXPIREAT_LEN ((Py_ssize_t)sizeof EXPIREAT - 1)

/* ---- a growable byte buffer ---------------------------------------------------------------- */

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} Buf;

static int buf_put(Buf *b, const char *src, Py_ssize_t n) {
    if (n > b->cap - b->len) {
        Py_ssize_t cap = b->cap ? b->cap : 4096;
        while (n > cap - b->len) {
            if (cap > PY_SSIZE_T_MAX / 2) {
                PyErr_NoMemory();
                return -1;
            }
            cap *= 2;
        }
        char *grown = PyMem_Realloc(b->data, (size_t)cap);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        b->data = grown;
        b->cap = cap;
    }
    memcpy(b->data + b->len, src, (size_t)n);
    b->len += n;
    return 0;
}

static int buf_bytes(Buf *b, PyObject *bytes) {
    return buf_put(b, PyBytes_AS_STRING(bytes), PyBytes_GET_SIZE(bytes));
}

/* ---- member -> bulk, by object identity ------------------------------------------------------
 * A window's few thousand users are looked up ~100 times each; comparing pointers in a small
 * table that stays in the CPU caches is several times cheaper than a dict lookup. An equal id
 * held by another object just gets its own slot (with the same bulk, from the shared cache). */

typedef struct {
    PyObject *key, *bulk; /* strong references */
} Slot;

typedef struct {
    Slot *slots;
    size_t mask, used;
} Table;

static inline size_t slot_of(const Table *t, PyObject *key) {
    uint64_t h = (uint64_t)(uintptr_t)key * 0x9E3779B97F4A7C15ull; /* objects are 16-byte aligned */
    size_t i = (size_t)(h >> 32) & t->mask;
    while (t->slots[i].key != NULL && t->slots[i].key != key) i = (i + 1) & t->mask;
    return i;
}

static int table_init(Table *t, size_t size) {
    t->slots = PyMem_Calloc(size, sizeof(Slot));
    if (t->slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    t->mask = size - 1;
    t->used = 0;
    return 0;
}

static int table_grow(Table *t) {
    Table bigger;
    if (t->mask > ((size_t)PY_SSIZE_T_MAX / sizeof(Slot)) / 4 || table_init(&bigger, (t->mask + 1) * 2) < 0) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; i <= t->mask; i++) {
        if (t->slots[i].key != NULL) bigger.slots[slot_of(&bigger, t->slots[i].key)] = t->slots[i];
    }
    bigger.used = t->used;
    PyMem_Free(t->slots);
    *t = bigger;
    return 0;
}

static void table_free(Table *t) {
    if (t->slots == NULL) return;
    for (size_t i = 0; i <= t->mask; i++) {
        Py_XDECREF(t->slots[i].key);
        Py_XDECREF(t->slots[i].bulk);
    }
    PyMem_Free(t->slots);
    t->slots = NULL;
}

/* ---- hashes and their fields ------------------------------------------------------------------ */

typedef struct {
    PyObject *field;  /* strong */
    long long count;
    Py_hash_t hash;   /* of the field's bytes */
    Py_ssize_t hash_no; /* the hash (record) it belongs to */
    Py_ssize_t next;  /* next field of the same hash, -1 at the end */
} Field;

typedef struct {
    PyObject *key, *expire, *deadline; /* strong */
    Py_ssize_t first, last, n;
} Hash;

/* (hash, field bytes) -> field index + 1 (0: empty): fields are unique within a hash. A slot
 * keeps a tag of its key's mixed hash, so a probe reads the field array only on a likely match. */
typedef struct {
    uint32_t at, tag;
} IndexSlot;

typedef struct {
    IndexSlot *slots;
    size_t mask;
} FieldIndex;

typedef struct {
    long long cutoff;
    PyObject *known, *sketch_heads, *sketch_miss, *match_heads, *match_miss, *dim_heads, *dim_miss;
    PyObject *members, *field_caches, *field_cache;
    /* outputs */
    PyObject *pfadds, *sketch_deadlines, *hash_deadlines;
    Buf expires;
    /* member table and the scratch list of one PFADD's bulks (borrowed from the table) */
    Table table;
    PyObject **scratch;
    Py_ssize_t scratch_cap;
    /* hashes */
    PyObject *hash_no; /* key bulk -> int index into hashes */
    Hash *hashes;
    Py_ssize_t n_hashes, hashes_cap;
    Field *fields;
    Py_ssize_t n_fields, fields_cap;
    FieldIndex index;
} Enc;

static int grow(void **array, Py_ssize_t *cap, size_t item) {
    Py_ssize_t bigger = *cap ? *cap * 2 : 1024;
    if (bigger > PY_SSIZE_T_MAX / (Py_ssize_t)item) {
        PyErr_NoMemory();
        return -1;
    }
    void *grown = PyMem_Realloc(*array, (size_t)bigger * item);
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    *array = grown;
    *cap = bigger;
    return 0;
}

static uint64_t index_mix(Py_ssize_t hash_no, Py_hash_t hash) {
    return ((uint64_t)hash ^ ((uint64_t)hash_no * 0x9E3779B97F4A7C15ull)) * 0xBF58476D1CE4E5B9ull;
}

static size_t index_slot(const Enc *e, Py_ssize_t hash_no, PyObject *field, Py_hash_t hash) {
    const FieldIndex *x = &e->index;
    uint64_t mixed = index_mix(hash_no, hash);
    uint32_t tag = (uint32_t)mixed;
    size_t i = (size_t)(mixed >> 32) & x->mask;
    Py_ssize_t size = PyBytes_GET_SIZE(field);
    for (;; i = (i + 1) & x->mask) {
        const IndexSlot *slot = &x->slots[i];
        if (slot->at == 0) return i;
        if (slot->tag != tag) continue;
        const Field *f = &e->fields[slot->at - 1];
        if (f->hash_no == hash_no && f->hash == hash &&
            (f->field == field || (PyBytes_GET_SIZE(f->field) == size &&
                                   memcmp(PyBytes_AS_STRING(f->field), PyBytes_AS_STRING(field), (size_t)size) == 0)))
            return i;
    }
}

static int index_grow(Enc *e) {
    FieldIndex *x = &e->index;
    size_t size = x->mask ? (x->mask + 1) * 2 : 4096;
    if (size > (size_t)UINT32_MAX || size > (size_t)PY_SSIZE_T_MAX / sizeof(IndexSlot)) {
        PyErr_NoMemory();
        return -1;
    }
    IndexSlot *slots = PyMem_Calloc(size, sizeof(IndexSlot));
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    PyMem_Free(x->slots);
    x->slots = slots;
    x->mask = size - 1;
    for (Py_ssize_t k = 0; k < e->n_fields; k++) {
        const Field *f = &e->fields[k];
        size_t i = index_slot(e, f->hash_no, f->field, f->hash);
        x->slots[i].at = (uint32_t)(k + 1);
        x->slots[i].tag = (uint32_t)index_mix(f->hash_no, f->hash);
    }
    return 0;
}

/* The index of the hash of key bulk `key`, created (with its deadline) when first seen. */
static Py_ssize_t hash_of(Enc *e, PyObject *key, PyObject *expire, PyObject *deadline) {
    PyObject *found = PyDict_GetItemWithError(e->hash_no, key); /* borrowed */
    if (found != NULL) return PyLong_AsSsize_t(found);
    if (PyErr_Occurred()) return -1;
    if (e->n_hashes == e->hashes_cap && grow((void **)&e->hashes, &e->hashes_cap, sizeof(Hash)) < 0) return -1;
    PyObject *no = PyLong_FromSsize_t(e->n_hashes);
    if (no == NULL) return -1;
    int rc = PyDict_SetItem(e->hash_no, key, no);
    Py_DECREF(no);
    if (rc < 0) return -1;
    Hash *h = &e->hashes[e->n_hashes];
    h->key = Py_NewRef(key);
    h->expire = Py_NewRef(expire);
    h->deadline = Py_NewRef(deadline);
    h->first = h->last = -1;
    h->n = 0;
    return e->n_hashes++;
}

/* Add `count` to a hash's field (add: the match counts' fields.get(f, 0) + count) or set it
 * (the dimensions' dict.update). BAIL when a sum leaves 64 bits. */
static int add_field(Enc *e, Py_ssize_t hash_no, PyObject *field, long long count, int replace) {
    if (!PyBytes_Check(field)) {
        PyErr_SetString(PyExc_TypeError, "encode: a field bulk is not bytes");
        return -1;
    }
    Py_hash_t hash = PyObject_Hash(field); /* cached in the bytes object after the first time */
    if (hash == -1) return -1;
    if ((size_t)(e->n_fields + 1) * 2 > e->index.mask && index_grow(e) < 0) return -1;
    size_t slot = index_slot(e, hash_no, field, hash);
    if (e->index.slots[slot].at != 0) {
        Field *f = &e->fields[e->index.slots[slot].at - 1];
        if (replace) {
            f->count = count;
        } else if (__builtin_add_overflow(f->count, count, &f->count)) {
            return BAIL;
        }
        return 0;
    }
    if (e->n_fields == e->fields_cap && grow((void **)&e->fields, &e->fields_cap, sizeof(Field)) < 0) return -1;
    Field *f = &e->fields[e->n_fields];
    f->field = Py_NewRef(field);
    f->count = count;
    f->hash = hash;
    f->hash_no = hash_no;
    f->next = -1;
    Hash *h = &e->hashes[hash_no];
    if (h->last >= 0) e->fields[h->last].next = e->n_fields;
    else h->first = e->n_fields;
    h->last = e->n_fields;
    h->n++;
    e->index.slots[slot].at = (uint32_t)++e->n_fields;
    e->index.slots[slot].tag = (uint32_t)index_mix(hash_no, hash);
    return 0;
}

/* ---- small helpers ---------------------------------------------------------------------------- */

/* A count as a non-negative long long: 0 ok, BAIL for anything else (not a plain int, negative,
 * beyond 64 bits: the Python path decides what those mean). */
static int plain_count(PyObject *obj, long long *out) {
    if (!PyLong_CheckExact(obj)) return BAIL;
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (overflow || v < 0) return BAIL;
    *out = v;
    return 0;
}

/* The cached head of `key` in `heads`, else miss(key): a new reference, checked to be a tuple of
 * `size` items whose first items are bytes and whose last is a plain int deadline (BAIL if not). */
static int head_of(PyObject *heads, PyObject *miss, PyObject *key, Py_ssize_t size, PyObject **out,
                   long long *deadline) {
    PyObject *head = PyDict_GetItemWithError(heads, key); /* borrowed */
    if (head != NULL) {
        Py_INCREF(head);
    } else {
        if (PyErr_Occurred()) return -1;
        head = PyObject_CallOneArg(miss, key);
        if (head == NULL) return -1;
    }
    if (!PyTuple_CheckExact(head) || PyTuple_GET_SIZE(head) != size) goto bail;
    for (Py_ssize_t i = 0; i < size - 1; i++) {
        if (!PyBytes_Check(PyTuple_GET_ITEM(head, i))) goto bail;
    }
    PyObject *last = PyTuple_GET_ITEM(head, size - 1);
    if (!PyLong_CheckExact(last)) goto bail;
    int overflow;
    *deadline = PyLong_AsLongLongAndOverflow(last, &overflow);
    if (*deadline == -1 && PyErr_Occurred()) {
        Py_DECREF(head);
        return -1;
    }
    if (overflow) goto bail;
    *out = head;
    return 0;
bail:
    Py_DECREF(head);
    return BAIL;
}

/* A non-negative count as the RESP bulk "$<len>\r\n<digits>\r\n" into out (at most 26 bytes). */
static inline Py_ssize_t count_bulk(long long count, char *out) {
    char digits[24];
    int n = 0;
    unsigned long long v = (unsigned long long)count;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    Py_ssize_t at = 0;
    out[at++] = '$';
    if (n >= 10) out[at++] = (char)('0' + n / 10);
    out[at++] = (char)('0' + n % 10);
    out[at++] = '\r';
    out[at++] = '\n';
    while (n) out[at++] = digits[--n];
    out[at++] = '\r';
    out[at++] = '\n';
    return at;
}

/* ---- sketches ----------------------------------------------------------------------------------- */

/* The bulk of one member (borrowed: the table holds it), or NULL with an exception. */
static PyObject *member_bulk(Enc *e, PyObject *member) {
    size_t i = slot_of(&e->table, member);
    if (e->table.slots[i].key != NULL) return e->table.slots[i].bulk;
    PyObject *bulk = PyObject_GetItem(e->members, member); /* the shared cache; __missing__ fills it */
    if (bulk == NULL) return NULL;
    if (!PyBytes_Check(bulk)) {
        PyErr_SetString(PyExc_TypeError, "encode: a cached sketch member is not bytes");
        Py_DECREF(bulk);
        return NULL;
    }
    /* the table is only touched by this C code, so slot i is still the free slot for member */
    e->table.slots[i].key = Py_NewRef(member);
    e->table.slots[i].bulk = bulk;
    e->table.used++;
    if (e->table.used * 2 > e->table.mask && table_grow(&e->table) < 0) return NULL;
    return bulk; /* still alive: the table holds it */
}

/* Room for `more` bulks in the scratch list after the first `got`. */
static int reserve_scratch(Enc *e, Py_ssize_t got, Py_ssize_t more) {
    while (more > e->scratch_cap - got) {
        if (grow((void **)&e->scratch, &e->scratch_cap, sizeof(PyObject *)) < 0) return -1;
    }
    return 0;
}

/* Remember one member's bulk for the PFADD being built; -1 on error. */
static int keep_bulk(Enc *e, PyObject *bulk, Py_ssize_t *got, Py_ssize_t *total) {
    if (reserve_scratch(e, *got, 1) < 0) return -1;
    e->scratch[(*got)++] = bulk;
    if (__builtin_add_overflow(*total, PyBytes_GET_SIZE(bulk), total)) {
        PyErr_SetString(PyExc_OverflowError, "encode: a PFADD is too long");
        return -1;
    }
    return 0;
}

/* The bulks of an exact set's members, in iteration order, walking its hash table in place (the
 * iterator's reference count traffic per member was ~1/5 of the encoding). The layout is the
 * documented one of cpython/setobject.h: a slot is active when its key is set and its hash is
 * not -1 (-1 marks a deleted slot). Python code runs only on a member-table miss (the shared
 * cache, whose __missing__ or a key's __hash__ might change the set): after it, a set whose table
 * moved or whose size changed raises, as its iterator would. Python code that removes a member
 * already passed and adds one further on keeps both: the walk then meets more active slots than
 * reserved, and raises rather than write past the scratch list. */
static int set_bulks(Enc *e, PyObject *members, Py_ssize_t *got, Py_ssize_t *total) {
    PySetObject *set = (PySetObject *)members;
    setentry *table = set->table;
    Py_ssize_t mask = set->mask, used = set->used;
    if (reserve_scratch(e, *got, used) < 0) return -1; /* one per active slot: no check per member */
    PyObject **out = e->scratch + *got, **end = out + used;
    Py_ssize_t sum = *total;
    for (Py_ssize_t i = 0; i <= mask; i++) {
        PyObject *member = table[i].key;
        if (member == NULL || table[i].hash == -1) continue;
        const Slot *hit = &e->table.slots[slot_of(&e->table, member)];
        PyObject *bulk = hit->bulk;
        if (hit->key == NULL) {
            Py_INCREF(member);
            bulk = member_bulk(e, member); /* may run Python code and grow the member table */
            Py_DECREF(member);
            if (bulk == NULL) return -1;
            if (set->table != table || set->mask != mask || set->used != used) {
                PyErr_SetString(PyExc_RuntimeError, "Set changed size during iteration");
                return -1;
            }
        }
        if (out == end) { /* only after Python code changed the set (see above) */
            PyErr_SetString(PyExc_RuntimeError, "Set changed during iteration");
            return -1;
        }
        *out++ = bulk;
        if (__builtin_add_overflow(sum, PyBytes_GET_SIZE(bulk), &sum)) {
            PyErr_SetString(PyExc_OverflowError, "encode: a PFADD is too long");
            return -1;
        }
    }
    *got = out - e->scratch;
    *total = sum;
    return 0;
}

/* The same through the iterator protocol, for any other iterable (a list...). */
static int iter_bulks(Enc *e, PyObject *members, Py_ssize_t *got, Py_ssize_t *total) {
    PyObject *iter = PyObject_GetIter(members);
    if (iter == NULL) return -1;
    PyObject *item;
    while ((item = PyIter_Next(iter)) != NULL) {
        PyObject *bulk = member_bulk(e, item);
        Py_DECREF(item);
        if (bulk == NULL || keep_bulk(e, bulk, got, total) < 0) break;
    }
    Py_DECREF(iter);
    return PyErr_Occurred() ? -1 : 0;
}

/* "*<n+2>\r\n$5\r\nPFADD\r\n" + key + the members' n bulks, appended to pfadds. n is the number of
 * bulks written, not len(members) taken before: a callback's Python code may change a list while it
 * is walked, and the command must still count what it carries. */
static int add_pfadd(Enc *e, PyObject *members, PyObject *key_bulk) {
    if (PyObject_Size(members) < 0) return -1; /* len() as the Python path takes it: its TypeError */
    Py_ssize_t got = 0, total = 0;
#if PY_VERSION_HEX < 0x030E0000 && !defined(Py_GIL_DISABLED)
    int exact_set = PySet_CheckExact(members) || PyFrozenSet_CheckExact(members);
#else
    /* set_bulks reads the table layout of CPython 3.11-3.13 with the GIL: elsewhere, the iterator */
    int exact_set = 0;
#endif
    if ((exact_set ? set_bulks : iter_bulks)(e, members, &got, &total) < 0) return -1;
    char head[64];
    int head_len = snprintf(head, sizeof head, "*%zd\r\n$5\r\nPFADD\r\n", got + 2);
    Py_ssize_t key_len = PyBytes_GET_SIZE(key_bulk), length;
    if (__builtin_add_overflow(total, head_len + key_len, &length)) { /* key_len < PY_SSIZE_T_MAX - 64 */
        PyErr_SetString(PyExc_OverflowError, "encode: a PFADD is too long");
        return -1;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, length);
    if (out == NULL) return -1;
    char *at = PyBytes_AS_STRING(out);
    memcpy(at, head, (size_t)head_len);
    at += head_len;
    memcpy(at, PyBytes_AS_STRING(key_bulk), (size_t)key_len);
    at += key_len;
    for (Py_ssize_t i = 0; i < got; i++) {
        Py_ssize_t size = PyBytes_GET_SIZE(e->scratch[i]);
        if (size == 14) memcpy(at, PyBytes_AS_STRING(e->scratch[i]), 14); /* "$8\r\n" + digest + "\r\n", inlined */
        else memcpy(at, PyBytes_AS_STRING(e->scratch[i]), (size_t)size);
        at += size;
    }
    int rc = PyList_Append(e->pfadds, out);
    Py_DECREF(out);
    return rc;
}

/* One users entry: its PFADD, and EXPIREAT once per key not known to have its deadline. */
static int encode_sketch(Enc *e, PyObject *bucket_key, PyObject *members) {
    int truth = PyObject_IsTrue(members);
    if (truth <= 0) return truth;
    PyObject *head;
    long long deadline;
    int rc = head_of(e->sketch_heads, e->sketch_miss, bucket_key, 3, &head, &deadline);
    if (rc != 0) return rc;
    PyObject *key_bulk = PyTuple_GET_ITEM(head, 0);
    if (deadline <= e->cutoff) goto done; /* past its retention: Redis would drop it at once */
    rc = add_pfadd(e, members, key_bulk);
    if (rc < 0) goto done;
    rc = PyDict_Contains(e->known, key_bulk);
    if (rc == 0) rc = PyDict_Contains(e->sketch_deadlines, key_bulk);
    if (rc == 0) {
        rc = PyDict_SetItem(e->sketch_deadlines, key_bulk, PyTuple_GET_ITEM(head, 2));
        if (rc == 0 && (buf_put(&e->expires, EXPIREAT, EXPIREAT_LEN) < 0 || buf_bytes(&e->expires, key_bulk) < 0 ||
                        buf_bytes(&e->expires, PyTuple_GET_ITEM(head, 1)) < 0))
            rc = -1;
    }
    if (rc > 0) rc = 0;
done:
    Py_DECREF(head);
    return rc;
}

/* ---- matches and dimensions --------------------------------------------------------------------- */

static int encode_match(Enc *e, PyObject *bucket_key, PyObject *count_obj) {
    long long count;
    int rc = plain_count(count_obj, &count);
    if (rc != 0 || count == 0) return rc;
    PyObject *head;
    long long deadline;
    rc = head_of(e->match_heads, e->match_miss, bucket_key, 4, &head, &deadline);
    if (rc != 0) return rc;
    if (deadline > e->cutoff) {
        Py_ssize_t no = hash_of(e, PyTuple_GET_ITEM(head, 0), PyTuple_GET_ITEM(head, 1), PyTuple_GET_ITEM(head, 3));
        rc = no < 0 ? -1 : add_field(e, no, PyTuple_GET_ITEM(head, 2), count, 0);
    }
    Py_DECREF(head);
    return rc;
}

/* The _FieldBulks of a dimension (a new reference). */
static PyObject *field_bulks(Enc *e, PyObject *dimension) {
    PyObject *found = PyDict_GetItemWithError(e->field_caches, dimension);
    if (found != NULL) return Py_NewRef(found);
    if (PyErr_Occurred()) return NULL;
    return PyObject_CallOneArg(e->field_cache, dimension);
}

/* One dimensions entry's non-zero counts into its (rule, day) hash. */
static int encode_values(Enc *e, Py_ssize_t no, PyObject *dimension, PyObject *values) {
    if (!PyDict_CheckExact(values)) return BAIL;
    PyObject *bulks = field_bulks(e, dimension);
    if (bulks == NULL) return -1;
    if (!PyDict_Check(bulks)) {
        Py_DECREF(bulks);
        return BAIL;
    }
    /* PyDict_Next stays memory-safe if Python code (a __missing__) changes the dict meanwhile; the
     * pair in hand is held. No copy: a list of item tuples per entry fed the cyclic GC. */
    Py_ssize_t pos = 0;
    PyObject *value, *count_obj;
    int rc = 0;
    while (rc == 0 && PyDict_Next(values, &pos, &value, &count_obj)) {
        long long count;
        rc = plain_count(count_obj, &count);
        if (rc != 0 || count == 0) continue;
        Py_INCREF(value);
        PyObject *field = PyDict_GetItemWithError(bulks, value);
        if (field != NULL) {
            Py_INCREF(field);
        } else if (!PyErr_Occurred()) {
            field = PyObject_GetItem(bulks, value); /* __missing__ builds "<dimension>=<value>" */
        }
        Py_DECREF(value);
        rc = field == NULL ? -1 : add_field(e, no, field, count, 1);
        Py_XDECREF(field);
    }
    Py_DECREF(bulks);
    return rc;
}

/* Dimension days must be whole days (the Python path floors and merges otherwise) and keys
 * 3-tuples: checked before anything is encoded. */
static int dimension_days_whole(PyObject *dimensions) {
    Py_ssize_t pos = 0;
    PyObject *key, *values;
    while (PyDict_Next(dimensions, &pos, &key, &values)) {
        if (!PyTuple_CheckExact(key) || PyTuple_GET_SIZE(key) != 3) return BAIL;
        PyObject *day = PyTuple_GET_ITEM(key, 1);
        if (!PyLong_CheckExact(day)) return BAIL;
        int overflow;
        long long d = PyLong_AsLongLongAndOverflow(day, &overflow);
        if (d == -1 && PyErr_Occurred()) return -1;
        if (overflow || d % 86400 != 0) return BAIL;
    }
    return 0;
}

/* The Python path's RuntimeError when a callback's Python code resized a batch dict it iterates
 * (its dict iterator checks the size before each step, the last one included). */
static int same_size(PyObject *dict, Py_ssize_t size) {
    if (PyDict_GET_SIZE(dict) == size) return 0;
    PyErr_SetString(PyExc_RuntimeError, "dictionary changed size during iteration");
    return -1;
}

static int encode_dimensions(Enc *e, PyObject *dimensions) {
    /* consecutive entries are mostly one (rule, day): its head and hash are reused */
    PyObject *last_key = NULL, *head = NULL, *key, *values;
    long long deadline = 0;
    Py_ssize_t no = -1, pos = 0, size = PyDict_GET_SIZE(dimensions);
    int rc = 0;
    while (rc == 0 && PyDict_Next(dimensions, &pos, &key, &values)) {
        if (!PyTuple_CheckExact(key) || PyTuple_GET_SIZE(key) != 3) { /* checked before, unless changed since */
            rc = BAIL;
            break;
        }
        Py_INCREF(key);
        Py_INCREF(values);
        PyObject *rid = PyTuple_GET_ITEM(key, 0), *day = PyTuple_GET_ITEM(key, 1);
        if (head == NULL || rid != PyTuple_GET_ITEM(last_key, 0) || day != PyTuple_GET_ITEM(last_key, 1)) {
            Py_CLEAR(head);
            Py_CLEAR(last_key);
            no = -1;
            PyObject *head_key = PyTuple_Pack(2, rid, day);
            rc = head_key == NULL ? -1 : head_of(e->dim_heads, e->dim_miss, head_key, 3, &head, &deadline);
            Py_XDECREF(head_key);
            if (rc != 0) head = NULL;
            else last_key = Py_NewRef(key);
        }
        if (rc == 0 && deadline > e->cutoff) {
            if (no < 0) no = hash_of(e, PyTuple_GET_ITEM(head, 0), PyTuple_GET_ITEM(head, 1), PyTuple_GET_ITEM(head, 2));
            rc = no < 0 ? -1 : encode_values(e, no, PyTuple_GET_ITEM(key, 2), values);
        }
        Py_DECREF(key);
        Py_DECREF(values);
        if (rc == 0 && same_size(dimensions, size) < 0) rc = -1;
    }
    Py_XDECREF(head);
    Py_XDECREF(last_key);
    return rc;
}

static inline char *put(char *at, PyObject *bytes) {
    memcpy(at, PyBytes_AS_STRING(bytes), (size_t)PyBytes_GET_SIZE(bytes));
    return at + PyBytes_GET_SIZE(bytes);
}

/* Decimal digits of a non-negative count. */
static inline int n_digits(long long count) {
    int n = 1;
    for (unsigned long long v = (unsigned long long)count; v >= 10; v /= 10) n++;
    return n;
}

/* HINCRBY key field count per field of each hash with fields, then EXPIREAT if not known: sized
 * first (deciding the EXPIREATs), then written straight into the bytes object. */
static PyObject *write_body(Enc *e, Py_ssize_t *n_body) {
    Py_ssize_t size = 0, n = 0;
    char *expire = PyMem_Calloc((size_t)e->n_hashes + 1, 1); /* per hash: send its EXPIREAT */
    if (expire == NULL) return PyErr_NoMemory();
    PyObject *out = NULL;
    for (Py_ssize_t k = 0; k < e->n_hashes; k++) {
        const Hash *h = &e->hashes[k];
        if (h->n == 0) continue;
        Py_ssize_t key = PyBytes_GET_SIZE(h->key);
        for (Py_ssize_t at = h->first; at >= 0; at = e->fields[at].next) {
            int digits = n_digits(e->fields[at].count);
            /* "$<digits>\r\n<count>\r\n" */
            Py_ssize_t command = HINCRBY_LEN + (digits >= 10 ? 2 : 1) + digits + 5;
            if (__builtin_add_overflow(size, command, &size) || __builtin_add_overflow(size, key, &size) ||
                __builtin_add_overflow(size, PyBytes_GET_SIZE(e->fields[at].field), &size))
                goto too_long;
        }
        n += h->n;
        int known = PyDict_Contains(e->known, h->key);
        if (known < 0) goto done;
        if (!known) { /* after the HINCRBYs: EXPIREAT on a missing key does nothing */
            if (PyDict_SetItem(e->hash_deadlines, h->key, h->deadline) < 0) goto done;
            expire[k] = 1;
            if (__builtin_add_overflow(size, EXPIREAT_LEN + key, &size) ||
                __builtin_add_overflow(size, PyBytes_GET_SIZE(h->expire), &size))
                goto too_long;
            n++;
        }
    }
    out = PyBytes_FromStringAndSize(NULL, size);
    if (out == NULL) goto done;
    char *at = PyBytes_AS_STRING(out);
    for (Py_ssize_t k = 0; k < e->n_hashes; k++) {
        const Hash *h = &e->hashes[k];
        for (Py_ssize_t f = h->first; f >= 0; f = e->fields[f].next) {
            memcpy(at, HINCRBY, HINCRBY_LEN);
            at = put(at + HINCRBY_LEN, h->key);
            at = put(at, e->fields[f].field);
            at += count_bulk(e->fields[f].count, at);
        }
        if (expire[k]) {
            memcpy(at, EXPIREAT, EXPIREAT_LEN);
            at = put(at + EXPIREAT_LEN, h->key);
            at = put(at, h->expire);
        }
    }
    assert(at == PyBytes_AS_STRING(out) + size);
    *n_body = n;
    goto done;
too_long:
    PyErr_SetString(PyExc_OverflowError, "encode: the transaction is too long");
done:
    PyMem_Free(expire);
    return out;
}

/* Each entry of `dict` through one_entry, in order (PyDict_Next stays memory-safe if a callback's
 * Python code changes the dict; the pair in hand is held). */
static int each_entry(Enc *e, PyObject *dict, int (*one_entry)(Enc *, PyObject *, PyObject *)) {
    Py_ssize_t pos = 0, size = PyDict_GET_SIZE(dict);
    PyObject *key, *value;
    int rc = 0;
    while (rc == 0 && PyDict_Next(dict, &pos, &key, &value)) {
        Py_INCREF(key);
        Py_INCREF(value);
        rc = one_entry(e, key, value);
        Py_DECREF(key);
        Py_DECREF(value);
        if (rc == 0 && same_size(dict, size) < 0) rc = -1;
    }
    return rc;
}

static int encode_all(Enc *e, PyObject *users, PyObject *matches, PyObject *dimensions) {
    int rc = dimension_days_whole(dimensions);
    if (rc == 0) rc = each_entry(e, users, encode_sketch);
    if (rc == 0) rc = each_entry(e, matches, encode_match);
    if (rc == 0) rc = encode_dimensions(e, dimensions);
    return rc;
}

static void enc_free(Enc *e) {
    Py_XDECREF(e->pfadds);
    Py_XDECREF(e->sketch_deadlines);
    Py_XDECREF(e->hash_deadlines);
    Py_XDECREF(e->hash_no);
    PyMem_Free(e->expires.data);
    table_free(&e->table);
    PyMem_Free(e->scratch);
    for (Py_ssize_t k = 0; k < e->n_hashes; k++) {
        Py_DECREF(e->hashes[k].key);
        Py_DECREF(e->hashes[k].expire);
        Py_DECREF(e->hashes[k].deadline);
    }
    PyMem_Free(e->hashes);
    for (Py_ssize_t k = 0; k < e->n_fields; k++) Py_DECREF(e->fields[k].field);
    PyMem_Free(e->fields);
    PyMem_Free(e->index.slots);
}

static PyObject *encode(PyObject *self, PyObject *args) {
    Enc e;
    memset(&e, 0, sizeof e);
    PyObject *users, *matches, *dimensions;
    if (!PyArg_ParseTuple(args, "OOOLO!O!OO!OO!OOO!O:encode", &users, &matches, &dimensions, &e.cutoff, &PyDict_Type, &e.known, &PyDict_Type,
                          &e.sketch_heads, &e.sketch_miss, &PyDict_Type, &e.match_heads, &e.match_miss,
                          &PyDict_Type, &e.dim_heads, &e.dim_miss, &e.members, &PyDict_Type, &e.field_caches,
                          &e.field_cache))
        return NULL;
    /* the batch's dicts exactly: a subclass may iterate otherwise than the Python path reads it */
    if (!PyDict_CheckExact(users) || !PyDict_CheckExact(matches) || !PyDict_CheckExact(dimensions))
        Py_RETURN_NONE;
    PyObject *result = NULL;
    e.pfadds = PyList_New(0);
    e.sketch_deadlines = PyDict_New();
    e.hash_deadlines = PyDict_New();
    e.hash_no = PyDict_New();
    if (e.pfadds == NULL || e.sketch_deadlines == NULL || e.hash_deadlines == NULL || e.hash_no == NULL ||
        table_init(&e.table, 8192) < 0 || index_grow(&e) < 0)
        goto done;
    int rc = encode_all(&e, users, matches, dimensions);
    if (rc < 0) goto done;
    if (rc == BAIL) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    Py_ssize_t n_body = 0;
    PyObject *body = write_body(&e, &n_body);
    if (body == NULL) goto done;
    PyObject *expires = PyBytes_FromStringAndSize(e.expires.data, e.expires.len);
    if (expires == NULL) {
        Py_DECREF(body);
        goto done;
    }
    result = Py_BuildValue("(ONONnO)", e.pfadds, expires, e.sketch_deadlines, body, n_body, e.hash_deadlines);
done:
    enc_free(&e);
    return result;
}

static PyMethodDef methods[] = {
    {"encode", encode, METH_VARARGS, "A CounterBatch's PFADDs, sketch EXPIREATs and transaction body (see the module)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_encode",
    .m_doc = "C twin of RedisCounters.encode_batch's per-entry loops.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__encode(void) { return PyModule_Create(&module); }
