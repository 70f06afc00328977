// The SIMT emulator's runtime: runs a kernel launch on the CPU, block after
// block, one fiber per CUDA thread, and checks what a CPU would not notice.
//
//  - Fibers: each thread runs on its own small stack, switched by a few
//    lines of x86-64 assembly (so: x86-64 Linux only; tests/simt skips
//    elsewhere). A fiber runs until it parks at a barrier or warp collective,
//    or exits; the scheduler then picks the next runnable fiber at random
//    (seeded), so that results that depend on the order of threads between
//    barriers show up.
//  - Barriers and collectives: __syncthreads releases when every thread of
//    the block has arrived (an exited thread is an error); a warp collective
//    (shfl, ballot, __syncwarp, ldmatrix, mma) when every lane of its mask
//    has; the last lane computes the result for all. Lanes at different
//    collectives, exited lanes, and deadlocks are reported.
//  - Memory: the kernel translation units are compiled with
//    -fsanitize=thread, which calls __tsan_read*/__tsan_write* before every
//    load and store; this file implements those hooks (no TSan runtime is
//    linked). Accesses to the fiber's own stack are ignored. Shared memory
//    is this library's TLS block (device.h makes __shared__ thread_local):
//    every byte has a shadow record of its last write and reads, with the
//    barrier epoch, thread and __syncwarp generation, and the hooks report
//    a race (two threads, one writing, with no __syncthreads between them,
//    or no __syncwarp within a warp), a read of a byte no thread of the
//    block wrote, an access to an in-flight cp.async destination, one that
//    is not inside a single __shared__ array of the running kernel (their
//    extents are the TLS symbols of this library's ELF symbol table; an
//    overrun into another array of the same kernel shows as a race or a
//    wrong answer instead), or one beyond the launch's dynamic shared
//    memory. Every other access must land on an element of one of the
//    launch's buffers (writes on a writable one), or be a read of this
//    library's own image (constants).
//    Accesses of naturally aligned types must sit at a multiple of their size.
//  - Reports name the threads and the source lines of both accesses
//    (return addresses resolved with addr2line on this library).
// Not modelled: blocks run one after another (no concurrency between blocks,
// no global-memory race detection, atomics in program order); the memory
// model beyond barrier ordering; memcpy/memset calls in kernel code (not
// instrumented); speed, occupancy, registers and bank conflicts; the GPU's
// own rounding of exp/log and of tensor-core sums (see ptx.cpp).
#include "runtime.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>

#if !defined(__x86_64__) || !defined(__linux__)
#error "the SIMT emulator runs on x86-64 Linux (its fibers switch with x86-64 assembly)"
#endif

