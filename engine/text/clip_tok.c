/* CLIP's byte-level BPE tokenizer, as OpenAI's simple_tokenizer.py runs it: clean-up (our ftfy
 * subset, html.unescape twice, whitespace collapse, strip, lower-case), the regex pre-split,
 * byte-to-unicode mapping, BPE by merge rank with "</w>" closing each word, then start token,
 * truncation, end token and padding as Hugging Face's CLIPTokenizer pads for Stable Diffusion.
 * Text is handled as arrays of code points; the character classes come from the generated
 * unicode_tables.c, so they are the reference's own. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clip.h"
#include "mem.h"
#include "unicode_tables.h"

/* Hugging Face's CLIPTokenizer reads at most this many merges (49152 tokens less the 256 bytes,
 * their 256 "</w>" forms... as CLIP counts them) and skips the file's first line. */
#define CLIP_MAX_MERGES (49152 - 256 - 2)
#define CLIP_MAX_VOCAB (1 << 20)
#define NO_RANK 0x7fffffff

/* ---------- code point buffers ---------- */

typedef struct cpbuf {
  uint32_t *v;
  size_t n, cap;
} cpbuf;

static int cp_push(cpbuf *b, uint32_t c) {
  if (b->n == b->cap) {
    size_t cap = b->cap ? b->cap * 2 : 64;
    uint32_t *v = mem_realloc(b->v, cap * sizeof *v);
    if (!v)
      return -1;
    b->v = v;
    b->cap = cap;
  }
  b->v[b->n++] = c;
  return 0;
}

static int cp_push_n(cpbuf *b, const uint32_t *c, size_t n) {
  if (b->n + n > b->cap) {
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->n + n)
      cap *= 2;
    uint32_t *v = mem_realloc(b->v, cap * sizeof *v);
    if (!v)
      return -1;
    b->v = v;
    b->cap = cap;
  }
  if (n)
    memcpy(b->v + b->n, c, n * sizeof *c);
  b->n += n;
  return 0;
}

static void cp_swap(cpbuf *a, cpbuf *b) {
  cpbuf t = *a;
  *a = *b;
  *b = t;
  b->n = 0;
}

/* Strict UTF-8: no overlongs, surrogates or code points past U+10FFFF. */
static int utf8_decode(const char *s, size_t len, cpbuf *out, err *e) {
  const unsigned char *u = (const unsigned char *)s;
  for (size_t i = 0; i < len;) {
    uint32_t c = u[i], min;
    int extra;
    if (c < 0x80) {
      extra = 0;
      min = 0;
    } else if ((c & 0xE0) == 0xC0) {
      extra = 1;
      c &= 0x1F;
      min = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
      extra = 2;
      c &= 0x0F;
      min = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
      extra = 3;
      c &= 0x07;
      min = 0x10000;
    } else {
      return err_set(e, ERR_INVALID, "prompt is not valid UTF-8 (byte 0x%02X at offset %zu)", u[i],
                     i);
    }
    if (i + (size_t)extra >= len + (extra ? 0 : 1) && extra)
      return err_set(e, ERR_INVALID, "prompt is not valid UTF-8 (truncated sequence at offset %zu)",
                     i);
    for (int k = 1; k <= extra; k++) {
      if ((u[i + k] & 0xC0) != 0x80)
        return err_set(e, ERR_INVALID,
                       "prompt is not valid UTF-8 (bad continuation byte at offset %zu)", i + k);
      c = (c << 6) | (u[i + k] & 0x3F);
    }
    if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF))
      return err_set(e, ERR_INVALID,
                     "prompt is not valid UTF-8 (overlong or invalid code point at offset %zu)", i);
    if (cp_push(out, c))
      return err_set(e, ERR_NOMEM, "out of memory reading the prompt");
    i += (size_t)extra + 1;
  }
  return 0;
}

static int utf8_put(uint32_t c, char *o) {
  if (c < 0x80) {
    o[0] = (char)c;
    return 1;
  }
  if (c < 0x800) {
    o[0] = (char)(0xC0 | (c >> 6));
    o[1] = (char)(0x80 | (c & 0x3F));
    return 2;
  }
  if (c < 0x10000) {
    o[0] = (char)(0xE0 | (c >> 12));
    o[1] = (char)(0x80 | ((c >> 6) & 0x3F));
    o[2] = (char)(0x80 | (c & 0x3F));
    return 3;
  }
  o[0] = (char)(0xF0 | (c >> 18));
  o[1] = (char)(0x80 | ((c >> 12) & 0x3F));
  o[2] = (char)(0x80 | ((c >> 6) & 0x3F));
  o[3] = (char)(0x80 | (c & 0x3F));
  return 4;
}

/* ---------- table look-ups ---------- */

static int in_ranges(const uni_range *r, int n, uint32_t c) {
  int lo = 0, hi = n - 1;
  while (lo <= hi) {
    int mid = (lo + hi) / 2;
    if (c < r[mid].lo)
      hi = mid - 1;
    else if (c > r[mid].hi)
      lo = mid + 1;
    else
      return 1;
  }
  return 0;
}

/* Every keyed table (uni_map3, uni_map4, uni_ccc) starts with its code point. */
static int cp_cmp(const void *key, const void *elem) {
  uint32_t k = *(const uint32_t *)key, c = *(const uint32_t *)elem;
  return k < c ? -1 : k > c;
}

static const uni_map3 *find_map3(const uni_map3 *m, int n, uint32_t c) {
  return bsearch(&c, m, (size_t)n, sizeof *m, cp_cmp);
}

/* The tables' first entries (asserted by the generator) let Latin-1 text skip the searches. */
#define FIRST_DECOMPOSABLE 0xC0u
#define FIRST_COMBINING 0x300u

static const uni_map4 *find_decomp(uint32_t c) {
  if (c < FIRST_DECOMPOSABLE)
    return NULL;
  return bsearch(&c, uni_decomp, (size_t)uni_decomp_count, sizeof *uni_decomp, cp_cmp);
}

static int ccc_of(uint32_t c) {
  if (c < FIRST_COMBINING)
    return 0;
  const uni_ccc *x =
      bsearch(&c, uni_combining, (size_t)uni_combining_count, sizeof *uni_combining, cp_cmp);
  return x ? x->ccc : 0;
}

