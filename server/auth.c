/* API keys: loaded from a file or the environment (never logged: only their names appear),
 * checked with a comparison whose time does not depend on where a guess goes wrong, nor on
 * which key matched. */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include "base64.h"
#include "internal.h"

#define MIN_KEY_LEN 16

static const struct {
  const char *name;
  int bit;
} scope_names[] = {{"read", SCOPE_READ},       {"submit", SCOPE_SUBMIT}, {"cancel", SCOPE_CANCEL},
                   {"metrics", SCOPE_METRICS}, {"admin", SCOPE_ADMIN},   {"all", 31}};

const char *auth_scope_name(int scope) {
  for (size_t i = 0; i < sizeof scope_names / sizeof *scope_names; i++)
    if (scope_names[i].bit == scope)
      return scope_names[i].name;
  return "?";
}

static int parse_scopes(const char *s, int *out, const char *where, err *e) {
  *out = 0;
  char buf[256];
  snprintf(buf, sizeof buf, "%s", s);
  char *save = NULL;
  for (char *t = strtok_r(buf, ",+", &save); t; t = strtok_r(NULL, ",+", &save)) {
    int found = 0;
    for (size_t i = 0; i < sizeof scope_names / sizeof *scope_names; i++)
      if (strcmp(t, scope_names[i].name) == 0) {
        *out |= scope_names[i].bit;
        found = 1;
      }
    if (!found)
      return err_set(e, ERR_INVALID,
                     "%s: unknown scope '%s' (read, submit, cancel, metrics, admin, all)", where,
                     t);
  }
  return ERR_OK;
}

static int add_key(auth *a, const char *name, const char *key, int scopes, const char *where,
                   err *e) {
  size_t len = strlen(key);
  if (len < MIN_KEY_LEN || len >= sizeof a->keys[0].key)
    return err_set(e, ERR_INVALID, "%s: key '%s' must be %d-255 characters long", where, name,
                   MIN_KEY_LEN);
  for (const char *p = key; *p; p++)
    if (*p <= ' ' || *p >= 127 || *p == ':')
      return err_set(e, ERR_INVALID, "%s: key '%s' has characters other than printable ASCII",
                     where, name);
  if (!*name || strlen(name) >= sizeof a->keys[0].name)
    return err_set(e, ERR_INVALID, "%s: key names must be 1-63 characters", where);
  for (int i = 0; i < a->n; i++)
    if (strcmp(a->keys[i].name, name) == 0)
      return err_set(e, ERR_INVALID, "%s: key name '%s' appears twice", where, name);
  auth_key *n = realloc(a->keys, sizeof *n * (size_t)(a->n + 1));
  if (!n)
    return err_set(e, ERR_NOMEM, "out of memory");
  a->keys = n;
  auth_key *k = &a->keys[a->n++];
  memset(k, 0, sizeof *k);
  snprintf(k->name, sizeof k->name, "%s", name);
  memcpy(k->key, key, len);
  k->len = len;
  k->scopes = scopes;
  return ERR_OK;
}

static int load_file(auth *a, const char *file, err *e) {
  FILE *f = fopen(file, "r");
  if (!f)
    return err_set(e, ERR_IO, "api_keys_file %s: cannot open", file);
  struct stat st;
  if (fstat(fileno(f), &st) == 0 && (st.st_mode & 0004))
    fprintf(stderr, "denoised: warning: api_keys_file %s is world-readable\n", file);
  char line[1024];
  int lineno = 0, rc = ERR_OK;
  while (!rc && fgets(line, sizeof line, f)) {
    lineno++;
    char where[1100];
    snprintf(where, sizeof where, "api_keys_file %s:%d", file, lineno);
    char *hash = strchr(line, '#');
    if (hash)
      *hash = 0;
    char *save = NULL, *name = strtok_r(line, " \t\r\n", &save);
    if (!name)
      continue;
    char *key = strtok_r(NULL, " \t\r\n", &save), *sc = strtok_r(NULL, " \t\r\n", &save);
    int scopes = SCOPE_DEFAULT;
    if (!key) {
      rc = err_set(e, ERR_INVALID, "%s: expected NAME KEY [SCOPES]", where);
      break;
    }
    if (sc && (rc = parse_scopes(sc, &scopes, where, e)))
      break;
    rc = add_key(a, name, key, scopes, where, e);
  }
  fclose(f);
  return rc;
}