namespace simt {

std::string resolve(const std::string& text);  // {pc:...} tags -> source lines
std::string kernel_name(const void* kernel);

namespace {

constexpr size_t kStackBytes = 128 * 1024;
constexpr size_t kGuardBytes = 4096;

// ---------------------------------------------------------------------------
// Context switch: save callee-saved registers, MXCSR and the x87 control word
// on the current stack, store the stack pointer in *save, continue on `next`.

extern "C" void simt_switch(void** save, void* next);
asm(R"(
  .text
  .globl simt_switch
  .hidden simt_switch
  .type simt_switch, @function
simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size simt_switch, .-simt_switch
)");

// A fresh stack that "returns" into entry() at its top, as simt_switch expects.
void* initial_stack(unsigned char* lo, size_t size, void (*entry)()) {
  uintptr_t top = (uintptr_t(lo) + size) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                  // entry's (never used) return address
  *--sp = reinterpret_cast<uint64_t>(entry);  // popped by simt_switch's ret
  for (int i = 0; i < 6; ++i) *--sp = 0;      // rbp rbx r12 r13 r14 r15
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  *--sp = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);
  return sp;
}

// ---------------------------------------------------------------------------
// State of the running launch (one at a time, under g_mutex).

std::mutex g_mutex;
DeviceConfig g_device;
uint64_t g_seed = 0;
uint64_t g_launch_serial = 0;
std::vector<std::string> g_log;  // kernel names of the launches, in order

const Launch* g_launch = nullptr;
uint3 g_block_idx{0, 0, 0};
int g_threads = 0;
int g_exited = 0;  // threads of the running block that have exited
std::vector<Fiber> g_fibers;
std::vector<std::unique_ptr<unsigned char, void (*)(unsigned char*)>> g_stacks;
Fiber* g_current = nullptr;   // the running fiber (nullptr: the scheduler)
Fiber* g_active = nullptr;    // the running fiber while it is in the kernel body (hooks on)
void* g_scheduler_sp = nullptr;
std::vector<int> g_runnable;
uint64_t g_rng = 0;

// Barrier epochs: +1 at each block start and each completed __syncthreads.
uint32_t g_epoch = 1;
uint32_t g_block_epoch = 1;  // epoch at the start of the running block
struct Barrier {
  int arrived = 0;
  uintptr_t pc = 0;
} g_barrier;

struct Warp {
  unsigned arrived = 0;  // lanes parked at `coll`
  Collective coll;
  uintptr_t first_pc = 0;
  void* operands[kWarpSize] = {};
  uintptr_t pcs[kWarpSize] = {};
  uint16_t gen = 0;  // completed __syncwarp count
};
std::vector<Warp> g_warps;

bool g_failed = false;
std::string g_report;

uint64_t next_random() {  // xorshift64*
  g_rng ^= g_rng >> 12;
  g_rng ^= g_rng << 25;
  g_rng ^= g_rng >> 27;
  return g_rng * 0x2545F4914F6CDD1Dull;
}

// ---------------------------------------------------------------------------
// This library in memory: its image (code, constants), its TLS block (the
// shared memory) and the dynamic shared memory arrays within it.

uintptr_t g_module_base = 0, g_image_lo = 0, g_image_hi = 0;
std::string g_module_path;
uintptr_t g_tls_lo = 0, g_tls_hi = 0;  // this OS thread's block, refreshed per launch
struct DynamicShared {
  unsigned char* (*addr)();
  size_t bytes;
};
std::vector<DynamicShared>& dynamic_arrays() {
  static std::vector<DynamicShared> arrays;
  return arrays;
}
std::vector<std::pair<uintptr_t, uintptr_t>> g_dynamic;  // [lo, lo + capacity) this launch

// The __shared__ arrays: TLS objects of this library, by offset in its TLS
// block. A launch may touch those of its kernel (static locals, whose
// symbols are "_ZZ" + the kernel's mangled name without "_Z" + "E...") and
// the dynamic one.
struct SharedArray {
  uint64_t offset, size;
  std::string symbol, name;
  bool in_launch;
};
std::vector<SharedArray> g_arrays;
std::map<uint64_t, std::string> g_functions;  // code offset -> mangled name

// The last `keep` names of a demangled C++ name, without namespaces and
// parameter lists: ("ns::f<T>(args)::s_q", 2) -> "f<T>::s_q".
std::string short_name(const std::string& full, size_t keep) {
  std::vector<std::string> parts(1);
  int angle = 0, paren = 0;
  for (size_t i = 0; i < full.size(); ++i) {
    const char c = full[i];
    if (paren == 0) angle += c == '<' ? 1 : c == '>' ? -1 : 0;
    if (c == '(' && angle == 0 && full.compare(i, 21, "(anonymous namespace)") != 0) ++paren;
    if (paren == 0 && angle == 0 && full.compare(i, 2, "::") == 0) {
      parts.emplace_back();
      ++i;
      continue;
    }
    if (paren == 0) parts.back() += c;
    if (c == ')' && angle == 0 && paren > 0) --paren;
  }
  std::string out;
  for (size_t i = parts.size() > keep ? parts.size() - keep : 0; i < parts.size(); ++i) {
    out += (out.empty() ? "" : "::") + parts[i];
  }
  return out;
}

std::string array_label(const char* mangled) {
  int status = 0;
  char* d = abi::__cxa_demangle(mangled, nullptr, nullptr, &status);
  const std::string full = status == 0 ? d : mangled;
  std::free(d);
  return short_name(full, 2);
}

// Reads the TLS object symbols of this library's ELF symbol table (.symtab).
void read_shared_arrays() {
  const int fd = open(g_module_path.c_str(), O_RDONLY);
  if (fd < 0) throw std::runtime_error("simt: cannot read " + g_module_path);
  auto read_at = [&](void* dst, size_t n, uint64_t off) {
    if (pread(fd, dst, n, off_t(off)) != ssize_t(n)) throw std::runtime_error("simt: bad ELF file");
  };
  Elf64_Ehdr eh;
  read_at(&eh, sizeof eh, 0);
  std::vector<Elf64_Shdr> sections(eh.e_shnum);
  read_at(sections.data(), sizeof(Elf64_Shdr) * eh.e_shnum, eh.e_shoff);
  for (const auto& sh : sections) {
    if (sh.sh_type != SHT_SYMTAB) continue;
    std::vector<Elf64_Sym> syms(sh.sh_size / sizeof(Elf64_Sym));
    read_at(syms.data(), sh.sh_size, sh.sh_offset);
    const Elf64_Shdr& str = sections[sh.sh_link];
    std::string names(str.sh_size, '\0');
    read_at(names.data(), str.sh_size, str.sh_offset);
    for (const auto& sym : syms) {
      const char* name = names.c_str() + sym.st_name;
      if (ELF64_ST_TYPE(sym.st_info) == STT_TLS && sym.st_size > 0) {
        g_arrays.push_back(SharedArray{sym.st_value, sym.st_size, name, array_label(name), false});
      } else if (ELF64_ST_TYPE(sym.st_info) == STT_FUNC) {
        g_functions[sym.st_value] = name;
      }
    }
  }
  close(fd);
  std::sort(g_arrays.begin(), g_arrays.end(),
            [](const SharedArray& a, const SharedArray& b) { return a.offset < b.offset; });
}

// Marks the arrays the launch of `kernel` may touch.
void select_arrays(const void* kernel) {
  const auto fn = g_functions.find(uintptr_t(kernel) - g_module_base);
  const std::string prefix = fn == g_functions.end() ? "?" : "_ZZ" + fn->second.substr(2) + "E";
  for (auto& a : g_arrays) {
    a.in_launch = a.symbol.compare(0, prefix.size(), prefix) == 0;
    for (const auto& d : g_dynamic) a.in_launch |= d.first == g_tls_lo + a.offset;
  }
}

// The __shared__ array holding TLS offset `off`, or nullptr.
const SharedArray* array_at(uint64_t off) {
  auto it = std::upper_bound(g_arrays.begin(), g_arrays.end(), off,
                             [](uint64_t o, const SharedArray& a) { return o < a.offset; });
  if (it == g_arrays.begin()) return nullptr;
  --it;
  return off < it->offset + it->size ? &*it : nullptr;
}

int find_module(dl_phdr_info* info, size_t, void*) {
  if (info->dlpi_addr != g_module_base) return 0;
  g_image_lo = UINTPTR_MAX;
  g_image_hi = 0;
  g_tls_lo = g_tls_hi = 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const auto& ph = info->dlpi_phdr[i];
    if (ph.p_type == PT_LOAD) {
      g_image_lo = std::min<uintptr_t>(g_image_lo, info->dlpi_addr + ph.p_vaddr);
      g_image_hi = std::max<uintptr_t>(g_image_hi, info->dlpi_addr + ph.p_vaddr + ph.p_memsz);
    } else if (ph.p_type == PT_TLS && info->dlpi_tls_data != nullptr) {
      g_tls_lo = uintptr_t(info->dlpi_tls_data);
      g_tls_hi = g_tls_lo + ph.p_memsz;
    }
  }
  return 1;
}

void locate_module() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&locate_module), &info) == 0) {
    throw std::runtime_error("simt: dladdr cannot find the emulator's library");
  }
  g_module_base = uintptr_t(info.dli_fbase);
  if (g_module_path.empty()) {
    g_module_path = info.dli_fname;
    read_shared_arrays();
  }
  g_dynamic.clear();
  for (const auto& d : dynamic_arrays()) {  // touching them allocates this thread's TLS block
    const uintptr_t lo = uintptr_t(d.addr());
    g_dynamic.emplace_back(lo, lo + d.bytes);
  }
  dl_iterate_phdr(find_module, nullptr);
  if (g_tls_hi == 0) throw std::runtime_error("simt: no TLS block (shared memory) found");
}

// ---------------------------------------------------------------------------
// Shadow of the shared memory: per byte, the last write, up to two reads by
// distinct threads since, and the in-flight cp.async it is the destination of.

