// LD_PRELOAD fault injector for the disk-fault tests (tests/e2e): while the
// file named by $KVR_EIO_TRIGGER exists, a read (read, pread, preadv and
// their 64-bit forms) of a file whose path contains $KVR_EIO_PATH fails with
// EIO, as a failing disk sector would. Without the trigger file every call
// goes through unchanged. Test-only; never linked into kvrecalld.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static int Faulty(int fd) {
  const char* want = getenv("KVR_EIO_PATH");
  const char* trigger = getenv("KVR_EIO_TRIGGER");
  if (want == NULL || trigger == NULL || access(trigger, F_OK) != 0) return 0;
  char link[64], path[4096];
  snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
  const ssize_t n = readlink(link, path, sizeof(path) - 1);
  if (n <= 0) return 0;
  path[n] = '\0';
  return strstr(path, want) != NULL;
}

#define KVR_NEXT(name) ((__typeof__(&name))dlsym(RTLD_NEXT, #name))

ssize_t read(int fd, void* buf, size_t count) {
  if (Faulty(fd)) return errno = EIO, -1;
  return KVR_NEXT(read)(fd, buf, count);
}
ssize_t pread(int fd, void* buf, size_t count, off_t offset) {
  if (Faulty(fd)) return errno = EIO, -1;
  return KVR_NEXT(pread)(fd, buf, count, offset);
}
ssize_t pread64(int fd, void* buf, size_t count, off_t offset) {
  if (Faulty(fd)) return errno = EIO, -1;
  return KVR_NEXT(pread64)(fd, buf, count, offset);
}
ssize_t preadv(int fd, const struct iovec* iov, int iovcnt, off_t offset) {
  if (Faulty(fd)) return errno = EIO, -1;
  return KVR_NEXT(preadv)(fd, iov, iovcnt, offset);
}
ssize_t preadv64(int fd, const struct iovec* iov, int iovcnt, off_t offset) {
  if (Faulty(fd)) return errno = EIO, -1;
  return KVR_NEXT(preadv64)(fd, iov, iovcnt, offset);
}
