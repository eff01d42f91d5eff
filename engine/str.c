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