#define HANGUL_S 0xAC00u
#define HANGUL_L 0x1100u
#define HANGUL_V 0x1161u
#define HANGUL_T 0x11A7u
#define HANGUL_VN 21u
#define HANGUL_TN 28u
#define HANGUL_COUNT (19u * 21u * 28u)

static uint32_t compose_pair(uint32_t a, uint32_t b) {
  if (b < FIRST_COMBINING)
    return 0;
  if (a >= HANGUL_L && a < HANGUL_L + 19 && b >= HANGUL_V && b < HANGUL_V + HANGUL_VN)
    return HANGUL_S + ((a - HANGUL_L) * HANGUL_VN + (b - HANGUL_V)) * HANGUL_TN;
  if (a >= HANGUL_S && a < HANGUL_S + HANGUL_COUNT && (a - HANGUL_S) % HANGUL_TN == 0 &&
      b > HANGUL_T && b < HANGUL_T + HANGUL_TN)
    return a + (b - HANGUL_T);
  int lo = 0, hi = uni_compose_count - 1;
  while (lo <= hi) {
    int mid = (lo + hi) / 2;
    const uni_pair *p = &uni_compose[mid];
    if (a == p->a && b == p->b)
      return p->composite;
    if (a < p->a || (a == p->a && b < p->b))
      hi = mid - 1;
    else
      lo = mid + 1;
  }
  return 0;
}

/* ---------- clean-up ---------- */

/* Unicode NFC: full canonical decomposition, canonical ordering, then composition of each
 * starter with the following characters it is not blocked from. */
static int nfc(cpbuf *in, cpbuf *out, int *changed) {
  size_t i0 = 0;
  while (i0 < in->n && in->v[i0] < FIRST_DECOMPOSABLE)
    i0++;
  if (i0 == in->n) /* Latin-1 below U+00C0 is NFC as it stands */
    return 0;
  out->n = 0;
  for (size_t i = 0; i < in->n; i++) {
    uint32_t c = in->v[i];
    if (c >= HANGUL_S && c < HANGUL_S + HANGUL_COUNT) {
      uint32_t s = c - HANGUL_S, t = s % HANGUL_TN;
      uint32_t parts[3] = {HANGUL_L + s / (HANGUL_VN * HANGUL_TN),
                           HANGUL_V + (s % (HANGUL_VN * HANGUL_TN)) / HANGUL_TN, HANGUL_T + t};
      if (cp_push_n(out, parts, t ? 3 : 2))
        return -1;
      continue;
    }
    const uni_map4 *d = find_decomp(c);
    if (d ? cp_push_n(out, d->to, d->n) : cp_push(out, c))
      return -1;
  }
  uint32_t *v = out->v;
  for (size_t i = 1; i < out->n; i++) { /* stable insertion sort of each run of marks */
    int cc = ccc_of(v[i]);
    if (cc == 0)
      continue;
    size_t j = i;
    while (j > 0 && ccc_of(v[j - 1]) > cc) {
      uint32_t t = v[j];
      v[j] = v[j - 1];
      v[j - 1] = t;
      j--;
    }
  }
  size_t n = 0;
  long starter = -1;
  int last_cc = 0;
  for (size_t i = 0; i < out->n; i++) {
    uint32_t c = v[i];
    int cc = ccc_of(c);
    if (starter >= 0) {
      int blocked = (long)n - 1 != starter && last_cc >= cc;
      uint32_t comp = blocked ? 0 : compose_pair(v[starter], c);
      if (comp) {
        v[starter] = comp;
        continue;
      }
    }
    if (cc == 0)
      starter = (long)n;
    last_cc = cc;
    v[n++] = c;
  }
  *changed |= n != in->n || memcmp(v, in->v, n * sizeof *v) != 0;
  out->n = n;
  cp_swap(in, out);
  return 0;
}

/* Windows-1252 for 0x80-0x9F (the five bytes it leaves undefined map to themselves): ftfy's
 * fix_c1_controls, and html.unescape's replacement for these numeric references. */
static const uint32_t cp1252_high[32] = {
    0x20AC, 0x81,   0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160,
    0x2039, 0x0152, 0x8D,   0x017D, 0x8F,   0x90,   0x2018, 0x2019, 0x201C, 0x201D, 0x2022,
    0x2013, 0x2014, 0x02DC, 0x2122, 0x0161, 0x203A, 0x0153, 0x9D,   0x017E, 0x0178};

static int is_ascii_digit(uint32_t c) {
  return c >= '0' && c <= '9';
}

static int entity_cmp(const void *key, const void *elem) {
  return strcmp(key, ((const uni_entity *)elem)->name);
}

static const uni_entity *find_entity(const char *name) {
  return bsearch(name, uni_html5, (size_t)uni_html5_count, sizeof uni_html5[0], entity_cmp);
}