struct Access {
  uint32_t epoch = 0;
  uint32_t pc = 0;  // offset from g_module_base
  uint16_t tid = 0;
  uint16_t gen = 0;  // the accessor's warp's __syncwarp count at the time
};
struct ByteShadow {
  Access write, read[2];
  Access pending;  // epoch != 0: an in-flight cp.async (pending.tid issued it)
};
std::vector<ByteShadow> g_shadow;

uintptr_t pc_of(uint32_t off) { return g_module_base + off; }
uint32_t pc_off(uintptr_t pc) { return uint32_t(pc - g_module_base); }

Access access_now(int tid, uintptr_t pc) {
  return Access{g_epoch, pc_off(pc), uint16_t(tid), g_warps[tid / kWarpSize].gen};
}

// Did `r` happen with nothing ordering it before an access of thread `tid`?
bool unordered(const Access& r, int tid) {
  if (r.epoch != g_epoch || r.tid == tid) return false;
  const int warp = r.tid / kWarpSize;
  return !(warp == tid / kWarpSize && r.gen != g_warps[warp].gen);
}

std::string shared_tag(uintptr_t a) {
  std::ostringstream s;
  if (const SharedArray* array = array_at(a - g_tls_lo)) {
    s << "__shared__ " << array->name << " + " << (a - g_tls_lo - array->offset);
  } else {
    s << "shared memory (TLS + " << (a - g_tls_lo) << ")";
  }
  return s.str();
}

[[noreturn]] void race(const char* now_kind, int tid, uintptr_t a, uintptr_t pc,
                       const char* then_kind, const Access& then) {
  std::ostringstream s;
  s << "shared-memory race on " << shared_tag(a) << ": " << thread_tag(tid) << " " << now_kind
    << " it at " << pc_tag(pc) << ", after " << thread_tag(then.tid) << " " << then_kind
    << " it at " << pc_tag(pc_of(then.pc)) << ", with no "
    << (then.tid / kWarpSize == tid / kWarpSize ? "__syncwarp or __syncthreads" : "__syncthreads")
    << " between them";
  fail(s.str());
}

void check_pending(const ByteShadow& b, int tid, bool write, uintptr_t a, uintptr_t pc) {
  if (b.pending.epoch == 0) return;
  std::ostringstream s;
  s << thread_tag(tid) << (write ? " writes " : " reads ") << shared_tag(a) << " at "
    << pc_tag(pc) << " while a cp.async of " << thread_tag(b.pending.tid) << " (issued at "
    << pc_tag(pc_of(b.pending.pc)) << ") to it is in flight: it lands only at that thread's "
    << "cp.async.wait_group that retires its group";
  if (b.pending.tid != tid) s << ", and other threads see it only after a barrier after that";
  fail(s.str());
}

// The access stays inside one __shared__ array, and the dynamic one inside
// the launch's bytes.
void check_shared_bounds(int tid, bool write, uintptr_t a, size_t n, uintptr_t pc) {
  const SharedArray* array = array_at(a - g_tls_lo);
  if (array == nullptr || !array->in_launch || a + n > g_tls_lo + array->offset + array->size) {
    std::ostringstream s;
    s << thread_tag(tid) << (write ? " writes " : " reads ") << n << " bytes at " << shared_tag(a)
      << " at " << pc_tag(pc);
    if (array == nullptr) {
      s << ", outside every __shared__ array";
    } else if (!array->in_launch) {
      s << ", which is not one of this kernel's __shared__ arrays";
    } else {
      s << ", past the end of __shared__ array " << array->name << " (" << array->size << " bytes)";
    }
    fail(s.str());
  }
  for (const auto& d : g_dynamic) {
    if (a + n > d.first && a < d.second && a + n > d.first + g_launch->smem) {
      std::ostringstream s;
      s << thread_tag(tid) << (write ? " writes " : " reads ") << n << " bytes at "
        << shared_tag(a) << " at " << pc_tag(pc) << ", beyond the " << g_launch->smem
        << " bytes of dynamic shared memory of this launch";
      fail(s.str());
    }
  }
}

ByteShadow& shadow_at(int tid, bool write, uintptr_t a, size_t i, size_t n, uintptr_t pc) {
  if (a + n > g_tls_hi) {
    std::ostringstream s;
    s << thread_tag(tid) << (write ? " writes " : " reads ") << n << " bytes at "
      << shared_tag(a) << ", past the end of shared memory, at " << pc_tag(pc);
    fail(s.str());
  }
  return g_shadow[a - g_tls_lo + i];
}

// ---------------------------------------------------------------------------
// Global memory: the launch's buffers.

struct BufferIndex {
  const Buffer* buf;
  uintptr_t lo, hi;  // bytes [lo, hi) span every element
  int ndim;
  int64_t size[4], stride[4];  // dims that matter, largest stride first
};
std::vector<BufferIndex> g_buffers;

void index_buffers(const std::vector<Buffer>& buffers) {
  g_buffers.clear();
  for (const auto& b : buffers) {
    if (b.base == nullptr) continue;
    BufferIndex x{&b, uintptr_t(b.base), uintptr_t(b.base), 0, {}, {}};
    int64_t last = 0;
    bool empty = false;
    std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
    for (int d = 0; d < b.ndim; ++d) {
      if (b.size[d] == 0) empty = true;
      if (b.size[d] > 1 && b.stride[d] > 0) dims.emplace_back(b.stride[d], b.size[d]);
      if (b.size[d] > 0) last += (b.size[d] - 1) * b.stride[d];
    }
    if (empty) continue;
    std::sort(dims.rbegin(), dims.rend());
    for (const auto& [stride, size] : dims) {
      x.stride[x.ndim] = stride;
      x.size[x.ndim++] = size;
    }
    x.hi = x.lo + uintptr_t(last + 1) * b.esize;
    g_buffers.push_back(x);
  }
}

// Is element `e` (offset from the base, in elements) one of the buffer's?
bool on_element(const BufferIndex& x, int64_t e) {
  for (int d = 0; d < x.ndim; ++d) {
    const int64_t i = e / x.stride[d];
    if (i >= x.size[d]) return false;
    e -= i * x.stride[d];
  }
  return e == 0;
}

