/* The encoding of the relayq Functions' arguments and replies (see
 * queue_codec.h). */
#include "relayq/queue_codec.h"

#include "relayq/json.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- replies ---- */

bool rq_queue_reply_int(const redisReply *r, int64_t *out)
{
	if (!r)
		return false;
	if (r->type == REDIS_REPLY_INTEGER) {
		*out = r->integer;
		return true;
	}
	if ((r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_STATUS) &&
	    r->len > 0 && r->len < 21) {
		char *end;
		errno = 0;
		long long v = strtoll(r->str, &end, 10);
		if (errno == 0 && end == r->str + r->len) {
			*out = v;
			return true;
		}
	}
	return false;
}

static bool is_str(const redisReply *r)
{
	return r && r->type == REDIS_REPLY_STRING;
}

static bool id_ok(const char *s, size_t len)
{
	if (len == 0 || len > RQ_QUEUE_ID_MAX)
		return false;
	for (size_t k = 0; k < len; k++) {
		unsigned char ch = (unsigned char)s[k];
		if (ch <= ' ' || ch >= 0x7f)
			return false;
	}
	return true;
}

bool rq_queue_reply_id(const redisReply *r, char *id, size_t idlen)
{
	if (!is_str(r) || !id_ok(r->str, r->len) || idlen <= r->len)
		return false;
	memcpy(id, r->str, r->len);
	id[r->len] = '\0';
	return true;
}

/* ---- claim ---- */

struct claim_priv {
	struct rq_queue_claim pub;
	redisReply *reply;
};

struct rq_queue_claim *rq_queue_claim_parse(redisReply *r, const char **why)
{
	int64_t now, next_due;
	if (!r || r->type != REDIS_REPLY_ARRAY || r->elements < 3 ||
	    !rq_queue_reply_int(r->element[0], &now) || !rq_queue_reply_int(r->element[1], &next_due) ||
	    !r->element[2] || r->element[2]->type != REDIS_REPLY_ARRAY) {
		*why = "relayq_claim: reply is not [now, next_due, msgs]";
		return NULL;
	}
	redisReply *msgs = r->element[2];
	size_t total = 0;
	for (size_t i = 0; i < msgs->elements; i++) {
		redisReply *m = msgs->element[i];
		if (!m || m->type != REDIS_REPLY_ARRAY || m->elements < 8 ||
		    !m->element[2] || m->element[2]->type != REDIS_REPLY_ARRAY) {
			*why = "relayq_claim: a message is not [id, from, rcpts, body, attempts, created, meta, lease]";
			return NULL;
		}
		if (m->element[2]->elements > SIZE_MAX / 64 - total) {
			*why = "relayq_claim: too many recipients";
			return NULL;
		}
		total += m->element[2]->elements;
	}
	size_t sz = sizeof(struct claim_priv) + msgs->elements * sizeof(struct rq_queue_msg) +
		    total * (sizeof(char *) + sizeof(size_t));
	struct claim_priv *cp = calloc(1, sz);
	if (!cp) {
		*why = "relayq_claim: out of memory";
		return NULL;
	}
	struct rq_queue_msg *ms = (struct rq_queue_msg *)(cp + 1);
	const char **rp = (const char **)(ms + msgs->elements);
	size_t *rl = (size_t *)(rp + total);
	cp->pub.now = now;
	cp->pub.next_due = next_due;
	cp->pub.count = msgs->elements;
	cp->pub.msgs = ms;
	cp->pub.priv_ = cp;
	cp->reply = r;
	for (size_t i = 0; i < msgs->elements; i++) {
		redisReply **e = msgs->element[i]->element;
		struct rq_queue_msg *m = &ms[i];
		if (!is_str(e[0]) || e[0]->len == 0 || e[0]->len > RQ_QUEUE_ID_MAX) {
			*why = "relayq_claim: a message id is not a string of 1 to 32 bytes";
			goto bad;
		}
		for (size_t k = 0; k < e[0]->len; k++) {
			unsigned char ch = (unsigned char)e[0]->str[k];
			if (ch <= ' ' || ch >= 0x7f) {
				*why = "relayq_claim: a message id is not printable";
				goto bad;
			}
		}
		memcpy(m->id, e[0]->str, e[0]->len);
		m->id[e[0]->len] = '\0';
		if (!is_str(e[1]) || !is_str(e[3]) ||
		    !rq_queue_reply_int(e[4], &m->attempts) || !rq_queue_reply_int(e[5], &m->created) ||
		    !rq_queue_reply_int(e[7], &m->lease)) {
			*why = "relayq_claim: a message field has the wrong type";
			goto bad;
		}
		m->from = e[1]->str;
		m->from_len = e[1]->len;
		m->body = e[3]->str;
		m->body_len = e[3]->len;
		if (is_str(e[6])) {
			m->meta = e[6]->str;
			m->meta_len = e[6]->len;
		} else if (e[6] && e[6]->type == REDIS_REPLY_NIL) {
			m->meta = "{}";
			m->meta_len = 2;
		} else {
			*why = "relayq_claim: meta is not a string";
			goto bad;
		}
		redisReply *rc = e[2];
		m->nrcpts = rc->elements;
		m->rcpts = rp;
		m->rcpt_lens = rl;
		for (size_t k = 0; k < rc->elements; k++) {
			if (!is_str(rc->element[k])) {
				*why = "relayq_claim: a recipient is not a string";
				goto bad;
			}
			*rp++ = rc->element[k]->str;
			*rl++ = rc->element[k]->len;
		}
	}
	return &cp->pub;
bad:
	free(cp);
	return NULL;
}

