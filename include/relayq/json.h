#ifndef RELAYQ_JSON_H
#define RELAYQ_JSON_H

/*
 * A small, strict JSON (RFC 8259) parser into a tree, and a writer that
 * appends to a growing buffer.
 *
 * Parser: any value at top level; strings are decoded to UTF-8 (\u escapes
 * including surrogate pairs; \u0000 gives a NUL byte, so strings carry a
 * length); numbers follow the RFC grammar and must be finite; whitespace is
 * space, tab, CR, LF only; trailing bytes other than whitespace are an error;
 * nesting is limited to RQ_JSON_MAX_DEPTH. Duplicate object keys are kept
 * (rq_json_get returns the last one, as JavaScript and Lua cjson do).
 * Input is untrusted: every error is reported, never a crash.
 *
 * Writer: rq_json_buf builds compact JSON. Commas and colons are placed
 * automatically; strings are escaped (", \, every control byte, DEL) and
 * invalid UTF-8 becomes U+FFFD, so the output is always valid JSON text.
 * Allocation failures and misuse (a value in an object without a key, a
 * key outside an object, mismatched ends, nesting over 64) are sticky:
 * check rq_json_buf_ok() once at the end.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define RQ_JSON_MAX_DEPTH 64

/*
 * The one limit on an application's `meta` object: at most this many levels
 * of nesting, the object itself being level 1 ({} is 1, {"a":{}} is 2).
 * relayq_enqueue refuses deeper meta (MAX_META_DEPTH in lua/redis/relayq.lua;
 * test_functions checks the two are equal), so does `relayq enqueue --meta`.
 * It leaves room under RQ_JSON_MAX_DEPTH for the records that carry meta
 * one level down (relayq_show, relayq_list, events), so every C reader of
 * them parses what enqueue accepted.
 */
#define RQ_JSON_META_MAX_DEPTH 32
_Static_assert(RQ_JSON_META_MAX_DEPTH + 2 <= RQ_JSON_MAX_DEPTH,
	       "meta must fit in a record under the parser's depth limit");

enum rq_json_type {
	RQ_JSON_NULL = 0,
	RQ_JSON_BOOL,
	RQ_JSON_NUMBER,
	RQ_JSON_STRING,
	RQ_JSON_ARRAY,
	RQ_JSON_OBJECT,
};

/* Parser flags. */
enum {
	/* Accept bytes that are not valid UTF-8 inside strings and keep them as
	 * they are (Redis cjson passes such bytes through). Default: rejected. */
	RQ_JSON_LAX_UTF8 = 1 << 0,
	/* A container nested deeper than RQ_JSON_MAX_DEPTH is not an error:
	 * it is skipped (its brackets must still balance, its strings end)
	 * and stands in the tree as a null node with too_deep set, so a
	 * reader still gets the rest of the document. Default: an error. */
	RQ_JSON_SKIP_DEEP = 1 << 1,
};

/*
 * One node of a parsed document. Read-only for users. Children of an array
 * or object are a list: first `child`, then `next`; an object member's name
 * is `key` (NUL-ended, key_len bytes, may hold NUL).
 */
struct rq_json {
	enum rq_json_type type;
	bool boolean;          /* RQ_JSON_BOOL */
	bool is_int;           /* RQ_JSON_NUMBER: integral and fits int64 */
	int64_t integer;       /* when is_int */
	double number;         /* RQ_JSON_NUMBER, always set */
	char *str;             /* RQ_JSON_STRING: NUL-ended, len bytes */
	size_t len;
	size_t count;          /* RQ_JSON_ARRAY / RQ_JSON_OBJECT: children */
	struct rq_json *child;
	struct rq_json *last;
	struct rq_json *next;
	char *key;
	size_t key_len;
	bool too_deep;         /* RQ_JSON_SKIP_DEEP: a container skipped here */
};

/*
 * Parses len bytes of text (need not be NUL-ended). Returns a tree the
 * caller frees with rq_json_free, or NULL with a message in err (like
 * "offset 12: expected ':' after object key") when invalid or out of memory.
 */
struct rq_json *rq_json_parse(const char *text, size_t len, int flags,
		char *err, size_t errlen);

