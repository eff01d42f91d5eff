/* The relayq Redis Functions library embedded in the binaries (see
 * fnlib.h). */
#include "relayq/fnlib.h"

#include <stdlib.h>
#include <string.h>

int rq_fnlib_version(void)
{
	const char *p = strstr(rq_fnlib_source, "local VERSION = ");
	if (!p)
		return -1;
	p += strlen("local VERSION = ");
	char *end;
	long v = strtol(p, &end, 10);
	if (end == p || v < 0 || v > 1000000)
		return -1;
	return (int)v;
}
