// CUDA side of the multi-tensor optimizer steps: one launch covers many tensors. The kernel
// argument carries, for up to kMaxTensors tensors, the addresses of each list (param, grad,
// states) and of the optional mask, and for up to kMaxBlocks blocks which tensor and which
// kChunk-element chunk each block owns; a list longer than that is cut into several launches
// (a tensor may straddle two). The struct stays under the 4 KiB kernel-argument limit.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <vector>

namespace autokd {

constexpr int kMaxTensors = 24;
constexpr int kMaxBlocks = 320;
constexpr int64_t kChunk = 65536;
constexpr int kThreads = 512;

template <int kLists>
struct MultiTensorMeta {
  void* ptrs[kLists][kMaxTensors];      // list 0 is the params
  const bool* masks[kMaxTensors];       // nullptr: dense
  int64_t numel[kMaxTensors];
  unsigned char block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};

// Calls launch(meta, blocks) once per batch. lists[k][i] is tensor i of list k (all contiguous);
// masks[i] undefined means dense.
template <int kLists, typename Launch>
void multi_tensor_apply(const std::vector<std::vector<at::Tensor>>& lists,
                        const std::vector<at::Tensor>& masks, const Launch& launch) {
  static_assert(sizeof(MultiTensorMeta<kLists>) <= 4096, "kernel argument over 4 KiB");
  MultiTensorMeta<kLists> meta;
  const size_t n = lists[0].size();
  int nt = 0, nb = 0;
  auto fill = [&](int slot, size_t i) {
    for (int k = 0; k < kLists; ++k) meta.ptrs[k][slot] = lists[k][i].data_ptr();
    meta.masks[slot] = masks[i].defined() ? masks[i].const_data_ptr<bool>() : nullptr;
    meta.numel[slot] = lists[0][i].numel();
  };
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = lists[0][i].numel();
    if (numel == 0) continue;
    fill(nt, i);
    const int64_t chunks = (numel + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_tensor[nb] = static_cast<unsigned char>(nt);
      meta.block_chunk[nb] = static_cast<int32_t>(c);
      ++nb;
      const bool last = c + 1 == chunks;
      if (nb == kMaxBlocks || (last && nt + 1 == kMaxTensors)) {
        launch(meta, nb);
        nb = 0;
        if (last) {
          nt = -1;  // the next tensor takes slot 0
        } else {
          fill(0, i);  // the rest of tensor i continues in slot 0 of the next launch
          nt = 0;
        }
      }
    }
    ++nt;
  }
  if (nb > 0) launch(meta, nb);
}

}  // namespace autokd
