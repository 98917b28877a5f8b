#include "service/store/disk_tier.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <optional>
#include <utility>

#include "absl/memory/memory.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/checksum.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "service/store/codec.h"

namespace kvrecall::store {

namespace {

constexpr int64_t kMinSegmentBytes = 64 << 10;
constexpr size_t kScanChunkBytes = 1 << 20;

// A full file system is RESOURCE_EXHAUSTED and a read-only one
// FAILED_PRECONDITION (the operator can act on both); other errors INTERNAL.
absl::Status ErrnoError(absl::string_view what, const std::string& path, int err) {
  const std::string message = absl::StrCat(what, " ", path, ": ", std::strerror(err));
  if (err == ENOSPC || err == EDQUOT) return absl::ResourceExhaustedError(message);
  if (err == EROFS) return absl::FailedPreconditionError(message);
  return absl::InternalError(message);
}

// pwritev/preadv until every byte of `iov` is transferred.
absl::Status TransferAll(bool write, int fd, std::vector<iovec> iov, uint64_t offset,
                         const std::string& path) {
  size_t first = 0;
  while (first < iov.size()) {
    const ssize_t n = write
                          ? ::pwritev(fd, iov.data() + first, static_cast<int>(iov.size() - first),
                                      static_cast<off_t>(offset))
                          : ::preadv(fd, iov.data() + first, static_cast<int>(iov.size() - first),
                                     static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(write ? "pwritev" : "preadv", path, errno);
    }
    if (n == 0) {
      return absl::DataLossError(absl::StrCat("unexpected end of file reading ", path));
    }
    offset += static_cast<uint64_t>(n);
    size_t left = static_cast<size_t>(n);
    while (first < iov.size() && left >= iov[first].iov_len) {
      left -= iov[first].iov_len;
      ++first;
    }
    if (first < iov.size()) {
      iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + left;
      iov[first].iov_len -= left;
    }
  }
  return absl::OkStatus();
}

absl::Status PreadAll(int fd, void* buf, size_t len, uint64_t offset, const std::string& path) {
  return TransferAll(false, fd, {iovec{buf, len}}, offset, path);
}

std::string SegmentName(uint64_t id) { return absl::StrFormat("seg-%012d.kvs", id); }

std::optional<uint64_t> ParseSegmentName(const std::string& name) {
  if (!absl::StartsWith(name, "seg-") || !absl::EndsWith(name, ".kvs")) return std::nullopt;
  uint64_t id = 0;
  if (!absl::SimpleAtoi(absl::string_view(name).substr(4, name.size() - 8), &id) || id == 0) {
    return std::nullopt;
  }
  return id;
}

SpanMeta MetaWithoutTokenIds(const SpanMeta& m) {
  SpanMeta out;
  out.model_id = m.model_id;
  out.parent = m.parent;
  out.num_tokens = m.num_tokens;
  out.payload_bytes = m.payload_bytes;
  out.payload_checksum = m.payload_checksum;
  out.durable = m.durable;
  out.created = m.created;
  return out;
}

// Verifies the trailing record checksum of a whole record held in memory.
bool VerifyRecordBytes(absl::string_view record) {
  if (record.size() < 8) return false;
  return Checksum64(record.data(), record.size() - 8) == LoadU64(record.data() + record.size() - 8);
}

}  // namespace

struct DiskTier::SegmentFile {
  uint64_t id = 0;
  std::string path;
  int fd = -1;
  ~SegmentFile() {
    if (fd >= 0) ::close(fd);
  }
};

struct DiskTier::Segment {
  using Ref = RecordRef;
  std::shared_ptr<SegmentFile> file;
  int64_t size = 0;        // bytes written (the next append offset of the active segment)
  int64_t live_bytes = 0;  // live span records and needed tombstones
  int32_t pending = 0;     // appended records not yet published
  bool sealed = false;
  std::vector<Ref> refs;  // every record in the file, in file order
  size_t evict_pos = 0;   // refs before this are dead
};

struct DiskTier::RecoveryScan {
  struct Candidate {
    Loc loc;
    SpanMeta meta;
  };
  absl::flat_hash_map<SpanKey, Candidate> best;
  absl::flat_hash_map<SpanKey, Loc> tomb;
  // Span records whose header verified but whose payload did not: seq of the
  // newest such record per key.
  absl::flat_hash_map<SpanKey, uint64_t> corrupt;
  uint64_t max_seq = 0;
};

DiskTier::DiskTier(const DiskTierOptions& options)
    : options_(options),
      segment_bytes_(std::max<int64_t>(
          kMinSegmentBytes,
          std::min<int64_t>(options.segment_bytes,
                            std::max<int64_t>(options.capacity_bytes / 4, kMinSegmentBytes)))),
      metrics_(TierId::kDisk, options.capacity_bytes, options.metrics) {}

DiskTier::~DiskTier() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (compaction_thread_.joinable()) compaction_thread_.join();
}

