/*
 * C twins of the per-document step (prepare) and of the emit step (emit) of
 * rules_service.counters.aggregate.aggregate_masks (the Python code is the reference; tests compare
 * both on the same inputs).
 *
 * Why: the stream turns ~60 (bid, rule) matches per bid into counter updates; in Python the
 * per-pair work (picking user ids, building sets, counting dimension values per rule) cost
 * ~30 us per bid. Here each rule's mask is walked word by word and the CounterBatch's sets and
 * dicts are filled directly. What is left is mostly CPython's own set and dict work (measured: a
 * window's sets grow to tens of MB, each new user a random slot), which no layout here can avoid
 * while the output stays sets of user ids.
 *
 * prepare(docs, union_bytes, dimensions, paths, want_dims) -> tuple | None: see its section below
 *   (the per-document loop and the dimension codes, ~4 us per bid in Python, for plain dicts).
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
 *   count_matches: add matched counts and dimension counts (False: users only, a replay);
 *   seen (optional): a SeenUsers. A (document, rule) pair adds its user to the hour sketch unless
 *     it holds (user, rule, hour), and to the day sketch unless it holds (user, rule, day); what
 *     is added is recorded. Counts are never filtered.
 *
 * SeenUsers(max_records): the (user, rule) pairs this process already added to the sketches of the
 *   user's current hour and day, so a user seen again is not sent again (PFADD of a member a
 *   sketch holds changes nothing). The twin of rules_service.counters.seen.SeenUsers; the rules
 *   are in that module's docstring. Per user: the hour, its day, and an open-addressed table of
 *   rule numbers (recorded for the day), each flagged when recorded for the hour too.
 *
 * pack_members(members, cache, miss) -> bytes
 *
 *   The concatenation of cache[m] (bytes) for each m in the iterable members; miss(m) computes and
 *   caches an absent one. The twin of b"".join(map(cache_dict.__getitem__, members)) in
 *   redis_store (a dict subclass with __missing__): one C loop instead of a call per member.
 *
 * Only a SeenUsers keeps state between calls; the scratch buffers are allocated per call.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>


/* ------------------------------------------------------------------ SeenUsers */

typedef struct {
    long long hour, day; /* the day of the hour */
    uint32_t n, cap;     /* rule numbers recorded for the day; table capacity (a power of 2, or 0) */
    uint32_t *slots;     /* per slot: rule number + 1, | HOUR_FLAG when recorded for the hour too; 0 = empty */
} UserEntry;

/* A slot's flag: the rule is recorded for the entry's hour, not only its day. */
#define HOUR_FLAG (UINT32_C(1) << 31)

typedef struct {
    PyObject_HEAD
    PyObject *user_index;  /* dict: user id -> index into entries (int) */
    PyObject *rule_number; /* dict: rule id -> number (int) */
    UserEntry *entries;
    Py_ssize_t n_entries, cap_entries;
    Py_ssize_t records, max_records, slot_bytes;
    int busy; /* inside emit: Python code a value's __add__ runs must not clear it under us */
} SeenUsers;

static PyTypeObject SeenUsersType;

/* A user's table of at most this many slots (1 KB) is kept, emptied, when the user moves on to a
 * later day (no regrowing it every day); a bigger one is freed. Keeping a table grown for one
 * busy day (thousands of rules) through the user's quiet later days would let memory grow
 * without bound while the records stay under max_records. */
#define KEPT_SLOTS 256u

/* The largest table: doubling it again would overflow its uint32 capacity. */
#define MAX_SLOTS (UINT32_C(1) << 31)

static void seen_forget(SeenUsers *s) {
    for (Py_ssize_t i = 0; i < s->n_entries; i++) PyMem_Free(s->entries[i].slots);
    s->n_entries = 0;
    s->records = 0;
    s->slot_bytes = 0;
    if (s->user_index) PyDict_Clear(s->user_index);
    if (s->rule_number) PyDict_Clear(s->rule_number);
}

static PyObject *SeenUsers_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"max_records", NULL};
    Py_ssize_t max_records;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n:SeenUsers", kwlist, &max_records)) return NULL;
    if (max_records < 1) {
        PyErr_SetString(PyExc_ValueError, "SeenUsers: max_records must be at least 1");
        return NULL;
    }
    SeenUsers *s = (SeenUsers *)type->tp_alloc(type, 0);
    if (s == NULL) return NULL;
    s->max_records = max_records;
    s->user_index = PyDict_New();
    s->rule_number = PyDict_New();
    if (s->user_index == NULL || s->rule_number == NULL) {
        Py_DECREF(s);
        return NULL;
    }
    return (PyObject *)s;
}

