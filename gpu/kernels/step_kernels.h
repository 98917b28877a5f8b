#pragma once

// Decode-step bookkeeping launchers (gpu/kernels/kernel_args.h has the
// argument structs and their contracts): advance the sequence lengths,
// append new K/V rows to a paged cache, project rows onto a per-head basis
// (Loki's rotated keys and queries), refresh Quest page bounds, mask scores
// outside the selection candidates, and compose the position lists of
// sparse attention (sinks, recent window, expanded selection). Every
// per-step value (sequence lengths, start positions) is read from device
// memory and every grid size depends on the arguments only, so a decode
// step built from these launchers is captured once in a CUDA graph and
// replayed step after step. Host-safe header.

#include <cuda_runtime.h>

#include "gpu/kernels/kernel_args.h"

namespace kvrecall::gpu {

// Thread-safe: the launchers keep no state; they capture into CUDA graphs.
// Each returns cudaErrorInvalidValue (nothing launched) when its Validate*
// function fails, else the launch error. Asynchronous on `stream`; they
// never allocate or synchronize and need no workspace.

// seq_lens[b] += num_tokens (and pages[b] = ceil(seq_lens[b] / page_size)).
cudaError_t AdvanceSeqLens(const AdvanceSeqLensArgs& args, cudaStream_t stream);

// Writes num_tokens K/V rows per (sequence, KV head) into the paged cache.
cudaError_t AppendKv(const AppendKvArgs& args, cudaStream_t stream);

// y[.., t + offset, :rank] = x[.., t, :] · P[:, :rank], f32 accumulation.
cudaError_t ProjectRows(const ProjectRowsArgs& args, cudaStream_t stream);

// Element-wise key max / min per Quest page (all pages, or the last few).
cudaError_t ComputePageBounds(const PageBoundsArgs& args, cudaStream_t stream);

// scores = -inf outside the candidates [sinks, seq_len - window), in place.
cudaError_t MaskScores(const MaskScoresArgs& args, cudaStream_t stream);

// Position lists (sinks, window, expanded selection) and their lengths.
cudaError_t ComposeLists(const ComposeListsArgs& args, cudaStream_t stream);

}  // namespace kvrecall::gpu
