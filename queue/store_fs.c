/* The directory store: one JSON file per job and one PNG per image, each written to a temporary
 * name, fsync'ed, renamed into place and made durable by an fsync of the directory. A lock file
 * keeps a second daemon off the same directory. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mem.h"
#include "store.h"

typedef struct fs_store {
  store base;
  char dir[1024];
  int jobs_fd, images_fd, lock_fd;
  store_fault *fault;
} fs_store;

/* ---- the system calls, through the test-only fault counters ---- */

static int fault_hit(const fs_store *s, store_fault_kind k) {
  store_fault *f = s->fault;
  if (!f)
    return 0;
  const long n = atomic_fetch_add(&f->calls[k], 1) + 1, at = atomic_load(&f->fail_at[k]);
  if (at <= 0 || n < at || (n > at && !atomic_load(&f->sticky)))
    return 0;
  atomic_fetch_add(&f->injected, 1);
  const int en = atomic_load(&f->errnum);
  errno = en ? en : EIO;
  return 1;
}

static int io_open(const fs_store *s, int dirfd, const char *name, int flags, mode_t mode) {
  if (fault_hit(s, (flags & O_CREAT) ? STORE_FAULT_WRITE : STORE_FAULT_READ))
    return -1;
  return openat(dirfd, name, flags, mode);
}

static ssize_t io_write(const fs_store *s, int fd, const void *p, size_t n) {
  return fault_hit(s, STORE_FAULT_WRITE) ? -1 : write(fd, p, n);
}

static ssize_t io_read(const fs_store *s, int fd, void *p, size_t n) {
  return fault_hit(s, STORE_FAULT_READ) ? -1 : read(fd, p, n);
}

static int io_fsync(const fs_store *s, int fd) {
  return fault_hit(s, STORE_FAULT_FSYNC) ? -1 : fsync(fd);
}

static int io_rename(const fs_store *s, int dirfd, const char *from, const char *to) {
  return fault_hit(s, STORE_FAULT_RENAME) ? -1 : renameat(dirfd, from, dirfd, to);
}

int store_fault_parse(const char *text, store_fault *f, err *e) {
  static const char *const kinds[] = {"write", "fsync", "rename", "read"};
  char kind[16] = "", opt1[16] = "", opt2[16] = "";
  long n = 0;
  int got = sscanf(text, "%15[a-z]:%ld:%15[a-zA-Z]:%15[a-zA-Z]", kind, &n, opt1, opt2);
  int k = 0;
  while (k < STORE_FAULT_KINDS && strcmp(kind, kinds[k]) != 0)
    k++;
  if (got < 2 || k == STORE_FAULT_KINDS || n < 1)
    return err_set(e, ERR_INVALID, "fault '%s': expected KIND:N[:sticky][:ENOSPC|EIO|EROFS]", text);
  memset(f, 0, sizeof *f);
  atomic_store(&f->fail_at[k], n);
  for (const char *o = opt1; o; o = o == opt1 ? opt2 : NULL) {
    if (strcmp(o, "sticky") == 0)
      atomic_store(&f->sticky, 1);
    else if (strcmp(o, "ENOSPC") == 0)
      atomic_store(&f->errnum, ENOSPC);
    else if (strcmp(o, "EROFS") == 0)
      atomic_store(&f->errnum, EROFS);
    else if (strcmp(o, "EIO") == 0)
      atomic_store(&f->errnum, EIO);
    else if (*o)
      return err_set(e, ERR_INVALID, "fault '%s': unknown option '%s'", text, o);
  }
  return ERR_OK;
}

/* ---- files ---- */

static int write_all(const fs_store *s, int fd, const void *buf, size_t len) {
  const char *p = buf;
  while (len) {
    ssize_t w = io_write(s, fd, p, len);
    if (w < 0) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    p += w;
    len -= (size_t)w;
  }
  return 0;
}