absl::StatusOr<std::unique_ptr<DiskTier>> DiskTier::Create(const DiskTierOptions& options) {
  if (options.dir.empty()) return absl::InvalidArgumentError("disk tier dir is empty");
  if (options.capacity_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("disk capacity_bytes must be > 0, got ", options.capacity_bytes));
  }
  if (options.segment_bytes < kMinSegmentBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "disk segment_bytes must be >= ", kMinSegmentBytes, ", got ", options.segment_bytes));
  }
  if (!(options.compaction_live_fraction >= 0.0 && options.compaction_live_fraction <= 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "disk compaction_live_fraction must be in 0..1, got ", options.compaction_live_fraction));
  }
  std::error_code ec;
  std::filesystem::create_directories(options.dir, ec);
  if (ec) {
    return absl::InternalError(
        absl::StrCat("cannot create segment directory ", options.dir, ": ", ec.message()));
  }
  auto tier = absl::WrapUnique(new DiskTier(options));
  KVR_RETURN_IF_ERROR(tier->Recover());
  if (options.background_compaction) {
    tier->compaction_thread_ = std::thread([t = tier.get()] { t->CompactionLoop(); });
  }
  return tier;
}

absl::Status DiskTier::SyncDir() const {
  const int fd = ::open(options_.dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return ErrnoError("open", options_.dir, errno);
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) return ErrnoError("fsync", options_.dir, err);
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Recovery

absl::Status DiskTier::Recover() {
  std::vector<std::pair<uint64_t, std::string>> files;
  std::error_code ec;
  for (const auto& de : std::filesystem::directory_iterator(options_.dir, ec)) {
    const std::string name = de.path().filename().string();
    if (auto id = ParseSegmentName(name)) files.emplace_back(*id, de.path().string());
  }
  if (ec) {
    return absl::InternalError(absl::StrCat("cannot list ", options_.dir, ": ", ec.message()));
  }
  std::sort(files.begin(), files.end());

  RecoveryScan scan;
  const size_t report_every = std::max<size_t>(16, files.size() / 10);
  for (size_t i = 0; i < files.size(); ++i) {
    const bool verify_payloads = i + 2 >= files.size();
    KVR_RETURN_IF_ERROR(RecoverSegment(files[i].first, files[i].second, verify_payloads, &scan));
    if ((i + 1) % report_every == 0 && i + 1 < files.size()) {
      KVR_LOG(INFO) << "disk tier " << options_.dir << ": recovered " << i + 1 << " of "
                    << files.size() << " segments";
    }
  }

  absl::MutexLock wlock(&write_mu_);
  {
    absl::MutexLock lock(&mu_);
    for (auto& [key, cand] : scan.best) {
      auto t = scan.tomb.find(key);
      if (t != scan.tomb.end() && t->second.seq > cand.loc.seq) continue;
      segments_[cand.loc.segment]->live_bytes += static_cast<int64_t>(cand.loc.length);
      live_bytes_ += static_cast<int64_t>(cand.loc.length);
      index_.emplace(key, IndexEntry{cand.loc, std::move(cand.meta), false});
    }
    for (const auto& [key, seq] : scan.corrupt) {
      auto live = index_.find(key);
      if (live != index_.end() && live->second.loc.seq > seq) continue;
      auto t = scan.tomb.find(key);
      if (t != scan.tomb.end() && t->second.seq > seq) continue;
      lost_.insert(key);
      metrics_.checksum_failures->Increment();
    }
    for (const auto& [key, loc] : scan.tomb) {
      if (!instances_.contains(key)) continue;
      tombs_.emplace(key, loc);
      segments_[loc.segment]->live_bytes += static_cast<int64_t>(loc.length);
    }
    recovery_.live_spans = static_cast<int64_t>(index_.size());
    // Segments without a single record (an active segment that was never
    // written) go right away.
    for (auto it = segments_.begin(); it != segments_.end();) {
      if (!it->second->refs.empty()) {
        ++it;
        continue;
      }
      if (::unlink(it->second->file->path.c_str()) != 0) {
        return ErrnoError("unlink", it->second->file->path, errno);
      }
      it = segments_.erase(it);
    }
    next_seq_.store(scan.max_seq + 1);
    for (const auto& [id, seg] : segments_) {
      if (WantsCompactionLocked(*seg)) compaction_wanted_ = true;
    }
    PublishMetricsLocked();
  }
  next_segment_id_ = files.empty() ? 1 : files.back().first + 1;
  KVR_RETURN_IF_ERROR(OpenNewActiveSegment());
  {
    absl::MutexLock lock(&mu_);
    if (recovery_.corrupt_records > 0 || recovery_.truncated_bytes > 0 ||
        recovery_.unreadable_segments > 0) {
      KVR_LOG(WARNING) << "disk tier " << options_.dir << ": recovered " << recovery_.live_spans
                       << " spans from " << recovery_.segments << " segments; skipped "
                       << recovery_.corrupt_records << " corrupt records, truncated "
                       << recovery_.truncated_bytes << " torn bytes, set aside "
                       << recovery_.unreadable_segments << " unreadable segments";
    }
  }
  return absl::OkStatus();
}

namespace {

// Reads the records of one segment file for recovery, checking each.
struct SegmentScanner {
  // The header and meta of a record.
  struct Parsed {
    RecordHeader h;
    SpanKey key;
    SpanMeta meta;
  };

  // Reads and checks the header and meta of a record at `off`.
  bool ParseAt(uint64_t off, Parsed* p) const {
    if (off + kRecordHeaderBytes > size) return false;
    char fixed[kRecordHeaderBytes];
    if (!PreadAll(fd, fixed, sizeof(fixed), off, path).ok()) return false;
    auto h = ParseRecordHeader(absl::string_view(fixed, sizeof(fixed)));
    if (!h.ok() || off + h->prefix_bytes() > size) return false;
    std::string meta(h->meta_len, '\0');
    if (!PreadAll(fd, meta.data(), meta.size(), off + kRecordHeaderBytes, path).ok()) {
      return false;
    }
    if (!VerifyHeaderChecksum(*h, absl::string_view(fixed, sizeof(fixed)), meta)) return false;
    if (!DecodeRecordMeta(*h, meta, /*with_token_ids=*/false, &p->key, &p->meta)) return false;
    p->h = *h;
    return true;
  }

  // Streams the whole record at `off` (`len` bytes) through its checksum.
  bool VerifyAt(uint64_t off, uint64_t len) const {
    std::string buf;
    Checksum64Builder b;
    uint64_t done = 0;
    while (done < len - 8) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(kScanChunkBytes, len - 8 - done));
      buf.resize(n);
      if (!PreadAll(fd, buf.data(), n, off + done, path).ok()) return false;
      b.Update(buf);
      done += n;
    }
    char tail[8];
    if (!PreadAll(fd, tail, 8, off + len - 8, path).ok()) return false;
    return b.Digest() == LoadU64(tail);
  }

  // The next offset after `from` holding a record whose header verifies.
  std::optional<uint64_t> FindNext(uint64_t from) const {
    std::string chunk;
    for (uint64_t base = AlignUp8(from); base + kRecordHeaderBytes <= size;
         base += kScanChunkBytes) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(kScanChunkBytes, size - base));
      chunk.resize(n);
      if (!PreadAll(fd, chunk.data(), n, base, path).ok()) return std::nullopt;
      for (size_t i = 0; i + 4 <= n; i += 8) {
        if (LoadU32(chunk.data() + i) != kRecordMagic) continue;
        Parsed p;
        if (ParseAt(base + i, &p) && base + i + p.h.record_bytes() <= size) return base + i;
      }
    }
    return std::nullopt;
  }

  int fd;
  const std::string& path;
  uint64_t size;
};

}  // namespace