static int is_hex(uint32_t c) {
  return is_ascii_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

static int hex_val(uint32_t c) {
  return is_ascii_digit(c) ? (int)(c - '0') : (int)((c | 0x20) - 'a' + 10);
}

static int invalid_charref(uint32_t c) {
  return (c >= 0x01 && c <= 0x08) || c == 0x0B || (c >= 0x0E && c <= 0x1F) ||
         (c >= 0x7F && c <= 0x9F) || (c >= 0xFDD0 && c <= 0xFDEF) || (c & 0xFFFE) == 0xFFFE;
}

/* A numeric reference "&#..." at v[i]: appends its replacement and returns the length consumed,
 * or 0 when there is none (html.unescape's rules, numbers saturating past U+10FFFF). */
static size_t numeric_ref(const uint32_t *v, size_t n, size_t i, cpbuf *out, int *fail) {
  size_t j = i + 2;
  int hex = j < n && (v[j] == 'x' || v[j] == 'X');
  if (hex)
    j++;
  size_t d0 = j;
  uint32_t num = 0;
  while (j < n && (hex ? is_hex(v[j]) : is_ascii_digit(v[j]))) {
    uint32_t dv = hex ? (uint32_t)hex_val(v[j]) : v[j] - '0';
    num = num > 0x110000 ? 0x110001 : num * (hex ? 16 : 10) + dv;
    j++;
  }
  if (j == d0)
    return 0;
  if (j < n && v[j] == ';')
    j++;
  uint32_t r = num;
  if (num == 0)
    r = 0xFFFD;
  else if (num == 0x0D)
    r = '\r';
  else if (num >= 0x80 && num <= 0x9F)
    r = cp1252_high[num - 0x80];
  else if ((num >= 0xD800 && num <= 0xDFFF) || num > 0x10FFFF)
    r = 0xFFFD;
  else if (invalid_charref(num))
    return j - i; /* dropped */
  if (cp_push(out, r))
    *fail = 1;
  return j - i;
}

/* A named reference at v[i] ('&' then up to 32 name characters and an optional ';'): the full
 * name, else its longest known prefix of at least two characters followed by the rest. */
static size_t named_ref(const uint32_t *v, size_t n, size_t i, cpbuf *out, int *fail) {
  char name[40];
  size_t j = i + 1, len = 0;
  while (j < n && len < 32) {
    uint32_t c = v[j];
    if (c == '\t' || c == '\n' || c == '\f' || c == ' ' || c == '<' || c == '&' || c == '#' ||
        c == ';')
      break;
    name[len++] = c < 0x80 ? (char)c : '\x01'; /* no entity name holds a non-ASCII character */
    j++;
  }
  if (len == 0)
    return 0;
  if (j < n && v[j] == ';') {
    name[len++] = ';';
    j++;
  }
  for (size_t x = len; x >= 2; x--) {
    name[x] = '\0';
    const uni_entity *ent = find_entity(name);
    if (!ent)
      continue;
    if (cp_push_n(out, ent->to, ent->n) || cp_push_n(out, v + i + 1 + x, len - x))
      *fail = 1;
    return j - i;
  }
  return 0; /* no known prefix: the text stays as it is */
}

/* html.unescape: every '&' that starts a numeric or named reference is replaced. */
static int html_unescape(cpbuf *t, cpbuf *tmp) {
  tmp->n = 0;
  int fail = 0;
  for (size_t i = 0; i < t->n && !fail;) {
    size_t used = 0;
    if (t->v[i] == '&') {
      if (i + 1 < t->n && t->v[i + 1] == '#')
        used = numeric_ref(t->v, t->n, i, tmp, &fail);
      else
        used = named_ref(t->v, t->n, i, tmp, &fail);
    }
    if (used) {
      i += used;
    } else {
      fail |= cp_push(tmp, t->v[i]);
      i++;
    }
  }
  cp_swap(t, tmp);
  return fail ? -1 : 0;
}

/* ---------- ftfy ---------- */

static int ftfy_control(uint32_t c) {
  return c <= 0x08 || c == 0x0B || (c >= 0x0E && c <= 0x1F) || c == 0x7F ||
         (c >= 0x206A && c <= 0x206F) || c == 0xFEFF || (c >= 0xFFF9 && c <= 0xFFFC);
}

static int is_ascii_alnum(uint32_t c) {
  return is_ascii_digit(c) || ((c | 0x20) >= 'a' && (c | 0x20) <= 'z');
}

/* Length of ftfy's entity pattern "&#?[0-9A-Za-z]{1,24};" at v[i], or 0. */
static size_t ftfy_entity_len(const uint32_t *v, size_t n, size_t i) {
  size_t j = i + 1, k = 0;
  if (j < n && v[j] == '#')
    j++;
  while (j + k < n && k <= 24 && is_ascii_alnum(v[j + k]))
    k++;
  return k >= 1 && k <= 24 && j + k < n && v[j + k] == ';' ? j + k + 1 - i : 0;
}

/* The named entity of length len at v[i] ("&name;") in ftfy's table: HTML5's names that end
 * in ';', then its upper-case additions. */
static const uni_entity *ftfy_entity(const uint32_t *v, size_t i, size_t len) {
  char name[32];
  for (size_t k = 1; k < len; k++)
    name[k - 1] = (char)v[i + k];
  name[len - 1] = '\0';
  const uni_entity *ent = find_entity(name);
  return ent ? ent
             : bsearch(name, uni_ftfy_upper, (size_t)uni_ftfy_upper_count, sizeof *uni_ftfy_upper,
                       entity_cmp);
}

/* ftfy's unescape_html: each match of its entity pattern that is in its table, or that is a
 * numeric reference html.unescape decodes whole, is replaced; other matches stay. */
static int ftfy_unescape(cpbuf *t, cpbuf *tmp, int *changed) {
  const uint32_t *amp = t->v;
  while (amp < t->v + t->n && *amp != '&')
    amp++;
  if (amp == t->v + t->n)
    return 0;
  tmp->n = 0;
  int fail = 0, replaced = 0;
  for (size_t i = 0; i < t->n && !fail;) {
    size_t len = t->v[i] == '&' ? ftfy_entity_len(t->v, t->n, i) : 0, used = 0;
    if (len && t->v[i + 1] == '#') {
      size_t mark = tmp->n;
      used = numeric_ref(t->v, i + len, i, tmp, &fail);
      if (used != len) { /* html.unescape decoded only a part: ftfy keeps the text */
        tmp->n = mark;
        used = 0;
      }
    } else if (len) {
      const uni_entity *ent = ftfy_entity(t->v, i, len);
      if (ent) {
        fail |= cp_push_n(tmp, ent->to, ent->n);
        used = len;
      }
    }
    replaced |= used != 0;
    if (!used) { /* re.sub goes on after the whole match; text without '&' is copied whole */
      used = len ? len : 1;
      while (!len && i + used < t->n && t->v[i + used] != '&')
        used++;
      fail |= cp_push_n(tmp, t->v + i, used);
    }
    i += used;
  }
  *changed |= replaced;
  cp_swap(t, tmp);
  return fail ? -1 : 0;
}

/* fix_c1_controls, fix_latin_ligatures, fix_character_width and uncurl_quotes on one
 * character: each maps characters alone, so applying them in turn to a character is applying
 * them in turn to the text. Up to 9 characters in out. */
static int ftfy_map_char(uint32_t c, uint32_t *out) {
  if (c < 0x80) { /* no map touches ASCII */
    out[0] = c;
    return 1;
  }
  if (c <= 0x9F)
    c = cp1252_high[c - 0x80];
  const uni_map3 *lig = find_map3(uni_ligature, uni_ligature_count, c);
  int n = 0;
  for (int k = 0; k < (lig ? lig->n : 1); k++) {
    uint32_t d = lig ? lig->to[k] : c;
    const uni_map3 *w = find_map3(uni_width, uni_width_count, d);
    for (int x = 0; x < (w ? w->n : 1); x++) {
      uint32_t q = w ? w->to[x] : d;
      if (q == 0x02BC || (q >= 0x2018 && q <= 0x201B))
        q = '\'';
      else if (q >= 0x201C && q <= 0x201F)
        q = '"';
      out[n++] = q;
    }
  }
  return n;
}

/* The character maps, then fix_line_breaks ("\r\n", "\r", U+2028, U+2029, U+0085 to "\n"; no
 * map makes a "\r" or "\n", so the "\r\n" test can look at the unmapped text). */
static int ftfy_maps(cpbuf *t, cpbuf *tmp, int *changed) {
  size_t first = 0;
  while (first < t->n && t->v[first] < 0x80 && t->v[first] != '\r')
    first++;
  if (first == t->n) /* only ASCII and no "\r": nothing to map */
    return 0;
  tmp->n = 0;
  for (size_t i = 0; i < t->n; i++) {
    uint32_t buf[9];
    int nb = ftfy_map_char(t->v[i], buf);
    *changed |= nb != 1 || buf[0] != t->v[i];
    for (int k = 0; k < nb; k++) {
      uint32_t d = buf[k];
      if (d == '\r' && i + 1 < t->n && t->v[i + 1] == '\n') {
        *changed = 1;
        continue;
      }
      if (d == '\r' || d == 0x2028 || d == 0x2029 || d == 0x85) {
        d = '\n';
        *changed = 1;
      }
      if (cp_push(tmp, d))
        return -1;
    }
  }
  cp_swap(t, tmp);
  return 0;
}

/* remove_terminal_escapes (ESC "[", Python's \d digits or ';', an ASCII letter), then
 * remove_control_chars. */
static int ftfy_strip(cpbuf *t, cpbuf *tmp, int *changed) {
  size_t first = 0; /* ESC is a control character too */
  while (first < t->n && !ftfy_control(t->v[first]))
    first++;
  if (first == t->n)
    return 0;
  tmp->n = 0;
  for (size_t i = 0; i < t->n; i++) {
    if (t->v[i] == 0x1B && i + 1 < t->n && t->v[i + 1] == '[') {
      size_t j = i + 2;
      while (j < t->n && (t->v[j] == ';' || in_ranges(uni_digit, uni_digit_count, t->v[j])))
        j++;
      uint32_t f = j < t->n ? t->v[j] : 0;
      if ((f >= 'a' && f <= 'z') || (f >= 'A' && f <= 'Z')) {
        i = j;
        continue;
      }
    }
    if (!ftfy_control(t->v[i]) && cp_push(tmp, t->v[i]))
      return -1;
  }
  *changed |= tmp->n != t->n;
  cp_swap(t, tmp);
  return 0;
}

/* One piece of fix_text, fixed until nothing changes (ftfy's fix_and_explain). A round that
 * changes the text undoes an entity or an escape (shortening it) or maps characters the next
 * round leaves alone, so the piece's length bounds the rounds; the bound guards against a
 * hang all the same. Steps skip text they cannot change. */
static int ftfy_piece(cpbuf *s, cpbuf *tmp, int unescape) {
  for (size_t round = 0, limit = s->n + 2; round < limit; round++) {
    int changed = 0;
    if ((unescape && ftfy_unescape(s, tmp, &changed)) || ftfy_maps(s, tmp, &changed) ||
        ftfy_strip(s, tmp, &changed) || nfc(s, tmp, &changed))
      return -1;
    if (!changed)
      break;
  }
  return 0;
}

/* ftfy.fix_text with its defaults except fix_encoding (README.md "Text encoder"): line by line
 * (each piece ends after its "\n"), and with HTML unescaping off from the first line that
 * holds a "<" on ("auto"). */
static int ftfy_fix_text(cpbuf *t, cpbuf *tmp) {
  cpbuf piece = {0}, out = {0};
  int unescape = 1, rc = 0;
  for (size_t pos = 0; pos < t->n && !rc;) {
    size_t end = pos;
    while (end < t->n && t->v[end] != '\n')
      end++;
    end += end < t->n;
    for (size_t k = pos; k < end; k++)
      unescape &= t->v[k] != '<';
    piece.n = 0;
    rc = cp_push_n(&piece, t->v + pos, end - pos) || ftfy_piece(&piece, tmp, unescape) ||
         cp_push_n(&out, piece.v, piece.n);
    pos = end;
  }
  if (!rc)
    cp_swap(t, &out);
  free(piece.v);
  free(out.v);
  return rc;
}

static int is_space(uint32_t c) {
  return in_ranges(uni_space, uni_space_count, c);
}

static int is_pyspace(uint32_t c) {
  return in_ranges(uni_pyspace, uni_pyspace_count, c);
}

static void strip(cpbuf *t) {
  size_t a = 0, b = t->n;
  while (a < b && is_pyspace(t->v[a]))
    a++;
  while (b > a && is_pyspace(t->v[b - 1]))
    b--;
  if (a) /* an empty text has no buffer */
    memmove(t->v, t->v + a, (b - a) * sizeof *t->v);
  t->n = b - a;
}

/* Python's Final_Sigma rule for the capital sigma at t[i]: a cased character before it and
 * none after it, case-ignorable characters skipped both ways. */
static int final_sigma(const cpbuf *t, size_t i) {
  size_t j = i;
  while (j > 0 && in_ranges(uni_case_ignorable, uni_case_ignorable_count, t->v[j - 1]))
    j--;
  if (j == 0 || !in_ranges(uni_cased, uni_cased_count, t->v[j - 1]))
    return 0;
  for (j = i + 1; j < t->n; j++)
    if (!in_ranges(uni_case_ignorable, uni_case_ignorable_count, t->v[j]))
      return !in_ranges(uni_cased, uni_cased_count, t->v[j]);
  return 1;
}

/* whitespace_clean: each run of \s becomes one space, then strip; then str.lower(). */
static int collapse_and_lower(cpbuf *t, cpbuf *tmp) {
  tmp->n = 0;
  for (size_t i = 0; i < t->n;) {
    if (is_space(t->v[i])) {
      while (i < t->n && is_space(t->v[i]))
        i++;
      if (cp_push(tmp, ' '))
        return -1;
      continue;
    }
    if (cp_push(tmp, t->v[i]))
      return -1;
    i++;
  }
  cp_swap(t, tmp);
  strip(t);
  tmp->n = 0;
  for (size_t i = 0; i < t->n; i++) {
    if (t->v[i] == 0x3A3) {
      if (cp_push(tmp, final_sigma(t, i) ? 0x3C2 : 0x3C3))
        return -1;
      continue;
    }
    const uni_map3 *m = find_map3(uni_lower, uni_lower_count, t->v[i]);
    if (m ? cp_push_n(tmp, m->to, m->n) : cp_push(tmp, t->v[i]))
      return -1;
  }
  cp_swap(t, tmp);
  return 0;
}

/* CLIP's basic_clean then whitespace_clean then lower(), on the decoded prompt in t. */
static int clean(cpbuf *t, err *e) {
  cpbuf tmp = {0};
  int rc = ftfy_fix_text(t, &tmp) || html_unescape(t, &tmp) || html_unescape(t, &tmp);
  if (!rc) {
    strip(t);
    rc = collapse_and_lower(t, &tmp);
  }
  free(tmp.v);
  return rc ? err_set(e, ERR_NOMEM, "out of memory cleaning the prompt") : 0;
}

static int decode_prompt(const char *text, size_t len, cpbuf *t, err *e) {
  if (!text && len)
    return err_set(e, ERR_INVALID, "prompt is NULL");
  if (len > CLIP_MAX_PROMPT_BYTES)
    return err_set(e, ERR_INVALID, "prompt is %zu bytes, more than the %d accepted", len,
                   CLIP_MAX_PROMPT_BYTES);
  if (memchr(text ? text : "", '\0', len))
    return err_set(e, ERR_INVALID, "prompt contains a NUL byte");
  int rc = utf8_decode(text, len, t, e);
  return rc ? rc : clean(t, e);
}

int clip_clean_text(const char *text, size_t len, char **out, err *e) {
  cpbuf t = {0};
  *out = NULL;
  int rc = decode_prompt(text, len, &t, e);
  if (!rc) {
    *out = mem_malloc(t.n * 4 + 1);
    if (!*out) {
      rc = err_set(e, ERR_NOMEM, "out of memory cleaning the prompt");
    } else {
      size_t o = 0;
      for (size_t i = 0; i < t.n; i++)
        o += (size_t)utf8_put(t.v[i], *out + o);
      (*out)[o] = '\0';
    }
  }
  free(t.v);
  return rc;
}

/* ---------- vocabulary: interned symbols and merge ranks ---------- */

typedef struct pair_slot {
  uint64_t key; /* (first << 32 | second) + 1; 0 marks an empty slot */
  int rank, merged;
} pair_slot;

struct clip_tokenizer {
  char *chars; /* every symbol's bytes, NUL-terminated, one after another */
  size_t chars_len, chars_cap;
  size_t *off;   /* symbol -> offset in chars */
  int *vocab_id; /* symbol -> id in vocab.json, or -1 */
  int count, cap;
  int *slots; /* open addressing over symbols, -1 empty */
  size_t slot_mask;
  pair_slot *pairs;
  size_t pair_mask, npairs;
  int byte_sym[256], byte_end[256]; /* the byte's character, and with "</w>" */
  int64_t bos, eos, pad, unk, sot_literal, eot_literal;
  int length;
};

static uint64_t hash_bytes(const char *s, size_t n) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; i++)
    h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
  return h;
}

