/* Queue names and their Redis key prefix (see keys.h). */
#include "relayq/keys.h"

#include <stdio.h>
#include <string.h>

bool rq_keys_queue_valid(const char *s, size_t len)
{
	if (!s || len == 0 || len > RQ_KEYS_QUEUE_MAX)
		return false;
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];
		bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
			  (c >= '0' && c <= '9') || c == '_' || c == '.' || c == ':' || c == '-';
		if (!ok)
			return false;
	}
	return true;
}

int rq_keys_prefix(const char *queue, char *buf, size_t len)
{
	if (!queue || !rq_keys_queue_valid(queue, strlen(queue)))
		return -1;
	int n = snprintf(buf, len, "relayq:{%s}", queue);
	return n < 0 || (size_t)n >= len ? -1 : 0;
}
