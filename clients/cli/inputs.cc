#include "clients/cli/inputs.h"

#include <cstring>
#include <optional>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "clients/cpp/span_keys.h"
#include "common/half.h"
#include "common/status_macros.h"
#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>

namespace kvrecall::cli {
DType ToDType(v1::DType d) {
  switch (d) {
    case v1::DTYPE_F16:
      return DType::kF16;
    case v1::DTYPE_F32:
      return DType::kF32;
    default:
      return DType::kBf16;
  }
}

absl::StatusOr<std::vector<Hash128>> ReadSpanHashes(const std::string& list,
                                                    const std::string& file) {
  std::vector<std::string> texts;
  for (absl::string_view h : absl::StrSplit(list, ',', absl::SkipWhitespace())) {
    texts.emplace_back(absl::StripAsciiWhitespace(h));
  }
  if (!file.empty()) {
    KVR_ASSIGN_OR_RETURN(std::string body, ReadFileToString(file));
    for (absl::string_view line : absl::StrSplit(body, '\n', absl::SkipWhitespace())) {
      line = absl::StripAsciiWhitespace(line);
      if (!line.empty() && line[0] != '#') texts.emplace_back(line);
    }
  }
  std::vector<Hash128> out;
  for (const std::string& t : texts) {
    absl::StatusOr<Hash128> h = Hash128::FromHex(t);
    if (!h.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("bad span hash '", t, "': 32 hex digits expected"));
    }
    out.push_back(*h);
  }
  return out;
}

namespace {

std::string ShapeText(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

template <typename T>
void AppendInts(const char* data, int64_t n, std::vector<int64_t>* out) {
  for (int64_t i = 0; i < n; ++i) {
    T v;
    std::memcpy(&v, data + i * sizeof(T), sizeof(T));
    out->push_back(static_cast<int64_t>(v));
  }
}

absl::StatusOr<std::vector<uint32_t>> IntsToTokens(const std::string& descr, const std::string& data,
                                                   int64_t n, const std::string& what) {
  std::vector<int64_t> ints;
  if (descr == "<i4") {
    AppendInts<int32_t>(data.data(), n, &ints);
  } else if (descr == "<u4" || descr == "U32") {
    AppendInts<uint32_t>(data.data(), n, &ints);
  } else if (descr == "<i8" || descr == "I64") {
    AppendInts<int64_t>(data.data(), n, &ints);
  } else if (descr == "<u8") {
    AppendInts<uint64_t>(data.data(), n, &ints);
  } else if (descr == "<i2") {
    AppendInts<int16_t>(data.data(), n, &ints);
  } else if (descr == "<u2") {
    AppendInts<uint16_t>(data.data(), n, &ints);
  } else if (descr == "|u1" || descr == "|i1") {
    AppendInts<uint8_t>(data.data(), n, &ints);
  } else if (descr == "I32") {
    AppendInts<int32_t>(data.data(), n, &ints);
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": token ids must be integers, got dtype ", descr));
  }
  std::vector<uint32_t> tokens;
  tokens.reserve(ints.size());
  for (int64_t v : ints) {
    if (v < 0 || v > 0xffffffffLL) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": token id ", v, " is not an unsigned 32-bit value"));
    }
    tokens.push_back(static_cast<uint32_t>(v));
  }
  return tokens;
}

}  // namespace

absl::StatusOr<std::vector<uint32_t>> ReadTokenIds(const std::string& tokens_npy,
                                                   const std::string& text_file) {
  if (tokens_npy.empty() == text_file.empty()) {
    return absl::InvalidArgumentError(
        "give the token ids with exactly one of --tokens=FILE.npy and --text=FILE "
        "(span hashes are computed from them)");
  }
  if (!text_file.empty()) {
    KVR_ASSIGN_OR_RETURN(std::string text, ReadFileToString(text_file));
    return std::vector<uint32_t>(reinterpret_cast<const uint8_t*>(text.data()),
                                 reinterpret_cast<const uint8_t*>(text.data()) + text.size());
  }
  KVR_ASSIGN_OR_RETURN(NpyArray a, ReadNpy(tokens_npy));
  if (a.shape.size() != 1) {
    return absl::InvalidArgumentError(absl::StrCat(tokens_npy, ": token ids must be 1-D, got ",
                                                   ShapeText(a.shape)));
  }
  return IntsToTokens(a.descr, a.data, a.num_elements(), tokens_npy);
}