static uint64_t hash_u64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  return x;
}

static int sym_find(const clip_tokenizer *t, const char *s, size_t n) {
  for (size_t h = hash_bytes(s, n) & t->slot_mask;; h = (h + 1) & t->slot_mask) {
    int id = t->slots[h];
    if (id < 0)
      return -1;
    const char *c = t->chars + t->off[id];
    if (strncmp(c, s, n) == 0 && c[n] == '\0')
      return id;
  }
}

static int sym_grow(clip_tokenizer *t) {
  int cap = t->cap ? t->cap * 2 : 1 << 16;
  size_t *off = mem_realloc(t->off, (size_t)cap * sizeof *off);
  if (!off)
    return -1;
  t->off = off;
  int *vid = mem_realloc(t->vocab_id, (size_t)cap * sizeof *vid);
  if (!vid)
    return -1;
  t->vocab_id = vid;
  size_t nslots = (size_t)cap * 2;
  int *slots = mem_malloc(nslots * sizeof *slots);
  if (!slots)
    return -1;
  free(t->slots);
  t->slots = slots;
  t->slot_mask = nslots - 1;
  memset(slots, 0xff, nslots * sizeof *slots);
  t->cap = cap;
  for (int id = 0; id < t->count; id++) {
    const char *c = t->chars + t->off[id];
    size_t h = hash_bytes(c, strlen(c)) & t->slot_mask;
    while (slots[h] >= 0)
      h = (h + 1) & t->slot_mask;
    slots[h] = id;
  }
  return 0;
}