/* tmp file, fsync, rename; the caller syncs the directory. */
static int write_atomic(fs_store *s, int dirfd, const char *sub, const char *name, const void *data,
                        size_t len, err *e) {
  char tmp[300];
  snprintf(tmp, sizeof tmp, ".tmp-%s", name);
  int fd = io_open(s, dirfd, tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
  if (fd < 0)
    return err_set(e, ERR_IO, "state directory %s: creating %s/%s: %s", s->dir, sub, tmp,
                   strerror(errno));
  if (write_all(s, fd, data, len) != 0 || io_fsync(s, fd) != 0) {
    int en = errno;
    close(fd);
    unlinkat(dirfd, tmp, 0);
    return err_set(e, ERR_IO, "state directory %s: writing %s/%s: %s", s->dir, sub, name,
                   strerror(en));
  }
  if (close(fd) != 0 || io_rename(s, dirfd, tmp, name) != 0) {
    int en = errno;
    unlinkat(dirfd, tmp, 0);
    return err_set(e, ERR_IO, "state directory %s: renaming %s/%s: %s", s->dir, sub, name,
                   strerror(en));
  }
  return ERR_OK;
}

static int sync_dir(fs_store *s, int dirfd, const char *sub, err *e) {
  if (io_fsync(s, dirfd) != 0)
    return err_set(e, ERR_IO, "state directory %s: syncing %s/: %s", s->dir, sub, strerror(errno));
  return ERR_OK;
}

static int fs_put_job(store *b, const char *id, const char *json, size_t len, err *e) {
  fs_store *s = (fs_store *)b;
  if (len > STORE_RECORD_MAX) /* what list_jobs could not read back is never written */
    return err_set(e, ERR_INVALID, "job record of %zu bytes exceeds the store's %zu", len,
                   STORE_RECORD_MAX);
  char name[128];
  snprintf(name, sizeof name, "%s.json", id);
  int rc = write_atomic(s, s->jobs_fd, "jobs", name, json, len, e);
  return rc ? rc : sync_dir(s, s->jobs_fd, "jobs", e);
}

static int fs_put_image(store *b, const char *id, int n, const uint8_t *png, size_t len, err *e) {
  fs_store *s = (fs_store *)b;
  char name[128];
  snprintf(name, sizeof name, "%s-%d.png", id, n);
  return write_atomic(s, s->images_fd, "images", name, png, len, e);
}

static int fs_sync_images(store *b, err *e) {
  fs_store *s = (fs_store *)b;
  return sync_dir(s, s->images_fd, "images", e);
}

static int read_fd_all(const fs_store *s, int fd, uint8_t **out, size_t *len, size_t max) {
  struct stat st;
  if (fstat(fd, &st) != 0)
    return -1;
  if ((size_t)st.st_size > max) {
    errno = EFBIG;
    return -1;
  }
  size_t n = (size_t)st.st_size, got = 0;
  uint8_t *buf = mem_malloc(n + 1);
  if (!buf)
    return -1;
  while (got < n) {
    ssize_t r = io_read(s, fd, buf + got, n - got);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0) {
      free(buf);
      if (r == 0)
        errno = EIO;
      return -1;
    }
    got += (size_t)r;
  }
  buf[n] = 0;
  *out = buf;
  *len = n;
  return 0;
}

int store_file_name_check(const char *file, err *e) {
  if (!*file || strspn(file, "abcdefghijklmnopqrstuvwxyz0123456789._-") != strlen(file) ||
      file[0] == '.' || strlen(file) > 64)
    return err_set(e, ERR_INVALID, "'%s' is not a result file name", file);
  return ERR_OK;
}

static int file_name(const char *id, const char *file, char *name, size_t n, err *e) {
  int rc = store_file_name_check(file, e);
  if (rc == ERR_OK && snprintf(name, n, "%s.%s", id, file) >= (int)n)
    rc = err_set(e, ERR_INVALID, "'%s' is not a result file name", file);
  return rc;
}

static int fs_put_file(store *b, const char *id, const char *file, const uint8_t *data, size_t len,
                       err *e) {
  fs_store *s = (fs_store *)b;
  char name[160];
  int rc = file_name(id, file, name, sizeof name, e);
  if (!rc)
    rc = write_atomic(s, s->images_fd, "images", name, data, len, e);
  return rc ? rc : sync_dir(s, s->images_fd, "images", e);
}

