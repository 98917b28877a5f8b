#pragma once

// The one converter from rocksdb::Status to absl::Status (STYLE.md §2).
// Included only by the RocksDB tier.

#include <rocksdb/status.h>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace kvrecall::store {

// OK stays OK; otherwise the closest absl code, with `context` and RocksDB's
// message: NotFound -> NOT_FOUND, Corruption -> DATA_LOSS, InvalidArgument ->
// INVALID_ARGUMENT, NotSupported -> UNIMPLEMENTED, IOError with no space ->
// RESOURCE_EXHAUSTED, other IOError -> INTERNAL, Busy / TryAgain /
// ShutdownInProgress -> UNAVAILABLE, TimedOut / Expired -> DEADLINE_EXCEEDED,
// Aborted / MergeInProgress -> ABORTED, anything else -> INTERNAL.
absl::Status FromRocksDbStatus(const rocksdb::Status& status, absl::string_view context);

}  // namespace kvrecall::store
