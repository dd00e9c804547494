/*
 * C twin of rules_service.normalize._fast_document (the Python function is the reference; tests
 * compare both on the same inputs, byte for byte once serialised by orjson).
 *
 * Why: the stream normalises every bid; the Python happy path cost ~9 us per bid on top of
 * orjson.loads. Here the same dict lookups and type checks run without the interpreter.
 *
 * fast_document(bid, log_timestamp_ms, now_ms) -> dict | None
 *
 *   bid must be a dict (the parsed BidRequest). Returns the user document _fast_document returns
 *   (same keys in the same order, the same value objects or equal ones of the same types), or None
 *   where _fast_document returns None ("not sure: ask the careful path"). One documented widening:
 *   an ext.received_at ISO string is only understood in the exact shape YYYY-MM-DDTHH:MM:SS.mmmZ
 *   with ASCII digits (what exchanges send); other shapes that datetime.fromisoformat happens to
 *   accept (week dates, ...) give None, and the careful path decides.
 *
 * The checks follow _fast_document field by field: a value is looked at only where the Python code
 * looks at it (device.langb only without device.language, user.geo's position only without a
 * usable device.geo one, site.cat only without app.cat, banner.format only without w or h), so
 * garbage in a field Python ignores does not turn a document into None.
 *
 * document_from_json(raw, log_timestamp_ms, now_ms) -> dict | None
 *
 *   fast_document(orjson.loads(raw), ...) without building the whole bid: one scan of the bytes
 *   validates all of it and keeps only what fast_document reads. None whenever the bytes step
 *   outside the strict subset of JSON it handles (see its section below): then
 *   normalize.normalise_message takes its usual lane (orjson.loads, fast_document, careful path).
 *
 * Module state (set once at import, read-only afterwards): the interned key strings, the
 * schema's GENDERS and DEVICE_TYPES dicts (the same objects the Python lane reads), the age band
 * of each age 0..MAX_AGE (from schema.age_band) and the time module (time.time() is looked up at
 * call time, as Python does, so tests can patch the clock). One cache changes between calls: the
 * word cache of document_from_json (cached_word), which hands out equal str objects it made
 * before; strings are immutable, so sharing one is invisible but for `is`.
 *
 * Every object held across a dict lookup is an owned reference: a lookup may run Python code
 * (__eq__ of an exotic key) that could change the bid.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* keep in step with rules_service/normalize.py (the tests compare them via the module attributes) */
#define MIN_EVENT_MS 946684800000LL  /* 2000-01-01 */
#define MAX_EVENT_MS 4102444800000LL /* 2100-01-01 */
#define MAX_AGE 120
#define MAX_SLOT_SIZE 2147483647LL

enum { ERR = -1, BAIL = 0, OK = 1 }; /* ERR: exception set; BAIL: return None */

/* The word cache (cached_word): slots, and the longest string kept there. */
#define WORD_SLOTS 4096
#define WORD_MAX_LEN 40

/* key strings: bid fields first, then document fields that are not also bid fields */
#define KEY_NAMES(X)                                                                              \
    X(USER, "user") X(DEVICE, "device") X(EXT, "ext") X(ID, "id") X(IFA, "ifa")                   \
    X(RECEIVED_AT, "received_at") X(EXCHANGE, "exchange") X(YOB, "yob") X(GENDER, "gender")       \
    X(OCCUPATION, "occupation") X(KEYWORDS, "keywords") X(KWARRAY, "kwarray") X(DATA, "data")     \
    X(SEGMENT, "segment") X(NAME, "name") X(GEO, "geo") X(LANGUAGE, "language") X(LANGB, "langb") \
    X(OS, "os") X(OSV, "osv") X(MAKE, "make") X(MODEL, "model") X(CARRIER, "carrier")             \
    X(DEVICETYPE, "devicetype") X(LAT, "lat") X(LON, "lon") X(CITY, "city") X(ZIP, "zip")         \
    X(REGION, "region") X(COUNTRY, "country") X(APP, "app") X(SITE, "site") X(BUNDLE, "bundle")   \
    X(DOMAIN, "domain") X(CAT, "cat") X(IMP, "imp") X(BANNER, "banner") X(W, "w") X(H, "h")       \
    X(FORMAT, "format") X(USER_ID, "user_id") X(AGE, "age") X(AGE_BAND, "age_band")               \
    X(INTERESTS, "interests") X(OS_VERSION, "os_version") X(TYPE, "type")                         \
    X(LOCATION, "location") X(POSTCODE, "postcode") X(PUBLISHER, "publisher")                     \
    X(CATEGORY, "category") X(AD_SLOT, "ad_slot") X(LAST_SEEN, "last_seen")

#define KEY_ENUM(name, text) K_##name,
#define KEY_TEXT(name, text) text,
enum { KEY_NAMES(KEY_ENUM) K_COUNT };
static const char *const KEY_TEXTS[K_COUNT] = {KEY_NAMES(KEY_TEXT)};

typedef struct {
    PyObject *keys[K_COUNT];
    PyObject *genders;      /* schema.GENDERS */
    PyObject *device_types; /* schema.DEVICE_TYPES */
    PyObject *age_bands[MAX_AGE + 1]; /* schema.age_band(age): str or None */
    PyObject *time_module;
    PyObject *words[WORD_SLOTS]; /* see cached_word */
} State;

/* The parts of one document (all owned, NULL = absent) and the bid's sub-objects kept across steps. */
typedef struct {
    PyObject *user, *device, *ext, *user_geo, *device_geo;
    PyObject *user_id, *age, *band, *gender, *occupation, *interests, *language, *dev, *geo, *publisher,
        *exchange, *slot, *last_seen;
} Doc;

static void doc_clear(Doc *doc) {
    PyObject **all[] = {&doc->user, &doc->device, &doc->ext, &doc->user_geo, &doc->device_geo,
                        &doc->user_id, &doc->age, &doc->band, &doc->gender, &doc->occupation,
                        &doc->interests, &doc->language, &doc->dev, &doc->geo, &doc->publisher,
                        &doc->exchange, &doc->slot, &doc->last_seen};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) Py_CLEAR(*all[i]);
}

/* d.get(key): borrowed, Py_None when absent; NULL only with an exception set. */
static inline PyObject *get(PyObject *d, PyObject *key) {
    PyObject *v = PyDict_GetItemWithError(d, key);
    if (v == NULL && !PyErr_Occurred()) return Py_None;
    return v;
}

#define GET(var, d, k)                            \
    do {                                          \
        (var) = get((d), st->keys[(k)]);          \
        if ((var) == NULL) return ERR;            \
    } while (0)

#define IS_STR(v) PyUnicode_CheckExact(v)
#define IS_INT(v) PyLong_CheckExact(v) /* exact: bool is not an int here, as type(x) is int */

/* An optional non-empty string field: OK with *out a new reference or NULL (absent, null, ""),
 * BAIL for any other type. */
static int opt_str(PyObject *v, PyObject **out) {
    *out = NULL;
    if (v == Py_None) return OK;
    if (!IS_STR(v)) return BAIL;
    if (PyUnicode_GET_LENGTH(v) > 0) *out = Py_NewRef(v);
    return OK;
}

/* d[key] = value, creating *d on first use (documents omit empty objects). */
static int put(PyObject **d, PyObject *key, PyObject *value) {
    if (*d == NULL && (*d = PyDict_New()) == NULL) return ERR;
    return PyDict_SetItem(*d, key, value) < 0 ? ERR : OK;
}

/* ---- time --------------------------------------------------------------------------------- */

/* Proleptic Gregorian calendar <-> days since 1970-01-01 (H. Hinnant's algorithms), as gmtime. */
static long long days_from_civil(long long y, unsigned m, unsigned d) {
    y -= m <= 2;
    long long era = (y >= 0 ? y : y - 399) / 400;
    unsigned yoe = (unsigned)(y - era * 400);
    unsigned doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
    unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + (long long)doe - 719468;
}

