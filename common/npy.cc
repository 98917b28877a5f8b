#include "common/npy.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/status_macros.h"

namespace kvrecall {
namespace {

constexpr char kMagic[] = "\x93NUMPY";

absl::Status ErrnoError(absl::string_view what, const std::string& path, int err) {
  const std::string msg = absl::StrCat(what, " ", path, ": ", std::strerror(err));
  if (err == ENOENT) return absl::NotFoundError(msg);
  if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(msg);
  return absl::InternalError(msg);
}

// Returns the text of `key`'s value in the Python dict literal `header`.
absl::StatusOr<std::string> DictValue(absl::string_view header, absl::string_view key) {
  const std::string quoted = absl::StrCat("'", key, "'");
  size_t pos = header.find(quoted);
  if (pos == absl::string_view::npos) {
    return absl::InvalidArgumentError(absl::StrCat("npy header has no ", quoted));
  }
  pos = header.find(':', pos + quoted.size());
  if (pos == absl::string_view::npos) {
    return absl::InvalidArgumentError("npy header is malformed");
  }
  absl::string_view rest = absl::StripLeadingAsciiWhitespace(header.substr(pos + 1));
  if (rest.empty()) return absl::InvalidArgumentError("npy header is malformed");
  size_t end;
  if (rest[0] == '\'') {
    end = rest.find('\'', 1);
    if (end == absl::string_view::npos) return absl::InvalidArgumentError("npy header is malformed");
    return std::string(rest.substr(1, end - 1));
  }
  if (rest[0] == '(') {
    end = rest.find(')');
    if (end == absl::string_view::npos) return absl::InvalidArgumentError("npy header is malformed");
    return std::string(rest.substr(0, end + 1));
  }
  end = rest.find_first_of(",}");
  return std::string(absl::StripAsciiWhitespace(rest.substr(0, end)));
}

}  // namespace

int64_t NpyArray::num_elements() const {
  for (int64_t d : shape) {
    if (d == 0) return 0;
  }
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

size_t NpyArray::item_size() const {
  if (descr.size() < 3) return 0;
  int size = 0;
  if (!absl::SimpleAtoi(absl::string_view(descr).substr(2), &size)) return 0;
  return static_cast<size_t>(size);
}

absl::StatusOr<NpyArray> ParseNpy(absl::string_view bytes) {
  if (bytes.size() < 10 || bytes.substr(0, 6) != absl::string_view(kMagic, 6)) {
    return absl::InvalidArgumentError("not a .npy file (bad magic)");
  }
  const int major = static_cast<unsigned char>(bytes[6]);
  size_t header_len;
  size_t offset;
  if (major == 1) {
    header_len = static_cast<unsigned char>(bytes[8]) |
                 (static_cast<size_t>(static_cast<unsigned char>(bytes[9])) << 8);
    offset = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) return absl::InvalidArgumentError(".npy file truncated");
    header_len = 0;
    for (int i = 3; i >= 0; --i) {
      header_len = (header_len << 8) | static_cast<unsigned char>(bytes[8 + i]);
    }
    offset = 12;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("unsupported .npy version ", major));
  }
  if (bytes.size() < offset + header_len) {
    return absl::InvalidArgumentError(".npy header truncated");
  }
  const absl::string_view header = bytes.substr(offset, header_len);
  NpyArray array;
  KVR_ASSIGN_OR_RETURN(array.descr, DictValue(header, "descr"));
  if (array.descr.empty() || array.descr[0] == '>') {
    return absl::InvalidArgumentError(
        absl::StrCat("unsupported .npy dtype '", array.descr, "' (need little-endian)"));
  }
  if (array.descr[0] == '=') array.descr[0] = '<';
  KVR_ASSIGN_OR_RETURN(std::string fortran, DictValue(header, "fortran_order"));
  if (fortran != "False") {
    return absl::InvalidArgumentError(".npy in Fortran order is not supported");
  }
  KVR_ASSIGN_OR_RETURN(std::string shape_text, DictValue(header, "shape"));
  absl::string_view inner = shape_text;
  absl::ConsumePrefix(&inner, "(");
  absl::ConsumeSuffix(&inner, ")");
  for (absl::string_view part : absl::StrSplit(inner, ',', absl::SkipWhitespace())) {
    int64_t dim;
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(part), &dim) || dim < 0) {
      return absl::InvalidArgumentError(absl::StrCat("bad .npy shape ", shape_text));
    }
    array.shape.push_back(dim);
  }
  if (array.item_size() == 0) {
    return absl::InvalidArgumentError(absl::StrCat("unsupported .npy dtype '", array.descr, "'"));
  }
  // The shape's size, checked against the bytes present as it is multiplied
  // out: a product that overflowed could match a short file.
  const size_t data_offset = offset + header_len;
  const size_t available = bytes.size() - data_offset;
  if (std::find(array.shape.begin(), array.shape.end(), 0) == array.shape.end()) {
    size_t fits = available / array.item_size();  // elements the data can hold
    for (int64_t d : array.shape) {
      if (static_cast<uint64_t>(d) > fits) {
        return absl::InvalidArgumentError(absl::StrCat(
            ".npy shape ", shape_text, " of ", array.descr, " needs more than the ",
            available, " data bytes"));
      }
      fits /= static_cast<size_t>(d);
    }
  }
  const size_t want = static_cast<size_t>(array.num_elements()) * array.item_size();
  if (bytes.size() - data_offset != want) {
    return absl::InvalidArgumentError(absl::StrCat(".npy data is ", bytes.size() - data_offset,
                                                   " bytes, shape and dtype need ", want));
  }
  array.data.assign(bytes.data() + data_offset, want);
  return array;
}