static int read_named(fs_store *s, const char *name, uint8_t **data, size_t *len, err *e) {
  int fd = io_open(s, s->images_fd, name, O_RDONLY | O_CLOEXEC, 0);
  if (fd < 0)
    return err_set(e, ERR_IO, "images/%s: %s", name, strerror(errno));
  int rc = read_fd_all(s, fd, data, len, (size_t)1 << 30);
  int en = errno;
  close(fd);
  if (rc)
    return err_set(e, ERR_IO, "images/%s: %s", name, strerror(en));
  return ERR_OK;
}

static int fs_get_image(store *b, const char *id, int n, uint8_t **png, size_t *len, err *e) {
  char name[128];
  snprintf(name, sizeof name, "%s-%d.png", id, n);
  return read_named((fs_store *)b, name, png, len, e);
}

static int fs_get_file(store *b, const char *id, const char *file, uint8_t **data, size_t *len,
                       err *e) {
  char name[160];
  int rc = file_name(id, file, name, sizeof name, e);
  return rc ? rc : read_named((fs_store *)b, name, data, len, e);
}

static int fs_remove_job(store *b, const char *id, int nimages, const char *const *files, err *e) {
  fs_store *s = (fs_store *)b;
  char name[160];
  for (int i = 0; i < nimages; i++) {
    snprintf(name, sizeof name, "%s-%d.png", id, i);
    unlinkat(s->images_fd, name, 0);
  }
  for (int i = 0; files && files[i]; i++)
    if (file_name(id, files[i], name, sizeof name, e) == ERR_OK)
      unlinkat(s->images_fd, name, 0);
  snprintf(name, sizeof name, "%s.json", id);
  if (unlinkat(s->jobs_fd, name, 0) != 0 && errno != ENOENT)
    return err_set(e, ERR_IO, "state directory %s: removing jobs/%s: %s", s->dir, name,
                   strerror(errno));
  return ERR_OK;
}

static int fs_list_jobs(store *b, store_job_fn fn, void *user, err *e) {
  fs_store *s = (fs_store *)b;
  int fd = dup(s->jobs_fd);
  DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
  if (!d) {
    if (fd >= 0)
      close(fd);
    return err_set(e, ERR_IO, "state directory %s: listing jobs/: %s", s->dir, strerror(errno));
  }
  rewinddir(d);
  struct dirent *de;
  while ((de = readdir(d))) {
    const char *nm = de->d_name;
    size_t n = strlen(nm);
    if (strncmp(nm, ".tmp-", 5) == 0) { /* a write cut short by a crash */
      unlinkat(s->jobs_fd, nm, 0);
      continue;
    }
    if (n < 6 || n > 100 || strcmp(nm + n - 5, ".json") != 0 || nm[0] == '.')
      continue;
    char id[100];
    snprintf(id, sizeof id, "%.*s", (int)(n - 5), nm);
    int jfd = io_open(s, s->jobs_fd, nm, O_RDONLY | O_CLOEXEC, 0);
    uint8_t *buf = NULL;
    size_t len = 0;
    if (jfd >= 0 && read_fd_all(s, jfd, &buf, &len, STORE_RECORD_MAX) == 0)
      fn(user, id, (const char *)buf, len);
    else
      fn(user, id, NULL, 0); /* unreadable: the queue reports it */
    free(buf);
    if (jfd >= 0)
      close(jfd);
  }
  closedir(d);
  return ERR_OK;
}

static int fs_get_job(store *b, const char *id, char **json, size_t *len, err *e) {
  fs_store *s = (fs_store *)b;
  char name[128];
  if (snprintf(name, sizeof name, "%s.json", id) >= (int)sizeof name || strchr(id, '/'))
    return err_set(e, ERR_INVALID, "'%s' is not a job id", id);
  int fd = io_open(s, s->jobs_fd, name, O_RDONLY | O_CLOEXEC, 0);
  if (fd < 0)
    return err_set(e, ERR_IO, "jobs/%s: %s", name, strerror(errno));
  uint8_t *buf = NULL;
  int rc = read_fd_all(s, fd, &buf, len, STORE_RECORD_MAX);
  int en = errno;
  close(fd);
  if (rc)
    return err_set(e, ERR_IO, "jobs/%s: %s", name, strerror(en));
  *json = (char *)buf;
  return ERR_OK;
}

