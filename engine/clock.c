/* Clocks: the one place that reads them (see clock.h). */
#include "relayq/clock.h"

#include <time.h>

static int64_t read_ms(clockid_t id)
{
	struct timespec ts;
	clock_gettime(id, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t rq_clock_wall_ms(void)
{
	return read_ms(CLOCK_REALTIME);
}

int64_t rq_clock_mono_ms(void)
{
	return read_ms(CLOCK_MONOTONIC);
}

int64_t rq_clock_mono_coarse_ms(void)
{
#ifdef CLOCK_MONOTONIC_COARSE
	return read_ms(CLOCK_MONOTONIC_COARSE);
#else
	return read_ms(CLOCK_MONOTONIC);
#endif
}

struct timeval rq_clock_tv(int64_t ms)
{
	if (ms < 0)
		ms = 0;
	struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)((ms % 1000) * 1000)};
	return tv;
}
