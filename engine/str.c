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