bool covers(const BufferIndex& x, uintptr_t a, size_t n) {
  if (a < x.lo || a + n > x.hi) return false;
  const int es = x.buf->esize;
  for (int64_t e = int64_t(a - x.lo) / es; e <= int64_t(a + n - 1 - x.lo) / es; ++e) {
    if (!on_element(x, e)) return false;
  }
  return true;
}

[[noreturn]] void bad_global(bool write, uintptr_t a, size_t n, uintptr_t pc,
                             const BufferIndex* read_only) {
  std::ostringstream s;
  s << thread_tag(current().tid) << (write ? " writes " : " reads ") << n << " bytes at "
    << reinterpret_cast<void*>(a) << " at " << pc_tag(pc) << ": ";
  if (read_only != nullptr) {
    s << "buffer " << read_only->buf->name << " is read-only for this kernel";
    fail(s.str());
  }
  const BufferIndex* near = nullptr;
  uintptr_t dist = UINTPTR_MAX;
  for (const auto& x : g_buffers) {
    const uintptr_t d = a < x.lo ? x.lo - a : a >= x.hi ? a - x.hi + 1 : 0;
    if (d < dist) dist = d, near = &x;
  }
  s << "outside every buffer of the launch";
  if (near != nullptr && dist <= 65536) {
    const auto es = near->buf->esize;
    if (dist == 0) {
      s << " (inside the span of " << near->buf->name << " but not on its elements: element offset "
        << int64_t(a - near->lo) / es << ")";
    } else if (a < near->lo) {
      s << " (" << (near->lo - a) << " bytes before " << near->buf->name << ")";
    } else {
      s << " (" << (a - near->hi) << " bytes past the end of " << near->buf->name << ", "
        << (near->hi - near->lo) / es << " elements of " << es << " bytes)";
    }
  }
  fail(s.str());
}

// ---------------------------------------------------------------------------
// Fibers and the scheduler.

void switch_to_scheduler() {
  Fiber* f = g_current;
  g_active = nullptr;
  simt_switch(&f->sp, g_scheduler_sp);
}

void make_runnable(int tid) { g_runnable.push_back(tid); }

[[noreturn]] void exit_fiber();

void fiber_entry() {
  g_launch->body(g_launch->ctx);
  exit_fiber();
}

unsigned char* stack_for(int tid) {
  while (int(g_stacks.size()) <= tid) {
    void* m = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) throw std::runtime_error("simt: cannot allocate fiber stacks");
    mprotect(m, kGuardBytes, PROT_NONE);  // an overflow faults instead of corrupting
    g_stacks.emplace_back(static_cast<unsigned char*>(m), [](unsigned char* p) {
      munmap(p, kStackBytes + kGuardBytes);
    });
  }
  return g_stacks[tid].get() + kGuardBytes;
}

void start_fiber(Fiber& f) {
  f.stack_lo = stack_for(f.tid);
  f.stack_size = kStackBytes;
  f.sp = initial_stack(f.stack_lo, f.stack_size, &fiber_entry);
}

void resume(Fiber& f) {
  g_current = &f;
  g_active = f.in_kernel ? &f : nullptr;
  simt_switch(&g_scheduler_sp, f.sp);
  g_active = nullptr;
  g_current = nullptr;
}

std::string lanes(unsigned m) {
  std::ostringstream s;
  bool first = true;
  for (int l = 0; l < kWarpSize;) {
    if (!(m >> l & 1u)) {
      ++l;
      continue;
    }
    int e = l;
    while (e + 1 < kWarpSize && (m >> (e + 1) & 1u)) ++e;
    s << (first ? "" : ",") << l;
    if (e > l) s << "-" << e;
    first = false;
    l = e + 1;
  }
  return s.str();
}

// Records the launch's first error (the scheduler then stops it).
void stop(const std::string& what) {
  if (!g_failed) {
    g_failed = true;
    g_report = what;
  }
}

// Nothing can run but the block is not done: say who waits where.
void deadlock() {
  std::ostringstream s;
  s << "the block cannot finish (divergent barrier or warp collective):";
  if (g_barrier.arrived > 0) {
    s << " " << g_barrier.arrived << " of " << g_threads << " threads wait at __syncthreads at "
      << pc_tag(g_barrier.pc) << ";";
  }
  if (g_exited > 0) s << " " << g_exited << " threads have exited;";
  for (size_t w = 0; w < g_warps.size(); ++w) {
    const Warp& wp = g_warps[w];
    if (wp.arrived == 0) continue;
    s << " warp " << w << ": lanes " << lanes(wp.arrived) << " wait at " << op_name(wp.coll.op)
      << " at " << pc_tag(wp.first_pc) << " for lanes " << lanes(wp.coll.mask & ~wp.arrived) << ";";
  }
  stop(s.str());
}

void run_block() {
  const Launch& l = *g_launch;
  g_epoch += 1;
  g_block_epoch = g_epoch;
  g_barrier = Barrier{};
  g_warps.assign(size_t((g_threads + kWarpSize - 1) / kWarpSize), Warp{});
  for (const auto& d : g_dynamic) std::memset(reinterpret_cast<void*>(d.first), 0xff, l.smem);
  g_fibers.assign(size_t(g_threads), Fiber{});
  g_exited = 0;
  g_runnable.clear();
  for (int t = 0; t < g_threads; ++t) {
    Fiber& f = g_fibers[size_t(t)];
    f.tid = t;
    f.warp = t / kWarpSize;
    f.lane = t % kWarpSize;
    f.idx = uint3{unsigned(t) % l.block.x, unsigned(t) / l.block.x % l.block.y,
                  unsigned(t) / (l.block.x * l.block.y)};
    start_fiber(f);
    make_runnable(t);
  }
  while (!g_runnable.empty()) {
    const size_t pick = size_t(next_random() % g_runnable.size());
    const int tid = g_runnable[pick];
    g_runnable[pick] = g_runnable.back();
    g_runnable.pop_back();
    resume(g_fibers[size_t(tid)]);
    if (g_failed) return;
  }
  if (g_exited != g_threads) deadlock();
}