absl::StatusOr<NpyArray> ReadNpy(const std::string& path) {
  KVR_ASSIGN_OR_RETURN(std::string bytes, ReadFileToString(path));
  auto parsed = ParseNpy(bytes);
  if (!parsed.ok()) {
    return absl::Status(parsed.status().code(),
                        absl::StrCat(path, ": ", parsed.status().message()));
  }
  return parsed;
}

absl::StatusOr<std::string> SerializeNpy(const NpyArray& array) {
  if (array.item_size() == 0) {
    return absl::InvalidArgumentError(absl::StrCat("unsupported .npy dtype '", array.descr, "'"));
  }
  if (array.data.size() != static_cast<size_t>(array.num_elements()) * array.item_size()) {
    return absl::InvalidArgumentError("npy data size does not match shape");
  }
  std::string shape = "(";
  for (size_t i = 0; i < array.shape.size(); ++i) {
    absl::StrAppend(&shape, array.shape[i], array.shape.size() == 1 ? "," : "");
    if (i + 1 < array.shape.size()) shape += ", ";
  }
  shape += ")";
  std::string header = absl::StrCat("{'descr': '", array.descr,
                                    "', 'fortran_order': False, 'shape': ", shape, ", }");
  // Pad with spaces so that the data starts on a 64-byte boundary; end with \n.
  const size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header.push_back('\n');
  std::string out(kMagic, 6);
  out.push_back('\x01');
  out.push_back('\x00');
  out.push_back(static_cast<char>(header.size() & 0xff));
  out.push_back(static_cast<char>((header.size() >> 8) & 0xff));
  out += header;
  out += array.data;
  return out;
}

absl::Status WriteNpy(const std::string& path, const NpyArray& array) {
  KVR_ASSIGN_OR_RETURN(std::string bytes, SerializeNpy(array));
  return WriteStringToFileAtomic(path, bytes);
}

absl::StatusOr<std::string> ReadFileToString(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoError("cannot open", path, errno);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return ErrnoError("cannot stat", path, err);
  }
  std::string out(static_cast<size_t>(st.st_size), '\0');
  size_t done = 0;
  while (done < out.size()) {
    const ssize_t n = ::read(fd, out.data() + done, out.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      return ErrnoError("cannot read", path, err);
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  out.resize(done);
  return out;
}

absl::Status WriteStringToFileAtomic(const std::string& path, absl::string_view data) {
  const std::string tmp = absl::StrCat(path, ".tmp.", ::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoError("cannot create", tmp, errno);
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      return ErrnoError("cannot write", tmp, err);
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    return ErrnoError("cannot sync", tmp, err);
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    return ErrnoError("cannot rename to", path, err);
  }
  return absl::OkStatus();
}

}  // namespace kvrecall
