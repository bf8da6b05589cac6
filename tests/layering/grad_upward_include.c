/* Must not compile: a file of the grad room reaching up into the model room. The suite expects
 * this build to fail (CMakeLists.txt), so the backward rules stay free of any model. */
#include "grad.h"
#include "model.h"

int layering_probe_grad(void);
int layering_probe_grad(void) {
  return (int)sizeof(model_call) + GRAD_OP_COUNT;
}