/* The symbol's id, added when new; -1 when out of memory. */
static int sym_intern(clip_tokenizer *t, const char *s, size_t n) {
  if (t->cap) {
    int id = sym_find(t, s, n);
    if (id >= 0)
      return id;
  }
  if (t->count + 1 > t->cap && sym_grow(t)) /* slots stay at most half full */
    return -1;
  if (t->chars_len + n + 1 > t->chars_cap) {
    size_t cap = t->chars_cap ? t->chars_cap : 1 << 20;
    while (cap < t->chars_len + n + 1)
      cap *= 2;
    char *c = mem_realloc(t->chars, cap);
    if (!c)
      return -1;
    t->chars = c;
    t->chars_cap = cap;
  }
  memcpy(t->chars + t->chars_len, s, n);
  t->chars[t->chars_len + n] = '\0';
  int id = t->count++;
  t->off[id] = t->chars_len;
  t->vocab_id[id] = -1;
  t->chars_len += n + 1;
  size_t h = hash_bytes(s, n) & t->slot_mask;
  while (t->slots[h] >= 0)
    h = (h + 1) & t->slot_mask;
  t->slots[h] = id;
  return id;
}

static const pair_slot *pair_get(const clip_tokenizer *t, int a, int b) {
  uint64_t key = ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1;
  for (size_t h = hash_u64(key) & t->pair_mask;; h = (h + 1) & t->pair_mask) {
    if (t->pairs[h].key == key)
      return &t->pairs[h];
    if (t->pairs[h].key == 0)
      return NULL;
  }
}