static void SeenUsers_dealloc(SeenUsers *s) {
    for (Py_ssize_t i = 0; i < s->n_entries; i++) PyMem_Free(s->entries[i].slots);
    PyMem_Free(s->entries);
    Py_XDECREF(s->user_index);
    Py_XDECREF(s->rule_number);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyObject *SeenUsers_clear(SeenUsers *s, PyObject *unused) {
    if (s->busy) {
        PyErr_SetString(PyExc_RuntimeError, "SeenUsers.clear() during an emit that uses it");
        return NULL;
    }
    seen_forget(s);
    Py_RETURN_NONE;
}

static PyObject *SeenUsers_get_records(SeenUsers *s, void *closure) { return PyLong_FromSsize_t(s->records); }
static PyObject *SeenUsers_get_users(SeenUsers *s, void *closure) { return PyLong_FromSsize_t(s->n_entries); }
static PyObject *SeenUsers_get_max(SeenUsers *s, void *closure) { return PyLong_FromSsize_t(s->max_records); }
static PyObject *SeenUsers_get_nbytes(SeenUsers *s, void *closure) {
    return PyLong_FromSsize_t(s->slot_bytes + s->cap_entries * (Py_ssize_t)sizeof(UserEntry));
}

/* The entry of user ``uid`` for a document of ``hour`` (creating it, or moving it on to a later
 * hour: the hour records of an earlier hour are no use any more, nor the day records of an earlier
 * day), or -1 when the entry is at a later hour (a late document: its users are added, not
 * recorded). -2 on errors. */
static Py_ssize_t seen_entry(SeenUsers *s, PyObject *uid, long long hour, long long day) {
    PyObject *found = PyDict_GetItemWithError(s->user_index, uid); /* borrowed */
    if (found != NULL) {
        Py_ssize_t i = PyLong_AsSsize_t(found);
        if (i < 0 || i >= s->n_entries) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "SeenUsers: corrupt index");
            return -2;
        }
        UserEntry *e = &s->entries[i];
        if (e->hour > hour) return -1;
        if (e->hour < hour && e->day == day) { /* a later hour of the same day: keep the day records */
            e->hour = hour;
            for (uint32_t j = 0; j < e->cap; j++) e->slots[j] &= ~HOUR_FLAG;
        } else if (e->hour < hour) {
            e->day = day;
            s->records -= e->n;
            e->n = 0;
            e->hour = hour;
            if (e->cap > KEPT_SLOTS) { /* grown for a busy hour: the new hour grows what it needs */
                PyMem_Free(e->slots);
                s->slot_bytes -= (Py_ssize_t)e->cap * (Py_ssize_t)sizeof(uint32_t);
                e->slots = NULL;
                e->cap = 0;
            } else if (e->cap) {
                memset(e->slots, 0, (size_t)e->cap * sizeof(uint32_t));
            }
        }
        return i;
    }
    if (PyErr_Occurred()) return -2;
    if (s->n_entries == s->cap_entries) {
        Py_ssize_t cap = s->cap_entries ? s->cap_entries * 2 : 1024;
        UserEntry *grown = PyMem_Realloc(s->entries, (size_t)cap * sizeof(UserEntry));
        if (grown == NULL) {
            PyErr_NoMemory();
            return -2;
        }
        s->entries = grown;
        s->cap_entries = cap;
    }
    PyObject *index = PyLong_FromSsize_t(s->n_entries);
    if (index == NULL) return -2;
    int rc = PyDict_SetItem(s->user_index, uid, index);
    Py_DECREF(index);
    if (rc < 0) return -2;
    UserEntry *e = &s->entries[s->n_entries];
    e->hour = hour;
    e->day = day;
    e->n = e->cap = 0;
    e->slots = NULL;
    return s->n_entries++;
}

static inline uint32_t slot_of(uint32_t key, uint32_t mask) { /* key without HOUR_FLAG */
    uint32_t h = key * 0x9E3779B1u;
    return (h ^ (h >> 15)) & mask;
}

/* Record rule ``number`` for an entry's hour and day: 2 when both were recorded already, 1 when
 * only the day was (now the hour is too), 0 when neither (now both are), -1 on errors. */