static void civil_from_days(long long z, long long *y, unsigned *m, unsigned *d) {
    z += 719468;
    long long era = (z >= 0 ? z : z - 146096) / 146097;
    unsigned doe = (unsigned)(z - era * 146097);
    unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    unsigned mp = (5 * doy + 2) / 153;
    *d = doy - (153 * mp + 2) / 5 + 1;
    *m = mp < 10 ? mp + 3 : mp - 9;
    *y = (long long)yoe + era * 400 + (*m <= 2);
}

static unsigned days_in_month(long long y, unsigned m) {
    static const unsigned char days[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    int leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    return days[m - 1] + (m == 2 && leap);
}

static unsigned digits(const char *p, int n) {
    unsigned v = 0;
    for (int i = 0; i < n; i++) v = v * 10 + (unsigned)(p[i] - '0');
    return v;
}

/* "YYYY-MM-DDTHH:MM:SS.mmmZ" with ASCII digits -> epoch millis, computed as the Python lane does
 * (float seconds * 1000, truncated) so rounding is identical. BAIL on any other shape, an invalid
 * date or time, or a year outside 2000..2099 (an implausible time: Python bails on those too). */
static int iso_z_ms(PyObject *text, long long *ms) {
    static const char shape[] = "dddd-dd-ddTdd:dd:dd.dddZ";
    if (!PyUnicode_IS_ASCII(text)) return BAIL;
    const char *p = (const char *)PyUnicode_1BYTE_DATA(text);
    for (int i = 0; i < 24; i++) {
        if (shape[i] == 'd' ? (p[i] < '0' || p[i] > '9') : p[i] != shape[i]) return BAIL;
    }
    long long year = digits(p, 4);
    unsigned month = digits(p + 5, 2), day = digits(p + 8, 2), hour = digits(p + 11, 2);
    unsigned minute = digits(p + 14, 2), second = digits(p + 17, 2), milli = digits(p + 20, 3);
    if (year < 2000 || year > 2099 || month < 1 || month > 12 || day < 1 || day > days_in_month(year, month)
        || hour > 23 || minute > 59 || second > 59)
        return BAIL;
    long long seconds = days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second;
    long long micros = seconds * 1000000 + milli * 1000; /* < 2^53: exact as a double */
    *ms = (long long)((double)micros / 1000000.0 * 1000.0);
    return OK;
}

/* ext.received_at as a string: ISO (24 characters) or ASCII digits; anything else BAILs. */
static int received_text_ms(PyObject *text, long long *ms) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    if (n == 24) return iso_z_ms(text, ms);
    if (n == 0 || !PyUnicode_IS_ASCII(text)) return BAIL;
    const char *p = (const char *)PyUnicode_1BYTE_DATA(text);
    Py_ssize_t i = 0;
    for (Py_ssize_t j = 0; j < n; j++) {
        if (p[j] < '0' || p[j] > '9') return BAIL;
    }
    while (i < n - 1 && p[i] == '0') i++; /* leading zeros do not count against the length */
    if (n - i > 13) return BAIL; /* >= 10^13: beyond 2100 */
    long long v = 0;
    for (; i < n; i++) v = v * 10 + (p[i] - '0');
    *ms = v;
    return OK;
}

/* An exact int as long long; BAIL when it does not fit (then it is implausible anyway). */
static int int_value(PyObject *v, long long *out) {
    int overflow;
    *out = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow) return BAIL;
    if (*out == -1 && PyErr_Occurred()) return ERR;
    return OK;
}

/* int(time.time() * 1000), with time.time looked up now (tests patch it). */
static int clock_ms(State *st, long long *ms) {
    PyObject *now = PyObject_CallMethod(st->time_module, "time", NULL);
    if (now == NULL) return ERR;
    PyObject *thousand = PyLong_FromLong(1000);
    PyObject *product = thousand ? PyNumber_Multiply(now, thousand) : NULL;
    Py_DECREF(now);
    Py_XDECREF(thousand);
    PyObject *whole = product ? PyNumber_Long(product) : NULL;
    Py_XDECREF(product);
    if (whole == NULL) return ERR;
    int rc = int_value(whole, ms);
    Py_DECREF(whole);
    return rc;
}

/* The event time (ext.received_at, else the log timestamp, else now) and ext.exchange. */
static int take_event_ms(State *st, Doc *doc, PyObject *log_ms, PyObject *now_ms, long long *ms) {
    int have = 0, rc;
    if (doc->ext != NULL) {
        PyObject *received, *exchange;
        GET(received, doc->ext, K_RECEIVED_AT);
        if (IS_INT(received)) {
            if ((rc = int_value(received, ms)) != OK) return rc;
            have = 1;
        } else if (received != Py_None) {
            if (!IS_STR(received)) return BAIL;
            if ((rc = received_text_ms(received, ms)) != OK) return rc;
            have = 1;
        }
        GET(exchange, doc->ext, K_EXCHANGE);
        if ((rc = opt_str(exchange, &doc->exchange)) != OK) return rc;
    }
    if (!have) {
        PyObject *source = log_ms != Py_None ? log_ms : now_ms != Py_None ? now_ms : NULL;
        if (source == NULL) {
            if ((rc = clock_ms(st, ms)) != OK) return rc;
        } else {
            if (!IS_INT(source)) return BAIL;
            if ((rc = int_value(source, ms)) != OK) return rc;
        }
    }
    return MIN_EVENT_MS <= *ms && *ms < MAX_EVENT_MS ? OK : BAIL;
}

/* last_seen "YYYY-MM-DDTHH:MM:SS.mmmZ" of a plausible time, and its UTC year. */
static PyObject *format_last_seen(long long ms, long long *year) {
    unsigned month, day;
    civil_from_days(ms / 86400000, year, &month, &day);
    long long in_day = ms % 86400000;
    unsigned fields[] = {(unsigned)(in_day / 3600000), (unsigned)(in_day / 60000 % 60),
                         (unsigned)(in_day / 1000 % 60)};
    unsigned milli = (unsigned)(in_day % 1000);
    PyObject *text = PyUnicode_New(24, 127);
    if (text == NULL) return NULL;
    char *p = (char *)PyUnicode_1BYTE_DATA(text);
    unsigned y = (unsigned)*year;
    p[0] = (char)('0' + y / 1000), p[1] = (char)('0' + y / 100 % 10), p[2] = (char)('0' + y / 10 % 10);
    p[3] = (char)('0' + y % 10), p[4] = '-';
    p[5] = (char)('0' + month / 10), p[6] = (char)('0' + month % 10), p[7] = '-';
    p[8] = (char)('0' + day / 10), p[9] = (char)('0' + day % 10), p[10] = 'T';
    for (int i = 0; i < 3; i++) {
        p[11 + 3 * i] = (char)('0' + fields[i] / 10);
        p[12 + 3 * i] = (char)('0' + fields[i] % 10);
        p[13 + 3 * i] = i < 2 ? ':' : '.';
    }
    p[20] = (char)('0' + milli / 100), p[21] = (char)('0' + milli / 10 % 10), p[22] = (char)('0' + milli % 10);
    p[23] = 'Z';
    return text;
}

/* ---- user ---------------------------------------------------------------------------------- */

/* Distinct non-empty strings in first-seen order (list(dict.fromkeys(...)) without ""): a linear
 * scan while short, a set once longer, so a huge keyword list stays linear. */
typedef struct {
    PyObject *list, *seen;
} Unique;

static int same_str(PyObject *a, PyObject *b) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(a);
    if (a == b) return 1;
    if (n != PyUnicode_GET_LENGTH(b) || PyUnicode_KIND(a) != PyUnicode_KIND(b)) return 0;
    return memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b), (size_t)n * PyUnicode_KIND(a)) == 0;
}