absl::StatusOr<std::string> ConvertToModelDType(const std::string& data, const std::string& descr,
                                                int64_t n, v1::DType dtype) {
  const DType target = ToDType(dtype);
  const size_t target_size = DTypeSize(target);
  if (descr == "<u2" || descr == "<i2" || (descr == "<f2" && target == DType::kF16) ||
      (descr == "<f4" && target == DType::kF32) ||
      (descr == "BF16" && target == DType::kBf16)) {
    if (static_cast<int64_t>(data.size()) != n * static_cast<int64_t>(target_size)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "elements of dtype ", descr, " cannot be stored as ", DTypeName(target),
          " without conversion (", target_size, " bytes each)"));
    }
    return data;
  }
  std::vector<float> f32(static_cast<size_t>(n));
  if (descr == "<f2") {
    ConvertToFloat(data.data(), DType::kF16, f32.size(), f32.data());
  } else if (descr == "<f4") {
    std::memcpy(f32.data(), data.data(), f32.size() * sizeof(float));
  } else if (descr == "<f8") {
    for (int64_t i = 0; i < n; ++i) {
      double v;
      std::memcpy(&v, data.data() + i * 8, 8);
      f32[i] = static_cast<float>(v);
    }
  } else if (descr == "BF16") {
    ConvertToFloat(data.data(), DType::kBf16, f32.size(), f32.data());
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "unsupported element type ", descr, " (use float16, float32, float64, or uint16 raw bits)"));
  }
  std::string out(static_cast<size_t>(n) * target_size, '\0');
  ConvertFromFloat(f32.data(), f32.size(), target, out.data());
  return out;
}

absl::StatusOr<SequenceData> ReadSequenceNpy(const std::string& path,
                                             const v1::ModelGeometry& model) {
  KVR_ASSIGN_OR_RETURN(NpyArray a, ReadNpy(path));
  if (a.shape.size() != 5 || a.shape[0] != model.num_layers() || a.shape[1] != 2 ||
      a.shape[2] != model.num_kv_heads() || a.shape[4] != model.head_dim()) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": shape ", ShapeText(a.shape), " is not [", model.num_layers(), ", 2, ",
        model.num_kv_heads(), ", tokens, ", model.head_dim(), "] (layers, K|V, kv heads, tokens, "
        "head dim of ", model.model_id(), ")"));
  }
  SequenceData out;
  out.num_tokens = a.shape[3];
  KVR_ASSIGN_OR_RETURN(out.kv, ConvertToModelDType(a.data, a.descr, a.num_elements(),
                                                   model.dtype()));
  return out;
}

namespace {

// One tensor of a safetensors file: its dtype name, shape and bytes.
struct SafeTensor {
  std::string dtype;
  std::vector<int64_t> shape;
  std::string data;
};

// A safetensors file: an 8-byte header length, a JSON header naming each
// tensor's dtype, shape and byte range, then the bytes.
class SafetensorsFile {
 public:
  static absl::StatusOr<SafetensorsFile> Read(const std::string& path) {
    SafetensorsFile f;
    f.path_ = path;
    KVR_ASSIGN_OR_RETURN(f.file_, ReadFileToString(path));
    if (f.file_.size() < 8) return absl::InvalidArgumentError(absl::StrCat(path, ": too short"));
    uint64_t header_len = 0;
    std::memcpy(&header_len, f.file_.data(), 8);
    if (header_len > f.file_.size() - 8) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": bad safetensors header length"));
    }
    const auto parsed = google::protobuf::util::JsonStringToMessage(
        std::string(f.file_.data() + 8, header_len), &f.header_);
    if (!parsed.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": bad safetensors header: ",
                                                     parsed.ToString()));
    }
    f.data_start_ = 8 + header_len;
    return f;
  }

  // The first tensor of `names` the file holds; none when it holds none of
  // them (INVALID_ARGUMENT when `required`).
  absl::StatusOr<std::optional<SafeTensor>> Find(std::initializer_list<const char*> names,
                                                 bool required) const {
    for (const char* name : names) {
      auto it = header_.fields().find(name);
      if (it == header_.fields().end()) continue;
      const auto& f = it->second.struct_value().fields();
      SafeTensor t;
      if (f.count("dtype") == 0 || f.count("shape") == 0 || f.count("data_offsets") == 0) {
        return absl::InvalidArgumentError(absl::StrCat(path_, ": tensor ", name, " is malformed"));
      }
      t.dtype = f.at("dtype").string_value();
      for (const auto& v : f.at("shape").list_value().values()) {
        t.shape.push_back(static_cast<int64_t>(v.number_value()));
      }
      const auto& offsets = f.at("data_offsets").list_value().values();
      if (offsets.size() != 2) {
        return absl::InvalidArgumentError(absl::StrCat(path_, ": tensor ", name, " offsets"));
      }
      const auto begin = static_cast<uint64_t>(offsets[0].number_value());
      const auto end = static_cast<uint64_t>(offsets[1].number_value());
      if (begin > end || end > file_.size() - data_start_) {
        return absl::InvalidArgumentError(
            absl::StrCat(path_, ": tensor ", name, " lies outside the file"));
      }
      t.data = file_.substr(data_start_ + begin, end - begin);
      return std::optional<SafeTensor>(std::move(t));
    }
    if (required) {
      return absl::InvalidArgumentError(
          absl::StrCat(path_, ": no tensor named ", *names.begin(), " (or ",
                       *(names.begin() + 1), ")"));
    }
    return std::optional<SafeTensor>();
  }

 private:
  std::string path_;
  std::string file_;
  google::protobuf::Struct header_;
  size_t data_start_ = 0;
};