/* A merge listed twice keeps its later rank, as the reference's dict(zip(merges, ranks)). */
static void pair_put(clip_tokenizer *t, int a, int b, int rank, int merged) {
  uint64_t key = ((uint64_t)(uint32_t)a << 32 | (uint32_t)b) + 1;
  size_t h = hash_u64(key) & t->pair_mask;
  while (t->pairs[h].key != 0 && t->pairs[h].key != key)
    h = (h + 1) & t->pair_mask;
  if (t->pairs[h].key == 0)
    t->npairs++;
  t->pairs[h] = (pair_slot){key, rank, merged};
}

void clip_tokenizer_free(clip_tokenizer *t) {
  if (!t)
    return;
  free(t->chars);
  free(t->off);
  free(t->vocab_id);
  free(t->slots);
  free(t->pairs);
  free(t);
}

int clip_tokenizer_length(const clip_tokenizer *t) {
  return t->length;
}

int64_t clip_tokenizer_pad_id(const clip_tokenizer *t) {
  return t->pad;
}

/* ---------- loading ---------- */

static void join_path(char *out, size_t cap, const char *dir, const char *file) {
  snprintf(out, cap, "%s/%s", dir, file);
}

static int load_vocab(clip_tokenizer *t, const char *dir, err *e) {
  char path[4096];
  join_path(path, sizeof path, dir, "vocab.json");
  json_error_t je;
  json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
  if (!root)
    return err_set(e, ERR_FORMAT, "%s: %s (line %d)", path, je.text, je.line);
  int rc = 0;
  if (!json_is_object(root) || json_object_size(root) == 0 ||
      json_object_size(root) > CLIP_MAX_VOCAB)
    rc = err_set(e, ERR_FORMAT, "%s: expected an object of 1 to %d token -> id entries", path,
                 CLIP_MAX_VOCAB);
  const char *key;
  json_t *val;
  json_object_foreach(root, key, val) {
    if (rc)
      break;
    json_int_t id = json_is_integer(val) ? json_integer_value(val) : -1;
    if (id < 0 || id >= CLIP_MAX_VOCAB) {
      rc = err_set(e, ERR_FORMAT, "%s: token \"%.40s\" has id %s; ids are integers 0 to %d", path,
                   key, json_is_integer(val) ? "out of range" : "that is not an integer",
                   CLIP_MAX_VOCAB - 1);
      break;
    }
    int sym = sym_intern(t, key, strlen(key));
    if (sym < 0)
      rc = err_set(e, ERR_NOMEM, "out of memory reading %s", path);
    else
      t->vocab_id[sym] = (int)id;
  }
  json_decref(root);
  return rc;
}

static char *read_small_file(const char *path, size_t max, size_t *len, err *e) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    err_set(e, ERR_IO, "cannot open %s", path);
    return NULL;
  }
  char *buf = mem_malloc(max + 1);
  size_t n = buf ? fread(buf, 1, max + 1, f) : 0;
  int bad = ferror(f);
  fclose(f);
  if (!buf) {
    err_set(e, ERR_NOMEM, "out of memory reading %s", path);
  } else if (bad) {
    err_set(e, ERR_IO, "cannot read %s", path);
  } else if (n > max) {
    err_set(e, ERR_FORMAT, "%s is larger than %zu bytes", path, max);
  } else {
    buf[n] = '\0';
    *len = n;
    return buf;
  }
  free(buf);
  return NULL;
}

