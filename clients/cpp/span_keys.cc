#include "clients/cpp/span_keys.h"

#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kvrecall::client {

int64_t DTypeBytes(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_F16:
    case v1::DTYPE_BF16:
      return 2;
    case v1::DTYPE_F32:
      return 4;
    default:
      return 0;
  }
}

int64_t SpanPayloadBytes(const v1::ModelGeometry& model, int64_t num_tokens) {
  return int64_t{model.num_layers()} * 2 * model.num_kv_heads() * num_tokens * model.head_dim() *
         DTypeBytes(model.dtype());
}

namespace {

// Copies tokens [t0, t0 + n) of every (layer, kv, head) row between a buffer
// of `from_tokens` tokens per row and one of `to_tokens` tokens per row.
void CopyTokenRange(const char* from, int64_t from_tokens, int64_t from_t0, char* to,
                    int64_t to_tokens, int64_t to_t0, int64_t n, int64_t rows,
                    int64_t token_bytes) {
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(to + (r * to_tokens + to_t0) * token_bytes,
                from + (r * from_tokens + from_t0) * token_bytes, n * token_bytes);
  }
}

}  // namespace

absl::StatusOr<std::vector<OwnedSpan>> SequenceToSpans(const v1::ModelGeometry& model,
                                                       absl::string_view salt,
                                                       absl::Span<const uint32_t> token_ids,
                                                       absl::string_view sequence,
                                                       bool include_partial_tail) {
  const int64_t total = static_cast<int64_t>(token_ids.size());
  if (DTypeBytes(model.dtype()) == 0 || model.block_tokens() <= 0) {
    return absl::InvalidArgumentError("model: dtype and block_tokens must be set");
  }
  if (static_cast<int64_t>(sequence.size()) != SpanPayloadBytes(model, total)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sequence has ", sequence.size(), " bytes; ", total, " tokens of ", model.model_id(),
        " need ", SpanPayloadBytes(model, total)));
  }
  const std::vector<Hash128> hashes = ChainHashes(model.model_id(), salt, token_ids,
                                                  model.block_tokens(), include_partial_tail);
  const int64_t rows = int64_t{model.num_layers()} * 2 * model.num_kv_heads();
  const int64_t token_bytes = int64_t{model.head_dim()} * DTypeBytes(model.dtype());
  std::vector<OwnedSpan> spans;
  Hash128 parent = SpanRootHash(model.model_id(), salt);
  for (size_t i = 0; i < hashes.size(); ++i) {
    const int64_t t0 = static_cast<int64_t>(i) * model.block_tokens();
    const int64_t n = std::min<int64_t>(model.block_tokens(), total - t0);
    OwnedSpan span;
    span.hash = hashes[i];
    span.parent = parent;
    span.token_ids.assign(token_ids.begin() + t0, token_ids.begin() + t0 + n);
    span.payload.resize(SpanPayloadBytes(model, n));
    CopyTokenRange(sequence.data(), total, t0, span.payload.data(), n, 0, n, rows, token_bytes);
    parent = span.hash;
    spans.push_back(std::move(span));
  }
  return spans;
}

absl::StatusOr<std::string> SpansToSequence(const v1::ModelGeometry& model, int32_t num_layers,
                                            absl::Span<const absl::string_view> payloads,
                                            absl::Span<const int32_t> tokens) {
  if (payloads.size() != tokens.size()) {
    return absl::InvalidArgumentError("one token count per payload");
  }
  const int64_t rows = int64_t{num_layers} * 2 * model.num_kv_heads();
  const int64_t token_bytes = int64_t{model.head_dim()} * DTypeBytes(model.dtype());
  int64_t total = 0;
  for (size_t i = 0; i < payloads.size(); ++i) {
    if (static_cast<int64_t>(payloads[i].size()) != rows * tokens[i] * token_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("payload ", i, " has ", payloads[i].size(),
                                                     " bytes, expected ",
                                                     rows * tokens[i] * token_bytes));
    }
    total += tokens[i];
  }
  std::string out(rows * total * token_bytes, '\0');
  int64_t t0 = 0;
  for (size_t i = 0; i < payloads.size(); ++i) {
    CopyTokenRange(payloads[i].data(), tokens[i], 0, out.data(), total, t0, tokens[i], rows,
                   token_bytes);
    t0 += tokens[i];
  }
  return out;
}

}  // namespace kvrecall::client