/* Frees a tree; NULL is a no-op. */
void rq_json_free(struct rq_json *v);

/* The member `key` of an object (last one when repeated), NULL when v is not
 * an object or has no such member. */
const struct rq_json *rq_json_get(const struct rq_json *v, const char *key);

/* Element i of an array, NULL when out of range or v is not an array. */
const struct rq_json *rq_json_at(const struct rq_json *v, size_t i);

/* The string of member `key`, NULL when absent or not a string. */
const char *rq_json_get_str(const struct rq_json *v, const char *key);

/* Integer value of member `key` into *out: true when it is an integral
 * number (or, with lax, a string holding a decimal integer). */
bool rq_json_get_int(const struct rq_json *v, const char *key, bool lax,
		int64_t *out);

/* Levels of nesting of v: 0 for a scalar (or NULL), 1 for an empty array
 * or object, 1 + the deepest child otherwise. A too_deep node counts as
 * deeper than RQ_JSON_MAX_DEPTH. */
size_t rq_json_depth(const struct rq_json *v);

/* True when v or anything under it is a too_deep node. */
bool rq_json_has_deep(const struct rq_json *v);

/* True when v is a node of this type (false for NULL). */
bool rq_json_is(const struct rq_json *v, enum rq_json_type type);

/* Type name for messages: "null", "boolean", "number", ... */
const char *rq_json_type_name(enum rq_json_type type);

/*
 * The writer. Embed it, rq_json_buf_init, append, then use data/len
 * (always NUL-ended once anything was appended; data may be NULL before),
 * and rq_json_buf_finish to free. rq_json_buf_take hands the string to the
 * caller.
 */
struct rq_json_buf {
	char *data;
	size_t len;
	size_t cap;
	bool failed;           /* an allocation failed or nesting was too deep */
	bool after_key;        /* a key was written, its value is due */
	bool in_key;
	unsigned depth;
	uint64_t has_item;     /* bit d: level d already has an element */
	uint64_t is_object;    /* bit d: level d is an object */
};

void rq_json_buf_init(struct rq_json_buf *b);
void rq_json_buf_finish(struct rq_json_buf *b);
/* Empties the buffer, keeping its memory. */
void rq_json_buf_reset(struct rq_json_buf *b);
/* The text (caller frees), or NULL when the buffer failed; resets b. */
char *rq_json_buf_take(struct rq_json_buf *b, size_t *len);
/* False when any append failed since init/reset. */
bool rq_json_buf_ok(const struct rq_json_buf *b);

/* Values. Each returns 0, or -1 when the buffer has failed. */
int rq_json_buf_obj_begin(struct rq_json_buf *b);
int rq_json_buf_obj_end(struct rq_json_buf *b);
int rq_json_buf_arr_begin(struct rq_json_buf *b);
int rq_json_buf_arr_end(struct rq_json_buf *b);
/* An object member name; the value follows with any value call. */
int rq_json_buf_key(struct rq_json_buf *b, const char *key);
/* A string of len bytes (may hold NUL), escaped. */
int rq_json_buf_strn(struct rq_json_buf *b, const char *s, size_t len);
/* A NUL-ended string; NULL writes null. */
int rq_json_buf_str(struct rq_json_buf *b, const char *s);
int rq_json_buf_int(struct rq_json_buf *b, int64_t v);
/* A finite double (shortest form that reads back the same); NaN and
 * infinities write null. */
int rq_json_buf_double(struct rq_json_buf *b, double v);
int rq_json_buf_bool(struct rq_json_buf *b, bool v);
int rq_json_buf_null(struct rq_json_buf *b);
/* A parsed tree (or subtree), re-serialized compactly. */
int rq_json_buf_value(struct rq_json_buf *b, const struct rq_json *v);
/* JSON text the caller vouches for (e.g. produced by this writer), copied
 * as one value. */
int rq_json_buf_raw(struct rq_json_buf *b, const char *json, size_t len);

/* Shorthands: key then value. */
int rq_json_buf_kv_str(struct rq_json_buf *b, const char *key, const char *s);
int rq_json_buf_kv_int(struct rq_json_buf *b, const char *key, int64_t v);
int rq_json_buf_kv_bool(struct rq_json_buf *b, const char *key, bool v);

#endif
