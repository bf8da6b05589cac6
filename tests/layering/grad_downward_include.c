/* The control for grad_upward_include.c: the grad room including itself and core builds, so
 * that probe fails for its upward include and not for some other reason. */
#include "gemm.h"
#include "grad.h"

int layering_control_grad(void);
int layering_control_grad(void) {
  return (int)sizeof(grad_node) + (int)sizeof(gemm_packed);
}
