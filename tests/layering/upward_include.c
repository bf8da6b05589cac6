/* Must not compile: a file of the model room reaching up into the solver room. The suite builds
 * it with the model room's include path and expects the build to fail (see CMakeLists.txt), so
 * the layering stays enforced rather than documented. */
#include "model.h"
#include "sampler.h"

int layering_probe(void);
int layering_probe(void) {
  return (int)sizeof(sampler *);
}
