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
 * Module state (set once at import, read-only afterwards): the interned key strings, the
 * schema's GENDERS and DEVICE_TYPES dicts (the same objects the Python lane reads), the age band
 * of each age 0..MAX_AGE (from schema.age_band) and the time module (time.time() is looked up at
 * call time, as Python does, so tests can patch the clock). Nothing else is kept between calls.
 *
 * Every object held across a dict lookup is an owned reference: a lookup may run Python code
 * (__eq__ of an exotic key) that could change the bid.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* keep in step with rules_service/normalize.py (the tests compare them via the module attributes) */
#define MIN_EVENT_MS 946684800000LL  /* 2000-01-01 */
#define MAX_EVENT_MS 4102444800000LL /* 2100-01-01 */
#define MAX_AGE 120
#define MAX_SLOT_SIZE 2147483647LL

enum { ERR = -1, BAIL = 0, OK = 1 }; /* ERR: exception set; BAIL: return None */

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
    PyObject *fields[3];
    const int keys[3] = {K_KEYWORDS, K_KWARRAY, K_DATA};
    for (int i = 0; i < 3; i++) {
        GET(fields[i], doc->user, keys[i]);
    }
    if (fields[0] != Py_None && !IS_STR(fields[0])) return BAIL; /* a list under the 2.5 name: careful path */
    for (int i = 0; i < 3; i++) Py_INCREF(fields[i]);
    Unique u = {NULL, NULL};
    int rc = OK;
    if (fields[0] != Py_None) rc = add_keywords(&u, fields[0]);
    if (rc == OK && fields[1] != Py_None) rc = add_kwarray(&u, fields[1]);
    if (rc == OK && fields[2] != Py_None) rc = add_segments(st, &u, fields[2]);
    for (int i = 0; i < 3; i++) Py_DECREF(fields[i]);
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

static PyObject *fast_document(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "fast_document(bid, log_timestamp_ms, now_ms) takes 3 arguments");
        return NULL;
    }
    if (!PyDict_CheckExact(args[0])) {
        PyErr_Format(PyExc_TypeError, "fast_document: bid must be a dict, not %.100s", Py_TYPE(args[0])->tp_name);
        return NULL;
    }
    State *st = PyModule_GetState(module);
    Doc doc;
    memset(&doc, 0, sizeof doc);
    Py_INCREF(args[0]); /* the caller's reference could go if Python code we run drops it */
    int rc = take_all(st, args[0], args[1], args[2], &doc);
    Py_DECREF(args[0]);
    PyObject *result = rc == OK ? assemble(st, &doc) : rc == BAIL ? Py_NewRef(Py_None) : NULL;
    doc_clear(&doc);
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
    return 0;
}

static void module_free(void *module) { module_clear((PyObject *)module); }

static PyMethodDef methods[] = {
    {"fast_document", (PyCFunction)(void (*)(void))fast_document, METH_FASTCALL,
     "fast_document(bid, log_timestamp_ms, now_ms) -> dict | None: the C twin of "
     "rules_service.normalize._fast_document (None: ask the careful path)."},
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
