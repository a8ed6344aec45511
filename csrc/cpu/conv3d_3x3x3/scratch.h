// Scratch memory of the CPU 3x3x3 convolution that each thread keeps between calls (forward and backward).
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <memory>

namespace uxnet {
namespace cpu {
namespace conv3d_3x3x3 {

// Scratch memory each thread keeps between calls, grow-only: the transformed filter and the one-block buffers are
// tens of MB for the wide layers (u is 38 MB for 384 -> 384 channels; v and m of 768 -> 384 at 12^3 63 MB), and
// fresh memory of that size costs a page fault per 4 KiB on every call (measured: as long as the products
// themselves at 384 channels). Slots: the transformed filter (or a slice of it, or of the weight gradient's du),
// and the v and m of a block that holds every tile.
class Scratch {
 public:
  enum Slot { kU, kV, kM, kSlots };
  template <typename T>
  static T* get(Slot slot, int64_t count) {
    thread_local Scratch scratch;
    Buffer& b = scratch.buffers_[slot];
    const size_t bytes = static_cast<size_t>(count) * sizeof(T);
    if (bytes > b.bytes) {
      b.data.reset(static_cast<char*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64)));
      TORCH_CHECK(b.data != nullptr, "uxnet::conv3d_3x3x3: out of memory for ", bytes, " bytes of scratch");
      b.bytes = bytes;
    }
    return reinterpret_cast<T*>(b.data.get());
  }

 private:
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  struct Buffer {
    std::unique_ptr<char, Free> data;
    size_t bytes = 0;
  };
  Buffer buffers_[kSlots];
};

}  // namespace conv3d_3x3x3
}  // namespace cpu
}  // namespace uxnet