void rq_queue_msg_release(struct rq_queue_claim *c, size_t i)
{
	if (!c || i >= c->count || c->msgs[i].released)
		return;
	struct claim_priv *cp = c->priv_;
	redisReply *msgs = cp->reply->element[2];
	freeReplyObject(msgs->element[i]);
	msgs->element[i] = NULL;
	struct rq_queue_msg *m = &c->msgs[i];
	m->released = true;
	m->from = m->body = m->meta = NULL;
	m->from_len = m->body_len = m->meta_len = 0;
	m->rcpts = NULL;
	m->rcpt_lens = NULL;
	m->nrcpts = 0;
}

void rq_queue_claim_free(struct rq_queue_claim *c)
{
	if (!c)
		return;
	struct claim_priv *cp = c->priv_;
	freeReplyObject(cp->reply);
	free(cp);
}

int rq_queue_settle_parse(const redisReply *r, size_t n, enum rq_queue_settled *res)
{
	if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != n)
		return -1;
	for (size_t i = 0; i < n; i++) {
		const redisReply *e = r->element[i];
		if (!e || (e->type != REDIS_REPLY_STRING && e->type != REDIS_REPLY_STATUS))
			return -1;
		if (strcmp(e->str, "done") == 0)
			res[i] = RQ_QUEUE_SETTLE_DONE;
		else if (strcmp(e->str, "scheduled") == 0)
			res[i] = RQ_QUEUE_SETTLE_SCHEDULED;
		else if (strcmp(e->str, "held") == 0)
			res[i] = RQ_QUEUE_SETTLE_HELD;
		else if (strcmp(e->str, "lost") == 0)
			res[i] = RQ_QUEUE_SETTLE_LOST;
		else if (strcmp(e->str, "invalid") == 0)
			res[i] = RQ_QUEUE_SETTLE_INVALID;
		else
			return -1;
	}
	return 0;
}

/* ---- settle: the outcomes JSON ---- */

void rq_queue_outcomes_init(struct rq_queue_outcomes *o)
{
	memset(o, 0, sizeof(*o));
}

void rq_queue_outcomes_reset(struct rq_queue_outcomes *o)
{
	o->len = 0;
	o->nmsgs = 0;
	o->nrcpts = 0;
	o->open = false;
	o->oom = false;
}

void rq_queue_outcomes_finish(struct rq_queue_outcomes *o)
{
	free(o->buf);
	memset(o, 0, sizeof(*o));
}

static void put(struct rq_queue_outcomes *o, const char *s, size_t n)
{
	if (o->oom)
		return;
	if (o->len + n + 3 > o->cap) {
		size_t cap = o->cap ? o->cap : 256;
		while (cap < o->len + n + 3)
			cap *= 2;
		char *nb = realloc(o->buf, cap);
		if (!nb) {
			o->oom = true;
			return;
		}
		o->buf = nb;
		o->cap = cap;
	}
	memcpy(o->buf + o->len, s, n);
	o->len += n;
}

static void puts_(struct rq_queue_outcomes *o, const char *s)
{
	put(o, s, strlen(s));
}

static void put_jstr(struct rq_queue_outcomes *o, const char *s)
{
	put(o, "\"", 1);
	const char *run = s;
	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		char esc[8];
		const char *e = NULL;
		switch (*p) {
		case '"': e = "\\\""; break;
		case '\\': e = "\\\\"; break;
		case '\n': e = "\\n"; break;
		case '\r': e = "\\r"; break;
		case '\t': e = "\\t"; break;
		default:
			if (*p < 0x20 || *p == 0x7f) {
				snprintf(esc, sizeof(esc), "\\u%04x", *p);
				e = esc;
			}
		}
		if (e) {
			put(o, run, (size_t)((const char *)p - run));
			puts_(o, e);
			run = (const char *)p + 1;
		}
	}
	puts_(o, run);
	put(o, "\"", 1);
}

static void close_msg(struct rq_queue_outcomes *o)
{
	if (o->open) {
		puts_(o, "]}");
		o->open = false;
	}
}

