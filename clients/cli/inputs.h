#pragma once

// Inputs and outputs of the kvrecall CLI: token ids and sequence K/V from
// .npy, .safetensors and text files, converted to a model's layout and dtype.
//
// Sequence layout (the CLI's .npy in and out):
//   [num_layers][2 (K, V)][num_kv_heads][num_tokens][head_dim]
// .safetensors input: tensors "keys" and "values" (or "k" and "v"), each
//   [num_layers][num_kv_heads][num_tokens][head_dim], dtype F16, BF16 or F32,
//   and optionally "token_ids" (I32, I64 or U32, [num_tokens]).

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/npy.h"
#include "common/types.h"
#include "kvrecall/v1/kv_store.pb.h"

namespace kvrecall::cli {

// A sequence ready to cut into spans.
struct SequenceData {
  std::vector<uint32_t> token_ids;  // may be empty when the file has none
  int64_t num_tokens = 0;
  std::string kv;  // sequence layout, the model's dtype
};

// The element type of a model's dtype (bf16 for an unspecified one).
DType ToDType(v1::DType dtype);

// Span hashes (32 hex digits each) from a comma-separated `list`, then from
// `file` (one a line; blank lines and lines starting with '#' skipped).
absl::StatusOr<std::vector<Hash128>> ReadSpanHashes(const std::string& list,
                                                    const std::string& file);

// Token ids from a .npy of integers ([n], any integer dtype) or, with
// `text_file`, the bytes of a file (one token per byte, as byte-level models
// like kvr-tiny-llama use). Exactly one of the two must be non-empty.
absl::StatusOr<std::vector<uint32_t>> ReadTokenIds(const std::string& tokens_npy,
                                                   const std::string& text_file);

// Converts `n` elements of numpy dtype `descr` ("<f2", "<f4", "<u2", "<i2",
// "<f8") to the model's dtype. 16-bit integer descrs are taken as the model's
// raw 16-bit elements (how bf16 is written to .npy, which has no bfloat16).
absl::StatusOr<std::string> ConvertToModelDType(const std::string& data, const std::string& descr,
                                                int64_t n, v1::DType dtype);

// Reads a sequence .npy ([L, 2, Hkv, T, d]) for `model`.
absl::StatusOr<SequenceData> ReadSequenceNpy(const std::string& path,
                                             const v1::ModelGeometry& model);

// Reads keys/values (and token ids when present) from a .safetensors file.
absl::StatusOr<SequenceData> ReadSafetensors(const std::string& path,
                                             const v1::ModelGeometry& model);

// The .npy array for fetched K/V in the sequence layout (bf16 as "<u2"
// bit patterns, or everything as "<f4" when `as_float32`).
absl::StatusOr<NpyArray> SequenceToNpy(const std::string& kv, const v1::ModelGeometry& model,
                                       int32_t num_layers, int64_t num_tokens, bool as_float32);

}  // namespace kvrecall::cli
