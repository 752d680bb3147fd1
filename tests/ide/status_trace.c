/* tests/ide/status_trace.c - an LD_PRELOAD shim that records every state the
 * server gives DIR/.agentsmithy/status.json.
 *
 * status.json is replaced atomically: written to a temporary file, then
 * renamed over the old one. This shim wraps rename(), renameat() and
 * renameat2(); after each successful rename onto a path ending in
 * "/.agentsmithy/status.json" it appends the new file's bytes, followed by a
 * line holding only "\x1e" (ASCII record separator), to $STATUS_TRACE with a
 * single O_APPEND write. The tests then see every intermediate state
 * (starting, stopping, crashed), however briefly it lasted, with no timing
 * involved; a server that wrote status.json in place instead would leave the
 * trace empty.
 *
 *   cc -shared -fPIC -O2 -o status_trace.so status_trace.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char kSuffix[] = "/.agentsmithy/status.json";

static int is_status(const char* path) {
  if (!path) return 0;
  const size_t n = strlen(path), s = sizeof kSuffix - 1;
  return (n >= s && strcmp(path + n - s, kSuffix) == 0) || strcmp(path, ".agentsmithy/status.json") == 0;
}

static void record(int dirfd, const char* path) {
  const char* trace = getenv("STATUS_TRACE");
  if (!trace || !*trace || !is_status(path)) return;
  const int saved = errno;
  const int in = openat(dirfd, path, O_RDONLY | O_CLOEXEC);
  if (in >= 0) {
    char buf[1 << 16];
    size_t len = 0;
    ssize_t n;
    while (len < sizeof buf - 3 && (n = read(in, buf + len, sizeof buf - 3 - len)) != 0) {
      if (n < 0) {
        if (errno == EINTR) continue;
        break;
      }
      len += (size_t)n;
    }
    close(in);
    if (len == 0 || buf[len - 1] != '\n') buf[len++] = '\n';
    buf[len++] = '\x1e';
    buf[len++] = '\n';
    const int out = open(trace, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (out >= 0) {
      ssize_t w = write(out, buf, len);
      (void)w;
      close(out);
    }
  }
  errno = saved;
}

int rename(const char* from, const char* to) {
  static int (*real)(const char*, const char*);
  if (!real) real = (int (*)(const char*, const char*))dlsym(RTLD_NEXT, "rename");
  const int rc = real(from, to);
  if (rc == 0) record(AT_FDCWD, to);
  return rc;
}

int renameat(int fromfd, const char* from, int tofd, const char* to) {
  static int (*real)(int, const char*, int, const char*);
  if (!real) real = (int (*)(int, const char*, int, const char*))dlsym(RTLD_NEXT, "renameat");
  const int rc = real(fromfd, from, tofd, to);
  if (rc == 0) record(tofd, to);
  return rc;
}

int renameat2(int fromfd, const char* from, int tofd, const char* to, unsigned int flags) {
  static int (*real)(int, const char*, int, const char*, unsigned int);
  if (!real) {
    real = (int (*)(int, const char*, int, const char*, unsigned int))dlsym(RTLD_NEXT, "renameat2");
  }
  if (!real) {
    errno = ENOSYS;
    return -1;
  }
  const int rc = real(fromfd, from, tofd, to, flags);
  if (rc == 0) record(tofd, to);
  return rc;
}