// Clears what an aborted launch left: in-flight cp.async markers.
void abandon_block() {
  for (auto& f : g_fibers) {
    auto clear = [](const std::vector<AsyncCopy>& copies) {
      for (const auto& c : copies) {
        for (int i = 0; i < c.cp_size; ++i) {
          const uintptr_t a = uintptr_t(c.dst) + i;
          if (a >= g_tls_lo && a < g_tls_hi) g_shadow[a - g_tls_lo].pending = Access{};
        }
      }
    };
    clear(f.uncommitted);
    for (const auto& g : f.groups) clear(g);
  }
  g_fibers.clear();
}

}  // namespace

// ---------------------------------------------------------------------------

DeviceConfig& device() { return g_device; }

void configure(uint64_t seed) {
  g_seed = seed;
  g_launch_serial = 0;  // the launches after this call get the same orders for the same seed
}

std::vector<std::string> take_log() {
  std::lock_guard<std::mutex> lock(g_mutex);
  std::vector<std::string> out;
  out.swap(g_log);
  return out;
}

bool register_dynamic_shared(unsigned char* (*addr)(), size_t bytes) {
  dynamic_arrays().push_back(DynamicShared{addr, bytes});
  return true;
}


void run(const Launch& l) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const int threads = int(l.block.x * l.block.y * l.block.z);
  if (threads < 1 || threads > 1024 || l.block.z > 64) {
    throw std::runtime_error("simt: invalid block size (1 to 1024 threads, z <= 64)");
  }
  if (l.grid.x < 1 || l.grid.y < 1 || l.grid.z < 1 || l.grid.y > 65535 || l.grid.z > 65535 ||
      l.grid.x > 0x7fffffffu) {
    throw std::runtime_error("simt: invalid grid size");
  }
  if (l.smem > size_t(g_device.smem_optin)) {
    throw std::runtime_error("simt: dynamic shared memory of " + std::to_string(l.smem) +
                             " bytes exceeds the device's " + std::to_string(g_device.smem_optin));
  }
  locate_module();
  for (const auto& d : g_dynamic) {
    if (l.smem > d.second - d.first) {
      throw std::runtime_error("simt: dynamic shared array too small");
    }
  }
  if (g_shadow.size() < g_tls_hi - g_tls_lo) g_shadow.resize(g_tls_hi - g_tls_lo);
  index_buffers(l.buffers);
  select_arrays(l.kernel);
  g_launch = &l;
  g_threads = threads;
  g_rng = (g_seed + 1) * 0x9E3779B97F4A7C15ull ^ (++g_launch_serial * 0xD1B54A32D192ED03ull);
  if (g_rng == 0) g_rng = 1;
  g_failed = false;
  g_log.push_back(kernel_name(l.kernel));
  for (unsigned z = 0; z < l.grid.z && !g_failed; ++z) {
    for (unsigned y = 0; y < l.grid.y && !g_failed; ++y) {
      for (unsigned x = 0; x < l.grid.x && !g_failed; ++x) {
        g_block_idx = uint3{x, y, z};
        run_block();
      }
    }
  }
  g_launch = nullptr;
  if (g_failed) {
    abandon_block();
    std::ostringstream s;
    s << "simt: " << g_log.back() << ", block (" << g_block_idx.x << ", " << g_block_idx.y << ", "
      << g_block_idx.z << "): " << resolve(g_report);
    throw std::runtime_error(s.str());
  }
}

void enter_kernel() {
  g_current->in_kernel = true;
  g_active = g_current;
}

Fiber& current() { return *g_current; }

Quiet::Quiet() : fiber_(g_current), was_in_kernel_(g_current != nullptr && g_current->in_kernel) {
  if (fiber_ != nullptr) fiber_->in_kernel = false;
  g_active = nullptr;
}
Quiet::~Quiet() {
  if (fiber_ == nullptr) return;
  fiber_->in_kernel = was_in_kernel_;
  g_active = was_in_kernel_ ? fiber_ : nullptr;
}

uint3 thread_idx() { return g_current->idx; }
uint3 block_idx() { return g_block_idx; }
dim3 block_dim() { return g_launch->block; }
dim3 grid_dim() { return g_launch->grid; }

namespace {

[[noreturn]] void exit_fiber() {
  Fiber& f = *g_current;
  f.in_kernel = false;
  g_active = nullptr;
  if (!f.uncommitted.empty() || !f.groups.empty()) {
    const AsyncCopy& c = f.uncommitted.empty() ? f.groups.front().front() : f.uncommitted.front();
    fail(thread_tag(f.tid) + " exits with a cp.async (issued at " + pc_tag(c.pc) +
         ") that no cp.async.wait_group completed");
  }
  const Warp& w = g_warps[size_t(f.warp)];
  if (w.arrived != 0 && (w.coll.mask >> f.lane & 1u)) {
    fail(thread_tag(f.tid) + " exits while lanes " + lanes(w.arrived) +
         " of its warp wait for it at " + op_name(w.coll.op) + " at " + pc_tag(w.first_pc) +
         " (a partial-warp collective)");
  }
  if (g_barrier.arrived > 0) {
    fail(thread_tag(f.tid) + " exits while " + std::to_string(g_barrier.arrived) +
         " threads wait at __syncthreads at " + pc_tag(g_barrier.pc));
  }
  f.exited = true;
  g_exited += 1;
  switch_to_scheduler();
  std::abort();  // an exited fiber is never resumed
}

}  // namespace

void syncthreads() {
  const Quiet quiet;
  const uintptr_t pc = uintptr_t(__builtin_return_address(0));
  Fiber& f = *g_current;
  if (g_exited > 0) {
    const auto gone =
        std::find_if(g_fibers.begin(), g_fibers.end(), [](const Fiber& o) { return o.exited; });
    fail(thread_tag(f.tid) + " reaches __syncthreads at " + pc_tag(pc) + " after " +
         thread_tag(gone->tid) + " exited (a barrier in divergent code)");
  }
  if (g_barrier.arrived == 0) {
    g_barrier.pc = pc;
  } else if (g_barrier.pc != pc) {
    fail(thread_tag(f.tid) + " reaches __syncthreads at " + pc_tag(pc) + " while " +
         std::to_string(g_barrier.arrived) + " threads wait at another one, at " +
         pc_tag(g_barrier.pc) + " (a barrier in divergent code)");
  }
  const Warp& w = g_warps[size_t(f.warp)];
  if (w.arrived != 0 && (w.coll.mask >> f.lane & 1u)) {
    fail(thread_tag(f.tid) + " reaches __syncthreads at " + pc_tag(pc) + " while lanes " +
         lanes(w.arrived) + " of its warp wait for it at " + op_name(w.coll.op) + " at " +
         pc_tag(w.first_pc));
  }
  if (++g_barrier.arrived == g_threads) {
    g_barrier.arrived = 0;
    g_epoch += 1;
    for (auto& other : g_fibers) {
      if (other.at_barrier) {
        other.at_barrier = false;
        make_runnable(other.tid);
      }
    }
    return;
  }
  f.at_barrier = true;
  switch_to_scheduler();
}