/* Adds s (a new reference, stolen); "" is dropped. */
static int unique_add(Unique *u, PyObject *s) {
    if (s == NULL) return ERR;
    if (PyUnicode_GET_LENGTH(s) == 0) {
        Py_DECREF(s);
        return OK;
    }
    if (u->list == NULL && (u->list = PyList_New(0)) == NULL) goto fail;
    if (u->seen != NULL) {
        int found = PySet_Contains(u->seen, s);
        if (found < 0 || (!found && PySet_Add(u->seen, s) < 0)) goto fail;
        if (found) goto done;
    } else {
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(u->list); i++) {
            if (same_str(PyList_GET_ITEM(u->list, i), s)) goto done;
        }
    }
    if (PyList_Append(u->list, s) < 0) goto fail;
    if (u->seen == NULL && PyList_GET_SIZE(u->list) > 8 && (u->seen = PySet_New(u->list)) == NULL) goto fail;
done:
    Py_DECREF(s);
    return OK;
fail:
    Py_DECREF(s);
    return ERR;
}

/* s[start:end].strip() as a new reference (str.strip's whitespace: Py_UNICODE_ISSPACE). */
static PyObject *stripped(PyObject *s, Py_ssize_t start, Py_ssize_t end) {
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
    while (start < end && Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, start))) start++;
    while (end > start && Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, end - 1))) end--;
    return PyUnicode_Substring(s, start, end);
}

/* user.keywords split on commas, each part stripped. */
static int add_keywords(Unique *u, PyObject *keywords) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(keywords), start = 0;
    for (;;) {
        Py_ssize_t comma = PyUnicode_FindChar(keywords, ',', start, n, 1);
        if (comma == -2) return ERR;
        if (unique_add(u, stripped(keywords, start, comma < 0 ? n : comma)) != OK) return ERR;
        if (comma < 0) return OK;
        start = comma + 1;
    }
}

/* user.kwarray: every item an exact str (else BAIL), each non-empty one stripped. */
static int add_kwarray(Unique *u, PyObject *kwarray) {
    if (!PyList_CheckExact(kwarray)) return BAIL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(kwarray); i++) {
        if (!IS_STR(PyList_GET_ITEM(kwarray, i))) return BAIL;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(kwarray); i++) {
        PyObject *item = PyList_GET_ITEM(kwarray, i);
        if (PyUnicode_GET_LENGTH(item) > 0 && unique_add(u, stripped(item, 0, PyUnicode_GET_LENGTH(item))) != OK)
            return ERR;
    }
    return OK;
}

/* user.data[].segment[].name (data is held by the caller; its items are held while looked into). */
static int add_segments(State *st, Unique *u, PyObject *data) {
    if (!PyList_CheckExact(data)) return BAIL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(data); i++) {
        PyObject *provider = PyList_GET_ITEM(data, i), *segments;
        if (!PyDict_CheckExact(provider)) return BAIL;
        Py_INCREF(provider);
        segments = get(provider, st->keys[K_SEGMENT]);
        Py_XINCREF(segments);
        Py_DECREF(provider);
        if (segments == NULL) return ERR;
        int rc = OK;
        if (segments != Py_None && !PyList_CheckExact(segments)) rc = BAIL;
        for (Py_ssize_t j = 0; rc == OK && segments != Py_None && j < PyList_GET_SIZE(segments); j++) {
            PyObject *segment = PyList_GET_ITEM(segments, j), *name;
            if (!PyDict_CheckExact(segment)) {
                rc = BAIL;
                break;
            }
            Py_INCREF(segment);
            name = get(segment, st->keys[K_NAME]);
            if (name == NULL) rc = ERR;
            else if (IS_STR(name)) {
                if (PyUnicode_GET_LENGTH(name) > 0) rc = unique_add(u, stripped(name, 0, PyUnicode_GET_LENGTH(name)));
            } else if (name != Py_None)
                rc = BAIL;
            Py_DECREF(segment);
        }
        Py_DECREF(segments);
        if (rc != OK) return rc;
    }
    return OK;
}

/* interests: keywords, kwarray, data segment names; distinct, non-empty; absent when none. */
static int take_interests(State *st, Doc *doc) {
    PyObject *fields[3] = {NULL, NULL, NULL};
    const int keys[3] = {K_KEYWORDS, K_KWARRAY, K_DATA};
    Unique u = {NULL, NULL};
    int rc = OK;
    /* each field owned as soon as it is read: the next lookup may run Python code that empties user */
    for (int i = 0; rc == OK && i < 3; i++) {
        fields[i] = get(doc->user, st->keys[keys[i]]);
        if (fields[i] == NULL) rc = ERR;
        Py_XINCREF(fields[i]);
    }
    if (rc == OK && fields[0] != Py_None && !IS_STR(fields[0])) rc = BAIL; /* a list under the 2.5 name: careful path */
    if (rc == OK && fields[0] != Py_None) rc = add_keywords(&u, fields[0]);
    if (rc == OK && fields[1] != Py_None) rc = add_kwarray(&u, fields[1]);
    if (rc == OK && fields[2] != Py_None) rc = add_segments(st, &u, fields[2]);
    for (int i = 0; i < 3; i++) Py_XDECREF(fields[i]);
    Py_XDECREF(u.seen);
    if (rc == OK) doc->interests = u.list;
    else Py_XDECREF(u.list);
    return rc;
}

/* A str-keyed mapping lookup (GENDERS, DEVICE_TYPES): a new reference or NULL when absent/None. */
static int lookup_name(PyObject *table, PyObject *key, PyObject **out) {
    PyObject *name = PyDict_GetItemWithError(table, key);
    if (name == NULL) return PyErr_Occurred() ? ERR : OK;
    if (name != Py_None) *out = Py_NewRef(name);
    return OK;
}

static int take_user(State *st, Doc *doc, long long year) {
    PyObject *user = doc->user, *v;
    int rc;
    GET(v, user, K_YOB);
    if (v != Py_None) {
        long long yob;
        if (!IS_INT(v)) return BAIL;
        if ((rc = int_value(v, &yob)) != OK) return rc;
        if (yob > year || yob < year - MAX_AGE) return BAIL;
        if ((doc->age = PyLong_FromLongLong(year - yob)) == NULL) return ERR;
        PyObject *band = st->age_bands[year - yob];
        if (band != Py_None) doc->band = Py_NewRef(band);
    }
    GET(v, user, K_GENDER);
    if (v != Py_None) {
        if (!IS_STR(v)) return BAIL;
        Py_INCREF(v);
        rc = lookup_name(st->genders, v, &doc->gender);
        Py_DECREF(v);
        if (rc != OK) return rc;
    }
    GET(v, user, K_EXT);
    if (v != Py_None) {
        if (!PyDict_CheckExact(v)) return BAIL;
        Py_INCREF(v);
        PyObject *occupation = get(v, st->keys[K_OCCUPATION]);
        rc = occupation == NULL ? ERR : opt_str(occupation, &doc->occupation);
        Py_DECREF(v);
        if (rc != OK) return rc;
    }
    if ((rc = take_interests(st, doc)) != OK) return rc;
    GET(v, user, K_GEO);
    if (v != Py_None) {
        if (!PyDict_CheckExact(v)) return BAIL;
        doc->user_geo = Py_NewRef(v);
    }
    return OK;
}

/* ---- device, geo --------------------------------------------------------------------------- */

static int take_device(State *st, Doc *doc) {
    static const int sources[] = {K_OS, K_OSV, K_MAKE, K_MODEL, K_CARRIER};
    static const int targets[] = {K_OS, K_OS_VERSION, K_MAKE, K_MODEL, K_CARRIER};
    PyObject *device = doc->device, *v, *value;
    int rc;
    GET(v, device, K_LANGUAGE); /* device.language, else device.langb */
    if ((rc = opt_str(v, &doc->language)) != OK) return rc;
    if (doc->language == NULL) {
        GET(v, device, K_LANGB);
        if ((rc = opt_str(v, &doc->language)) != OK) return rc;
    }
    for (int i = 0; i < 5; i++) {
        GET(v, device, sources[i]);
        if ((rc = opt_str(v, &value)) != OK) return rc;
        if (value != NULL) {
            rc = put(&doc->dev, st->keys[targets[i]], value);
            Py_DECREF(value);
            if (rc != OK) return rc;
        }
    }
    GET(v, device, K_DEVICETYPE);
    if (v != Py_None) {
        if (!IS_INT(v)) return BAIL;
        value = NULL;
        Py_INCREF(v);
        rc = lookup_name(st->device_types, v, &value);
        Py_DECREF(v);
        if (rc != OK) return rc;
        if (value != NULL) {
            rc = put(&doc->dev, st->keys[K_TYPE], value);
            Py_DECREF(value);
            if (rc != OK) return rc;
        }
    }
    GET(v, device, K_GEO);
    if (v != Py_None) {
        if (!PyDict_CheckExact(v)) return BAIL;
        doc->device_geo = Py_NewRef(v);
    }
    return OK;
}