static int is_ascii_ws(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

/* One merge line: two symbols separated by whitespace. */
static int add_merge(clip_tokenizer *t, char *line, int rank, const char *path, int lineno,
                     err *e) {
  char *parts[3];
  int np = 0;
  for (char *p = line; *p && np < 3;) {
    while (*p && is_ascii_ws(*p))
      p++;
    if (!*p)
      break;
    parts[np++] = p;
    while (*p && !is_ascii_ws(*p))
      p++;
    if (*p)
      *p++ = '\0';
  }
  if (np != 2)
    return err_set(e, ERR_FORMAT, "%s line %d: expected two symbols separated by a space", path,
                   lineno);
  size_t la = strlen(parts[0]), lb = strlen(parts[1]);
  char joined[512];
  if (la + lb >= sizeof joined)
    return err_set(e, ERR_FORMAT, "%s line %d: symbol longer than %zu bytes", path, lineno,
                   sizeof joined / 2);
  memcpy(joined, parts[0], la);
  memcpy(joined + la, parts[1], lb + 1);
  int a = sym_intern(t, parts[0], la), b = sym_intern(t, parts[1], lb);
  int m = sym_intern(t, joined, la + lb);
  if (a < 0 || b < 0 || m < 0)
    return err_set(e, ERR_NOMEM, "out of memory reading %s", path);
  pair_put(t, a, b, rank, m);
  return 0;
}

/* merges.txt as Hugging Face reads it: the file stripped, its first line (the "#version"
 * header) skipped, at most CLIP_MAX_MERGES merges. */
static int load_merges(clip_tokenizer *t, const char *dir, err *e) {
  char path[4096];
  join_path(path, sizeof path, dir, "merges.txt");
  size_t len;
  char *buf = read_small_file(path, 64u << 20, &len, e);
  if (!buf)
    return e ? e->code : ERR_IO;
  char *s = buf, *end = buf + len;
  while (s < end && is_ascii_ws(*s))
    s++;
  while (end > s && is_ascii_ws(end[-1]))
    *--end = '\0';
  size_t pcap = 1;
  while (pcap < (size_t)CLIP_MAX_MERGES * 2)
    pcap *= 2;
  t->pairs = mem_calloc(pcap, sizeof *t->pairs);
  t->pair_mask = pcap - 1;
  int rc = t->pairs ? 0 : err_set(e, ERR_NOMEM, "out of memory reading %s", path);
  char *nl = memchr(s, '\n', (size_t)(end - s));
  char *line = nl ? nl + 1 : end;
  for (int rank = 0, lineno = 2; !rc && line < end && rank < CLIP_MAX_MERGES; rank++, lineno++) {
    nl = memchr(line, '\n', (size_t)(end - line));
    if (nl)
      *nl = '\0';
    rc = add_merge(t, line, rank, path, lineno, e);
    line = nl ? nl + 1 : end;
  }
  free(buf);
  return rc;
}

/* A special token as special_tokens_map.json or tokenizer_config.json gives it: a string or an
 * AddedToken object {"content": ...}. NULL when absent. */
static const char *special_token(const json_t *root, const char *key) {
  const json_t *v = root ? json_object_get(root, key) : NULL;
  if (json_is_object(v))
    v = json_object_get(v, "content");
  return json_is_string(v) ? json_string_value(v) : NULL;
}

static int vocab_lookup(const clip_tokenizer *t, const char *tok, const char *what, const char *dir,
                        int64_t *id, err *e) {
  int sym = sym_find(t, tok, strlen(tok));
  if (sym < 0 || t->vocab_id[sym] < 0)
    return err_set(e, ERR_FORMAT, "%s: the %s \"%.60s\" is not in vocab.json", dir, what, tok);
  *id = t->vocab_id[sym];
  return 0;
}

static json_t *load_optional_json(const char *dir, const char *file, int *rc, err *e) {
  char path[4096];
  join_path(path, sizeof path, dir, file);
  FILE *f = fopen(path, "rb");
  if (!f)
    return NULL;
  fclose(f);
  json_error_t je;
  /* Hugging Face writes an unset model_max_length as 1e30 spelt as an integer */
  json_t *j = json_load_file(path, JSON_DECODE_INT_AS_REAL, &je);
  if (!j || !json_is_object(j)) {
    *rc = err_set(e, ERR_FORMAT, "%s: %s", path, j ? "expected a JSON object" : je.text);
    json_decref(j);
    return NULL;
  }
  return j;
}

/* Special tokens (special_tokens_map.json first, then tokenizer_config.json, then CLIP's) and
 * model_max_length; a given config stands in for both files. */
static int load_config(clip_tokenizer *t, const char *dir, const json_t *given, err *e) {
  int rc = 0;
  json_t *map = given ? NULL : load_optional_json(dir, "special_tokens_map.json", &rc, e);
  json_t *own = given || rc ? NULL : load_optional_json(dir, "tokenizer_config.json", &rc, e);
  const json_t *cfg = given ? given : own;
  if (given && !json_is_object(given))
    rc = err_set(e, ERR_FORMAT, "the tokenizer config is not a JSON object");
  const char *keys[4] = {"bos_token", "eos_token", "unk_token", "pad_token"};
  const char *names[4] = {"start token", "end token", "unknown token", "pad token"};
  const char *defaults[4] = {"<|startoftext|>", "<|endoftext|>", "<|endoftext|>", NULL};
  int64_t *ids[4] = {&t->bos, &t->eos, &t->unk, &t->pad};
  for (int i = 0; i < 4 && !rc; i++) {
    const char *tok = special_token(map, keys[i]);
    if (!tok)
      tok = special_token(cfg, keys[i]);
    if (!tok)
      tok = defaults[i];
    if (tok)
      rc = vocab_lookup(t, tok, names[i], dir, ids[i], e);
    else
      t->pad = t->eos; /* CLIP's own files name no pad token; Stable Diffusion 1.x pads so */
  }
  t->length = 77;
  const json_t *ml = cfg ? json_object_get(cfg, "model_max_length") : NULL;
  if (!rc && ml) {
    double v = json_is_number(ml) ? json_number_value(ml) : -1;
    if (v < 2 || v > 1024 || v != (int)v)
      rc = err_set(e, ERR_FORMAT,
                   "%s/tokenizer_config.json: model_max_length must be an integer from 2 to 1024",
                   dir);
    else
      t->length = (int)v;
  }
  if (!rc)
    rc = vocab_lookup(t, "<|startoftext|>", "start token", dir, &t->sot_literal, e);
  if (!rc)
    rc = vocab_lookup(t, "<|endoftext|>", "end token", dir, &t->eot_literal, e);
  json_decref(map);
  json_decref(own);
  return rc;
}

/* CLIP's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other 68 bytes for
 * U+0100 upwards in byte order. Each byte's one-character symbol, with and without "</w>". */
static int byte_symbols(clip_tokenizer *t, err *e) {
  int next = 0;
  for (int b = 0; b < 256; b++) {
    int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
    uint32_t cp = printable ? (uint32_t)b : 0x100u + (uint32_t)next++;
    char s[8];
    int n = utf8_put(cp, s);
    memcpy(s + n, "</w>", 4);
    t->byte_sym[b] = sym_intern(t, s, (size_t)n);
    t->byte_end[b] = sym_intern(t, s, (size_t)n + 4);
    if (t->byte_sym[b] < 0 || t->byte_end[b] < 0)
      return err_set(e, ERR_NOMEM, "out of memory loading the tokenizer");
  }
  return 0;
}

int clip_tokenizer_new(const char *dir, clip_tokenizer **out, err *e) {
  return clip_tokenizer_new_from(dir, NULL, out, e);
}

int clip_tokenizer_new_from(const char *dir, const json_t *config, clip_tokenizer **out, err *e) {
  *out = NULL;
  clip_tokenizer *t = mem_calloc(1, sizeof *t);
  if (!t)
    return err_set(e, ERR_NOMEM, "out of memory loading the tokenizer");
  int rc = load_vocab(t, dir, e);
  if (!rc)
    rc = load_merges(t, dir, e);
  if (!rc)
    rc = byte_symbols(t, e);
  if (!rc)
    rc = load_config(t, dir, config, e);
  if (rc) {
    clip_tokenizer_free(t);
    return rc;
  }
  *out = t;
  return 0;
}

/* ---------- encoding ---------- */

/* regex's simple case folding, as the IGNORECASE pattern compares: after lower() only the long
 * s still differs from its ASCII fold. */
static uint32_t fold(uint32_t c) {
  return c == 0x17F ? 's' : c;
}

static int match_literal(const cpbuf *t, size_t i, const char *lit) {
  size_t n = strlen(lit);
  if (i + n > t->n)
    return 0;
  for (size_t k = 0; k < n; k++)
    if (fold(t->v[i + k]) != (unsigned char)lit[k])
      return 0;
  return 1;
}

/* Length of the pre-token at t[i] (CLIP's pattern, alternatives in order), 0 for a character no
 * alternative matches (whitespace), which findall skips. *special: the token is a literal start
 * or end token. */
static size_t pretoken(const cpbuf *t, size_t i, int *special) {
  static const char *const lits[] = {
      "<|startoftext|>", "<|endoftext|>", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d"};
  *special = 0;
  for (int k = 0; k < 9; k++)
    if (match_literal(t, i, lits[k])) {
      *special = k < 2 ? k + 1 : 0;
      return strlen(lits[k]);
    }
  size_t j = i;
  while (j < t->n && in_ranges(uni_letter, uni_letter_count, t->v[j]))
    j++;
  if (j > i)
    return j - i;
  if (in_ranges(uni_number, uni_number_count, t->v[i]))
    return 1;
  while (j < t->n && in_ranges(uni_other, uni_other_count, t->v[j]))
    j++;
  return j - i;
}

typedef struct tok_out {
  int64_t *ids;
  int n, cap, truncated;
} tok_out;

static void emit(tok_out *o, int64_t id) {
  if (o->n < o->cap)
    o->ids[o->n++] = id;
  else
    o->truncated = 1;
}

/* BPE over one pre-token's bytes: repeatedly merge every occurrence, left to right, of the
 * adjacent pair with the lowest rank. rank[] caches each adjacent pair's rank so a pass only
 * looks up the pairs a merge touched. */
static int bpe_word(const clip_tokenizer *t, const unsigned char *bytes, int n, tok_out *o) {
  int *sym = mem_malloc((size_t)n * 4 * sizeof(int));
  if (!sym)
    return -1;
  int *rank = sym + n, *nsym = sym + 2 * n, *nrank = sym + 3 * n;
  for (int i = 0; i < n; i++)
    sym[i] = i == n - 1 ? t->byte_end[bytes[i]] : t->byte_sym[bytes[i]];
  for (int i = 0; i + 1 < n; i++) {
    const pair_slot *p = pair_get(t, sym[i], sym[i + 1]);
    rank[i] = p ? p->rank : NO_RANK;
  }
  while (n > 1) {
    int best = 0;
    for (int i = 1; i + 1 < n; i++)
      if (rank[i] < rank[best])
        best = i;
    if (rank[best] == NO_RANK)
      break;
    int a = sym[best], b = sym[best + 1];
    int merged = pair_get(t, a, b)->merged, m = 0;
    /* nrank[k] < 0 marks "recompute": the pair's left or right symbol is new */
    for (int i = 0; i < n;) {
      if (i + 1 < n && sym[i] == a && sym[i + 1] == b) {
        nsym[m] = merged;
        nrank[m] = -1;
        if (m > 0)
          nrank[m - 1] = -1;
        m++;
        i += 2;
      } else {
        nsym[m] = sym[i];
        nrank[m] = i + 1 < n ? rank[i] : NO_RANK;
        m++;
        i++;
      }
    }
    for (int k = 0; k + 1 < m; k++)
      if (nrank[k] < 0) {
        const pair_slot *p = pair_get(t, nsym[k], nsym[k + 1]);
        nrank[k] = p ? p->rank : NO_RANK;
      }
    int *ts = sym, *tr = rank;
    sym = nsym;
    rank = nrank;
    nsym = ts;
    nrank = tr;
    n = m;
  }
  for (int i = 0; i < n; i++) {
    int v = t->vocab_id[sym[i]];
    emit(o, v >= 0 ? v : t->unk);
  }
  free(sym < nsym ? sym : nsym);
  return 0;
}

/* The cleaned text's tokens into o, stopping once o is full and one more token was seen. */
static int encode_text(const clip_tokenizer *t, const cpbuf *text, tok_out *o, err *e) {
  unsigned char *bytes = mem_malloc(text->n * 4 + 1);
  if (!bytes)
    return err_set(e, ERR_NOMEM, "out of memory tokenizing the prompt");
  int rc = 0;
  for (size_t i = 0; i < text->n && !o->truncated && !rc;) {
    int special;
    size_t len = pretoken(text, i, &special);
    if (len == 0) {
      i++;
      continue;
    }
    if (special) {
      emit(o, special == 1 ? t->sot_literal : t->eot_literal);
    } else {
      int nb = 0;
      for (size_t k = i; k < i + len; k++)
        nb += utf8_put(text->v[k], (char *)bytes + nb);
      if (bpe_word(t, bytes, nb, o))
        rc = err_set(e, ERR_NOMEM, "out of memory tokenizing the prompt");
    }
    i += len;
  }
  free(bytes);
  return rc;
}

int clip_tokenize(const clip_tokenizer *t, const char *text, size_t len, int64_t *ids, int *ntokens,
                  int *truncated, err *e) {
  cpbuf cp = {0};
  int rc = decode_prompt(text, len, &cp, e);
  tok_out o = {.ids = ids + 1, .cap = t->length - 2};
  if (!rc)
    rc = encode_text(t, &cp, &o, e);
  free(cp.v);
  if (rc)
    return rc;
  ids[0] = t->bos;
  ids[o.n + 1] = t->eos;
  for (int i = o.n + 2; i < t->length; i++)
    ids[i] = t->pad;
  if (ntokens)
    *ntokens = o.n;
  if (truncated)
    *truncated = o.truncated;
  return 0;
}