const char* op_name(Op op) {
  switch (op) {
    case Op::SyncWarp: return "__syncwarp";
    case Op::Shfl: return "__shfl_*_sync";
    case Op::Ballot: return "__ballot_sync";
    case Op::Ldmatrix: return "ldmatrix";
    case Op::Mma: return "mma.sync";
  }
  return "?";
}

void warp_collective(const Collective& c, uintptr_t pc,
                     void (*complete)(void* const*, unsigned, const uintptr_t*, int)) {
  Fiber& f = *g_current;
  Warp& w = g_warps[size_t(f.warp)];
  const unsigned me = 1u << f.lane;
  const int warp_lanes = std::min(kWarpSize, g_threads - f.warp * kWarpSize);
  const unsigned live = warp_lanes == kWarpSize ? ~0u : (1u << warp_lanes) - 1;
  if (!(c.mask & me)) {
    fail(thread_tag(f.tid) + " calls " + op_name(c.op) + " at " + pc_tag(pc) +
         " with a mask that leaves out its own lane");
  }
  if (c.mask & ~live) {
    fail(thread_tag(f.tid) + " calls " + op_name(c.op) + " at " + pc_tag(pc) + " with mask lanes " +
         lanes(c.mask & ~live) + " that the block does not have");
  }
  for (int l = 0; l < kWarpSize; ++l) {
    if ((c.mask >> l & 1u) && g_fibers[size_t(f.warp * kWarpSize + l)].exited) {
      fail(thread_tag(f.tid) + " calls " + op_name(c.op) + " at " + pc_tag(pc) + " but lane " +
           std::to_string(l) + " of its mask has exited (a partial-warp collective)");
    }
    if ((c.mask >> l & 1u) && g_fibers[size_t(f.warp * kWarpSize + l)].at_barrier) {
      fail(thread_tag(f.tid) + " calls " + op_name(c.op) + " at " + pc_tag(pc) + " while lane " +
           std::to_string(l) + " of its mask waits at __syncthreads at " + pc_tag(g_barrier.pc));
    }
  }
  if (w.arrived == 0) {
    w.coll = c;
    w.first_pc = pc;
  } else if (w.coll.op != c.op || w.coll.mask != c.mask || w.coll.variant != c.variant ||
             w.first_pc != pc) {
    fail(thread_tag(f.tid) + " calls " + op_name(c.op) + " at " + pc_tag(pc) +
         " while lanes " + lanes(w.arrived) + " of its warp wait at " + op_name(w.coll.op) +
         " at " + pc_tag(w.first_pc) +
         " (divergent warp collectives, or different masks or qualifiers)");
  }
  w.operands[f.lane] = c.operands;
  w.pcs[f.lane] = pc;
  w.arrived |= me;
  if (w.arrived != w.coll.mask) {
    switch_to_scheduler();
    return;
  }
  complete(w.operands, w.coll.mask, w.pcs, f.warp);
  if (w.coll.op == Op::SyncWarp) w.gen += 1;
  const unsigned released = w.arrived & ~me;
  w.arrived = 0;
  for (int l = 0; l < kWarpSize; ++l) {
    if (released >> l & 1u) make_runnable(f.warp * kWarpSize + l);
  }
}

namespace {

struct ShflOperands {
  uint64_t value;
  int src;  // source lane, computed by the calling lane
  uint64_t result;
};

void complete_shfl(void* const* ops, unsigned mask, const uintptr_t* pcs, int warp) {
  for (int l = 0; l < kWarpSize; ++l) {
    if (!(mask >> l & 1u)) continue;
    auto* o = static_cast<ShflOperands*>(ops[l]);
    if (!(mask >> o->src & 1u)) {
      fail(thread_tag(warp * kWarpSize + l) + " reads lane " + std::to_string(o->src) +
           " in __shfl_*_sync at " + pc_tag(pcs[l]) + ", which is not in the mask (undefined)");
    }
    o->result = static_cast<ShflOperands*>(ops[o->src])->value;
  }
}

struct BallotOperands {
  bool pred;
  unsigned result;
};

void complete_ballot(void* const* ops, unsigned mask, const uintptr_t*, int) {
  unsigned bits = 0;
  for (int l = 0; l < kWarpSize; ++l) {
    if ((mask >> l & 1u) && static_cast<BallotOperands*>(ops[l])->pred) bits |= 1u << l;
  }
  for (int l = 0; l < kWarpSize; ++l) {
    if (mask >> l & 1u) static_cast<BallotOperands*>(ops[l])->result = bits;
  }
}

void complete_nothing(void* const*, unsigned, const uintptr_t*, int) {}

}  // namespace

void syncwarp(unsigned mask) {
  const Quiet quiet;
  warp_collective(Collective{Op::SyncWarp, mask, 0, nullptr},
                  uintptr_t(__builtin_return_address(0)), &complete_nothing);
}

uint64_t shfl(Shfl mode, unsigned mask, uint64_t bits, int arg, int width) {
  const Quiet quiet;
  const uintptr_t pc = uintptr_t(__builtin_return_address(0));
  if (width < 1 || width > kWarpSize || (width & (width - 1)) != 0) {
    fail(thread_tag(g_current->tid) + " calls __shfl_*_sync at " + pc_tag(pc) +
         " with width " + std::to_string(width) + " (a power of 2 up to 32)");
  }
  // CUDA PG "Warp Shuffle Functions": lanes form segments of `width`; a source
  // outside the caller's segment gives back the caller's own value.
  const int lane = g_current->lane, seg = lane & ~(width - 1);
  int src = lane;
  switch (mode) {
    case Shfl::Idx: src = seg + (arg & (width - 1)); break;
    case Shfl::Xor: src = lane ^ arg; break;
    case Shfl::Up: src = lane - arg; break;
    case Shfl::Down: src = lane + arg; break;
  }
  if (src < seg || src >= seg + width) src = lane;
  ShflOperands o{bits, src, 0};
  warp_collective(Collective{Op::Shfl, mask, 0, &o}, pc, &complete_shfl);
  return o.result;
}