/* -limit <= x <= limit for an exact float or int, compared as Python compares them. */
static int within(PyObject *x, double limit) {
    if (PyFloat_CheckExact(x)) {
        double d = PyFloat_AS_DOUBLE(x);
        return -limit <= d && d <= limit;
    }
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(x, &overflow);
    return !overflow && -(long long)limit <= v && v <= (long long)limit;
}

#define IS_NUM(v) (PyFloat_CheckExact(v) || PyLong_CheckExact(v))

/* {"lat", "lon"} of one geo object into *geo when both are numbers in range; BAIL on a non-number. */
static int take_location(State *st, PyObject *source, PyObject **geo, int *found) {
    PyObject *lat, *lon;
    GET(lat, source, K_LAT);
    Py_INCREF(lat);
    lon = get(source, st->keys[K_LON]);
    int rc = lon == NULL ? ERR : OK;
    if (rc == OK && ((lat != Py_None && !IS_NUM(lat)) || (lon != Py_None && !IS_NUM(lon)))) rc = BAIL;
    if (rc == OK && lat != Py_None && lon != Py_None && within(lat, 90.0) && within(lon, 180.0)) {
        PyObject *location = PyDict_New();
        if (location == NULL || PyDict_SetItem(location, st->keys[K_LAT], lat) < 0
            || PyDict_SetItem(location, st->keys[K_LON], lon) < 0)
            rc = ERR;
        else
            rc = put(geo, st->keys[K_LOCATION], location);
        Py_XDECREF(location);
        *found = 1;
    }
    Py_DECREF(lat);
    return rc;
}

/* geo: device.geo's location else user.geo's, then each field from device.geo else user.geo. */
static int take_geo(State *st, Doc *doc) {
    static const int sources[] = {K_CITY, K_ZIP, K_REGION, K_COUNTRY};
    static const int targets[] = {K_CITY, K_POSTCODE, K_REGION, K_COUNTRY};
    int rc, found = 0;
    if (doc->device_geo != NULL && (rc = take_location(st, doc->device_geo, &doc->geo, &found)) != OK) return rc;
    if (!found && doc->user_geo != NULL && (rc = take_location(st, doc->user_geo, &doc->geo, &found)) != OK)
        return rc;
    for (int i = 0; i < 4; i++) {
        PyObject *v = Py_None, *value = NULL;
        if (doc->device_geo != NULL) GET(v, doc->device_geo, sources[i]);
        if ((rc = opt_str(v, &value)) != OK) return rc;
        if (value == NULL && doc->user_geo != NULL) {
            GET(v, doc->user_geo, sources[i]);
            if ((rc = opt_str(v, &value)) != OK) return rc;
        }
        if (value != NULL) {
            rc = put(&doc->geo, st->keys[targets[i]], value);
            Py_DECREF(value);
            if (rc != OK) return rc;
        }
    }
    return OK;
}

/* ---- publisher, ad slot -------------------------------------------------------------------- */

/* A category list: exact strs (else BAIL), distinct, no ""; *out NULL when that leaves nothing. */
static int take_category(PyObject *value, PyObject **out) {
    if (!PyList_CheckExact(value)) return BAIL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(value); i++) {
        if (!IS_STR(PyList_GET_ITEM(value, i))) return BAIL;
    }
    Unique u = {NULL, NULL};
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(value); i++) {
        if (unique_add(&u, Py_NewRef(PyList_GET_ITEM(value, i))) != OK) {
            Py_XDECREF(u.list);
            Py_XDECREF(u.seen);
            return ERR;
        }
    }
    Py_XDECREF(u.seen);
    *out = u.list;
    return OK;
}

/* app.bundle or site.domain into the publisher, and the source's cat when no category yet. */
static int take_source(State *st, PyObject *source, int name_key, PyObject **publisher, PyObject **category) {
    PyObject *v, *value;
    int rc;
    GET(v, source, name_key);
    if ((rc = opt_str(v, &value)) != OK) return rc;
    if (value != NULL) {
        rc = put(publisher, st->keys[name_key], value);
        Py_DECREF(value);
        if (rc != OK) return rc;
    }
    if (*category == NULL) {
        GET(v, source, K_CAT);
        if (v != Py_None) {
            Py_INCREF(v);
            rc = take_category(v, category);
            Py_DECREF(v);
        }
    }
    return rc;
}

static int take_publisher(State *st, PyObject *bid, Doc *doc) {
    PyObject *app, *site, *category = NULL;
    GET(app, bid, K_APP);
    if (app != Py_None && !PyDict_CheckExact(app)) return BAIL;
    Py_INCREF(app);
    site = get(bid, st->keys[K_SITE]);
    int rc = site == NULL ? ERR : site != Py_None && !PyDict_CheckExact(site) ? BAIL : OK;
    Py_XINCREF(site);
    if (rc == OK && app != Py_None) rc = take_source(st, app, K_BUNDLE, &doc->publisher, &category);
    if (rc == OK && site != Py_None) rc = take_source(st, site, K_DOMAIN, &doc->publisher, &category);
    if (rc == OK && category != NULL) rc = put(&doc->publisher, st->keys[K_CATEGORY], category);
    Py_XDECREF(category);
    Py_DECREF(app);
    Py_XDECREF(site);
    return rc;
}

/* An optional banner size: an exact int (else BAIL) kept as a new reference in *out. */
static int take_size(PyObject *v, PyObject **out) {
    if (v == Py_None) return OK;
    if (!IS_INT(v)) return BAIL;
    *out = Py_NewRef(v);
    return OK;
}

static int in_slot_range(PyObject *size) {
    long long v;
    int overflow;
    if (size == NULL) return 1;
    v = PyLong_AsLongLongAndOverflow(size, &overflow);
    return !overflow && 0 <= v && v <= MAX_SLOT_SIZE;
}

/* The first banner's w/h (the banner and its first format held by the caller). */
static int banner_sizes(State *st, PyObject *banner, PyObject **w, PyObject **h) {
    PyObject *v, *formats, *first;
    int rc;
    GET(v, banner, K_W);
    if ((rc = take_size(v, w)) != OK) return rc;
    GET(v, banner, K_H);
    if ((rc = take_size(v, h)) != OK) return rc;
    if (*w != NULL && *h != NULL) return OK;
    GET(formats, banner, K_FORMAT);
    if (formats == Py_None) return OK;
    if (!PyList_CheckExact(formats)) return BAIL;
    if (PyList_GET_SIZE(formats) == 0) return OK;
    first = PyList_GET_ITEM(formats, 0);
    if (!PyDict_CheckExact(first)) return BAIL;
    Py_INCREF(first);
    rc = OK;
    if (*w == NULL) {
        v = get(first, st->keys[K_W]);
        rc = v == NULL ? ERR : take_size(v, w);
    }
    if (rc == OK && *h == NULL) {
        v = get(first, st->keys[K_H]);
        rc = v == NULL ? ERR : take_size(v, h);
    }
    Py_DECREF(first);
    return rc;
}

