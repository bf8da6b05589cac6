/* The control for upward_include.c: the same room including only itself and rooms below it
 * builds, so that probe fails for its upward include and not for some other reason. */
#include "model.h"
#include "npy.h"
#include "schedule.h"

int layering_control(void);
int layering_control(void) {
  return (int)sizeof(model_call) + (int)sizeof(sched_config);
}