unsigned ballot(unsigned mask, bool pred) {
  const Quiet quiet;
  BallotOperands o{pred, 0};
  warp_collective(Collective{Op::Ballot, mask, 0, &o}, uintptr_t(__builtin_return_address(0)),
                  &complete_ballot);
  return o.result;
}

// ---------------------------------------------------------------------------
// Memory checks.

bool is_shared(uintptr_t a) { return a >= g_tls_lo && a < g_tls_hi; }

void shared_access(int tid, bool write, uintptr_t a, size_t n, uintptr_t pc) {
  check_shared_bounds(tid, write, a, n, pc);
  const Access now = access_now(tid, pc);
  for (size_t i = 0; i < n; ++i) {
    ByteShadow& b = shadow_at(tid, write, a, i, n, pc);
    check_pending(b, tid, write, a + i, pc);
    if (write) {
      if (unordered(b.write, tid)) race("writes", tid, a + i, pc, "wrote", b.write);
      for (const Access& r : b.read) {
        if (unordered(r, tid)) race("writes", tid, a + i, pc, "read", r);
      }
      b.write = now;
      b.read[0] = b.read[1] = Access{};
    } else {
      if (b.write.epoch < g_block_epoch) {
        fail(thread_tag(tid) + " reads " + shared_tag(a + i) + " at " + pc_tag(pc) +
             ", which no thread of this block has written (uninitialized shared memory)");
      }
      if (unordered(b.write, tid)) race("reads", tid, a + i, pc, "wrote", b.write);
      // keep reads of two distinct threads: a later write conflicts with one of them
      const bool first_free = b.read[0].epoch != g_epoch || b.read[0].tid == tid;
      b.read[first_free ? 0 : 1] = now;
    }
  }
}

void shared_begin_async_write(int tid, uintptr_t a, size_t n, uintptr_t pc) {
  check_shared_bounds(tid, true, a, n, pc);
  for (size_t i = 0; i < n; ++i) {
    ByteShadow& b = shadow_at(tid, true, a, i, n, pc);
    if (b.pending.epoch != 0) {
      fail(thread_tag(tid) + " issues a cp.async at " + pc_tag(pc) + " to " + shared_tag(a + i) +
           ", the destination of another in-flight cp.async (issued by " +
           thread_tag(b.pending.tid) + " at " + pc_tag(pc_of(b.pending.pc)) + ")");
    }
    if (unordered(b.write, tid)) race("issues a cp.async to", tid, a + i, pc, "wrote", b.write);
    for (const Access& r : b.read) {
      if (unordered(r, tid)) race("issues a cp.async to", tid, a + i, pc, "read", r);
    }
    b.pending = access_now(tid, pc);
  }
  std::memset(reinterpret_cast<void*>(a), 0xff, n);  // what a read before the wait would see
}

void shared_end_async_write(int tid, uintptr_t a, size_t n, uintptr_t pc) {
  const Access now = access_now(tid, pc);
  for (size_t i = 0; i < n; ++i) {
    ByteShadow& b = g_shadow[a + i - g_tls_lo];
    b.pending = Access{};
    b.write = now;
    b.read[0] = b.read[1] = Access{};
  }
}

void global_access(bool write, uintptr_t a, size_t n, uintptr_t pc) {
  const BufferIndex* read_only = nullptr;
  for (const auto& x : g_buffers) {
    if (covers(x, a, n)) {
      if (!write || x.buf->writable) return;
      read_only = &x;
    }
  }
  if (read_only == nullptr && !write && a >= g_image_lo && a + n <= g_image_hi) return;
  bad_global(write, a, n, pc, read_only);
}

namespace {

void checked_access(uintptr_t a, size_t n, bool write, uintptr_t pc) {
  if (is_shared(a)) {
    shared_access(g_current->tid, write, a, n, pc);
  } else {
    global_access(write, a, n, pc);
  }
}

template <typename T> T atomic_add_impl(T* addr, T v, uintptr_t pc) {
  const Quiet quiet;
  const uintptr_t a = uintptr_t(addr);
  if (a % sizeof(T) != 0) {
    fail(thread_tag(g_current->tid) + " calls atomicAdd at " + pc_tag(pc) +
         " on a misaligned address");
  }
  if (is_shared(a)) {
    fail(thread_tag(g_current->tid) + " calls atomicAdd at " + pc_tag(pc) +
         " on shared memory, which the emulator does not model");
  }
  global_access(true, a, sizeof(T), pc);
  const T old = *addr;
  *addr = old + v;
  return old;
}

}  // namespace

float atomic_add(float* addr, float v) {
  return atomic_add_impl(addr, v, uintptr_t(__builtin_return_address(0)));
}
double atomic_add(double* addr, double v) {
  return atomic_add_impl(addr, v, uintptr_t(__builtin_return_address(0)));
}

// ---------------------------------------------------------------------------
// Reports.

std::string thread_tag(int tid) {
  const Launch& l = *g_launch;
  const unsigned x = unsigned(tid) % l.block.x, y = unsigned(tid) / l.block.x % l.block.y,
                 z = unsigned(tid) / (l.block.x * l.block.y);
  std::ostringstream s;
  s << "thread " << x;
  if (l.block.y > 1 || l.block.z > 1) s << "," << y << "," << z;
  s << " (warp " << tid / kWarpSize << " lane " << tid % kWarpSize << ")";
  return s.str();
}

std::string pc_tag(uintptr_t pc) {
  std::ostringstream s;
  s << "{pc:" << std::hex << (pc - g_module_base) << "}";
  return s.str();
}

void fail(const std::string& what) {
  stop(what);
  switch_to_scheduler();
  std::abort();  // a failed launch never resumes its fibers
}