static int take_slot(State *st, PyObject *bid, Doc *doc) {
    PyObject *imps, *imp, *banner, *w = NULL, *h = NULL;
    GET(imps, bid, K_IMP);
    if (imps == Py_None) return OK;
    if (!PyList_CheckExact(imps)) return BAIL;
    if (PyList_GET_SIZE(imps) == 0) return OK;
    imp = PyList_GET_ITEM(imps, 0);
    if (!PyDict_CheckExact(imp)) return BAIL;
    Py_INCREF(imp);
    banner = get(imp, st->keys[K_BANNER]);
    Py_XINCREF(banner);
    Py_DECREF(imp);
    if (banner == NULL) return ERR;
    int rc = banner == Py_None ? OK : PyDict_CheckExact(banner) ? banner_sizes(st, banner, &w, &h) : BAIL;
    Py_DECREF(banner);
    if (rc == OK && !(in_slot_range(w) && in_slot_range(h))) rc = BAIL;
    if (rc == OK && w != NULL) rc = put(&doc->slot, st->keys[K_W], w);
    if (rc == OK && h != NULL) rc = put(&doc->slot, st->keys[K_H], h);
    Py_XDECREF(w);
    Py_XDECREF(h);
    return rc;
}

/* ---- the document -------------------------------------------------------------------------- */

static int take_ids(State *st, PyObject *bid, Doc *doc) {
    PyObject *v;
    const int keys[3] = {K_USER, K_DEVICE, K_EXT};
    PyObject **slots[3] = {&doc->user, &doc->device, &doc->ext};
    for (int i = 0; i < 3; i++) {
        GET(v, bid, keys[i]);
        if (v != Py_None) {
            if (!PyDict_CheckExact(v)) return BAIL;
            *slots[i] = Py_NewRef(v);
        }
    }
    if (doc->user != NULL) { /* user.id, else device.ifa */
        GET(v, doc->user, K_ID);
        if (opt_str(v, &doc->user_id) != OK) return BAIL;
    }
    if (doc->user_id == NULL) {
        if (doc->device == NULL) return BAIL;
        GET(v, doc->device, K_IFA);
        if (!IS_STR(v) || PyUnicode_GET_LENGTH(v) == 0) return BAIL;
        doc->user_id = Py_NewRef(v);
    }
    return OK;
}

static int take_all(State *st, PyObject *bid, PyObject *log_ms, PyObject *now_ms, Doc *doc) {
    long long ms, year;
    int rc;
    if ((rc = take_ids(st, bid, doc)) != OK) return rc;
    if ((rc = take_event_ms(st, doc, log_ms, now_ms, &ms)) != OK) return rc;
    if ((doc->last_seen = format_last_seen(ms, &year)) == NULL) return ERR;
    if (doc->user != NULL && (rc = take_user(st, doc, year)) != OK) return rc;
    if (doc->device != NULL && (rc = take_device(st, doc)) != OK) return rc;
    if ((doc->device_geo != NULL || doc->user_geo != NULL) && (rc = take_geo(st, doc)) != OK) return rc;
    if ((rc = take_publisher(st, bid, doc)) != OK) return rc;
    return take_slot(st, bid, doc);
}

/* The document dict, keys in the careful path's order. */
static PyObject *assemble(State *st, Doc *doc) {
    const int keys[] = {K_USER_ID, K_AGE, K_AGE_BAND, K_GENDER, K_OCCUPATION, K_INTERESTS, K_LANGUAGE,
                        K_DEVICE, K_GEO, K_PUBLISHER, K_EXCHANGE, K_AD_SLOT, K_LAST_SEEN};
    PyObject *values[] = {doc->user_id, doc->age, doc->band, doc->gender, doc->occupation, doc->interests,
                          doc->language, doc->dev, doc->geo, doc->publisher, doc->exchange, doc->slot,
                          doc->last_seen};
    PyObject *result = PyDict_New();
    if (result == NULL) return NULL;
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        if (values[i] != NULL && PyDict_SetItem(result, st->keys[keys[i]], values[i]) < 0) {
            Py_DECREF(result);
            return NULL;
        }
    }
    return result;
}

/* The document of a bid dict (held by the caller), None, or NULL with an exception set. */
static PyObject *document_of(State *st, PyObject *bid, PyObject *log_ms, PyObject *now_ms) {
    Doc doc;
    memset(&doc, 0, sizeof doc);
    int rc = take_all(st, bid, log_ms, now_ms, &doc);
    PyObject *result = rc == OK ? assemble(st, &doc) : rc == BAIL ? Py_NewRef(Py_None) : NULL;
    doc_clear(&doc);
    return result;
}

static PyObject *fast_document(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "fast_document(bid, log_timestamp_ms, now_ms) takes 3 arguments");
        return NULL;
    }
    if (!PyDict_CheckExact(args[0])) {
        PyErr_Format(PyExc_TypeError, "fast_document: bid must be a dict, not %.100s", Py_TYPE(args[0])->tp_name);
        return NULL;
    }
    Py_INCREF(args[0]); /* the caller's reference could go if Python code we run drops it */
    PyObject *result = document_of(PyModule_GetState(module), args[0], args[1], args[2]);
    Py_DECREF(args[0]);
    return result;
}

/* ---- document_from_json: the raw bytes straight to the document --------------------------- */

/*
 * document_from_json(raw, log_timestamp_ms, now_ms) -> dict | None
 *
 * Why: orjson.loads builds every value of a bid (~60 objects: user agents, IPs, page URLs, bid
 * floors ...) and the document reads a handful. Here one scan validates the whole message and
 * builds a minimal bid: only the objects and values fast_document reads (the SPECS below), in
 * dicts keyed by the same interned strings; fast_document's own code (take_all) then makes the
 * document. So a document from this lane is, by construction, the one fast_document makes of
 * orjson's dict, as long as the minimal bid holds the same values on every path it reads.
 *
 * It must never accept what orjson.loads rejects, so everything it skips is validated too, and it
 * says None ("use orjson.loads and the usual lanes") on anything outside a strict subset of JSON:
 *   - raw not bytes, a top level that is not an object, nesting deeper than MAX_DEPTH;
 *   - a backslash in a string it keeps or in a key of an object it keeps (escapes are only
 *     validated, in skipped strings; \u escapes of surrogates say None), a control character
 *     in any string, UTF-8 that is not strict RFC 3629 (orjson rejects it; Python agrees);
 *   - numbers with an exponent or longer than MAX_NUMBER bytes anywhere (so every number it
 *     accepts is finite, as orjson requires); a kept integer of more than 18 digits (orjson
 *     would give a float past 64 bits); kept floats go through PyOS_string_to_double, which is
 *     correctly rounded like orjson's reader;
 *   - an array or object where a kept scalar is read, or a container of the other kind where a
 *     kept container is read (fast_document would say None or the careful path decides).
 * Duplicate keys: the last one wins, as in orjson, because the minimal bid is filled with
 * PyDict_SetItem in document order. Only the first item of imp and of banner.format is kept
 * (fast_document reads no other); the rest of those arrays is validated and skipped.
 */

#define MAX_DEPTH 64
#define MAX_NUMBER 64

/* a scalar, a scalar worth the word cache, an object, every item of an array, its first */
enum { S_LEAF, S_WORD, S_OBJ, S_ALL, S_FIRST };

typedef struct Field Field;
typedef struct Spec {
    int kind;
    const struct Spec *item; /* S_ALL, S_FIRST: what each kept item is */
    const Field *fields;     /* S_OBJ: the keys kept, ended by a NULL name */
} Spec;
struct Field {
    const char *name;
    Py_ssize_t len; /* strlen(name) */
    int key;
    const Spec *spec;
};

static const Spec LEAF = {S_LEAF, NULL, NULL};
/* Values that repeat across bids (an OS, a city, an exchange; not ids or times): cached_word. */
static const Spec WORD = {S_WORD, NULL, NULL};
static const Spec WORDS = {S_ALL, &WORD, NULL};

static const Field GEO_FIELDS[] = {{"lat", 3, K_LAT, &LEAF}, {"lon", 3, K_LON, &LEAF}, {"city", 4, K_CITY, &WORD},
                                   {"zip", 3, K_ZIP, &WORD}, {"region", 6, K_REGION, &WORD},
                                   {"country", 7, K_COUNTRY, &WORD}, {NULL, 0, 0, NULL}};
