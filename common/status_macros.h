#pragma once

// Status propagation macros. Abseil 20220623 (Debian bookworm) has neither
// RETURN_IF_ERROR nor ASSIGN_OR_RETURN, so kvrecall defines its own.
//
//   KVR_RETURN_IF_ERROR(tier->Put(key, value));
//   KVR_ASSIGN_OR_RETURN(std::unique_ptr<Tier> tier, DiskTier::Create(options));

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define KVR_STATUS_MACROS_CONCAT_INNER_(x, y) x##y
#define KVR_STATUS_MACROS_CONCAT_(x, y) KVR_STATUS_MACROS_CONCAT_INNER_(x, y)

// Evaluates `expr` (an absl::Status) and returns it from the enclosing
// function when it is not OK.
#define KVR_RETURN_IF_ERROR(expr)                  \
  do {                                             \
    ::absl::Status kvr_status_ = (expr);           \
    if (!kvr_status_.ok()) return kvr_status_;     \
  } while (false)

// Evaluates `rexpr` (an absl::StatusOr<T>); on error returns its status from
// the enclosing function, otherwise moves the value into `lhs`, which may be a
// declaration (`auto x`, `std::unique_ptr<T> p`) or an existing variable.
#define KVR_ASSIGN_OR_RETURN(lhs, rexpr)                                              \
  KVR_ASSIGN_OR_RETURN_IMPL_(KVR_STATUS_MACROS_CONCAT_(kvr_statusor_, __LINE__), lhs, \
                             rexpr)

#define KVR_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                               \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()