int rq_queue_outcomes_msg(struct rq_queue_outcomes *o, const char *id,
			  int64_t lease, bool attempt, int64_t next_ms, bool hold)
{
	char num[32];
	if (!id)
		return -1;
	close_msg(o);
	puts_(o, o->nmsgs ? ",{\"id\":" : "[{\"id\":");
	put_jstr(o, id);
	snprintf(num, sizeof(num), "%" PRId64, lease);
	puts_(o, ",\"lease\":");
	puts_(o, num);
	puts_(o, attempt ? ",\"attempt\":true" : ",\"attempt\":false");
	if (next_ms >= 0) {
		snprintf(num, sizeof(num), "%" PRId64, next_ms);
		puts_(o, ",\"next\":");
		puts_(o, num);
	}
	puts_(o, hold ? ",\"hold\":true,\"rcpts\":[" : ",\"hold\":false,\"rcpts\":[");
	o->open = true;
	o->nrcpts = 0;
	o->nmsgs++;
	return o->oom ? -1 : 0;
}

static const char *const rcpt_state_names[] = {"delivered", "deferred", "failed",
						"dropped", "expired"};

int rq_queue_outcomes_rcpt(struct rq_queue_outcomes *o,
			   const struct rq_queue_rcpt_outcome *r)
{
	if (!o->open || !r || !r->to || (unsigned)r->s > RQ_QUEUE_RCPT_EXPIRED)
		return -1;
	puts_(o, o->nrcpts ? ",{\"to\":" : "{\"to\":");
	put_jstr(o, r->to);
	puts_(o, ",\"s\":\"");
	puts_(o, rcpt_state_names[r->s]);
	puts_(o, "\"");
	if (r->code > 0 && r->code <= 999) {
		char num[16];
		snprintf(num, sizeof(num), ",\"code\":%d", r->code);
		puts_(o, num);
	}
	const char *keys[] = {"enh", "text", "stage", "hint"};
	const char *vals[] = {r->enh, r->text, r->stage, r->hint};
	for (int i = 0; i < 4; i++) {
		if (!vals[i])
			continue;
		puts_(o, ",\"");
		puts_(o, keys[i]);
		puts_(o, "\":");
		put_jstr(o, vals[i]);
	}
	puts_(o, "}");
	o->nrcpts++;
	return o->oom ? -1 : 0;
}

const char *rq_queue_outcomes_json(struct rq_queue_outcomes *o, size_t *len)
{
	close_msg(o);
	if (o->oom || o->nmsgs == 0)
		return NULL;
	/* put() always leaves 3 spare bytes: close the array past len, so
	 * that more messages can still be added */
	o->buf[o->len] = ']';
	o->buf[o->len + 1] = '\0';
	if (len)
		*len = o->len + 1;
	return o->buf;
}

/* ---- enqueue ---- */

int rq_queue_enqueue_envelope(const struct rq_queue_enqueue_req *req,
			      struct rq_json_buf *b)
{
	if (!req || !req->from || !req->to || req->nto == 0 ||
	    (req->meta && req->meta->type != RQ_JSON_OBJECT))
		return -1;
	rq_json_buf_obj_begin(b);
	rq_json_buf_key(b, "from");
	rq_json_buf_strn(b, req->from, req->from_len ? req->from_len : strlen(req->from));
	rq_json_buf_key(b, "to");
	rq_json_buf_arr_begin(b);
	for (size_t i = 0; i < req->nto; i++) {
		if (!req->to[i])
			return -1;
		rq_json_buf_strn(b, req->to[i],
				 req->to_lens ? req->to_lens[i] : strlen(req->to[i]));
	}
	rq_json_buf_arr_end(b);
	if (req->delay_s >= 0 && isfinite(req->delay_s)) {
		rq_json_buf_key(b, "delay");
		if (req->delay_s == floor(req->delay_s) && req->delay_s < 9e15)
			rq_json_buf_int(b, (int64_t)req->delay_s);
		else
			rq_json_buf_double(b, req->delay_s);
	}
	if (req->key) {
		rq_json_buf_key(b, "key");
		rq_json_buf_str(b, req->key);
	}
	if (req->meta) {
		rq_json_buf_key(b, "meta");
		rq_json_buf_value(b, req->meta);
	}
	rq_json_buf_obj_end(b);
	return rq_json_buf_ok(b) ? 0 : -1;
}

/* ---- the Functions library ---- */

enum rq_queue_version_check rq_queue_version_check(const redisReply *r, long long want)
{
	if (!r)
		return RQ_QUEUE_VERSION_ERROR;
	if (r->type == REDIS_REPLY_INTEGER)
		return r->integer < want ? RQ_QUEUE_VERSION_LOAD : RQ_QUEUE_VERSION_OK;
	if (r->type == REDIS_REPLY_ERROR && r->str && strstr(r->str, "Function not found"))
		return RQ_QUEUE_VERSION_LOAD;
	return RQ_QUEUE_VERSION_ERROR;
}
