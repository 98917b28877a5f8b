#pragma once

// CPU references of the gpu/kernels launchers: the same argument structs
// (gpu/kernels/kernel_args.h) with HOST pointers, the same contracts, float64
// arithmetic on the bf16/f16 inputs. They are the ground truth of the GPU
// tests and build without CUDA.
//
// Each function validates its arguments with the same Validate*Args() as
// the launcher and returns false (writing nothing) when they are unusable.
// Where the kernel's output is unordered (top-k), the reference writes the
// k largest in descending order, ties broken by the smaller index.
// All functions are thread-safe (pure functions of their arguments).

#include <cstdint>
#include <string>

#include "gpu/kernels/kernel_args.h"

namespace kvrecall::gpu::reference {

// Sparse decode attention. *num_invalid (a host counter when not null) is
// incremented per skipped entry, as the kernel does.
bool SparseDecodeAttention(const SparseDecodeArgs& args);

// Dense decode attention with scores and optional top-k positions. When
// args.top_k > 0 and args.scores is null, the logits are kept internally.
bool DenseDecodeAttention(const DenseDecodeArgs& args);

// Merge of partial attention states.
bool MergeStates(const MergeStatesArgs& args);

// Top-k per row: indices (and values) of the k largest, descending, ties by
// the smaller index; NaN ranks above +inf.
bool TopK(const TopKArgs& args);

// Loki low-rank scores and optional top-k positions.
bool LokiScore(const LokiScoreArgs& args);

// Quest page upper bounds and optional top-k pages.
bool QuestScore(const QuestScoreArgs& args);

// Decode-step bookkeeping (kernel_args.h has the contracts). Same names as
// the launchers in gpu/kernels/step_kernels.h; host pointers; the outputs are
// written exactly as the kernels write them (ProjectRows accumulates in
// float64 and rounds once, where the kernel accumulates in f32).

// seq_lens[b] += num_tokens, optionally pages[b] = ceil(seq_lens[b] / page_size).
bool AdvanceSeqLens(const AdvanceSeqLensArgs& args);

// Copies the new K/V rows into the paged cache (args.kv.k / v are written).
bool AppendKv(const AppendKvArgs& args);

// y = x · P[:, :rank] per head, at the rows' (optionally offset) positions.
bool ProjectRows(const ProjectRowsArgs& args);

// Element-wise key max and min per Quest page of the paged cache.
bool ComputePageBounds(const PageBoundsArgs& args);

// Sets the scores outside [sinks, seq_len - window) to -inf, in place.
bool MaskScores(const MaskScoresArgs& args);

// Position lists: sinks, window, then the expanded selection, and their lengths.
bool ComposeLists(const ComposeListsArgs& args);

// The order used by TopK: true when a ranks before b (a larger, NaN above
// everything). Used by tests to check unordered GPU selections.
bool ScoreRanksBefore(float a, float b);

// Checks that `selected` (k column indices of one row, any order) is a valid
// top-k of `row` (n scores): k distinct in-range indices whose scores are all
// >= the k-th largest score minus `tolerance`, containing every index whose
// score exceeds the k-th largest plus `tolerance`. With tolerance 0 this is
// the exact contract of the top-k kernel. Returns an empty string when valid,
// else what is wrong.
std::string CheckTopKSelection(const float* row, int32_t n, const int32_t* selected, int32_t k,
                               double tolerance);

}  // namespace kvrecall::gpu::reference