// The npy descr ConvertToModelDType takes for a safetensors dtype name.
std::string NpyDescr(const std::string& dtype) {
  if (dtype == "F16") return "<f2";
  if (dtype == "F32") return "<f4";
  if (dtype == "F64") return "<f8";
  return dtype;  // BF16, or one ConvertToModelDType refuses by name
}

}  // namespace

absl::StatusOr<SequenceData> ReadSafetensors(const std::string& path,
                                             const v1::ModelGeometry& model) {
  KVR_ASSIGN_OR_RETURN(const SafetensorsFile file, SafetensorsFile::Read(path));
  KVR_ASSIGN_OR_RETURN(std::optional<SafeTensor> keys, file.Find({"keys", "k"}, true));
  KVR_ASSIGN_OR_RETURN(std::optional<SafeTensor> values, file.Find({"values", "v"}, true));
  KVR_ASSIGN_OR_RETURN(std::optional<SafeTensor> tokens, file.Find({"token_ids", "tokens"}, false));
  for (const SafeTensor* t : {&*keys, &*values}) {
    if (t->shape.size() != 4 || t->shape[0] != model.num_layers() ||
        t->shape[1] != model.num_kv_heads() || t->shape[3] != model.head_dim() ||
        t->shape[2] != keys->shape[2]) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": keys and values must both be [", model.num_layers(), ", ",
          model.num_kv_heads(), ", tokens, ", model.head_dim(), "], got ", ShapeText(t->shape)));
    }
  }
  const int64_t layers = model.num_layers();
  const int64_t tokens_n = keys->shape[2];
  const int64_t per_layer = int64_t{model.num_kv_heads()} * tokens_n * model.head_dim();
  KVR_ASSIGN_OR_RETURN(std::string k, ConvertToModelDType(keys->data, NpyDescr(keys->dtype),
                                                          layers * per_layer, model.dtype()));
  KVR_ASSIGN_OR_RETURN(std::string v, ConvertToModelDType(values->data, NpyDescr(values->dtype),
                                                          layers * per_layer, model.dtype()));
  // The sequence layout: [layer][K|V][kv_head][token][d].
  SequenceData out;
  out.num_tokens = tokens_n;
  const size_t layer_bytes = static_cast<size_t>(per_layer) * client::DTypeBytes(model.dtype());
  out.kv.reserve(2 * k.size());
  for (int64_t l = 0; l < layers; ++l) {
    out.kv.append(k, l * layer_bytes, layer_bytes);
    out.kv.append(v, l * layer_bytes, layer_bytes);
  }
  if (tokens.has_value()) {
    const SafeTensor& t = *tokens;
    if (t.shape.size() != 1 || t.shape[0] != tokens_n) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": token_ids must be [", tokens_n, "], got ", ShapeText(t.shape)));
    }
    KVR_ASSIGN_OR_RETURN(out.token_ids, IntsToTokens(t.dtype, t.data, tokens_n, path));
  }
  return out;
}

absl::StatusOr<NpyArray> SequenceToNpy(const std::string& kv, const v1::ModelGeometry& model,
                                       int32_t num_layers, int64_t num_tokens, bool as_float32) {
  NpyArray a;
  a.shape = {num_layers, 2, model.num_kv_heads(), num_tokens, model.head_dim()};
  const int64_t n = a.num_elements();
  if (static_cast<int64_t>(kv.size()) != n * client::DTypeBytes(model.dtype())) {
    return absl::InternalError("fetched K/V size does not match its shape");
  }
  if (as_float32 && model.dtype() != v1::DTYPE_F32) {
    a.descr = "<f4";
    a.data.resize(static_cast<size_t>(n) * 4);
    ConvertToFloat(kv.data(), ToDType(model.dtype()), static_cast<size_t>(n),
                   reinterpret_cast<float*>(a.data.data()));
    return a;
  }
  a.descr = model.dtype() == v1::DTYPE_F32 ? "<f4" : model.dtype() == v1::DTYPE_F16 ? "<f2" : "<u2";
  a.data = kv;
  return a;
}

}  // namespace kvrecall::cli