static int fs_probe(store *b, err *e) {
  fs_store *s = (fs_store *)b;
  static const char probe[] = "probe";
  int rc = write_atomic(s, s->jobs_fd, "jobs", ".probe", probe, sizeof probe, e);
  if (!rc)
    rc = sync_dir(s, s->jobs_fd, "jobs", e);
  unlinkat(s->jobs_fd, ".probe", 0);
  return rc;
}

static void fs_free(store *b) {
  fs_store *s = (fs_store *)b;
  if (!s)
    return;
  if (s->jobs_fd >= 0)
    close(s->jobs_fd);
  if (s->images_fd >= 0)
    close(s->images_fd);
  if (s->lock_fd >= 0)
    close(s->lock_fd); /* releases the flock */
  free(s);
}

static const store_ops fs_ops = {
    .put_job = fs_put_job,
    .put_image = fs_put_image,
    .sync_images = fs_sync_images,
    .get_image = fs_get_image,
    .put_file = fs_put_file,
    .get_file = fs_get_file,
    .remove_job = fs_remove_job,
    .list_jobs = fs_list_jobs,
    .get_job = fs_get_job,
    .probe = fs_probe,
    .free = fs_free,
};

static int open_subdir(fs_store *s, const char *sub, int *out, err *e) {
  char path[1200];
  snprintf(path, sizeof path, "%s/%s", s->dir, sub);
  if (mkdir(path, 0750) != 0 && errno != EEXIST)
    return err_set(e, ERR_IO, "state directory %s: creating %s/: %s", s->dir, sub, strerror(errno));
  int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0)
    return err_set(e, ERR_IO, "state directory %s: opening %s/: %s", s->dir, sub, strerror(errno));
  *out = fd;
  /* clear leftovers of writes a crash cut short */
  int dfd = dup(fd);
  DIR *d = dfd >= 0 ? fdopendir(dfd) : NULL;
  if (d) {
    struct dirent *de;
    while ((de = readdir(d)))
      if (strncmp(de->d_name, ".tmp-", 5) == 0)
        unlinkat(fd, de->d_name, 0);
    closedir(d);
  } else if (dfd >= 0) {
    close(dfd);
  }
  return ERR_OK;
}

int store_fs_open(const char *dir, store_fault *fault, store **out, err *e) {
  fs_store *s = mem_calloc(1, sizeof *s);
  if (!s)
    return err_set(e, ERR_NOMEM, "out of memory");
  s->base.ops = &fs_ops;
  s->fault = fault;
  s->jobs_fd = s->images_fd = s->lock_fd = -1;
  if (strlen(dir) >= sizeof s->dir - 16) {
    free(s);
    return err_set(e, ERR_INVALID, "state directory path too long");
  }
  snprintf(s->dir, sizeof s->dir, "%s", dir);
  int rc = ERR_OK;
  if (mkdir(dir, 0750) != 0 && errno != EEXIST) {
    rc = err_set(e, ERR_IO, "state directory %s: cannot create: %s", dir, strerror(errno));
    goto fail;
  }
  char path[1200];
  snprintf(path, sizeof path, "%s/lock", dir);
  s->lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0640);
  if (s->lock_fd < 0) {
    rc = err_set(e, ERR_IO, "state directory %s: not writable: %s", dir, strerror(errno));
    goto fail;
  }
  if (flock(s->lock_fd, LOCK_EX | LOCK_NB) != 0) {
    rc = err_set(e, ERR_IO, "state directory %s is in use by another denoised process", dir);
    goto fail;
  }
  if ((rc = open_subdir(s, "jobs", &s->jobs_fd, e)) ||
      (rc = open_subdir(s, "images", &s->images_fd, e)))
    goto fail;
  /* a directory that opens but cannot take a write (read-only mount, full disk) should stop the
   * daemon at start, not fail the first job */
  if ((rc = fs_probe(&s->base, e)))
    goto fail;
  *out = &s->base;
  return ERR_OK;
fail:
  fs_free(&s->base);
  return rc;
}