static int load_env(auth *a, const char *env, err *e) {
  char *buf = strdup(env);
  if (!buf)
    return err_set(e, ERR_NOMEM, "out of memory");
  int rc = ERR_OK, n = 0;
  char *save = NULL;
  for (char *t = strtok_r(buf, ", \t\n", &save); t && !rc; t = strtok_r(NULL, ", \t\n", &save)) {
    char *c1 = strchr(t, ':');
    int scopes = SCOPE_DEFAULT;
    n++;
    if (!c1) {
      char name[64];
      snprintf(name, sizeof name, "env-%d", n);
      rc = add_key(a, name, t, scopes, "DENOISED_API_KEYS", e);
      continue;
    }
    *c1 = 0;
    char *key = c1 + 1, *c2 = strchr(key, ':');
    if (c2) {
      *c2 = 0;
      if ((rc = parse_scopes(c2 + 1, &scopes, "DENOISED_API_KEYS", e)))
        break;
    }
    rc = add_key(a, t, key, scopes, "DENOISED_API_KEYS", e);
  }
  free(buf);
  return rc;
}

int auth_load(const char *file, const char *env, auth *out, err *e) {
  auth a = {0};
  int rc = ERR_OK;
  if (file && *file)
    rc = load_file(&a, file, e);
  if (!rc && env && *env)
    rc = load_env(&a, env, e);
  if (rc) {
    auth_free(&a);
    return rc;
  }
  *out = a;
  return ERR_OK;
}

void auth_free(auth *a) {
  if (a->keys)
    memset(a->keys, 0, sizeof *a->keys * (size_t)a->n);
  free(a->keys);
  a->keys = NULL;
  a->n = 0;
}

/* Equal lengths and bytes, touching every byte of the stored key whatever the guess. */
static int ct_equal(const char *guess, size_t glen, const auth_key *k) {
  volatile unsigned char diff = (unsigned char)(glen != k->len);
  for (size_t i = 0; i < sizeof k->key; i++) {
    unsigned char g = i < glen ? (unsigned char)guess[i] : 0;
    diff |= (unsigned char)(g ^ (unsigned char)k->key[i]);
  }
  return diff == 0;
}

const auth_key *auth_check(const auth *a, const char *header) {
  if (!header)
    return NULL;
  char decoded[512];
  const char *tok = NULL;
  size_t len = 0;
  if (strncasecmp(header, "Bearer ", 7) == 0) {
    tok = header + 7;
    while (*tok == ' ')
      tok++;
    len = strlen(tok);
  } else if (strncasecmp(header, "Basic ", 6) == 0) { /* AUTOMATIC1111 clients: key = password */
    const char *b = header + 6;
    uint8_t *raw = NULL;
    size_t rl = 0;
    if (strlen(b) < 700 && base64_decode(b, strlen(b), &raw, &rl) == 0 && rl < sizeof decoded) {
      memcpy(decoded, raw, rl);
      decoded[rl] = 0;
      char *colon = memchr(decoded, ':', rl);
      if (colon) {
        tok = colon + 1;
        len = rl - (size_t)(colon + 1 - decoded);
      }
    }
    free(raw);
  }
  if (!tok || len == 0 || len >= 256)
    return NULL;
  const auth_key *hit = NULL;
  for (int i = 0; i < a->n; i++) /* no early exit: timing says nothing about which key */
    if (ct_equal(tok, len, &a->keys[i]))
      hit = &a->keys[i];
  memset(decoded, 0, sizeof decoded);
  return hit;
}
