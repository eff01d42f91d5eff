/* Small string helpers (see str.h). */
#include "relayq/str.h"

#include <stdlib.h>
#include <string.h>

char *rq_str_dup(const char *s, bool *oom)
{
	if (!s)
		return NULL;
	char *d = strdup(s);
	if (!d)
		*oom = true;
	return d;
}

size_t rq_str_end(const char *s, size_t from, size_t n, char c)
{
	const char *p = from < n ? memchr(s + from, c, n - from) : NULL;
	return p ? (size_t)(p - s) : n;
}

void rq_str_one_line(char *s)
{
	for (; *s; s++)
		if ((unsigned char)*s < 0x20 || *s == 0x7f)
			*s = ' ';
}

uint64_t rq_str_fnv1a(uint64_t h, const void *p, size_t n)
{
	const unsigned char *s = p;
	for (size_t i = 0; i < n; i++) {
		h ^= s[i];
		h *= 0x100000001b3ULL;
	}
	return h;
}