static const Spec GEO = {S_OBJ, NULL, GEO_FIELDS};

static const Field SEGMENT_FIELDS[] = {{"name", 4, K_NAME, &WORD}, {NULL, 0, 0, NULL}};
static const Spec SEGMENT = {S_OBJ, NULL, SEGMENT_FIELDS};
static const Spec SEGMENTS = {S_ALL, &SEGMENT, NULL};
static const Field PROVIDER_FIELDS[] = {{"segment", 7, K_SEGMENT, &SEGMENTS}, {NULL, 0, 0, NULL}};
static const Spec PROVIDER = {S_OBJ, NULL, PROVIDER_FIELDS};
static const Spec PROVIDERS = {S_ALL, &PROVIDER, NULL};
static const Field USER_EXT_FIELDS[] = {{"occupation", 10, K_OCCUPATION, &WORD}, {NULL, 0, 0, NULL}};
static const Spec USER_EXT = {S_OBJ, NULL, USER_EXT_FIELDS};
static const Field USER_FIELDS[] = {
    {"id", 2, K_ID, &LEAF}, {"yob", 3, K_YOB, &LEAF}, {"gender", 6, K_GENDER, &LEAF}, {"ext", 3, K_EXT, &USER_EXT},
    {"keywords", 8, K_KEYWORDS, &LEAF}, {"kwarray", 7, K_KWARRAY, &WORDS}, {"data", 4, K_DATA, &PROVIDERS},
    {"geo", 3, K_GEO, &GEO}, {NULL, 0, 0, NULL}};
static const Spec USER = {S_OBJ, NULL, USER_FIELDS};

static const Field DEVICE_FIELDS[] = {
    {"ifa", 3, K_IFA, &LEAF}, {"language", 8, K_LANGUAGE, &WORD}, {"langb", 5, K_LANGB, &WORD}, {"os", 2, K_OS, &WORD},
    {"osv", 3, K_OSV, &WORD}, {"make", 4, K_MAKE, &WORD}, {"model", 5, K_MODEL, &WORD}, {"carrier", 7, K_CARRIER, &WORD},
    {"devicetype", 10, K_DEVICETYPE, &LEAF}, {"geo", 3, K_GEO, &GEO}, {NULL, 0, 0, NULL}};
static const Spec DEVICE = {S_OBJ, NULL, DEVICE_FIELDS};

static const Field EXT_FIELDS[] = {{"received_at", 11, K_RECEIVED_AT, &LEAF}, {"exchange", 8, K_EXCHANGE, &WORD},
                                   {NULL, 0, 0, NULL}};
static const Spec EXT = {S_OBJ, NULL, EXT_FIELDS};
static const Field APP_FIELDS[] = {{"bundle", 6, K_BUNDLE, &WORD}, {"cat", 3, K_CAT, &WORDS}, {NULL, 0, 0, NULL}};
static const Spec APP = {S_OBJ, NULL, APP_FIELDS};
static const Field SITE_FIELDS[] = {{"domain", 6, K_DOMAIN, &WORD}, {"cat", 3, K_CAT, &WORDS}, {NULL, 0, 0, NULL}};
static const Spec SITE = {S_OBJ, NULL, SITE_FIELDS};

static const Field FORMAT_FIELDS[] = {{"w", 1, K_W, &LEAF}, {"h", 1, K_H, &LEAF}, {NULL, 0, 0, NULL}};
static const Spec FORMAT = {S_OBJ, NULL, FORMAT_FIELDS};
static const Spec FORMATS = {S_FIRST, &FORMAT, NULL};
static const Field BANNER_FIELDS[] = {{"w", 1, K_W, &LEAF}, {"h", 1, K_H, &LEAF}, {"format", 6, K_FORMAT, &FORMATS},
                                      {NULL, 0, 0, NULL}};
static const Spec BANNER = {S_OBJ, NULL, BANNER_FIELDS};
static const Field IMP_FIELDS[] = {{"banner", 6, K_BANNER, &BANNER}, {NULL, 0, 0, NULL}};
static const Spec IMP = {S_OBJ, NULL, IMP_FIELDS};
static const Spec IMPS = {S_FIRST, &IMP, NULL};

static const Field BID_FIELDS[] = {{"user", 4, K_USER, &USER}, {"device", 6, K_DEVICE, &DEVICE}, {"ext", 3, K_EXT, &EXT},
                                   {"app", 3, K_APP, &APP}, {"site", 4, K_SITE, &SITE}, {"imp", 3, K_IMP, &IMPS},
                                   {NULL, 0, 0, NULL}};
static const Spec BID = {S_OBJ, NULL, BID_FIELDS};

typedef struct {
    const unsigned char *p, *end;
    int depth;
    State *st;
} Scan;

static inline void skip_ws(Scan *s) {
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\n' || *s->p == '\r' || *s->p == '\t')) s->p++;
}

/* One strict UTF-8 sequence (RFC 3629: no overlongs, no surrogates, nothing past U+10FFFF) at p;
 * its length, or 0 when invalid. */
static int utf8_length(const unsigned char *p, const unsigned char *end) {
    unsigned char c = p[0];
    int n;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) n = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        n = 3;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else
        return 0;
    if (end - p < n || p[1] < lo || p[1] > hi) return 0;
    for (int i = 2; i < n; i++) {
        if ((p[i] & 0xC0) != 0x80) return 0;
    }
    return n;
}

