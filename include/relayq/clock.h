#ifndef RELAYQ_CLOCK_H
#define RELAYQ_CLOCK_H

/*
 * Clocks, the one place that reads them.
 *
 * Wall time (ms since the epoch) is for times that leave the process or are
 * compared with Redis's TIME: scheduled times, leases, created. Monotonic
 * time is for durations and timers inside one process.
 *
 * A duration that is logged or stored is the one that was decided, never
 * the difference of two clock reads (which differs by however many
 * microseconds passed between them): keep the decided value next to the
 * deadline it produced.
 */

#include <stdint.h>
#include <sys/time.h>

/* Milliseconds since the epoch (CLOCK_REALTIME). */
int64_t rq_clock_wall_ms(void);

/* Milliseconds of CLOCK_MONOTONIC: only differences mean anything. */
int64_t rq_clock_mono_ms(void);

/* Milliseconds of CLOCK_MONOTONIC_COARSE where the system has it (cheap,
 * a few ms of resolution: for budgets and watchdogs), else monotonic. */
int64_t rq_clock_mono_coarse_ms(void);

/* ms as a struct timeval for libevent timers (negative: zero). */
struct timeval rq_clock_tv(int64_t ms);

#endif
