/* Internal to the noise room: the scheduler_config key schema (sched_keys.c) as schedule.c uses
 * it to build and layer configs. */
#ifndef DENOISED_SCHED_KEYS_H
#define DENOISED_SCHED_KEYS_H

#include <jansson.h>

#include "err.h"
#include "schedule.h"

/* Guards against configs that would make the tables absurdly large. */
#define SCHED_MAX_TRAIN_TIMESTEPS 1000000

/* Every key of the schema at the default all classes start from (schedule.c then applies the
 * class's own); the rest of cfg is left as it is. */
void sched_keys_defaults(sched_config *cfg);

/* One key of the schema onto cfg, checked by its row (type, range, names) with errors naming
 * the key; *handled is 0 (and cfg untouched) for a key the schema does not have. A JSON null
 * clears a flag, resets a key whose None means "no bound", and otherwise keeps the value. */
int sched_keys_apply(sched_config *cfg, const char *key, const json_t *v, int *handled, err *e);

#endif