namespace {

// addr2line's (function, file:line) lines of a code offset, innermost inlined frame first.
std::vector<std::pair<std::string, std::string>> frames_of(uintptr_t off) {
  static std::map<uintptr_t, std::vector<std::pair<std::string, std::string>>> cache;
  auto it = cache.find(off);
  if (it != cache.end()) return it->second;
  std::ostringstream cmd;
  cmd << "addr2line -f -C -i -e '" << g_module_path << "' 0x" << std::hex << off << " 2>/dev/null";
  std::vector<std::string> lines;
  if (FILE* p = popen(cmd.str().c_str(), "r")) {
    char buf[8192];
    while (fgets(buf, sizeof buf, p)) {
      std::string line(buf);
      while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) line.pop_back();
      lines.push_back(line);
    }
    pclose(p);
  }
  std::vector<std::pair<std::string, std::string>> frames;
  for (size_t i = 0; i + 1 < lines.size(); i += 2) {
    std::string file = lines[i + 1];
    for (const char* top : {"/csrc/", "/tests/"}) {  // repository-relative
      const size_t at = file.rfind(top);
      if (at != std::string::npos) {
        file = file.substr(at + 1);
        break;
      }
    }
    const size_t disc = file.find(" (discriminator");
    if (disc != std::string::npos) file = file.substr(0, disc);
    frames.emplace_back(short_name(lines[i], 1), file);
  }
  return cache[off] = frames;
}

// "file:line (function), inlined in file:line (function)" of a return address.
std::string source_of(uintptr_t off) {
  std::string out;
  for (const auto& [fn, file] : frames_of(off - 1)) {
    out += (out.empty() ? "" : ", inlined in ") + file + " (" + fn + ")";
  }
  if (!out.empty()) return out;
  std::ostringstream s;
  s << "<code offset 0x" << std::hex << off << ">";
  return s.str();
}

}  // namespace

std::string kernel_name(const void* kernel) {
  const auto frames = frames_of(uintptr_t(kernel) - g_module_base);
  return frames.empty() ? "<kernel>" : frames.back().first;
}

std::string resolve(const std::string& text) {
  std::string out;
  size_t i = 0;
  while (i < text.size()) {
    const size_t open = text.find("{pc:", i);
    if (open == std::string::npos) break;
    const size_t close = text.find('}', open);
    out += text.substr(i, open - i);
    out += source_of(std::stoull(text.substr(open + 4, close - open - 4), nullptr, 16));
    i = close + 1;
  }
  return out + text.substr(i);
}

}  // namespace simt

// ---------------------------------------------------------------------------
// The hooks of GCC's -fsanitize=thread instrumentation (kernel translation
// units only). Everything but the accesses of a fiber running its kernel
// body returns at once.

namespace {
// `aligned`: an access of a naturally aligned type, which the GPU requires to
// sit at a multiple of its size (else a misaligned-address fault).
inline void on_access(void* p, size_t n, bool write, bool aligned, void* ret) {
  simt::Fiber* f = simt::g_active;
  if (f == nullptr) return;
  const uintptr_t a = uintptr_t(p);
  if (a - uintptr_t(f->stack_lo) < f->stack_size) return;
  const simt::Quiet quiet;
  if (aligned && a % n != 0) {
    simt::fail(simt::thread_tag(f->tid) + (write ? " writes " : " reads ") + std::to_string(n) +
               " bytes at a misaligned address at " + simt::pc_tag(uintptr_t(ret)));
  }
  simt::checked_access(a, n, write, uintptr_t(ret));
}
}  // namespace

#define SIMT_HOOK(kind, n, write)                                                        \
  extern "C" void __tsan_##kind##n(void* p) {                                             \
    on_access(p, n, write, true, __builtin_return_address(0));                            \
  }                                                                                      \
  extern "C" void __tsan_unaligned_##kind##n(void* p) {                                   \
    on_access(p, n, write, false, __builtin_return_address(0));                           \
  }
SIMT_HOOK(read, 1, false)
SIMT_HOOK(read, 2, false)
SIMT_HOOK(read, 4, false)
SIMT_HOOK(read, 8, false)
SIMT_HOOK(read, 16, false)
SIMT_HOOK(write, 1, true)
SIMT_HOOK(write, 2, true)
SIMT_HOOK(write, 4, true)
SIMT_HOOK(write, 8, true)
SIMT_HOOK(write, 16, true)
#undef SIMT_HOOK

// Atomics of instrumented host code (e.g. reference counts in c10 headers):
// performed as sequentially consistent atomics; kernels do not use them.
#define SIMT_FETCH(bits, T, op)                                                                 \
  extern "C" T __tsan_atomic##bits##_fetch_##op(volatile T* a, T v, int) {                       \
    return __atomic_fetch_##op(a, v, __ATOMIC_SEQ_CST);                                          \
  }
#define SIMT_ATOMICS(bits, T)                                                                   \
  extern "C" T __tsan_atomic##bits##_load(const volatile T* a, int) {                            \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                 \
  }                                                                                              \
  extern "C" void __tsan_atomic##bits##_store(volatile T* a, T v, int) {                         \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                    \
  }                                                                                              \
  extern "C" T __tsan_atomic##bits##_exchange(volatile T* a, T v, int) {                         \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                          \
  }                                                                                              \
  SIMT_FETCH(bits, T, add)                                                                       \
  SIMT_FETCH(bits, T, sub)                                                                       \
  SIMT_FETCH(bits, T, and)                                                                       \
  SIMT_FETCH(bits, T, or)                                                                        \
  SIMT_FETCH(bits, T, xor)                                                                       \
  SIMT_FETCH(bits, T, nand)                                                                      \
  extern "C" int __tsan_atomic##bits##_compare_exchange_strong(volatile T* a, T* c, T v, int,    \
                                                               int) {                            \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);      \
  }                                                                                              \
  extern "C" int __tsan_atomic##bits##_compare_exchange_weak(volatile T* a, T* c, T v, int,      \
                                                             int) {                              \
    return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);       \
  }                                                                                              \
  extern "C" T __tsan_atomic##bits##_compare_exchange_val(volatile T* a, T c, T v, int, int) {   \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);            \
    return c;                                                                                    \
  }
SIMT_ATOMICS(8, char)
SIMT_ATOMICS(16, short)
SIMT_ATOMICS(32, int)
SIMT_ATOMICS(64, long)
#undef SIMT_ATOMICS
#undef SIMT_FETCH

extern "C" {
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
void __tsan_read_range(void* p, size_t n) {
  on_access(p, n, false, false, __builtin_return_address(0));
}
void __tsan_write_range(void* p, size_t n) {
  on_access(p, n, true, false, __builtin_return_address(0));
}
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
}
