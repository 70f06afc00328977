// Internals shared by the emulator's runtime.cpp (fibers, scheduling,
// barriers, warp collectives, memory checks) and ptx.cpp (cp.async,
// ldmatrix, mma). Not seen by kernel code.
#pragma once
#include <cstddef>
#include <cstdint>
#include <deque>
#include <string>
#include <vector>

#include "device.h"

namespace simt {

constexpr int kWarpSize = 32;

// One cp.async copy: lands at the cp.async.wait_group that retires its group.
struct AsyncCopy {
  unsigned char* dst;
  const unsigned char* src;
  int cp_size, src_size;
  uintptr_t pc;  // where it was issued
};

// A CUDA thread.
struct Fiber {
  void* sp = nullptr;  // saved stack pointer while switched out
  unsigned char* stack_lo = nullptr;
  size_t stack_size = 0;
  int tid = 0, warp = 0, lane = 0;
  uint3 idx{0, 0, 0};
  bool in_kernel = false, exited = false, at_barrier = false;
  std::vector<AsyncCopy> uncommitted;
  std::deque<std::vector<AsyncCopy>> groups;  // committed, oldest first
};

// A warp collective in progress: the lanes that arrived, each with a pointer
// to its operands (on its own stack, valid while it is parked).
enum class Op { SyncWarp, Shfl, Ballot, Ldmatrix, Mma };
const char* op_name(Op op);
struct Collective {
  Op op;
  unsigned mask = 0;
  int variant = 0;  // qualifiers that must agree across lanes (ldmatrix .num/.trans, mma types)
  void* operands = nullptr;
};
// Parks the calling lane at a warp collective; the last lane of `c.mask` to
// arrive runs `complete` over all lanes' operands (indexed by lane) and
// releases them.
void warp_collective(const Collective& c, uintptr_t pc, void (*complete)(void* const* operands,
                                                                         unsigned mask,
                                                                         const uintptr_t* pcs,
                                                                         int warp));

Fiber& current();

// Held by every runtime function that kernel code calls: the fiber's memory
// accesses in it (e.g. in library code shared with the instrumented kernel
// translation units) are the emulator's, not the kernel's.
class Quiet {
 public:
  Quiet();
  ~Quiet();

 private:
  Fiber* fiber_;
  bool was_in_kernel_;
};

// Memory checks of an access of n bytes at `a` by thread `tid` at `pc`.
bool is_shared(uintptr_t a);
void shared_access(int tid, bool write, uintptr_t a, size_t n, uintptr_t pc);
void global_access(bool write, uintptr_t a, size_t n, uintptr_t pc);
// Shared bytes [a, a + n) become the destination of an in-flight cp.async
// of thread `tid` (checked like a write, then unreadable until landed).
void shared_begin_async_write(int tid, uintptr_t a, size_t n, uintptr_t pc);
void shared_end_async_write(int tid, uintptr_t a, size_t n, uintptr_t pc);

// Stops the launch with an error report; never returns. Source locations
// are written as {pc:0x...} and resolved (addr2line) when the report is made.
[[noreturn]] void fail(const std::string& what);
std::string pc_tag(uintptr_t pc);
std::string thread_tag(int tid);

}  // namespace simt