static int hex_value(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* One escape after the backslash at s->p (validated only; \u of a surrogate BAILs). */
static int skip_escape(Scan *s) {
    if (s->end - s->p < 2) return BAIL;
    unsigned char c = s->p[1];
    if (c == '"' || c == '\\' || c == '/' || c == 'b' || c == 'f' || c == 'n' || c == 'r' || c == 't') {
        s->p += 2;
        return OK;
    }
    if (c != 'u' || s->end - s->p < 6) return BAIL;
    int code = 0;
    for (int i = 2; i < 6; i++) {
        int h = hex_value(s->p[i]);
        if (h < 0) return BAIL;
        code = code * 16 + h;
    }
    if (code >= 0xD800 && code <= 0xDFFF) return BAIL;
    s->p += 6;
    return OK;
}

/* The end of the run of plain string bytes (printable ASCII but '"' and '\\') from p: eight bytes at
 * a time where the platform allows (strings are most of a bid's bytes). */
static inline const unsigned char *plain_run(const unsigned char *p, const unsigned char *end) {
#if defined(__GNUC__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
    while (end - p >= 8) {
        uint64_t w, quote, backslash;
        memcpy(&w, p, 8);
        quote = w ^ (ones * '"');
        backslash = w ^ (ones * '\\');
        /* the high bit of each byte that is '"', '\\', < 0x20 or >= 0x80 (bytes past the first such
         * one may be flagged wrongly by borrows: only the lowest flag, the first in memory, is used) */
        uint64_t special = (((quote - ones) & ~quote) | ((backslash - ones) & ~backslash)
                            | ((w - ones * 0x20) & ~w) | w) & highs;
        if (special) return p + (__builtin_ctzll(special) >> 3);
        p += 8;
    }
#endif
    while (p < end && *p >= 0x20 && *p < 0x80 && *p != '"' && *p != '\\') p++;
    return p;
}

/* A string whose opening quote is at s->p: *start and *len its raw bytes; *ascii whether all are
 * ASCII. With escapes_ok == 0 a backslash BAILs (a string we keep or a key we match). */
static int scan_string(Scan *s, int escapes_ok, const unsigned char **start, Py_ssize_t *len, int *ascii) {
    const unsigned char *p = ++s->p, *end = s->end;
    *ascii = 1;
    *start = p;
    for (;;) {
        p = plain_run(p, end);
        if (p >= end) return BAIL;
        unsigned char c = *p;
        if (c == '"') break;
        if (c < 0x20) return BAIL;
        if (c == '\\') {
            if (!escapes_ok) return BAIL;
            s->p = p;
            if (skip_escape(s) != OK) return BAIL;
            p = s->p;
            continue;
        }
        int n = utf8_length(p, end);
        if (n == 0) return BAIL;
        *ascii = 0;
        p += n;
    }
    *len = p - *start;
    s->p = p + 1;
    return OK;
}

/* A number at s->p: -?(0|[1-9][0-9]*)(.[0-9]+)? and no longer than MAX_NUMBER bytes; with out,
 * also its value (an int of at most 18 digits, or a float). Exponents BAIL. */
static int scan_number(Scan *s, PyObject **out) {
    const unsigned char *p = s->p, *end = s->end, *start = p;
    int is_float = 0;
    if (p < end && *p == '-') p++;
    const unsigned char *digits = p;
    if (p >= end || *p < '0' || *p > '9') return BAIL;
    if (*p == '0') p++;
    else
        while (p < end && *p >= '0' && *p <= '9') p++;
    Py_ssize_t int_digits = p - digits;
    if (p < end && *p == '.') {
        p++;
        if (p >= end || *p < '0' || *p > '9') return BAIL;
        while (p < end && *p >= '0' && *p <= '9') p++;
        is_float = 1;
    }
    if (p < end && (*p == 'e' || *p == 'E')) return BAIL;
    if (p - start > MAX_NUMBER) return BAIL;
    s->p = p;
    if (out == NULL) return OK;
    if (!is_float) {
        if (int_digits > 18) return BAIL;
        long long v = 0;
        for (const unsigned char *q = digits; q < p; q++) v = v * 10 + (*q - '0');
        *out = PyLong_FromLongLong(*start == '-' ? -v : v);
        return *out == NULL ? ERR : OK;
    }
    char buffer[MAX_NUMBER + 1];
    memcpy(buffer, start, (size_t)(p - start));
    buffer[p - start] = '\0';
    double d = PyOS_string_to_double(buffer, NULL, NULL);
    if (d == -1.0 && PyErr_Occurred()) return ERR;
    *out = PyFloat_FromDouble(d);
    return *out == NULL ? ERR : OK;
}

static int literal(Scan *s, const char *text, size_t n) {
    if ((size_t)(s->end - s->p) < n || memcmp(s->p, text, n) != 0) return BAIL;
    s->p += n;
    return OK;
}

static int skip_value(Scan *s);

/* The punctuation of objects and arrays, shared by the scanners that skip them and those that keep
 * them. DONE: the container closed (its bracket consumed); OK: an item follows. */
#define DONE 2

/* At an opening bracket: OK when an item follows, DONE when the container is empty, BAIL past
 * MAX_DEPTH. */
static int open_container(Scan *s, unsigned char close) {
    if (++s->depth > MAX_DEPTH) return BAIL;
    s->p++;
    skip_ws(s);
    if (s->p < s->end && *s->p == close) {
        s->p++;
        s->depth--;
        return DONE;
    }
    return OK;
}

/* After an item: OK when another follows (its comma consumed), DONE when the container closes,
 * BAIL on anything else. */
static int next_item(Scan *s, unsigned char close) {
    skip_ws(s);
    if (s->p >= s->end) return BAIL;
    if (*s->p == close) {
        s->p++;
        s->depth--;
        return DONE;
    }
    if (*s->p != ',') return BAIL;
    s->p++;
    skip_ws(s);
    return OK;
}

/* An object member's key and its colon (s->p at the key's quote); the key's raw bytes in
 * *start and *len. */
static int member_key(Scan *s, int escapes_ok, const unsigned char **start, Py_ssize_t *len) {
    int ascii, rc;
    if (s->p >= s->end || *s->p != '"') return BAIL;
    if ((rc = scan_string(s, escapes_ok, start, len, &ascii)) != OK) return rc;
    skip_ws(s);
    if (s->p >= s->end || *s->p != ':') return BAIL;
    s->p++;
    skip_ws(s);
    return OK;
}

/* The members of an object or items of an array at its opening bracket, validated only. */
static int skip_container(Scan *s, unsigned char close, int is_object) {
    const unsigned char *start;
    Py_ssize_t len;
    int rc = open_container(s, close);
    while (rc == OK) {
        if (is_object && (rc = member_key(s, 1, &start, &len)) != OK) return rc;
        if ((rc = skip_value(s)) != OK) return rc;
        rc = next_item(s, close);
    }
    return rc == DONE ? OK : rc;
}

/* Any JSON value at s->p (no whitespace before it), validated only. */
static int skip_value(Scan *s) {
    const unsigned char *start;
    Py_ssize_t len;
    int ascii;
    if (s->p >= s->end) return BAIL;
    switch (*s->p) {
    case '"': return scan_string(s, 1, &start, &len, &ascii);
    case '{': return skip_container(s, '}', 1);
    case '[': return skip_container(s, ']', 0);
    case 't': return literal(s, "true", 4);
    case 'f': return literal(s, "false", 5);
    case 'n': return literal(s, "null", 4);
    default: return scan_number(s, NULL);
    }
}

/* An ASCII string of at most WORD_MAX_LEN bytes: the one this cache made for the same bytes last
 * time, if it is still in its slot (direct-mapped: a new word replaces the slot's), else a new one
 * kept there. Why: a bid's values repeat across bids (OS, make, model, city, exchange), and each
 * new str was an allocation, a free, and a hash computed again by every dict lookup the
 * percolator's walk and the aggregation make with it; a cached one has its hash cached too. */
static PyObject *cached_word(State *st, const unsigned char *start, Py_ssize_t len) {
    uint64_t h = 1469598103934665603ULL ^ (uint64_t)len; /* FNV-1a */
    for (Py_ssize_t i = 0; i < len; i++) h = (h ^ start[i]) * 1099511628211ULL;
    PyObject **slot = &st->words[(h ^ (h >> 29)) & (WORD_SLOTS - 1)];
    PyObject *word = *slot;
    if (word != NULL && PyUnicode_GET_LENGTH(word) == len && memcmp(PyUnicode_1BYTE_DATA(word), start, (size_t)len) == 0)
        return Py_NewRef(word);
    if ((word = PyUnicode_New(len, 127)) == NULL) return NULL;
    memcpy(PyUnicode_1BYTE_DATA(word), start, (size_t)len);
    Py_XSETREF(*slot, Py_NewRef(word));
    return word;
}

/* A scalar we keep: a new reference in *out (a string of a WORD field from the word cache). */
static int keep_scalar(Scan *s, int word, PyObject **out) {
    const unsigned char *start;
    Py_ssize_t len;
    int ascii, rc;
    switch (*s->p) {
    case '"':
        if ((rc = scan_string(s, 0, &start, &len, &ascii)) != OK) return rc;
        if (ascii && word && len <= WORD_MAX_LEN) return (*out = cached_word(s->st, start, len)) == NULL ? ERR : OK;
        if (ascii) {
            if ((*out = PyUnicode_New(len, 127)) == NULL) return ERR;
            memcpy(PyUnicode_1BYTE_DATA(*out), start, (size_t)len);
            return OK;
        }
        *out = PyUnicode_DecodeUTF8((const char *)start, len, NULL);
        if (*out == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            PyErr_Clear(); /* cannot happen after utf8_length; if it did, orjson decides */
            return BAIL;
        }
        return *out == NULL ? ERR : OK;
    case 't': *out = Py_NewRef(Py_True); return literal(s, "true", 4);
    case 'f': *out = Py_NewRef(Py_False); return literal(s, "false", 5);
    case 'n': *out = Py_NewRef(Py_None); return literal(s, "null", 4);
    default: return scan_number(s, out);
    }
}

static int keep_value(Scan *s, const Spec *spec, PyObject **out);

/* An object we keep (s->p at '{'): a dict of the spec's fields, the others validated and skipped. */
static int keep_object(Scan *s, const Field *fields, PyObject **out) {
    const unsigned char *start;
    Py_ssize_t len;
    int rc = open_container(s, '}');
    if (rc == BAIL) return BAIL;
    if ((*out = PyDict_New()) == NULL) return ERR;
    while (rc == OK) {
        if ((rc = member_key(s, 0, &start, &len)) != OK) return rc;
        const Field *field = fields;
        while (field->name != NULL && !(field->len == len && memcmp(field->name, start, (size_t)len) == 0)) field++;
        if (field->name == NULL) {
            rc = skip_value(s);
        } else {
            PyObject *value = NULL;
            rc = keep_value(s, field->spec, &value);
            if (rc == OK && PyDict_SetItem(*out, s->st->keys[field->key], value) < 0) rc = ERR;
            Py_XDECREF(value);
        }
        if (rc != OK) return rc;
        rc = next_item(s, '}');
    }
    return rc == DONE ? OK : rc;
}

/* An array we keep (s->p at '['): every item, or only the first (the rest validated). */
static int keep_array(Scan *s, const Spec *spec, PyObject **out) {
    int rc = open_container(s, ']');
    if (rc == BAIL) return BAIL;
    if ((*out = PyList_New(0)) == NULL) return ERR;
    for (Py_ssize_t i = 0; rc == OK; i++) {
        if (spec->kind == S_FIRST && i > 0) {
            rc = skip_value(s);
        } else {
            PyObject *item = NULL;
            rc = keep_value(s, spec->item, &item);
            if (rc == OK && PyList_Append(*out, item) < 0) rc = ERR;
            Py_XDECREF(item);
        }
        if (rc != OK) return rc;
        rc = next_item(s, ']');
    }
    return rc == DONE ? OK : rc;
}

/* A value we keep, at s->p: scalars anywhere; a container only of the kind the spec expects.
 * On BAIL or ERR *out may hold a partly built object: the caller releases it. */
static int keep_value(Scan *s, const Spec *spec, PyObject **out) {
    if (s->p >= s->end) return BAIL;
    unsigned char c = *s->p;
    if (c == '{') return spec->kind == S_OBJ ? keep_object(s, spec->fields, out) : BAIL;
    if (c == '[') return spec->kind == S_ALL || spec->kind == S_FIRST ? keep_array(s, spec, out) : BAIL;
    return keep_scalar(s, spec->kind == S_WORD, out);
}

/* The minimal bid of raw (bytes): OK with *bid a new dict, or BAIL / ERR. */
static int minimal_bid(State *st, PyObject *raw, PyObject **bid) {
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(raw);
    Scan s = {p, p + PyBytes_GET_SIZE(raw), 0, st};
    skip_ws(&s);
    if (s.p >= s.end || *s.p != '{') return BAIL;
    int rc = keep_object(&s, BID.fields, bid);
    if (rc == OK) {
        skip_ws(&s);
        if (s.p != s.end) rc = BAIL;
    }
    if (rc != OK) Py_CLEAR(*bid);
    return rc;
}

static PyObject *document_from_json(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "document_from_json(raw, log_timestamp_ms, now_ms) takes 3 arguments");
        return NULL;
    }
    if (!PyBytes_CheckExact(args[0])) Py_RETURN_NONE; /* str, bytearray ...: orjson's lane */
    State *st = PyModule_GetState(module);
    PyObject *bid = NULL;
    int rc = minimal_bid(st, args[0], &bid);
    if (rc != OK) return rc == BAIL ? Py_NewRef(Py_None) : NULL;
    PyObject *result = document_of(st, bid, args[1], args[2]);
    Py_DECREF(bid);
    return result;
}