static int seen_record(SeenUsers *s, UserEntry *e, uint32_t number) {
    uint32_t key = number + 1;
    if (e->cap) {
        uint32_t mask = e->cap - 1;
        for (uint32_t i = slot_of(key, mask);; i = (i + 1) & mask) {
            if ((e->slots[i] & ~HOUR_FLAG) == key) {
                if (e->slots[i] & HOUR_FLAG) return 2;
                e->slots[i] |= HOUR_FLAG;
                return 1;
            }
            if (e->slots[i] == 0) break;
        }
    }
    if ((e->n + 1) * 2 > e->cap) { /* at most half full: short probes, and always an empty slot */
        if (e->cap >= MAX_SLOTS) {
            PyErr_SetString(PyExc_OverflowError, "SeenUsers: too many rules for one user");
            return -1;
        }
        uint32_t cap = e->cap ? e->cap * 2 : 8;
        uint32_t *slots = PyMem_Calloc(cap, sizeof(uint32_t));
        if (slots == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (uint32_t j = 0; j < e->cap; j++) {
            uint32_t k = e->slots[j];
            if (k == 0) continue;
            uint32_t i = slot_of(k & ~HOUR_FLAG, cap - 1);
            while (slots[i]) i = (i + 1) & (cap - 1);
            slots[i] = k;
        }
        PyMem_Free(e->slots);
        s->slot_bytes += (Py_ssize_t)(cap - e->cap) * (Py_ssize_t)sizeof(uint32_t);
        e->slots = slots;
        e->cap = cap;
    }
    uint32_t mask = e->cap - 1, i = slot_of(key, mask);
    while (e->slots[i]) i = (i + 1) & mask;
    e->slots[i] = key | HOUR_FLAG;
    e->n++;
    s->records++;
    return 0;
}

/* The number of a rule id (assigned on first sight), or (uint32_t)-1 on errors. */
static uint32_t seen_rule_number(SeenUsers *s, PyObject *rid) {
    PyObject *found = PyDict_GetItemWithError(s->rule_number, rid); /* borrowed */
    if (found != NULL) return (uint32_t)PyLong_AsUnsignedLong(found);
    if (PyErr_Occurred()) return (uint32_t)-1;
    Py_ssize_t n = PyDict_GET_SIZE(s->rule_number);
    if (n >= (Py_ssize_t)HOUR_FLAG - 1) { /* number + 1 must stay clear of HOUR_FLAG */
        PyErr_SetString(PyExc_OverflowError, "SeenUsers: too many rule ids");
        return (uint32_t)-1;
    }
    PyObject *number = PyLong_FromSsize_t(n);
    if (number == NULL) return (uint32_t)-1;
    int rc = PyDict_SetItem(s->rule_number, rid, number);
    Py_DECREF(number);
    return rc < 0 ? (uint32_t)-1 : (uint32_t)n;
}

static PyMethodDef SeenUsers_methods[] = {
    {"clear", (PyCFunction)SeenUsers_clear, METH_NOARGS, "Forget every record (the sketches may have lost them)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef SeenUsers_getset[] = {
    {"records", (getter)SeenUsers_get_records, NULL, "(user, rule) pairs recorded for their users' hours", NULL},
    {"users", (getter)SeenUsers_get_users, NULL, "users with an entry", NULL},
    {"max_records", (getter)SeenUsers_get_max, NULL, "above this many records, the next batch starts afresh", NULL},
    {"nbytes", (getter)SeenUsers_get_nbytes, NULL, "bytes of the entries and rule tables (not the dicts)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject SeenUsersType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "rules_service.counters._aggregate.SeenUsers",
    .tp_basicsize = sizeof(SeenUsers),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The (user, rule, hour) triples already added to the sketches (see the module).",
    .tp_new = SeenUsers_new,
    .tp_dealloc = (destructor)SeenUsers_dealloc,
    .tp_methods = SeenUsers_methods,
    .tp_getset = SeenUsers_getset,
};

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
    SeenUsers *seen;       /* or NULL: every pair adds its user */
    Py_ssize_t *entry_of;  /* with seen: per document, its user's entry (-1: a late document) */
    long long *hour_value; /* with seen: per hour code, the hour */
    Py_ssize_t *udocs;     /* with seen: the documents of the current group whose users the hour gets */
    Py_ssize_t *ddocs;     /* ... and the day (a subset) */
} Ctx;

/* users[key] |= uids[docs]: a new set when the key is absent (one set per key, never shared).
 * *made (if not NULL): a new reference to the set when this call created it, else NULL. */
static int add_users(Ctx *c, PyObject *key, const Py_ssize_t *docs, Py_ssize_t n, PyObject **made) {
    PyObject *set = PyDict_GetItemWithError(c->users, key); /* borrowed */
    int created = 0;
    if (set == NULL) {
        if (PyErr_Occurred()) return -1;
        set = PySet_New(NULL);
        if (set == NULL) return -1;
        if (PyDict_SetItem(c->users, key, set) < 0) {
            Py_DECREF(set);
            return -1;
        }
        created = 1;
    } else if (!PySet_Check(set)) { /* PySet_Add would fail as a SystemError, or grow a frozenset */
        PyErr_Format(PyExc_TypeError, "emit: users[%R] is a %.100s, not a set", key, Py_TYPE(set)->tp_name);
        return -1;
    } else {
        Py_INCREF(set); /* our own reference: a user id's __hash__ may drop it from users */
    }
    int rc = 0;
    for (Py_ssize_t i = 0; i < n && rc == 0; i++) rc = PySet_Add(set, PyTuple_GET_ITEM(c->uids, docs[i]));
    if (made != NULL && created && rc == 0) *made = set; /* handed over */
    else Py_DECREF(set);
    return rc;
}

/* The day sketch's users. When this group just created the hour's set and the day has none, the
 * day's set is a copy of it (the same users; a copy moves the hashed slots instead of adding each
 * user again): the usual case of a short flush window, where every key is new (callgrind, three
 * one-batch windows of the stream's workload: emit -13% instructions). */
static int add_day_users(Ctx *c, PyObject *day_key, PyObject *new_hour_set, const Py_ssize_t *docs,
                         Py_ssize_t n) {
    if (new_hour_set == NULL) return add_users(c, day_key, docs, n, NULL);
    PyObject *found = PyDict_GetItemWithError(c->users, day_key); /* borrowed */
    if (found != NULL || PyErr_Occurred()) return found ? add_users(c, day_key, docs, n, NULL) : -1;
    PyObject *copy = PySet_New(new_hour_set);
    if (copy == NULL) return -1;
    int rc = PyDict_SetItem(c->users, day_key, copy);
    Py_DECREF(copy);
    return rc;
}

/* dict[key] += n. An absent key costs one lookup (setdefault: in a short flush window most keys
 * are new); an exact int total is added in C (the usual case), anything else (a big int, a
 * caller's float) through PyNumber_Add, as Python's ``+`` would. */
static int add_count(PyObject *dict, PyObject *key, Py_ssize_t n) {
    PyObject *fresh = PyLong_FromSsize_t(n);
    if (fresh == NULL) return -1;
    Py_ssize_t size = PyDict_GET_SIZE(dict);
    PyObject *found = PyDict_SetDefault(dict, key, fresh); /* borrowed */
    if (found == NULL || PyDict_GET_SIZE(dict) != size) { /* an error, or fresh went in (not "is fresh": */
        Py_DECREF(fresh);                                   /* small ints are shared) */
        return found == NULL ? -1 : 0;
    }
    PyObject *total;
    int overflow = 0;
    long long old = PyLong_CheckExact(found) ? PyLong_AsLongLongAndOverflow(found, &overflow) : -1;
    if (PyLong_CheckExact(found) && !overflow && old <= PY_SSIZE_T_MAX - n && old >= PY_SSIZE_T_MIN) {
        total = PyLong_FromSsize_t((Py_ssize_t)old + n); /* n >= 0: only the top can overflow */
    } else {
        Py_INCREF(found); /* a non-int total's __add__ may remove it from the dict */
        total = PyNumber_Add(found, fresh);
        Py_DECREF(found);
    }
    Py_DECREF(fresh);
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

/* With a SeenUsers: the documents of a group whose users are added (into c->udocs), recording
 * them; the others' (user, rule, hour) was added before. -1 on errors. */
static Py_ssize_t unseen_docs(Ctx *c, uint32_t number, Py_ssize_t h, const Py_ssize_t *docs, Py_ssize_t n,
                              Py_ssize_t *n_day) {
    Py_ssize_t kept = 0, day_kept = 0;
    long long hour = c->hour_value[h];
    for (Py_ssize_t k = 0; k < n; k++) {
        Py_ssize_t i = docs[k], entry = c->entry_of[i];
        int found = 0;
        if (entry >= 0 && c->seen->entries[entry].hour == hour) {
            found = seen_record(c->seen, &c->seen->entries[entry], number);
            if (found < 0) return -1;
        } /* else a late document, or its user moved on to a later hour in this batch: added, not recorded */
        if (found < 2) c->udocs[kept++] = i;
        if (found < 1) c->ddocs[day_kept++] = i;
    }
    *n_day = day_kept;
    return kept;
}

/* One (rule, hour) group: users to the hour and day sketches, then the counts. */
static int emit_group(Ctx *c, PyObject *rid, uint32_t number, Py_ssize_t h, const Py_ssize_t *docs, Py_ssize_t n) {
    PyObject *hour = PyTuple_GET_ITEM(c->hours, h), *day = PyTuple_GET_ITEM(c->days, h);
    PyObject *hour_key = bucket_key(rid, c->s_hour, hour);
    PyObject *day_key = bucket_key(rid, c->s_day, day);
    PyObject *new_hour_set = NULL; /* the hour's set, when this group created it */
    int rc = -1;
    if (hour_key == NULL || day_key == NULL) goto done;
    const Py_ssize_t *udocs = docs, *ddocs = docs;
    Py_ssize_t un = n, dn = n;
    if (c->seen != NULL) {
        un = unseen_docs(c, number, h, docs, n, &dn);
        if (un < 0) goto done;
        udocs = c->udocs;
        ddocs = c->ddocs;
    }
    if (un > 0 && add_users(c, hour_key, udocs, un, &new_hour_set) < 0) goto done;
    if (dn > 0 && (dn == un ? add_day_users(c, day_key, new_hour_set, ddocs, dn)  /* the same users */
                            : add_users(c, day_key, ddocs, dn, NULL)) < 0)
        goto done;
    if (c->count_matches && add_counts(c, rid, hour_key, day_key, day, docs, n) < 0) goto done;
    rc = 0;
done:
    Py_XDECREF(new_hour_set);
    Py_XDECREF(hour_key);
    Py_XDECREF(day_key);
    return rc;
}

/* Every document of one rule's mask, grouped by hour (stable: document order within an hour). */
static int emit_rule(Ctx *c, PyObject *rid, const char *words, Py_ssize_t n_words) {
    Py_ssize_t n = 0;
    uint32_t number = 0;
    if (c->seen != NULL && !PyUnicode_CheckExact(rid)) { /* its __hash__ could be Python code: not recorded */
        SeenUsers *seen = c->seen;
        c->seen = NULL;
        int rc = emit_rule(c, rid, words, n_words);
        c->seen = seen;
        return rc;
    }
    if (c->seen != NULL && (number = seen_rule_number(c->seen, rid)) == (uint32_t)-1) return -1;
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
    if (c->n_hours == 1) return emit_group(c, rid, number, 0, c->docs + c->n_docs, n);
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
        if (c->group_len[h] && emit_group(c, rid, number, h, c->docs + at, c->group_len[h]) < 0) return -1;
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

/* With a SeenUsers: start afresh when it holds too many records (checked once per call, so both
 * twins clear at the same moments), then each counted document's user entry, in document order. */
static int see_documents(Ctx *c) {
    SeenUsers *s = c->seen;
    if (s->records > s->max_records) seen_forget(s);
    c->entry_of = PyMem_New(Py_ssize_t, c->n_docs + 1);
    c->hour_value = PyMem_New(long long, c->n_hours + 1);
    c->udocs = PyMem_New(Py_ssize_t, c->n_docs + 1);
    c->ddocs = PyMem_New(Py_ssize_t, c->n_docs + 1);
    if (!c->entry_of || !c->hour_value || !c->udocs || !c->ddocs) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t h = 0; h < c->n_hours; h++) {
        c->hour_value[h] = PyLong_AsLongLong(PyTuple_GET_ITEM(c->hours, h));
        if (c->hour_value[h] == -1 && PyErr_Occurred()) return -1;
    }
    for (Py_ssize_t i = 0; i < c->n_docs; i++) {
        c->entry_of[i] = -1;
        if (c->hour_codes[i] < 0) continue;
        PyObject *uid = PyTuple_GET_ITEM(c->uids, i);
        if (!PyUnicode_CheckExact(uid)) continue; /* never recorded: only exact str keys are safe in the index */
        long long hour = c->hour_value[c->hour_codes[i]], into_day = hour % 86400;
        if (into_day < 0) into_day += 86400; /* the day as Python's floor modulo gives it */
        Py_ssize_t entry = seen_entry(s, uid, hour, hour - into_day);
        if (entry == -2) return -1;
        c->entry_of[i] = entry;
    }
    return 0;
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
    PyObject *seen = Py_None;
    if (!PyArg_ParseTuple(args, "O!O!O!O!y*nO!y*O!O!y*nO!O!p|O:emit", &PyDict_Type, &c.users, &PyDict_Type,
                          &c.matches, &PyDict_Type, &c.dims, &PyList_Type, &rule_list, &masks, &n_words,
                          &PyList_Type, &uid_list, &hour_codes, &PyList_Type, &hour_list, &PyList_Type, &day_list,
                          &doc_codes, &c.width, &PyList_Type, &dim_list, &PyList_Type, &value_list,
                          &c.count_matches, &seen))
        return NULL;
    if (seen != Py_None && !PyObject_TypeCheck(seen, &SeenUsersType)) {
        PyErr_Format(PyExc_TypeError, "emit: seen must be a SeenUsers or None, not %.100s", Py_TYPE(seen)->tp_name);
        PyBuffer_Release(&masks);
        PyBuffer_Release(&hour_codes);
        PyBuffer_Release(&doc_codes);
        return NULL;
    }
    c.seen = seen == Py_None ? NULL : (SeenUsers *)seen;
    if (c.seen != NULL && c.seen->busy) {
        PyErr_SetString(PyExc_RuntimeError, "emit: this SeenUsers is in use by another emit");
        PyBuffer_Release(&masks);
        PyBuffer_Release(&hour_codes);
        PyBuffer_Release(&doc_codes);
        return NULL;
    }
    if (c.seen != NULL) c.seen->busy = 1;
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
    if (c.seen != NULL && see_documents(&c) < 0) goto done;
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
    if (c.seen != NULL) c.seen->busy = 0;
    PyMem_Free(c.entry_of);
    PyMem_Free(c.hour_value);
    PyMem_Free(c.udocs);
    PyMem_Free(c.ddocs);
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

/* ------------------------------------------------------------------ prepare: the per-document step
 *
 * prepare(docs, union_bytes, dimensions, paths, want_dims)
 *     -> (uids, hour_codes, hours, doc_codes, width, code_dims, code_values) | None
 *
 * The per-document work of aggregate_masks before emit, for the usual batch: plain dicts (as the
 * normaliser and orjson make them) with a str user_id and an ISO 8601 UTC last_seen of ASCII digits.
 * Same values as the Python loop and _dimension_codes (numbering included): the user id of each
 * document ("" when not counted), its hour code (int32, -1 when not counted), the distinct hours
 * (sorted), and the documents x width int32 matrix of (dimension, value) codes padded with -1
 * (b"" and 0 when there are none, or when want_dims is false), with each code's dimension and value.
 *
 * None means "not the usual batch, run the Python loop": a document that is not a dict (None is fine
 * when no rule matched it), a matched document without a usable user_id or last_seen (Python raises
 * the error naming it), a last_seen it cannot read as Python does, a Mapping that is not a dict on a
 * dimension's path, or any exception on the way. Nothing is half done: the caller's data is only read.
 *
 *   docs: list or tuple; union_bytes: bit i (little-endian words) set when a rule matched docs[i];
 *   dimensions: list of str; paths: list of tuples of str, each dimension split on ".".
 */

typedef struct {
    int32_t *items;
    Py_ssize_t len, cap;
} IntVec;

static int vec_push(IntVec *v, int32_t x) {
    if (v->len == v->cap) {
        Py_ssize_t cap = v->cap ? v->cap * 2 : 256;
        int32_t *items = PyMem_Resize(v->items, int32_t, cap);
        if (items == NULL) return -1;
        v->items = items;
        v->cap = cap;
    }
    v->items[v->len++] = x;
    return 0;
}

/* Days from 1970-01-01 to y-m-01 in the proleptic Gregorian calendar (as date.toordinal()). */
static long long days_to_month(long long y, long long m) {
    y -= m <= 2;
    long long era = (y >= 0 ? y : y - 399) / 400;
    long long yoe = y - era * 400;
    long long doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5;
    long long doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static int digits(const Py_UCS1 *s, Py_ssize_t at, Py_ssize_t n, long long *out) {
    long long v = 0;
    for (Py_ssize_t k = at; k < at + n; k++) {
        if (s[k] < '0' || s[k] > '9') return -1;
        v = v * 10 + (s[k] - '0');
    }
    *out = v;
    return 0;
}

/* hour_of_last_seen() for ASCII text: 0 and *hour, or -1 for anything else (Python decides: an error,
 * or a spelling int() accepts, like "+1" or "1_0"). Day and hour are not range-checked, as timegm. */
static int hour_of(PyObject *text, long long *hour) {
    if (!PyUnicode_IS_ASCII(text)) return -1;
    const Py_UCS1 *s = PyUnicode_1BYTE_DATA(text);
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    if (n < 13) return -1;
    if (s[n - 1] != 'Z' && !(n >= 6 && memcmp(s + n - 6, "+00:00", 6) == 0)) return -1;
    long long y, mo, d, h;
    if (s[4] != '-' || s[7] != '-' || s[10] != 'T' || digits(s, 0, 4, &y) || digits(s, 5, 2, &mo) ||
        digits(s, 8, 2, &d) || digits(s, 11, 2, &h))
        return -1;
    if (y < 1 || mo < 1 || mo > 12) return -1; /* date() refuses them */
    *hour = ((days_to_month(y, mo) + d - 1) * 24 + h) * 3600;
    return 0;
}

typedef struct {
    PyObject *dims;       /* tuple of str */
    PyObject *paths;      /* tuple of tuples of str */
    PyObject *code_of;    /* list, per dimension: dict text -> code */
    PyObject *code_dims, *code_values; /* lists */
    IntVec flat;          /* every document's codes, one after the other */
    int32_t *stamp;       /* per code: the last list that used it (a list counts each value once) */
    Py_ssize_t stamp_cap, lists;
} Prep;

/* The value at a dimension's path (new reference), NULL with *unusual = 0 when absent, NULL with
 * *unusual = 1 for a Mapping that is not a dict (Python's isinstance decides) or an error. */
static PyObject *walk(PyObject *doc, PyObject *parts, int *unusual) {
    PyObject *value = Py_NewRef(doc);
    *unusual = 0;
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(parts); k++) {
        PyObject *next;
        if (PyDict_CheckExact(value)) {
            next = PyDict_GetItemWithError(value, PyTuple_GET_ITEM(parts, k));
            if (next == NULL && PyErr_Occurred()) *unusual = 1;
            Py_XINCREF(next);
        } else if (value == Py_None || PyUnicode_CheckExact(value) || PyLong_CheckExact(value) ||
                   PyFloat_CheckExact(value) || PyBool_Check(value) || PyList_CheckExact(value) ||
                   PyTuple_CheckExact(value)) {
            next = NULL; /* not a Mapping: the path stops here */
        } else {
            next = NULL;
            *unusual = 1;
        }
        Py_DECREF(value);
        if (next == NULL) return NULL;
        value = next;
    }
    if (value == Py_None) Py_CLEAR(value);
    return value;
}

/* _field_text(): a new reference to the text of a str, bool, int or float (exact types), else NULL
 * (an error is set only when str() failed). */
static PyObject *field_text(PyObject *value) {
    if (PyUnicode_CheckExact(value)) return Py_NewRef(value);
    if (PyBool_Check(value)) return PyUnicode_FromString(value == Py_True ? "true" : "false");
    if (PyLong_CheckExact(value) || PyFloat_CheckExact(value)) return PyObject_Str(value);
    return NULL;
}

/* Append the code of (dimension d, text) to the flat codes, numbering a new pair; list_serial > 0:
 * skip a code this list already gave. */
static int push_code(Prep *p, Py_ssize_t d, PyObject *text, Py_ssize_t list_serial) {
    PyObject *code_of = PyList_GET_ITEM(p->code_of, d);
    PyObject *found = PyDict_GetItemWithError(code_of, text); /* borrowed */
    Py_ssize_t code;
    if (found != NULL) {
        code = PyLong_AsSsize_t(found);
    } else {
        if (PyErr_Occurred()) return -1;
        code = PyList_GET_SIZE(p->code_values);
        if (code >= INT32_MAX) {
            PyErr_SetString(PyExc_OverflowError, "prepare: too many dimension values");
            return -1;
        }
        PyObject *number = PyLong_FromSsize_t(code);
        int rc = number == NULL ? -1 : PyDict_SetItem(code_of, text, number);
        Py_XDECREF(number);
        if (rc < 0 || PyList_Append(p->code_dims, PyTuple_GET_ITEM(p->dims, d)) < 0 ||
            PyList_Append(p->code_values, text) < 0)
            return -1;
    }
    if (list_serial) {
        if (code >= p->stamp_cap) {
            Py_ssize_t cap = (code + 1) * 2;
            int32_t *stamp = PyMem_Resize(p->stamp, int32_t, cap);
            if (stamp == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            memset(stamp + p->stamp_cap, 0, (size_t)(cap - p->stamp_cap) * sizeof *stamp);
            p->stamp = stamp;
            p->stamp_cap = cap;
        }
        if (p->stamp[code] == list_serial) return 0;
        p->stamp[code] = (int32_t)list_serial;
    }
    if (vec_push(&p->flat, (int32_t)code) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* One document's codes (the order of _dimension_codes). 0, or -1 with *unusual for a fallback. */
static int doc_codes(Prep *p, PyObject *doc, int *unusual) {
    for (Py_ssize_t d = 0; d < PyTuple_GET_SIZE(p->dims); d++) {
        PyObject *value = walk(doc, PyTuple_GET_ITEM(p->paths, d), unusual);
        if (*unusual) return -1;
        if (value == NULL) continue;
        int rc = 0;
        if (PyList_CheckExact(value)) {
            if (++p->lists == INT32_MAX) { /* stamps compare equal within one list only: start again */
                if (p->stamp_cap) memset(p->stamp, 0, (size_t)p->stamp_cap * sizeof *p->stamp);
                p->lists = 1;
            }
            PyObject *items = PyList_AsTuple(value); /* str() of an item cannot shrink it, but be sure */
            if (items == NULL) rc = -1;
            for (Py_ssize_t k = 0; items && k < PyTuple_GET_SIZE(items) && rc == 0; k++) {
                PyObject *text = field_text(PyTuple_GET_ITEM(items, k));
                if (text == NULL) {
                    if (PyErr_Occurred()) rc = -1;
                    continue;
                }
                rc = push_code(p, d, text, p->lists);
                Py_DECREF(text);
            }
            Py_XDECREF(items);
        } else {
            PyObject *text = field_text(value);
            if (text != NULL) {
                rc = push_code(p, d, text, 0);
                Py_DECREF(text);
            } else if (PyErr_Occurred()) {
                rc = -1;
            }
        }
        Py_DECREF(value);
        if (rc < 0) {
            *unusual = 1;
            return -1;
        }
    }
    return 0;
}

/* The distinct hours so far (unsorted), and each document's index into them. */
typedef struct {
    long long *hours;
    Py_ssize_t n, cap;
} Hours;

static Py_ssize_t hour_index(Hours *h, long long hour) {
    for (Py_ssize_t k = h->n - 1; k >= 0; k--) /* a batch has one or two hours, the last one likely */
        if (h->hours[k] == hour) return k;
    if (h->n == h->cap) {
        Py_ssize_t cap = h->cap ? h->cap * 2 : 8;
        long long *hours = PyMem_Resize(h->hours, long long, cap);
        if (hours == NULL) return -1;
        h->hours = hours;
        h->cap = cap;
    }
    h->hours[h->n] = hour;
    return h->n++;
}

static int compare_hours(const void *a, const void *b) {
    long long x = *(const long long *)a, y = *(const long long *)b;
    return (x > y) - (x < y);
}

/* The documents x width matrix of codes padded with -1, as bytes (b"" and width 0 when empty). */
static PyObject *code_matrix(const Prep *p, const Py_ssize_t *row_start, Py_ssize_t n_docs, Py_ssize_t *width) {
    Py_ssize_t widest = 0;
    for (Py_ssize_t i = 0; i < n_docs; i++)
        if (row_start[i + 1] - row_start[i] > widest) widest = row_start[i + 1] - row_start[i];
    *width = PyList_GET_SIZE(p->code_values) && widest ? widest : 0;
    if (*width == 0) return PyBytes_FromStringAndSize(NULL, 0);
    if (n_docs > PY_SSIZE_T_MAX / 4 / widest) return PyErr_NoMemory();
    PyObject *out = PyBytes_FromStringAndSize(NULL, n_docs * widest * 4);
    if (out == NULL) return NULL;
    int32_t *cells = (int32_t *)PyBytes_AS_STRING(out); /* bytes data is aligned enough for int32 */
    for (Py_ssize_t i = 0; i < n_docs; i++) {
        Py_ssize_t len = row_start[i + 1] - row_start[i];
        memcpy(cells + i * widest, p->flat.items + row_start[i], (size_t)len * 4);
        for (Py_ssize_t j = len; j < widest; j++) cells[i * widest + j] = -1;
    }
    return out;
}

/* Everything prepare() returns, from the per-document arrays (hour_of_doc: first-seen order). */
static PyObject *prepared(Prep *p, PyObject *uids, const int32_t *hour_of_doc, Hours *hours,
                          const Py_ssize_t *row_start, Py_ssize_t n_docs) {
    Py_ssize_t n_hours = hours->n, width = 0;
    int32_t *rank = PyMem_New(int32_t, n_hours + 1); /* first-seen index -> sorted index */
    long long *sorted = PyMem_New(long long, n_hours + 1);
    PyObject *hour_list = PyList_New(n_hours), *codes = NULL, *matrix = NULL, *result = NULL;
    if (rank == NULL || sorted == NULL || hour_list == NULL) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        goto done;
    }
    if (n_hours) memcpy(sorted, hours->hours, (size_t)n_hours * sizeof *sorted);
    qsort(sorted, (size_t)n_hours, sizeof *sorted, compare_hours);
    for (Py_ssize_t k = 0; k < n_hours; k++) {
        Py_ssize_t lo = 0, hi = n_hours - 1; /* distinct values: the one equal is found */
        while (lo < hi) {
            Py_ssize_t mid = (lo + hi) / 2;
            if (sorted[mid] < hours->hours[k]) lo = mid + 1;
            else hi = mid;
        }
        rank[k] = (int32_t)lo;
        PyObject *hour = PyLong_FromLongLong(sorted[k]);
        if (hour == NULL) goto done;
        PyList_SET_ITEM(hour_list, k, hour);
    }
    codes = PyBytes_FromStringAndSize(NULL, n_docs * 4);
    if (codes == NULL) goto done;
    int32_t *out = (int32_t *)PyBytes_AS_STRING(codes);
    for (Py_ssize_t i = 0; i < n_docs; i++) out[i] = hour_of_doc[i] < 0 ? -1 : rank[hour_of_doc[i]];
    matrix = code_matrix(p, row_start, n_docs, &width);
    if (matrix == NULL) goto done;
    result = Py_BuildValue("(OOOOnOO)", uids, codes, hour_list, matrix, width, p->code_dims, p->code_values);
done:
    PyMem_Free(rank);
    PyMem_Free(sorted);
    Py_XDECREF(hour_list);
    Py_XDECREF(codes);
    Py_XDECREF(matrix);
    return result;
}

/* One document: its user id into uids[i], its hour into hour_of_doc[i], its codes (want_dims).
 * 0, or -1 with *unusual (Python decides) or with an error set. */
static int prepare_doc(Prep *p, PyObject *doc, int counted, PyObject *keys[2], int want_dims, Hours *hours,
                       PyObject *uids, Py_ssize_t i, int32_t *hour_of_doc, int *unusual) {
    if (!PyDict_CheckExact(doc)) {
        if (doc == Py_None && !counted) return 0; /* a stand-in for a rejected document */
        *unusual = 1;
        return -1;
    }
    PyObject *uid = PyDict_GetItemWithError(doc, keys[0]);
    Py_XINCREF(uid); /* our own: a key's __eq__ in the next lookup could drop it from doc */
    PyObject *last_seen = uid || !PyErr_Occurred() ? PyDict_GetItemWithError(doc, keys[1]) : NULL;
    Py_XINCREF(last_seen);
    int rc = 0;
    long long hour;
    if (PyErr_Occurred()) {
        *unusual = 1;
        rc = -1;
    } else if (uid == NULL || !PyUnicode_CheckExact(uid) || PyUnicode_GET_LENGTH(uid) == 0 || last_seen == NULL ||
               !PyUnicode_CheckExact(last_seen)) {
        if (counted) { /* Python raises the error naming it */
            *unusual = 1;
            rc = -1;
        }
    } else if (hour_of(last_seen, &hour) < 0) {
        *unusual = 1; /* Python raises, or reads a spelling we do not */
        rc = -1;
    } else {
        Py_ssize_t k = hour_index(hours, hour);
        if (k < 0) {
            PyErr_NoMemory();
            rc = -1;
        } else {
            hour_of_doc[i] = (int32_t)k;
            PyList_SetItem(uids, i, Py_NewRef(uid)); /* drops the placeholder */
            if (want_dims) rc = doc_codes(p, doc, unusual);
        }
    }
    Py_XDECREF(uid);
    Py_XDECREF(last_seen);
    return rc;
}

static PyObject *prepare(PyObject *self, PyObject *args) {
    PyObject *doc_seq, *dim_list, *path_list;
    Py_buffer uni;
    int want_dims;
    if (!PyArg_ParseTuple(args, "Oy*O!O!p:prepare", &doc_seq, &uni, &PyList_Type, &dim_list, &PyList_Type,
                          &path_list, &want_dims))
        return NULL;
    Prep p;
    memset(&p, 0, sizeof p);
    Hours hours = {0};
    PyObject *docs = NULL, *uids = NULL, *empty = NULL, *result = NULL, *keys[2] = {NULL, NULL};
    Py_ssize_t *row_start = NULL, n_docs = 0;
    int32_t *hour_of_doc = NULL;
    int unusual = 0;
    if (!PyList_CheckExact(doc_seq) && !PyTuple_CheckExact(doc_seq)) {
        unusual = 1;
        goto done;
    }
    docs = PySequence_Tuple(doc_seq); /* a copy: Python code (a key's __eq__) must not shrink it */
    p.dims = docs ? PyList_AsTuple(dim_list) : NULL;
    p.paths = p.dims ? PyList_AsTuple(path_list) : NULL;
    if (p.paths == NULL) goto done;
    n_docs = PyTuple_GET_SIZE(docs);
    Py_ssize_t n_dims = PyTuple_GET_SIZE(p.dims);
    if (uni.len % 8 || uni.len / 8 != (n_docs + 63) / 64 || PyTuple_GET_SIZE(p.paths) != n_dims) {
        PyErr_SetString(PyExc_ValueError, "prepare: inconsistent sizes");
        goto done;
    }
    for (Py_ssize_t d = 0; d < n_dims; d++) {
        PyObject *parts = PyTuple_GET_ITEM(p.paths, d);
        if (!PyTuple_CheckExact(parts) || PyTuple_GET_SIZE(parts) == 0) {
            PyErr_SetString(PyExc_TypeError, "prepare: a path is not a non-empty tuple");
            goto done;
        }
    }
    uids = PyList_New(n_docs);
    empty = PyUnicode_FromStringAndSize(NULL, 0);
    keys[0] = PyUnicode_InternFromString("user_id");
    keys[1] = PyUnicode_InternFromString("last_seen");
    p.code_of = PyList_New(n_dims);
    p.code_dims = PyList_New(0);
    p.code_values = PyList_New(0);
    row_start = PyMem_New(Py_ssize_t, n_docs + 1);
    hour_of_doc = PyMem_New(int32_t, n_docs + 1);
    if (!uids || !empty || !keys[0] || !keys[1] || !p.code_of || !p.code_dims || !p.code_values || !row_start ||
        !hour_of_doc) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n_docs; i++) PyList_SET_ITEM(uids, i, Py_NewRef(empty));
    for (Py_ssize_t d = 0; d < n_dims; d++) {
        PyObject *code_of = PyDict_New();
        if (code_of == NULL) goto done;
        PyList_SET_ITEM(p.code_of, d, code_of);
    }
    const unsigned char *matched = uni.buf; /* little-endian words: document i is byte i / 8, bit i % 8 */
    for (Py_ssize_t i = 0; i < n_docs; i++) {
        row_start[i] = p.flat.len;
        hour_of_doc[i] = -1;
        if (prepare_doc(&p, PyTuple_GET_ITEM(docs, i), (matched[i / 8] >> (i % 8)) & 1, keys, want_dims, &hours,
                        uids, i, hour_of_doc, &unusual) < 0)
            goto done;
    }
    row_start[n_docs] = p.flat.len;
    result = prepared(&p, uids, hour_of_doc, &hours, row_start, n_docs);
done:
    if (unusual) { /* not an error: the caller runs the Python loop, which raises or reads it */
        PyErr_Clear();
        Py_CLEAR(result);
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&uni);
    Py_XDECREF(docs);
    Py_XDECREF(uids);
    Py_XDECREF(empty);
    Py_XDECREF(keys[0]);
    Py_XDECREF(keys[1]);
    Py_XDECREF(p.dims);
    Py_XDECREF(p.paths);
    Py_XDECREF(p.code_of);
    Py_XDECREF(p.code_dims);
    Py_XDECREF(p.code_values);
    PyMem_Free(p.flat.items);
    PyMem_Free(p.stamp);
    PyMem_Free(hours.hours);
    PyMem_Free(row_start);
    PyMem_Free(hour_of_doc);
    return result;
}

static PyMethodDef methods[] = {
    {"pack_members", pack_members, METH_VARARGS, "Concatenate the cached bytes of each member (see the module)."},
    {"emit", emit, METH_VARARGS, "Fill a CounterBatch's dicts from per-rule document masks (see the module)."},
    {"prepare", prepare, METH_VARARGS, "The per-document step of aggregate_masks for plain dicts, or None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_aggregate",
    .m_doc = "C twins of aggregate_masks' per-document and emit steps.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__aggregate(void) {
    const uint16_t one = 1;
    if (*(const uint8_t *)&one != 1) { /* the masks are little-endian words */
        PyErr_SetString(PyExc_ImportError, "_aggregate needs a little-endian host");
        return NULL;
    }
    if (PyType_Ready(&SeenUsersType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "SeenUsers", (PyObject *)&SeenUsersType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
