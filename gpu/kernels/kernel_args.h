#pragma once

// Argument structs of the GPU decode-step kernels, shared by the CUDA
// launchers (gpu/kernels/*.h) and the CPU references (gpu/reference/). This
// header is plain C++ (no CUDA types), so the references build without CUDA.
//
// Conventions for every kernel:
//   - Queries are f32; keys, values and per-page metadata are bf16 or f16.
//   - Logits are s_i = sm_scale * q·k_i, sm_scale = 1/sqrt(head_dim) unless
//     given; every LSE is in natural-log units (methods.md §0.2).
//   - An empty set of tokens has o = 0 and lse = -inf (the identity of the
//     merge), like the CPU partial attention in service/retrieval.
//   - Pointers are device pointers for the launchers and host pointers for
//     the references; the shapes below hold for both.
//   - Validate*Args() return nullptr when the arguments are usable, else a
//     static message naming the first problem. Launchers return
//     cudaErrorInvalidValue for any such problem, before launching anything.

#include <cstddef>
#include <cstdint>

namespace kvrecall::gpu {

// Element type of a tensor.
enum class DType : int32_t {
  kF32 = 0,
  kF16 = 1,   // IEEE binary16
  kBf16 = 2,  // bfloat16
};

inline int DTypeBytes(DType dtype) { return dtype == DType::kF32 ? 4 : 2; }

// A paged KV cache of one layer. Keys and values live in a pool of pages;
// each sequence of the batch maps its positions to pages through its row of
// the page table. Element (page, slot, kv_head, d) of K is at
//   k[page * page_stride + slot * token_stride + kv_head * head_stride + d]
// and the same for V. NHD pages ([num_pages, page_size, num_kv_heads,
// head_dim]) have page_stride = page_size * num_kv_heads * head_dim,
// token_stride = num_kv_heads * head_dim, head_stride = head_dim; HND pages
// and the layer slice of a span payload ([kv_head][token][head_dim]) are
// expressed by other strides. Position p of sequence b is in slot
// p % page_size of page page_table[b * max_pages_per_seq + p / page_size].
struct PagedKvCache {
  const void* k = nullptr;  // pool of key pages, dtype, layout above
  const void* v = nullptr;  // pool of value pages, dtype, same layout as k
  DType dtype = DType::kBf16;  // kBf16 or kF16
  int32_t head_dim = 128;      // 64 or 128
  int32_t num_kv_heads = 0;    // >= 1
  int32_t page_size = 16;      // tokens per page, 1..256
  int32_t num_pages = 0;       // pages in the pool; valid page ids are [0, num_pages)
  int64_t page_stride = 0;     // elements between consecutive pages; multiple of 8
  int64_t token_stride = 0;    // elements between consecutive slots of a page; multiple of 8
  int64_t head_stride = 0;     // elements between consecutive KV heads; multiple of 8
  const int32_t* page_table = nullptr;  // [batch_size, max_pages_per_seq], int32 page ids
  int32_t max_pages_per_seq = 0;        // >= 1
  const int32_t* seq_lens = nullptr;    // [batch_size], tokens in each sequence
};

// Fills the strides of an NHD pool: [num_pages, page_size, num_kv_heads, head_dim].
inline void SetNhdStrides(PagedKvCache* kv) {
  kv->head_stride = kv->head_dim;
  kv->token_stride = static_cast<int64_t>(kv->num_kv_heads) * kv->head_dim;
  kv->page_stride = kv->token_stride * kv->page_size;
}

// Fills the strides of an HND pool: [num_pages, num_kv_heads, page_size, head_dim].
inline void SetHndStrides(PagedKvCache* kv) {
  kv->token_stride = kv->head_dim;
  kv->head_stride = static_cast<int64_t>(kv->page_size) * kv->head_dim;
  kv->page_stride = kv->head_stride * kv->num_kv_heads;
}

// How the decode-attention kernels compute q·k and p·v. Every choice gives
// the same result to f32 rounding; they differ in speed.
enum class DecodeMath : int32_t {
  // kMma when 5..8 query heads share a list (GQA groups 5-8), else kFma
  // (measured on the H100: docs/gpu.md).
  kAuto = 0,
  // CUDA cores: each K/V row is read by head_dim / 8 lanes, partial dots
  // reduced by warp shuffles, one online softmax per row-lane group.
  kFma = 1,
  // Tensor cores (mma.sync m16n8k16): the list's query heads are the M rows
  // of a 16-token tile; queries and probabilities are split into 16-bit high
  // and low parts (rows 0-7 and 8-15 of the tile), so logits and outputs keep
  // f32 accuracy; one softmax per head and token instead of per lane.
  kMma = 2,
};

// How the partial states of a list split over several thread blocks are
// merged. Every choice gives the same result to f32 rounding.
enum class DecodeMerge : int32_t {
  // kKernel: on the H100 the cluster merge was never faster than the merge
  // kernel in the benchmark rows that favour it (batch 1: equal at 1-2K
  // positions per list, 10-40% slower above; docs/gpu.md), so it is opt-in.
  kAuto = 0,
  // Chunks sized to whole waves (PlanDecodeSplit), partial states in the
  // workspace, then MergeStates (a second kernel).
  kKernel = 1,
  // At most 8 chunks per list, launched as one thread-block cluster per list;
  // the blocks merge through distributed shared memory in the same kernel (no
  // partial states in the workspace, no second kernel). Lists that need more
  // than 8 chunks (more than 8192 positions) fall back to kKernel.
  kCluster = 2,
};

// Sparse decode attention: for each (sequence, query head), attention of its
// one query over a list of positions of its KV head, returning o and lse.
// Entries whose position is outside [0, seq_lens[b]) or whose page id is
// outside [0, num_pages) are skipped (they contribute nothing) and counted in
// *num_invalid. Positions must be distinct within a list (a repeated position
// is counted twice, as in any sum).
struct SparseDecodeArgs {
  PagedKvCache kv;
  int32_t batch_size = 0;   // sequences, >= 1
  int32_t num_q_heads = 0;  // = num_kv_heads * group_size, group_size in 1..8
  const float* q = nullptr;  // [batch_size, num_q_heads, head_dim], f32, post-RoPE
  // true: one list per (sequence, KV head), shared by the group's query heads
  // (K/V rows are read once for the group); false: one list per (sequence,
  // query head).
  bool lists_per_kv_head = true;
  // [batch_size, num_lists, max_list_len], int32 positions, num_lists =
  // num_kv_heads or num_q_heads (see lists_per_kv_head); entries at or past
  // the list's length are not read.
  const int32_t* positions = nullptr;
  const int32_t* list_lens = nullptr;  // [batch_size, num_lists] lengths in [0, max_list_len], or nullptr: all max_list_len
  int32_t max_list_len = 0;            // >= 0
  float sm_scale = 0.0f;               // logit scale; 0 means 1/sqrt(head_dim)
  // Chunks each list is split into (flash-decoding); 0: chosen from the
  // shape and the device's SM count. At least ceil(max_list_len / 1024) are
  // used (and at most 8 with DecodeMerge::kCluster).
  int32_t num_splits = 0;
  float* o = nullptr;             // [batch_size, num_q_heads, head_dim], f32 output
  float* lse = nullptr;           // [batch_size, num_q_heads], f32 output, natural log; may be nullptr
  int32_t* num_invalid = nullptr;  // device counter, may be nullptr; incremented per skipped entry (caller zeroes it)
  DecodeMath math = DecodeMath::kAuto;     // inner loop (speed only)
  DecodeMerge merge = DecodeMerge::kAuto;  // merge of split lists (speed only)
};

// Dense decode attention with scores (TidalDecode's selection layer): full
// attention of each query head over positions [0, seq_lens[b]) that also
// writes the scaled logits and, optionally, the top-k positions per head.
struct DenseDecodeArgs {
  PagedKvCache kv;
  int32_t batch_size = 0;    // >= 1
  int32_t num_q_heads = 0;   // = num_kv_heads * group_size, group_size in 1..8
  const float* q = nullptr;  // [batch_size, num_q_heads, head_dim], f32, post-RoPE
  // >= 1 and >= every seq_lens[b]; the number of score columns. Tokens past
  // it (or past max_pages_per_seq * page_size, or on a page id outside the
  // pool) are skipped and counted in *num_invalid.
  int32_t max_seq_len = 0;
  float sm_scale = 0.0f;     // 0 means 1/sqrt(head_dim)
  int32_t num_splits = 0;    // as in SparseDecodeArgs
  float* o = nullptr;        // [batch_size, num_q_heads, head_dim], f32 output
  float* lse = nullptr;      // [batch_size, num_q_heads], natural log; may be nullptr
  // [batch_size, num_q_heads, scores_stride], f32 output or nullptr: column t
  // is sm_scale * q·k_t for t < seq_len and -inf for seq_len <= t < max_seq_len.
  // With top_k > 0 and scores == nullptr the logits go to the workspace.
  float* scores = nullptr;
  int64_t scores_stride = 0;  // >= max_seq_len; 0 means max_seq_len
  int32_t top_k = 0;          // 0: no selection; else 1..max_seq_len positions per (sequence, query head)
  // [batch_size, num_q_heads, top_k] output when top_k > 0: the positions of
  // the top_k largest logits, unordered, ties broken arbitrarily; positions
  // >= seq_len (logit -inf) appear only when seq_len < top_k.
  int32_t* top_k_positions = nullptr;
  int32_t* num_invalid = nullptr;  // as in SparseDecodeArgs
  DecodeMath math = DecodeMath::kAuto;     // as in SparseDecodeArgs
  DecodeMerge merge = DecodeMerge::kAuto;  // as in SparseDecodeArgs
};

// Merge of J partial attention states per head into one (methods.md §0.2):
//   M = max_j lse_j, lse = M + ln Σ_j exp(lse_j − M), o = Σ_j exp(lse_j − lse) o_j.
// States with lse = -inf are empty and ignored; if all are, o = 0, lse = -inf.
struct MergeStatesArgs {
  // State j of head h: o_states[j * o_state_stride + h * o_head_stride + d],
  // f32, d < head_dim; contiguous [num_states, num_heads, head_dim] has
  // o_state_stride = num_heads * head_dim and o_head_stride = head_dim.
  const float* o_states = nullptr;
  // lse_states[j * lse_state_stride + h * lse_head_stride], f32, natural log.
  const float* lse_states = nullptr;
  int32_t num_states = 0;  // J >= 1
  int32_t num_heads = 0;   // >= 1
  int32_t head_dim = 128;  // 64 or 128
  int64_t o_state_stride = 0;
  int64_t o_head_stride = 0;
  int64_t lse_state_stride = 0;
  int64_t lse_head_stride = 0;
  void* o = nullptr;             // [num_heads, head_dim] output of out_dtype
  DType out_dtype = DType::kF32;  // kF32, kBf16 or kF16
  float* lse = nullptr;          // [num_heads] f32 output, natural log; may be nullptr
};

// Top-k selection per row (radix select over the f32 bit patterns). NaN
// ranks above +inf (as torch.topk); ties at the k-th value are broken
// arbitrarily; the output is unordered.
struct TopKArgs {
  const float* scores = nullptr;  // [num_rows, row_stride] f32; columns [0, num_cols) are used
  int32_t num_rows = 0;           // 1..65535
  int32_t num_cols = 0;           // n >= 1
  int64_t row_stride = 0;         // >= num_cols; 0 means num_cols
  int32_t k = 0;                  // 1..num_cols
  int32_t* indices = nullptr;     // [num_rows, k] output: column indices of the k largest
  float* values = nullptr;        // [num_rows, k] output: their scores; may be nullptr
};

// Loki scoring (methods.md §2): approximate logits from the first `rank`
// components of PCA-rotated keys and queries, then optionally the top-k
// positions per (sequence, query head) with the pass-0 radix histogram fused
// into the scoring pass.
//   score[b, h, t] = sm_scale * Σ_{j<rank} q'[b, h, j] * K'[b, h / group, t, j]
struct LokiScoreArgs {
  // [batch_size, num_q_heads, rank] f32: the first `rank` components of the
  // rotated query q·P (q·P's first components, not a new projection).
  const float* q = nullptr;
  // Rotated key plane, dtype: element (b, kv_head, t, j) at
  // keys[b * seq_stride + kv_head * head_stride + t * rank + j], j < rank.
  const void* keys = nullptr;
  DType dtype = DType::kBf16;  // kBf16 or kF16
  int32_t rank = 32;           // r: 16, 32 or 64
  int32_t head_dim = 128;      // d of the full keys; only for the default scale
  int32_t batch_size = 0;      // >= 1
  int32_t num_q_heads = 0;     // = num_kv_heads * group_size, group_size in 1..8
  int32_t num_kv_heads = 0;    // >= 1
  int64_t seq_stride = 0;      // elements between sequences; multiple of 8
  int64_t head_stride = 0;     // elements between KV heads; multiple of 8, >= max_seq_len * rank
  const int32_t* seq_lens = nullptr;  // [batch_size] tokens per sequence, <= max_seq_len
  int32_t max_seq_len = 0;     // >= 1; score columns
  float sm_scale = 0.0f;       // 0 means 1/sqrt(head_dim)
  // [batch_size, num_q_heads, max_seq_len] output of scores_dtype, or nullptr
  // (only when k > 0: then the scores live in the workspace); -inf past seq_len.
  void* scores = nullptr;
  // kF32, or kBf16 / kF16 (each score rounded once; half the bytes written,
  // as a bf16 matmul writes them) when k == 0.
  DType scores_dtype = DType::kF32;
  int32_t k = 0;                   // 0: scores only; else 1..max_seq_len
  int32_t* top_k_positions = nullptr;  // [batch_size, num_q_heads, k] output when k > 0, unordered
};

// Quest page scoring (methods.md §6.1): per page p and query head, the upper
// bound of the page's logits from its element-wise key max M_p and min m_p,
//   score[b, h, p] = sm_scale * Σ_j max(q_j * M_{p,j}, q_j * m_{p,j}),
// then optionally the top-k pages per (sequence, query head).
struct QuestScoreArgs {
  const float* q = nullptr;  // [batch_size, num_q_heads, head_dim] f32
  // Page metadata, dtype: element (b, kv_head, p, d) at
  // page_max[b * seq_stride + kv_head * head_stride + p * head_dim + d]; same for page_min.
  const void* page_max = nullptr;
  const void* page_min = nullptr;
  DType dtype = DType::kBf16;  // kBf16 or kF16
  int32_t head_dim = 128;      // 64 or 128
  int32_t batch_size = 0;      // >= 1
  int32_t num_q_heads = 0;     // = num_kv_heads * group_size, group_size in 1..8
  int32_t num_kv_heads = 0;    // >= 1
  int64_t seq_stride = 0;      // multiple of 8
  int64_t head_stride = 0;     // multiple of 8, >= max_pages * head_dim
  const int32_t* num_pages = nullptr;  // [batch_size] pages per sequence, <= max_pages
  int32_t max_pages = 0;       // >= 1; score columns
  float sm_scale = 0.0f;       // 0 means 1/sqrt(head_dim)
  float* scores = nullptr;     // [batch_size, num_q_heads, max_pages] f32 output (nullptr only when k > 0); -inf past num_pages
  int32_t k = 0;               // 0: scores only; else 1..max_pages
  int32_t* top_k_pages = nullptr;  // [batch_size, num_q_heads, k] output when k > 0, unordered
};

// ---------------------------------------------------------------------------
// Decode-step bookkeeping (gpu/worker): the small kernels that keep a paged
// KV cache, Loki's rotated key plane and Quest's page bounds up to date and
// turn a selection into position lists, all reading the per-step state
// (sequence lengths) from device memory, so that a whole decode step can be
// captured once in a CUDA graph and replayed step after step.

// seq_lens[b] += num_tokens for every sequence; optionally also
// pages[b] = ceil(seq_lens[b] / page_size) (after the increment; 0 for a
// length <= 0). One launch per step: num_tokens is a launch constant.
struct AdvanceSeqLensArgs {
  int32_t* seq_lens = nullptr;  // [batch_size], device, updated in place
  int32_t batch_size = 0;       // >= 1
  int32_t num_tokens = 1;       // >= 0
  int32_t* pages = nullptr;     // [batch_size] output or nullptr
  int32_t page_size = 16;       // >= 1 when pages != nullptr
};

// Writes num_tokens new K/V rows per (sequence, KV head) into a paged cache
// at positions [start_b, start_b + num_tokens), start_b = seq_lens[b] -
// num_tokens (the rows just counted by AdvanceSeqLens) when start_positions
// is null, else start_positions[b]. Rows whose position has no valid page
// (position < 0, position / page_size >= max_pages_per_seq, or page id < 0
// or >= num_pages) are skipped; positions are not checked against seq_lens
// (rows may be written ahead of AdvanceSeqLens through start_positions).
struct AppendKvArgs {
  // Destination cache: its k and v pools are written (the const in
  // PagedKvCache is cast away); page_table is read, and seq_lens when
  // start_positions is null (seq_lens may be null otherwise).
  PagedKvCache kv;
  int32_t batch_size = 0;   // >= 1
  int32_t num_tokens = 0;   // >= 1
  // Source rows, kv.dtype: element (b, kv_head, t, d) at
  //   k_src[b * src_batch_stride + kv_head * src_head_stride + t * src_token_stride + d]
  // (the same for v_src). [B, Hkv, T, d] contiguous has src_token_stride = d,
  // src_head_stride = T * d, src_batch_stride = Hkv * T * d. Both 16-byte
  // aligned; strides non-negative multiples of 8 elements.
  const void* k_src = nullptr;
  const void* v_src = nullptr;
  int64_t src_batch_stride = 0;
  int64_t src_head_stride = 0;
  int64_t src_token_stride = 0;
  const int32_t* start_positions = nullptr;  // [batch_size] or nullptr (see above)
};

// Projection of rows onto the first `rank` columns of per-head matrices
// (Loki's rotation, methods.md §2): for each (b, h, t) and j < rank,
//   y[b, h, t + offset_b, j] = Σ_i x[b, h, t, i] * P[h / heads_per_matrix][i, j]
// where offset_b = seq_lens[b] - num_tokens when offset_from_seq_lens (the
// rows just appended), else 0. Rows whose output position t + offset_b is
// negative are always skipped. f32 accumulation, one rounding to y_dtype.
// No alignment is required of x, matrices or y.
struct ProjectRowsArgs {
  const void* x = nullptr;      // element (b, h, t, i) at x[b*x_batch_stride + h*x_head_stride + t*x_token_stride + i]
  DType x_dtype = DType::kF32;  // kF32, kBf16 or kF16
  int64_t x_batch_stride = 0;
  int64_t x_head_stride = 0;
  int64_t x_token_stride = 0;
  // [num_heads / heads_per_matrix, head_dim, matrix_cols] f32: row i of
  // matrix m holds input dimension i; columns [0, rank) are used.
  const float* matrices = nullptr;
  int32_t matrix_cols = 0;      // >= rank (head_dim for a full PCA basis)
  int32_t heads_per_matrix = 1; // e.g. the GQA group size for query heads sharing their KV head's basis
  int32_t batch_size = 0;       // >= 1
  int32_t num_heads = 0;        // >= 1, a multiple of heads_per_matrix
  int32_t num_tokens = 0;       // >= 1
  int32_t head_dim = 128;       // 64 or 128
  int32_t rank = 32;            // 1..head_dim
  void* y = nullptr;            // element (b, h, t, j) at y[b*y_batch_stride + h*y_head_stride + t*y_token_stride + j]
  DType y_dtype = DType::kF32;  // kF32, kBf16 or kF16
  int64_t y_batch_stride = 0;
  int64_t y_head_stride = 0;
  int64_t y_token_stride = 0;   // >= rank
  bool offset_from_seq_lens = false;
  const int32_t* seq_lens = nullptr;  // [batch_size]; required when offset_from_seq_lens
  int32_t max_positions = 0;    // >= 0; rows with t + offset_b >= max_positions are skipped (0: no upper check)
};

// Quest page bounds from a paged KV cache: for each (b, kv_head) and each
// Quest page p of `quest_page_size` positions, the element-wise max and min
// of the keys at positions [p*P, min((p+1)*P, seq_lens[b])). Updates the
// pages [first_b, ceil(seq_lens[b] / P)), first_b = 0 when last_pages == 0,
// else max(0, ceil(seq_lens[b] / P) - last_pages) (after a decode step,
// last_pages = 1 refreshes the page the new token landed in). Positions
// whose KV page is invalid are left out of the bound; a page with no valid
// position gets max = -inf, min = +inf (its score is -inf). A sequence
// length <= 0 has no pages. The bounds are exact (max and min of 16-bit
// values need no rounding; NaN keys are ignored, as fmax/fmin do).
struct PageBoundsArgs {
  PagedKvCache kv;              // read: k, page_table, seq_lens (v may be null)
  int32_t batch_size = 0;       // >= 1
  int32_t quest_page_size = 16; // P >= 1
  int32_t last_pages = 0;       // 0: every page; else the last `last_pages` pages
  // Outputs, kv.dtype, the layout of QuestScoreArgs: element (b, kv_head, p, d) at
  // page_max[b * seq_stride + kv_head * head_stride + p * head_dim + d]; same for page_min.
  void* page_max = nullptr;
  void* page_min = nullptr;
  int64_t seq_stride = 0;       // multiple of 8; outputs 16-byte aligned
  int64_t head_stride = 0;      // multiple of 8, >= max_pages * head_dim
  int32_t max_pages = 0;        // >= 1; pages past it are not written
};

// Sets scores to -inf outside the selection candidates of each row: with
// T = seq_lens[b] (b = row / rows_per_seq) and unit U (1 for per-token
// scores, P for Quest page scores), column c covers positions [c*U, (c+1)*U)
// and is kept when that range meets [sinks, T - window), i.e. when
// c*U < T - window and (c+1)*U > sinks; other columns of [0, num_cols)
// become -inf (columns past num_cols are not touched).
struct MaskScoresArgs {
  float* scores = nullptr;      // [num_rows, row_stride] f32, in place
  int32_t num_rows = 0;         // batch_size * rows_per_seq, >= 1
  int32_t rows_per_seq = 1;     // >= 1, divides num_rows; e.g. num_q_heads
  int32_t num_cols = 0;         // >= 1
  int64_t row_stride = 0;       // >= num_cols; 0 means num_cols
  const int32_t* seq_lens = nullptr;  // [num_rows / rows_per_seq]
  int32_t sinks = 0;            // >= 0
  int32_t window = 0;           // >= 0
  int32_t unit = 1;             // >= 1
};

// Position lists for sparse attention from a selection: for each (b, list),
//   [0, min(sinks, T)) ∪ [max(sinks, T - window), T) ∪ expand(selected)
// where T = seq_lens[b] and expand() maps each selected entry e >= 0 to the
// positions [e*U, (e+1)*U) that lie in [sinks, T - window) (entries < 0 are
// skipped). The result is written in that order (sinks, window, then the
// expansion in selection order) with its length; positions are distinct
// when the selected entries are. selected may be null (sinks ∪ window only).
// A length T <= 0 gives an empty list; entries of positions at or past the
// list's length are left unchanged.
struct ComposeListsArgs {
  int32_t batch_size = 0;       // >= 1
  int32_t num_lists = 0;        // >= 1, lists per sequence (num_q_heads or num_kv_heads)
  const int32_t* seq_lens = nullptr;   // [batch_size]
  int32_t sinks = 0;                   // >= 0
  int32_t window = 0;                  // >= 0
  const int32_t* selected = nullptr;   // [batch_size, num_lists, num_selected] or nullptr
  int32_t num_selected = 0;            // >= 0; ignored when selected is null
  int32_t unit = 1;                    // >= 1
  int32_t* positions = nullptr;        // [batch_size, num_lists, max_list_len] output
  int32_t* list_lens = nullptr;        // [batch_size, num_lists] output
  int32_t max_list_len = 0;            // >= 1 and >= sinks + window + num_selected * unit (num_selected 0 when selected is null)
};

// ---------------------------------------------------------------------------
// Validation, shared by launchers and references.

namespace internal {

inline bool IsKvDType(DType d) { return d == DType::kBf16 || d == DType::kF16; }
inline bool IsAligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// The pool, its strides and page table; v and seq_lens only where a kernel
// reads them.
inline const char* ValidateKvPool(const PagedKvCache& kv, bool reads_v, bool reads_seq_lens) {
  if (kv.k == nullptr) return "kv.k must not be null";
  if (reads_v && kv.v == nullptr) return "kv.v must not be null";
  if (kv.page_table == nullptr) return "kv.page_table must not be null";
  if (reads_seq_lens && kv.seq_lens == nullptr) return "kv.seq_lens must not be null";
  if (!IsKvDType(kv.dtype)) return "kv.dtype must be kBf16 or kF16";
  if (kv.head_dim != 64 && kv.head_dim != 128) return "head_dim must be 64 or 128";
  if (kv.num_kv_heads < 1) return "num_kv_heads must be >= 1";
  if (kv.page_size < 1 || kv.page_size > 256) return "page_size must be in [1, 256]";
  if (kv.num_pages < 1) return "num_pages must be >= 1";
  if (kv.max_pages_per_seq < 1) return "max_pages_per_seq must be >= 1";
  if (kv.page_stride < 0 || kv.token_stride < 0 || kv.head_stride < 0 || kv.page_stride % 8 != 0 ||
      kv.token_stride % 8 != 0 || kv.head_stride % 8 != 0) {
    return "kv strides must be non-negative multiples of 8 elements";
  }
  if (!IsAligned16(kv.k)) return "kv.k must be 16-byte aligned";
  if (reads_v && !IsAligned16(kv.v)) return "kv.v must be 16-byte aligned";
  return nullptr;
}

inline const char* ValidateKv(const PagedKvCache& kv, int32_t batch_size, int32_t num_q_heads) {
  if (const char* e = ValidateKvPool(kv, /*reads_v=*/true, /*reads_seq_lens=*/true)) return e;
  if (batch_size < 1) return "batch_size must be >= 1";
  if (num_q_heads < 1 || num_q_heads % kv.num_kv_heads != 0) {
    return "num_q_heads must be a positive multiple of num_kv_heads";
  }
  const int32_t group = num_q_heads / kv.num_kv_heads;
  if (group > 8) return "group size (num_q_heads / num_kv_heads) must be in [1, 8]";
  if (static_cast<int64_t>(batch_size) * num_q_heads > 65535) return "batch_size * num_q_heads must be <= 65535";
  return nullptr;
}

inline const char* ValidateDecodeChoices(DecodeMath math, DecodeMerge merge) {
  if (math != DecodeMath::kAuto && math != DecodeMath::kFma && math != DecodeMath::kMma) {
    return "math must be kAuto, kFma or kMma";
  }
  if (merge != DecodeMerge::kAuto && merge != DecodeMerge::kKernel && merge != DecodeMerge::kCluster) {
    return "merge must be kAuto, kKernel or kCluster";
  }
  return nullptr;
}

inline const char* ValidateTopKShape(int32_t num_rows, int32_t num_cols, int32_t k) {
  if (num_rows < 1 || num_rows > 65535) return "top-k rows must be in [1, 65535]";
  if (num_cols < 1) return "top-k columns must be >= 1";
  if (k < 1 || k > num_cols) return "k must be in [1, number of columns]";
  return nullptr;
}

}  // namespace internal

inline const char* ValidateSparseDecodeArgs(const SparseDecodeArgs& a) {
  if (const char* e = internal::ValidateKv(a.kv, a.batch_size, a.num_q_heads)) return e;
  if (a.q == nullptr || a.o == nullptr) return "q and o must not be null";
  if (a.max_list_len < 0) return "max_list_len must be >= 0";
  if (a.max_list_len > 0 && a.positions == nullptr) return "positions must not be null";
  if (a.num_splits < 0) return "num_splits must be >= 0";
  if (!(a.sm_scale >= 0.0f)) return "sm_scale must be >= 0 (0: 1/sqrt(head_dim))";
  return internal::ValidateDecodeChoices(a.math, a.merge);
}

inline const char* ValidateDenseDecodeArgs(const DenseDecodeArgs& a) {
  if (const char* e = internal::ValidateKv(a.kv, a.batch_size, a.num_q_heads)) return e;
  if (a.q == nullptr || a.o == nullptr) return "q and o must not be null";
  if (a.max_seq_len < 1) return "max_seq_len must be >= 1";
  if (a.scores_stride != 0 && a.scores_stride < a.max_seq_len) return "scores_stride must be >= max_seq_len";
  if (a.num_splits < 0) return "num_splits must be >= 0";
  if (!(a.sm_scale >= 0.0f)) return "sm_scale must be >= 0 (0: 1/sqrt(head_dim))";
  if (a.top_k < 0) return "top_k must be >= 0";
  if (a.top_k > 0) {
    if (a.top_k > a.max_seq_len) return "top_k must be <= max_seq_len";
    if (a.top_k_positions == nullptr) return "top_k_positions must not be null when top_k > 0";
  }
  return internal::ValidateDecodeChoices(a.math, a.merge);
}

inline const char* ValidateMergeStatesArgs(const MergeStatesArgs& a) {
  if (a.o_states == nullptr || a.lse_states == nullptr || a.o == nullptr) return "o_states, lse_states and o must not be null";
  if (a.num_states < 1) return "num_states must be >= 1";
  if (a.num_heads < 1) return "num_heads must be >= 1";
  if (a.head_dim != 64 && a.head_dim != 128) return "head_dim must be 64 or 128";
  if (a.out_dtype != DType::kF32 && a.out_dtype != DType::kBf16 && a.out_dtype != DType::kF16) {
    return "out_dtype must be kF32, kBf16 or kF16";
  }
  if (a.o_state_stride < 0 || a.o_head_stride < 0 || a.lse_state_stride < 0 || a.lse_head_stride < 0) {
    return "strides must be non-negative";
  }
  return nullptr;
}

inline const char* ValidateTopKArgs(const TopKArgs& a) {
  if (a.scores == nullptr || a.indices == nullptr) return "scores and indices must not be null";
  if (const char* e = internal::ValidateTopKShape(a.num_rows, a.num_cols, a.k)) return e;
  if (a.row_stride != 0 && a.row_stride < a.num_cols) return "row_stride must be >= num_cols";
  return nullptr;
}

inline const char* ValidateLokiScoreArgs(const LokiScoreArgs& a) {
  if (a.q == nullptr || a.keys == nullptr || a.seq_lens == nullptr) return "q, keys and seq_lens must not be null";
  if (!internal::IsKvDType(a.dtype)) return "dtype must be kBf16 or kF16";
  if (a.rank != 16 && a.rank != 32 && a.rank != 64) return "rank must be 16, 32 or 64";
  if (a.head_dim < a.rank) return "head_dim must be >= rank";
  if (a.batch_size < 1 || a.num_kv_heads < 1) return "batch_size and num_kv_heads must be >= 1";
  if (a.num_q_heads < 1 || a.num_q_heads % a.num_kv_heads != 0 || a.num_q_heads / a.num_kv_heads > 8) {
    return "num_q_heads must be num_kv_heads * group_size, group_size in [1, 8]";
  }
  if (static_cast<int64_t>(a.batch_size) * a.num_q_heads > 65535) return "batch_size * num_q_heads must be <= 65535";
  if (a.max_seq_len < 1) return "max_seq_len must be >= 1";
  if (a.seq_stride < 0 || a.head_stride < 0 || a.seq_stride % 8 != 0 || a.head_stride % 8 != 0) {
    return "seq_stride and head_stride must be non-negative multiples of 8 elements";
  }
  if (a.head_stride < static_cast<int64_t>(a.max_seq_len) * a.rank) return "head_stride must be >= max_seq_len * rank";
  if (!internal::IsAligned16(a.keys)) return "keys must be 16-byte aligned";
  if (!(a.sm_scale >= 0.0f)) return "sm_scale must be >= 0 (0: 1/sqrt(head_dim))";
  if (a.k < 0) return "k must be >= 0";
  if (a.k == 0 && a.scores == nullptr) return "scores must not be null when k == 0";
  if (a.scores_dtype != DType::kF32 && a.scores_dtype != DType::kBf16 && a.scores_dtype != DType::kF16) {
    return "scores_dtype must be kF32, kBf16 or kF16";
  }
  if (a.scores_dtype != DType::kF32 && a.k != 0) return "16-bit scores_dtype needs k == 0 (top-k reads f32 scores)";
  if (a.k > 0) {
    if (a.k > a.max_seq_len) return "k must be <= max_seq_len";
    if (a.top_k_positions == nullptr) return "top_k_positions must not be null when k > 0";
  }
  return nullptr;
}

inline const char* ValidateQuestScoreArgs(const QuestScoreArgs& a) {
  if (a.q == nullptr || a.page_max == nullptr || a.page_min == nullptr || a.num_pages == nullptr) {
    return "q, page_max, page_min and num_pages must not be null";
  }
  if (!internal::IsKvDType(a.dtype)) return "dtype must be kBf16 or kF16";
  if (a.head_dim != 64 && a.head_dim != 128) return "head_dim must be 64 or 128";
  if (a.batch_size < 1 || a.num_kv_heads < 1) return "batch_size and num_kv_heads must be >= 1";
  if (a.num_q_heads < 1 || a.num_q_heads % a.num_kv_heads != 0 || a.num_q_heads / a.num_kv_heads > 8) {
    return "num_q_heads must be num_kv_heads * group_size, group_size in [1, 8]";
  }
  if (static_cast<int64_t>(a.batch_size) * a.num_q_heads > 65535) return "batch_size * num_q_heads must be <= 65535";
  if (a.max_pages < 1) return "max_pages must be >= 1";
  if (a.seq_stride < 0 || a.head_stride < 0 || a.seq_stride % 8 != 0 || a.head_stride % 8 != 0) {
    return "seq_stride and head_stride must be non-negative multiples of 8 elements";
  }
  if (a.head_stride < static_cast<int64_t>(a.max_pages) * a.head_dim) return "head_stride must be >= max_pages * head_dim";
  if (!internal::IsAligned16(a.page_max) || !internal::IsAligned16(a.page_min)) return "page_max and page_min must be 16-byte aligned";
  if (!(a.sm_scale >= 0.0f)) return "sm_scale must be >= 0 (0: 1/sqrt(head_dim))";
  if (a.k < 0) return "k must be >= 0";
  if (a.k == 0 && a.scores == nullptr) return "scores must not be null when k == 0";
  if (a.k > 0) {
    if (a.k > a.max_pages) return "k must be <= max_pages";
    if (a.top_k_pages == nullptr) return "top_k_pages must not be null when k > 0";
  }
  return nullptr;
}

inline const char* ValidateAdvanceSeqLensArgs(const AdvanceSeqLensArgs& a) {
  if (a.seq_lens == nullptr) return "seq_lens must not be null";
  if (a.batch_size < 1) return "batch_size must be >= 1";
  if (a.num_tokens < 0) return "num_tokens must be >= 0";
  if (a.pages != nullptr && a.page_size < 1) return "page_size must be >= 1 when pages is set";
  return nullptr;
}

inline const char* ValidateAppendKvArgs(const AppendKvArgs& a) {
  if (const char* e = internal::ValidateKvPool(a.kv, /*reads_v=*/true, /*reads_seq_lens=*/a.start_positions == nullptr)) {
    return e;
  }
  if (a.batch_size < 1) return "batch_size must be >= 1";
  if (a.num_tokens < 1) return "num_tokens must be >= 1";
  if (a.k_src == nullptr || a.v_src == nullptr) return "k_src and v_src must not be null";
  if (!internal::IsAligned16(a.k_src) || !internal::IsAligned16(a.v_src)) return "k_src and v_src must be 16-byte aligned";
  if (a.src_batch_stride < 0 || a.src_head_stride < 0 || a.src_token_stride < 0 || a.src_batch_stride % 8 != 0 ||
      a.src_head_stride % 8 != 0 || a.src_token_stride % 8 != 0) {
    return "source strides must be non-negative multiples of 8 elements";
  }
  return nullptr;
}

inline const char* ValidateProjectRowsArgs(const ProjectRowsArgs& a) {
  if (a.x == nullptr || a.matrices == nullptr || a.y == nullptr) return "x, matrices and y must not be null";
  const auto is_dtype = [](DType d) { return d == DType::kF32 || d == DType::kBf16 || d == DType::kF16; };
  if (!is_dtype(a.x_dtype) || !is_dtype(a.y_dtype)) return "x_dtype and y_dtype must be kF32, kBf16 or kF16";
  if (a.head_dim != 64 && a.head_dim != 128) return "head_dim must be 64 or 128";
  if (a.rank < 1 || a.rank > a.head_dim) return "rank must be in [1, head_dim]";
  if (a.matrix_cols < a.rank) return "matrix_cols must be >= rank";
  if (a.batch_size < 1 || a.num_tokens < 1) return "batch_size and num_tokens must be >= 1";
  if (a.heads_per_matrix < 1) return "heads_per_matrix must be >= 1";
  if (a.num_heads < 1 || a.num_heads % a.heads_per_matrix != 0) {
    return "num_heads must be a positive multiple of heads_per_matrix";
  }
  if (a.x_batch_stride < 0 || a.x_head_stride < 0 || a.x_token_stride < 0 || a.y_batch_stride < 0 ||
      a.y_head_stride < 0 || a.y_token_stride < 0) {
    return "strides must be non-negative";
  }
  if (a.y_token_stride < a.rank) return "y_token_stride must be >= rank";
  if (a.offset_from_seq_lens && a.seq_lens == nullptr) return "seq_lens must not be null when offset_from_seq_lens";
  if (a.max_positions < 0) return "max_positions must be >= 0";
  return nullptr;
}

inline const char* ValidatePageBoundsArgs(const PageBoundsArgs& a) {
  if (const char* e = internal::ValidateKvPool(a.kv, /*reads_v=*/false, /*reads_seq_lens=*/true)) return e;
  if (a.batch_size < 1 || a.batch_size > 65535) return "batch_size must be in [1, 65535]";
  if (a.kv.num_kv_heads > 65535) return "num_kv_heads must be <= 65535";
  if (a.quest_page_size < 1) return "quest_page_size must be >= 1";
  if (a.last_pages < 0) return "last_pages must be >= 0";
  if (a.page_max == nullptr || a.page_min == nullptr) return "page_max and page_min must not be null";
  if (!internal::IsAligned16(a.page_max) || !internal::IsAligned16(a.page_min)) return "page_max and page_min must be 16-byte aligned";
  if (a.max_pages < 1) return "max_pages must be >= 1";
  if (a.seq_stride < 0 || a.head_stride < 0 || a.seq_stride % 8 != 0 || a.head_stride % 8 != 0) {
    return "seq_stride and head_stride must be non-negative multiples of 8 elements";
  }
  if (a.head_stride < static_cast<int64_t>(a.max_pages) * a.kv.head_dim) return "head_stride must be >= max_pages * head_dim";
  return nullptr;
}

inline const char* ValidateMaskScoresArgs(const MaskScoresArgs& a) {
  if (a.scores == nullptr || a.seq_lens == nullptr) return "scores and seq_lens must not be null";
  if (a.num_rows < 1) return "num_rows must be >= 1";
  if (a.rows_per_seq < 1 || a.num_rows % a.rows_per_seq != 0) return "rows_per_seq must be >= 1 and divide num_rows";
  if (a.num_cols < 1) return "num_cols must be >= 1";
  if (a.row_stride != 0 && a.row_stride < a.num_cols) return "row_stride must be >= num_cols";
  if (a.sinks < 0 || a.window < 0) return "sinks and window must be >= 0";
  if (a.unit < 1) return "unit must be >= 1";
  return nullptr;
}

inline const char* ValidateComposeListsArgs(const ComposeListsArgs& a) {
  if (a.seq_lens == nullptr || a.positions == nullptr || a.list_lens == nullptr) {
    return "seq_lens, positions and list_lens must not be null";
  }
  if (a.batch_size < 1 || a.num_lists < 1) return "batch_size and num_lists must be >= 1";
  if (a.sinks < 0 || a.window < 0) return "sinks and window must be >= 0";
  if (a.num_selected < 0) return "num_selected must be >= 0";
  if (a.unit < 1) return "unit must be >= 1";
  const int64_t expanded = a.selected != nullptr ? static_cast<int64_t>(a.num_selected) * a.unit : 0;
  if (a.max_list_len < 1 || a.max_list_len < static_cast<int64_t>(a.sinks) + a.window + expanded) {
    return "max_list_len must be >= 1 and >= sinks + window + num_selected * unit";
  }
  return nullptr;
}

}  // namespace kvrecall::gpu