/* ---- module -------------------------------------------------------------------------------- */

static int add_long_long(PyObject *module, const char *name, long long value) {
    PyObject *number = PyLong_FromLongLong(value);
    int rc = number == NULL ? -1 : PyModule_AddObjectRef(module, name, number);
    Py_XDECREF(number);
    return rc;
}

static int state_init(PyObject *module, State *st) {
    for (int i = 0; i < K_COUNT; i++) {
        if ((st->keys[i] = PyUnicode_InternFromString(KEY_TEXTS[i])) == NULL) return -1;
    }
    PyObject *schema = PyImport_ImportModule("rules_service.schema");
    if (schema == NULL) return -1;
    st->genders = PyObject_GetAttrString(schema, "GENDERS");
    st->device_types = PyObject_GetAttrString(schema, "DEVICE_TYPES");
    PyObject *age_band = PyObject_GetAttrString(schema, "age_band");
    Py_DECREF(schema);
    int rc = st->genders && st->device_types && age_band && PyDict_CheckExact(st->genders)
                     && PyDict_CheckExact(st->device_types) ? 0 : -1;
    if (rc < 0 && !PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "schema.GENDERS/DEVICE_TYPES must be dicts");
    for (int age = 0; rc == 0 && age <= MAX_AGE; age++) {
        st->age_bands[age] = PyObject_CallFunction(age_band, "i", age);
        if (st->age_bands[age] == NULL) rc = -1;
        else if (st->age_bands[age] != Py_None && !IS_STR(st->age_bands[age])) {
            PyErr_SetString(PyExc_TypeError, "schema.age_band must give a str or None");
            rc = -1;
        }
    }
    Py_XDECREF(age_band);
    if (rc == 0 && (st->time_module = PyImport_ImportModule("time")) == NULL) rc = -1;
    if (rc == 0) {
        /* the limits, so tests can check they match normalize.py's */
        rc = PyModule_AddIntConstant(module, "MAX_AGE", MAX_AGE);
        if (rc == 0) rc = add_long_long(module, "MIN_EVENT_MS", MIN_EVENT_MS);
        if (rc == 0) rc = add_long_long(module, "MAX_EVENT_MS", MAX_EVENT_MS);
        if (rc == 0) rc = add_long_long(module, "MAX_SLOT_SIZE", MAX_SLOT_SIZE);
    }
    return rc;
}

static int module_traverse(PyObject *module, visitproc visit, void *arg) {
    State *st = PyModule_GetState(module);
    if (st == NULL) return 0;
    for (int i = 0; i < K_COUNT; i++) Py_VISIT(st->keys[i]);
    for (int i = 0; i <= MAX_AGE; i++) Py_VISIT(st->age_bands[i]);
    Py_VISIT(st->genders);
    Py_VISIT(st->device_types);
    Py_VISIT(st->time_module);
    return 0;
}

static int module_clear(PyObject *module) {
    State *st = PyModule_GetState(module);
    if (st == NULL) return 0;
    for (int i = 0; i < K_COUNT; i++) Py_CLEAR(st->keys[i]);
    for (int i = 0; i <= MAX_AGE; i++) Py_CLEAR(st->age_bands[i]);
    Py_CLEAR(st->genders);
    Py_CLEAR(st->device_types);
    Py_CLEAR(st->time_module);
    for (int i = 0; i < WORD_SLOTS; i++) Py_CLEAR(st->words[i]);
    return 0;
}

static void module_free(void *module) { module_clear((PyObject *)module); }

static PyMethodDef methods[] = {
    {"fast_document", (PyCFunction)(void (*)(void))fast_document, METH_FASTCALL,
     "fast_document(bid, log_timestamp_ms, now_ms) -> dict | None: the C twin of "
     "rules_service.normalize._fast_document (None: ask the careful path)."},
    {"document_from_json", (PyCFunction)(void (*)(void))document_from_json, METH_FASTCALL,
     "document_from_json(raw, log_timestamp_ms, now_ms) -> dict | None: fast_document of orjson.loads(raw) "
     "from one scan of the bytes that builds only what the document reads (None: use orjson.loads)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "rules_service._normalize", "C twin of rules_service.normalize._fast_document.",
    sizeof(State), methods, NULL, module_traverse, module_clear, module_free,
};

PyMODINIT_FUNC PyInit__normalize(void) {
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) return NULL;
    State *st = PyModule_GetState(module);
    memset(st, 0, sizeof *st);
    if (state_init(module, st) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
