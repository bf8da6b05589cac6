/* Shared main for every test executable: each tests/test_*.c provides
 * test_suite(), and this runs it with Check, exiting non-zero on failure. */
#include <check.h>
#include <stdlib.h>

#include "testutil.h"

int main(void) {
  SRunner *sr = srunner_create(test_suite());
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
