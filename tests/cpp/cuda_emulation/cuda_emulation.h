// A small CPU emulation of the CUDA execution model, enough to run the kernels of csrc/cuda/<op>/kernels.cuh
// on the host (no GPU on the development machines): each block runs as blockDim real threads, so
// __syncthreads is a real barrier, warp shuffles exchange values between the 32 threads of a warp, and
// dynamic shared memory starts NaN-filled so reads of unwritten shared memory show up in the results.
// Blocks run one after another. Include this before any kernel header.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emu {

inline thread_local dim3 thread_index;
inline dim3 block_index;
inline dim3 block_dim;
inline dim3 grid_dim;
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline std::vector<double> shuffle_slots;  // one slot per thread of the block
inline std::vector<unsigned char> dynamic_shared;

inline unsigned int linear_thread() {
  return thread_index.x + block_dim.x * (thread_index.y + block_dim.y * thread_index.z);
}

template <typename T>
T shfl_down(T value, int offset) {
  static_assert(sizeof(T) <= sizeof(double), "shuffle of a type wider than double");
  const unsigned int tid = linear_thread();
  const unsigned int lane = tid % 32;
  std::barrier<>& warp = *warp_barriers[tid / 32];
  std::memcpy(&shuffle_slots[tid], &value, sizeof(T));
  warp.arrive_and_wait();
  T result = value;
  if (lane + offset < 32) {
    std::memcpy(&result, &shuffle_slots[tid + offset], sizeof(T));
  }
  warp.arrive_and_wait();
  return result;
}

// kernel<<<grid, block, shared_bytes>>>(args...)
template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t shared_bytes, Args... args) {
  grid_dim = grid;
  block_dim = block;
  const unsigned int threads = block.x * block.y * block.z;
  for (unsigned int bz = 0; bz < grid.z; ++bz) {
    for (unsigned int by = 0; by < grid.y; ++by) {
      for (unsigned int bx = 0; bx < grid.x; ++bx) {
        block_index = dim3(bx, by, bz);
        dynamic_shared.assign(shared_bytes + 16, 0xFF);  // all-ones bytes: NaN as float and double
        shuffle_slots.assign(threads, 0.0);
        std::barrier<> barrier(threads);
        block_barrier = &barrier;
        warp_barriers.clear();
        for (unsigned int first = 0; first < threads; first += 32) {
          warp_barriers.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - first)));
        }
        std::vector<std::thread> workers;
        workers.reserve(threads);
        for (unsigned int t = 0; t < threads; ++t) {
          workers.emplace_back([=] {
            thread_index = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            kernel(static_cast<KernelArgs>(args)...);
            warp_barriers[t / 32]->arrive_and_drop();
            block_barrier->arrive_and_drop();
          });
        }
        for (auto& w : workers) {
          w.join();
        }
      }
    }
  }
}

}  // namespace emu

#define threadIdx (emu::thread_index)
#define blockIdx (emu::block_index)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static
#define UXNET_DYNAMIC_SHARED(name) unsigned char* name = emu::dynamic_shared.data()

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

template <typename T>
T __shfl_down_sync(unsigned int, T value, int offset) {
  return emu::shfl_down(value, offset);
}

using std::max;
using std::min;