absl::Status DiskTier::RecoverSegment(uint64_t id, const std::string& path, bool verify_payloads,
                                      RecoveryScan* scan) {
  const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return ErrnoError("open", path, errno);
  auto file = std::make_shared<SegmentFile>();
  file->id = id;
  file->path = path;
  file->fd = fd;
  struct stat st;
  if (::fstat(fd, &st) != 0) return ErrnoError("fstat", path, errno);
  const uint64_t size = static_cast<uint64_t>(st.st_size);

  absl::MutexLock lock(&mu_);
  if (size < kSegmentHeaderBytes) {
    // Torn while being created: it never held a record.
    recovery_.truncated_bytes += static_cast<int64_t>(size);
    if (::unlink(path.c_str()) != 0) return ErrnoError("unlink", path, errno);
    return absl::OkStatus();
  }
  std::string header(kSegmentHeaderBytes, '\0');
  KVR_RETURN_IF_ERROR(PreadAll(fd, header.data(), header.size(), 0, path));
  auto header_id = DecodeSegmentHeader(header);
  if (!header_id.ok() || *header_id != id) {
    ++recovery_.unreadable_segments;
    KVR_LOG(ERROR) << "segment " << path << " has no valid header; renamed to *.corrupt";
    if (::rename(path.c_str(), (path + ".corrupt").c_str()) != 0) {
      return ErrnoError("rename", path, errno);
    }
    return absl::OkStatus();
  }
  ++recovery_.segments;
  auto seg = std::make_unique<Segment>();
  seg->file = file;
  seg->sealed = true;
  Segment* s = seg.get();
  segments_[id] = std::move(seg);

  const SegmentScanner scanner{fd, path, size};
  uint64_t off = kSegmentHeaderBytes;
  std::optional<uint64_t> truncate_at;
  while (off < size) {
    SegmentScanner::Parsed p;
    const bool header_ok = scanner.ParseAt(off, &p);
    const bool fits = header_ok && off + p.h.record_bytes() <= size;
    const bool payload_ok =
        fits && (!verify_payloads || scanner.VerifyAt(off, p.h.record_bytes()));
    if (fits && !payload_ok && p.h.kind == RecordKind::kSpan) {
      // The header names the span: its next read reports a checksum failure
      // (unless a newer valid record of the key turns up).
      uint64_t& seq = scan->corrupt[p.key];
      seq = std::max(seq, p.h.seq);
    }
    if (payload_ok) {
      Loc loc{id, off, p.h.record_bytes(), p.h.prefix_bytes(), p.h.payload_len, p.h.seq};
      scan->max_seq = std::max(scan->max_seq, p.h.seq);
      s->refs.push_back(Segment::Ref{loc, p.h.kind, p.key});
      if (p.h.kind == RecordKind::kSpan) {
        ++recovery_.span_records;
        ++instances_[p.key];
        auto [it, inserted] = scan->best.try_emplace(p.key);
        if (inserted || p.h.seq >= it->second.loc.seq) it->second = {loc, std::move(p.meta)};
      } else {
        ++recovery_.tombstones;
        auto [it, inserted] = scan->tomb.try_emplace(p.key, loc);
        if (!inserted && p.h.seq >= it->second.seq) it->second = loc;
      }
      off += p.h.record_bytes();
      continue;
    }
    // Not a whole, valid record here: either the torn tail of the file, or a
    // damaged record with valid ones after it.
    std::optional<uint64_t> next = scanner.FindNext(fits ? off + p.h.record_bytes() : off + 8);
    if (!next.has_value()) {
      truncate_at = off;
      break;
    }
    ++recovery_.corrupt_records;
    off = *next;
  }
  if (truncate_at.has_value()) {
    if (::ftruncate(fd, static_cast<off_t>(*truncate_at)) != 0) {
      return ErrnoError("ftruncate", path, errno);
    }
    recovery_.truncated_bytes += static_cast<int64_t>(size - *truncate_at);
    s->size = static_cast<int64_t>(*truncate_at);
  } else {
    s->size = static_cast<int64_t>(size);
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Appending

absl::Status DiskTier::OpenNewActiveSegment() {
  const uint64_t id = next_segment_id_++;
  auto file = std::make_shared<SegmentFile>();
  file->id = id;
  file->path = (std::filesystem::path(options_.dir) / SegmentName(id)).string();
  file->fd = ::open(file->path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (file->fd < 0) return ErrnoError("create", file->path, errno);
  const std::string header = EncodeSegmentHeader(id, absl::Now());
  std::string copy = header;
  KVR_RETURN_IF_ERROR(
      TransferAll(true, file->fd, {iovec{copy.data(), copy.size()}}, 0, file->path));
  // The file's name must survive a crash before any synced record in it is
  // acknowledged; the records themselves are synced by fdatasync of the file.
  KVR_RETURN_IF_ERROR(SyncDir());
  absl::MutexLock lock(&mu_);
  if (active_id_ != 0) {
    auto it = segments_.find(active_id_);
    if (it != segments_.end()) {
      it->second->sealed = true;
      if (WantsCompactionLocked(*it->second)) compaction_wanted_ = true;
    }
  }
  auto seg = std::make_unique<Segment>();
  seg->file = std::move(file);
  seg->size = static_cast<int64_t>(kSegmentHeaderBytes);
  segments_[id] = std::move(seg);
  active_id_ = id;
  return absl::OkStatus();
}

absl::Status DiskTier::Append(absl::string_view a, absl::string_view b, absl::string_view c,
                              Loc* loc, std::shared_ptr<SegmentFile>* file) {
  const uint64_t len = a.size() + b.size() + c.size();
  absl::MutexLock wlock(&write_mu_);
  bool rotate = false;
  {
    absl::MutexLock lock(&mu_);
    const Segment& active = *segments_.at(active_id_);
    rotate = active.size > static_cast<int64_t>(kSegmentHeaderBytes) &&
             active.size + static_cast<int64_t>(len) > segment_bytes_;
  }
  if (rotate) KVR_RETURN_IF_ERROR(OpenNewActiveSegment());
  uint64_t offset = 0;
  {
    absl::MutexLock lock(&mu_);
    Segment& active = *segments_.at(active_id_);
    offset = static_cast<uint64_t>(active.size);
    *file = active.file;
    ++active.pending;
  }
  std::vector<iovec> iov;
  for (absl::string_view part : {a, b, c}) {
    if (!part.empty()) iov.push_back(iovec{const_cast<char*>(part.data()), part.size()});
  }
  absl::Status written = TransferAll(true, (*file)->fd, std::move(iov), offset, (*file)->path);
  absl::MutexLock lock(&mu_);
  Segment& active = *segments_.at((*file)->id);
  if (!written.ok()) {
    --active.pending;
    // Cut off whatever part of the record reached the file.
    if (::ftruncate((*file)->fd, static_cast<off_t>(offset)) != 0) {
      KVR_LOG(ERROR) << "ftruncate " << (*file)->path
                     << " after a failed write: " << std::strerror(errno);
    }
    return written;
  }
  active.size = static_cast<int64_t>(offset + len);
  loc->segment = (*file)->id;
  loc->offset = offset;
  loc->length = len;
  return absl::OkStatus();
}

void DiskTier::AddRefLocked(const Loc& loc, RecordKind kind, const SpanKey& key) {
  Segment& s = *segments_.at(loc.segment);
  s.refs.push_back(Segment::Ref{loc, kind, key});
  --s.pending;
  if (kind == RecordKind::kSpan) ++instances_[key];
}

void DiskTier::AddLiveLocked(uint64_t segment, int64_t delta) {
  auto it = segments_.find(segment);
  if (it == segments_.end()) return;
  it->second->live_bytes += delta;
  if (delta < 0 && WantsCompactionLocked(*it->second)) compaction_wanted_ = true;
}

bool DiskTier::WantsCompactionLocked(const Segment& s) const {
  if (!s.sealed || s.pending > 0) return false;
  const int64_t body = s.size - static_cast<int64_t>(kSegmentHeaderBytes);
  if (s.live_bytes <= 0 || body <= 0) return true;
  return static_cast<double>(s.live_bytes) <
         options_.compaction_live_fraction * static_cast<double>(body);
}

void DiskTier::DropEntryLocked(const SpanKey& key) {
  auto it = index_.find(key);
  if (it == index_.end()) return;
  const int64_t len = static_cast<int64_t>(it->second.loc.length);
  live_bytes_ -= len;
  if (it->second.leaving) leaving_bytes_ -= len;
  const uint64_t segment = it->second.loc.segment;
  index_.erase(it);
  AddLiveLocked(segment, -len);
}

void DiskTier::PublishMetricsLocked() {
  metrics_.bytes->Set(live_bytes_);
  metrics_.spans->Set(static_cast<int64_t>(index_.size()));
}

void DiskTier::SelectVictimsLocked(const SpanKey& key, int64_t need,
                                   std::vector<SpanKey>* victims) {
  for (auto& [id, seg] : segments_) {
    if (need <= 0) return;
    bool dead_prefix = true;  // every ref before i is dead
    for (size_t i = seg->evict_pos; i < seg->refs.size() && need > 0; ++i) {
      const Segment::Ref& r = seg->refs[i];
      auto it = r.kind == RecordKind::kSpan ? index_.find(r.key) : index_.end();
      const bool live_here = it != index_.end() && it->second.loc.segment == id &&
                             it->second.loc.offset == r.loc.offset;
      if (!live_here) {
        if (dead_prefix) seg->evict_pos = i + 1;
        continue;
      }
      dead_prefix = false;
      if (it->second.leaving || r.key == key) continue;
      it->second.leaving = true;
      leaving_bytes_ += static_cast<int64_t>(r.loc.length);
      need -= static_cast<int64_t>(r.loc.length);
      victims->push_back(r.key);
    }
  }
}

absl::Status DiskTier::Put(StoredSpanPtr span, const TierPutOptions& options,
                           std::vector<SpanKey>* victims) {
  victims->clear();
  const uint64_t seq = next_seq_.fetch_add(1);
  EncodedRecord rec = EncodeSpanRecord(*span, seq);
  if (static_cast<int64_t>(rec.record_bytes) > options_.capacity_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat("record of ", rec.record_bytes,
                                                     " bytes exceeds the disk capacity of ",
                                                     options_.capacity_bytes));
  }
  {
    absl::MutexLock lock(&mu_);
    auto it = index_.find(span->key);
    const int64_t replaced =
        it != index_.end() && !it->second.leaving ? static_cast<int64_t>(it->second.loc.length) : 0;
    // Records written but not yet published count too, so that concurrent
    // puts do not each assume the room is theirs.
    const int64_t need = live_bytes_ - leaving_bytes_ + reserved_bytes_ - replaced +
                         static_cast<int64_t>(rec.record_bytes) - options_.capacity_bytes;
    if (need > 0) SelectVictimsLocked(span->key, need, victims);
    reserved_bytes_ += static_cast<int64_t>(rec.record_bytes);
  }
  Loc loc;
  loc.prefix_len = rec.prefix.size();
  loc.payload_len = span->payload.size();
  loc.seq = seq;
  std::shared_ptr<SegmentFile> file;
  absl::Status st = Append(rec.prefix, span->payload, rec.suffix, &loc, &file);
  if (st.ok() && options.sync && ::fdatasync(file->fd) != 0) {
    st = ErrnoError("fdatasync", file->path, errno);
    // The record is in the file but unacknowledged; it is published as dead.
    absl::MutexLock lock(&mu_);
    AddRefLocked(loc, RecordKind::kSpan, span->key);
  }
  if (!st.ok()) {
    absl::MutexLock lock(&mu_);
    reserved_bytes_ -= static_cast<int64_t>(rec.record_bytes);
    for (const SpanKey& v : *victims) {
      auto it = index_.find(v);
      if (it != index_.end() && it->second.leaving) {
        it->second.leaving = false;
        leaving_bytes_ -= static_cast<int64_t>(it->second.loc.length);
      }
    }
    victims->clear();
    return st;
  }

  absl::MutexLock lock(&mu_);
  reserved_bytes_ -= static_cast<int64_t>(rec.record_bytes);
  AddRefLocked(loc, RecordKind::kSpan, span->key);
  auto it = index_.find(span->key);
  if (it != index_.end() && it->second.loc.seq > seq) {
    // A newer record of the key was published first; this one is dead.
  } else {
    if (it != index_.end()) DropEntryLocked(span->key);
    index_.emplace(span->key, IndexEntry{loc, MetaWithoutTokenIds(span->meta), false});
    live_bytes_ += static_cast<int64_t>(loc.length);
    AddLiveLocked(loc.segment, static_cast<int64_t>(loc.length));
  }
  lost_.erase(span->key);
  metrics_.CountOrigin(options.origin);
  PublishMetricsLocked();
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Reading

absl::StatusOr<StoredSpanPtr> DiskTier::ReadSpan(const std::shared_ptr<SegmentFile>& file,
                                                 const Loc& loc, const SpanKey& key) const {
  const uint64_t tail_len = loc.length - loc.prefix_len - loc.payload_len;
  std::string prefix(loc.prefix_len, '\0');
  std::string tail(tail_len, '\0');
  auto span = std::make_shared<StoredSpan>();
  span->payload.resize(loc.payload_len);
  std::vector<iovec> iov = {iovec{prefix.data(), prefix.size()},
                            iovec{span->payload.data(), span->payload.size()},
                            iovec{tail.data(), tail.size()}};
  absl::Status read = TransferAll(false, file->fd, std::move(iov), loc.offset, file->path);
  if (!read.ok()) return read;  // DATA_LOSS when the file ends early
  Checksum64Builder b;
  b.Update(prefix);
  b.Update(span->payload);
  b.Update(tail.data(), tail.size() - 8);
  if (b.Digest() != LoadU64(tail.data() + tail.size() - 8)) {
    return absl::DataLossError(absl::StrCat("span ", key.hash.ToHex(), ": record at ", file->path,
                                            ":", loc.offset, " failed its checksum"));
  }
  auto header = ParseRecordHeader(prefix);
  SpanKey stored_key;
  if (!header.ok() ||
      !DecodeRecordMeta(*header, absl::string_view(prefix).substr(kRecordHeaderBytes),
                        /*with_token_ids=*/true, &stored_key, &span->meta) ||
      !(stored_key == key)) {
    return absl::DataLossError(absl::StrCat("record at ", file->path, ":", loc.offset,
                                            " does not hold span ", key.hash.ToHex()));
  }
  span->key = std::move(stored_key);
  return StoredSpanPtr(std::move(span));
}

absl::StatusOr<StoredSpanPtr> DiskTier::ReadIndexed(const SpanKey& key, bool victim) {
  Loc loc;
  std::shared_ptr<SegmentFile> file;
  {
    absl::MutexLock lock(&mu_);
    if (!victim && lost_.erase(key) > 0) {
      return absl::DataLossError(absl::StrCat(
          "span ", key.hash.ToHex(),
          ": its record failed verification (found by recovery or compaction)"));
    }
    auto it = index_.find(key);
    if (it == index_.end() || (victim && !it->second.leaving)) {
      return absl::NotFoundError(victim ? "not leaving the disk tier" : "not on disk");
    }
    loc = it->second.loc;
    file = segments_.at(loc.segment)->file;
  }
  auto span = ReadSpan(file, loc, key);
  if (!span.ok() && span.status().code() == absl::StatusCode::kDataLoss) {
    absl::MutexLock lock(&mu_);
    auto it = index_.find(key);
    if (it != index_.end() && it->second.loc.segment == loc.segment &&
        it->second.loc.offset == loc.offset) {
      DropEntryLocked(key);
      PublishMetricsLocked();
    }
    metrics_.checksum_failures->Increment();
    KVR_LOG(ERROR) << span.status();
  }
  return span;
}

absl::StatusOr<StoredSpanPtr> DiskTier::Get(const SpanKey& key) {
  auto span = ReadIndexed(key, /*victim=*/false);
  (span.ok() ? metrics_.hits : metrics_.misses)->Increment();
  return span;
}

absl::StatusOr<StoredSpanPtr> DiskTier::GetVictim(const SpanKey& key) {
  return ReadIndexed(key, /*victim=*/true);
}

bool DiskTier::FinishEviction(const SpanKey& key) {
  absl::MutexLock lock(&mu_);
  auto it = index_.find(key);
  if (it == index_.end() || !it->second.leaving) return false;
  DropEntryLocked(key);
  metrics_.evictions->Increment();
  PublishMetricsLocked();
  return true;
}

bool DiskTier::Contains(const SpanKey& key) const {
  absl::MutexLock lock(&mu_);
  return index_.contains(key);
}

absl::Status DiskTier::Delete(const SpanKey& key) {
  bool live = false;
  {
    absl::MutexLock lock(&mu_);
    lost_.erase(key);
    live = index_.contains(key);
    if (!instances_.contains(key)) {
      return live ? absl::InternalError("disk index holds a span without a record")
                  : absl::NotFoundError("not on disk");
    }
  }
  const uint64_t seq = next_seq_.fetch_add(1);
  EncodedRecord rec = EncodeTombstoneRecord(key, seq);
  Loc loc;
  loc.prefix_len = rec.prefix.size();
  loc.seq = seq;
  std::shared_ptr<SegmentFile> file;
  KVR_RETURN_IF_ERROR(Append(rec.prefix, "", rec.suffix, &loc, &file));
  const bool synced = ::fdatasync(file->fd) == 0;
  const int err = errno;
  absl::MutexLock lock(&mu_);
  AddRefLocked(loc, RecordKind::kTombstone, key);
  if (!synced) return ErrnoError("fdatasync", file->path, err);
  if (instances_.contains(key)) {
    auto t = tombs_.find(key);
    if (t != tombs_.end()) {
      AddLiveLocked(t->second.segment, -static_cast<int64_t>(t->second.length));
      tombs_.erase(t);
    }
    tombs_.emplace(key, loc);
    AddLiveLocked(loc.segment, static_cast<int64_t>(loc.length));
  }
  auto it = index_.find(key);
  if (it != index_.end() && it->second.loc.seq < seq) {
    DropEntryLocked(key);
    PublishMetricsLocked();
    return absl::OkStatus();
  }
  return live ? absl::OkStatus() : absl::NotFoundError("not on disk");
}

void DiskTier::ForEachSpan(const std::function<void(const SpanKey&, const SpanMeta&)>& fn) const {
  absl::MutexLock lock(&mu_);
  for (const auto& [key, entry] : index_) fn(key, entry.meta);
}

TierStats DiskTier::Stats() const { return metrics_.Snapshot(); }

absl::Status DiskTier::Sync() {
  std::shared_ptr<SegmentFile> file;
  {
    absl::MutexLock lock(&mu_);
    file = segments_.at(active_id_)->file;
  }
  if (::fdatasync(file->fd) != 0) return ErrnoError("fdatasync", file->path, errno);
  return SyncDir();
}

std::vector<SpanKey> DiskTier::RecoveredCorruptKeys() const {
  absl::MutexLock lock(&mu_);
  return std::vector<SpanKey>(lost_.begin(), lost_.end());
}

DiskRecoveryStats DiskTier::recovery_stats() const {
  absl::MutexLock lock(&mu_);
  return recovery_;
}

DiskCompactionStats DiskTier::compaction_stats() const {
  absl::MutexLock lock(&mu_);
  return compaction_;
}

int64_t DiskTier::file_bytes() const {
  absl::MutexLock lock(&mu_);
  int64_t n = 0;
  for (const auto& [id, seg] : segments_) n += seg->size;
  return n;
}

int64_t DiskTier::num_segments() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(segments_.size());
}

// ---------------------------------------------------------------------------
// Compaction

void DiskTier::RemoveSegmentLocked(uint64_t id) {
  auto seg_it = segments_.find(id);
  if (seg_it == segments_.end()) return;
  for (const Segment::Ref& r : seg_it->second->refs) {
    auto t = tombs_.find(r.key);
    if (r.kind == RecordKind::kTombstone) {
      if (t != tombs_.end() && t->second.segment == id && t->second.offset == r.loc.offset) {
        tombs_.erase(t);
      }
      continue;
    }
    auto inst = instances_.find(r.key);
    if (inst == instances_.end() || --inst->second > 0) continue;
    instances_.erase(inst);
    // The last record of the key is gone: its tombstone is no longer needed.
    if (t != tombs_.end()) {
      if (t->second.segment != id) {
        AddLiveLocked(t->second.segment, -static_cast<int64_t>(t->second.length));
      }
      tombs_.erase(t);
    }
  }
  segments_.erase(seg_it);
}

bool DiskTier::IsCurrentLocked(uint64_t id, const RecordRef& r) const {
  if (r.kind == RecordKind::kSpan) {
    auto it = index_.find(r.key);
    return it != index_.end() && it->second.loc.segment == id &&
           it->second.loc.offset == r.loc.offset;
  }
  auto t = tombs_.find(r.key);
  return t != tombs_.end() && t->second.segment == id && t->second.offset == r.loc.offset;
}

absl::Status DiskTier::CompactSegment(uint64_t id, bool* removed) {
  *removed = false;
  std::vector<RecordRef> todo;
  std::shared_ptr<SegmentFile> file;
  {
    absl::MutexLock lock(&mu_);
    auto seg_it = segments_.find(id);
    if (seg_it == segments_.end() || !WantsCompactionLocked(*seg_it->second)) {
      return absl::OkStatus();
    }
    file = seg_it->second->file;
    for (const RecordRef& r : seg_it->second->refs) {
      if (IsCurrentLocked(id, r)) todo.push_back(r);
    }
  }
  std::vector<std::shared_ptr<SegmentFile>> written;
  int64_t copied = 0;
  std::string buf;
  for (const RecordRef& r : todo) {
    KVR_ASSIGN_OR_RETURN(const bool moved, MoveRecord(id, *file, r, &buf, &written));
    if (moved) ++copied;
  }
  // The copies must be durable before the originals go.
  for (const auto& f : written) {
    if (::fdatasync(f->fd) != 0) return ErrnoError("fdatasync", f->path, errno);
  }
  return RemoveCompactedSegment(id, *file, !todo.empty(), copied, removed);
}

absl::StatusOr<bool> DiskTier::MoveRecord(uint64_t id, const SegmentFile& file,
                                          const RecordRef& r, std::string* buf,
                                          std::vector<std::shared_ptr<SegmentFile>>* written) {
  Loc loc = r.loc;
  std::shared_ptr<SegmentFile> out;
  if (r.kind == RecordKind::kTombstone) {
    EncodedRecord rec = EncodeTombstoneRecord(r.key, r.loc.seq);
    KVR_RETURN_IF_ERROR(Append(rec.prefix, "", rec.suffix, &loc, &out));
  } else {
    buf->resize(r.loc.length);
    absl::Status read = PreadAll(file.fd, buf->data(), buf->size(), r.loc.offset, file.path);
    if (read.ok() && !VerifyRecordBytes(*buf)) {
      read = absl::DataLossError(absl::StrCat("record at ", file.path, ":", r.loc.offset,
                                              " failed its checksum during compaction"));
    }
    if (!read.ok()) {
      if (read.code() != absl::StatusCode::kDataLoss) return read;
      KVR_LOG(ERROR) << read;
      absl::MutexLock lock(&mu_);
      if (IsCurrentLocked(id, r)) {
        DropEntryLocked(r.key);
        lost_.insert(r.key);
        metrics_.checksum_failures->Increment();
        PublishMetricsLocked();
      }
      return false;
    }
    KVR_RETURN_IF_ERROR(Append(*buf, "", "", &loc, &out));
  }
  if (written->empty() || written->back() != out) written->push_back(out);
  absl::MutexLock lock(&mu_);
  AddRefLocked(loc, r.kind, r.key);
  if (!IsCurrentLocked(id, r)) return false;
  if (r.kind == RecordKind::kSpan) {
    index_.find(r.key)->second.loc = loc;
  } else {
    tombs_.find(r.key)->second = loc;
  }
  AddLiveLocked(id, -static_cast<int64_t>(r.loc.length));
  AddLiveLocked(loc.segment, static_cast<int64_t>(loc.length));
  return true;
}

absl::Status DiskTier::RemoveCompactedSegment(uint64_t id, const SegmentFile& file,
                                              bool compacted, int64_t copied, bool* removed) {
  {
    absl::MutexLock lock(&mu_);
    auto seg_it = segments_.find(id);
    if (seg_it == segments_.end()) return absl::OkStatus();
    for (const RecordRef& r : seg_it->second->refs) {
      auto it = index_.find(r.key);
      if (r.kind == RecordKind::kSpan && it != index_.end() && it->second.loc.segment == id) {
        return absl::InternalError(
            absl::StrCat("segment ", file.path, " still holds live records after compaction"));
      }
    }
    const int64_t size = seg_it->second->size;
    RemoveSegmentLocked(id);
    ++compaction_.segments_removed;
    if (compacted) ++compaction_.segments_compacted;
    compaction_.records_copied += copied;
    compaction_.bytes_reclaimed += size;
  }
  if (::unlink(file.path.c_str()) != 0) return ErrnoError("unlink", file.path, errno);
  *removed = true;
  return SyncDir();
}

absl::StatusOr<int> DiskTier::CompactNow() {
  absl::MutexLock compact_lock(&compact_mu_);
  int removed = 0;
  // Removing a segment can release tombstones elsewhere and make more
  // segments eligible; a few rounds reach the fixed point.
  for (int round = 0; round < 8; ++round) {
    std::vector<std::pair<double, uint64_t>> candidates;
    {
      absl::MutexLock lock(&mu_);
      compaction_wanted_ = false;
      for (const auto& [id, seg] : segments_) {
        if (!WantsCompactionLocked(*seg)) continue;
        const double body = static_cast<double>(seg->size - kSegmentHeaderBytes);
        candidates.emplace_back(body > 0 ? seg->live_bytes / body : 0.0, id);
      }
    }
    if (candidates.empty()) break;
    std::sort(candidates.begin(), candidates.end());
    int before = removed;
    for (const auto& [fraction, id] : candidates) {
      {
        absl::MutexLock lock(&mu_);
        if (stopping_) return removed;  // the destructor is waiting
      }
      bool done = false;
      KVR_RETURN_IF_ERROR(CompactSegment(id, &done));
      if (done) ++removed;
    }
    if (removed == before) break;
  }
  return removed;
}

void DiskTier::CompactionLoop() {
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(this, &DiskTier::WakeCompaction));
      if (stopping_) return;
    }
    absl::StatusOr<int> done = CompactNow();
    if (!done.ok()) {
      KVR_LOG(ERROR) << "disk tier compaction of " << options_.dir << " failed: " << done.status();
    }
  }
}

}  // namespace kvrecall::store
