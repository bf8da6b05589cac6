/* The generated Unicode tables (unicode_tables.c, tools/gen_unicode_tables.py) the CLIP
 * tokenizer classifies and rewrites code points with: every table sorted by code point. */
#ifndef DENOISED_UNICODE_TABLES_H
#define DENOISED_UNICODE_TABLES_H

#include <stdint.h>

typedef struct uni_range {
  uint32_t lo, hi;
} uni_range;
typedef struct uni_map3 {
  uint32_t cp;
  uint8_t n;
  uint32_t to[3];
} uni_map3;
typedef struct uni_map4 {
  uint32_t cp;
  uint8_t n;
  uint32_t to[4];
} uni_map4;
typedef struct uni_entity {
  const char *name; /* with its ';' when the reference has one */
  uint8_t n;
  uint32_t to[4];
} uni_entity;
typedef struct uni_ccc {
  uint32_t cp;
  uint8_t ccc;
} uni_ccc;
typedef struct uni_pair {
  uint32_t a, b, composite;
} uni_pair;

extern const uni_range uni_letter[], uni_number[], uni_other[], uni_space[], uni_pyspace[],
    uni_digit[];
extern const int uni_letter_count, uni_number_count, uni_other_count, uni_space_count,
    uni_pyspace_count, uni_digit_count;
extern const uni_range uni_case_ignorable[], uni_cased[];
extern const int uni_case_ignorable_count, uni_cased_count;
extern const uni_map3 uni_lower[], uni_width[], uni_ligature[];
extern const int uni_lower_count, uni_width_count, uni_ligature_count;
extern const uni_map4 uni_decomp[];
extern const int uni_decomp_count;
extern const uni_entity uni_html5[], uni_ftfy_upper[];
extern const int uni_html5_count, uni_ftfy_upper_count;
extern const uni_ccc uni_combining[];
extern const int uni_combining_count;
extern const uni_pair uni_compose[];
extern const int uni_compose_count;

#endif
