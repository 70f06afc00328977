// The PTX instructions of the flash kernels, emulated from NVIDIA's PTX ISA
// (sections "cp.async", "cp.async.commit_group", "cp.async.wait_group",
// "ldmatrix", "Matrix Fragments for mma.m16n8k16 with floating point type"),
// cross-checked with shared/CUDA_FACTS.md 1-3. Notation: lane l,
// g = l >> 2 (groupID), t = l % 4 (threadID_in_group).
//
//  - cp.async [dst], [src], cp-size, src-size: src-size bytes of global
//    memory are copied and the rest of the cp-size bytes zero-filled, but
//    only when a cp.async.wait_group of the issuing thread retires the
//    copy's group (wait_group N: all but the N newest committed groups); until
//    then the destination holds poison and any access to it is reported.
//  - ldmatrix.m8n8.{x1,x2,x4}{.trans}.b16: lanes 8i..8i+7 give the row
//    addresses (16 bytes each) of matrix i; register i of lane l receives
//    row l/4, elements 2(l%4) and 2(l%4)+1 of matrix i (lower element in the
//    low half), or with .trans the transposed matrix's: stored rows 2(l%4)
//    and 2(l%4)+1 of column l/4.
//  - mma.m16n8k16.row.col.f32.{f16,bf16}: D = A B + C with, per lane,
//    a_i (i = 0..7, two per register, low first) at row g + 8 [i in {2,3,6,7}],
//    column 2t + (i & 1) + 8 [i >= 4]; b_i (i = 0..3) at row (k)
//    2t + (i & 1) + 8 [i >= 2], column (n) g; c_i at row g + 8 [i >= 2],
//    column 2t + (i & 1). Products are exact in float; the sum is formed in
//    double and rounded once (the tensor core's own accumulation order and
//    rounding are not modelled).
#include "runtime.h"

#include <sstream>

namespace simt {
namespace {

[[noreturn]] void bad_operand(const std::string& what, uintptr_t pc) {
  fail(thread_tag(current().tid) + " " + what + " at " + pc_tag(pc));
}

void land(int tid, const AsyncCopy& c) {
  unsigned char tmp[16];
  std::memcpy(tmp, c.src, size_t(c.src_size));
  std::memset(tmp + c.src_size, 0, size_t(c.cp_size - c.src_size));
  std::memcpy(c.dst, tmp, size_t(c.cp_size));
  shared_end_async_write(tid, uintptr_t(c.dst), size_t(c.cp_size), c.pc);
}

}  // namespace

void cp_async(void* dst, const void* src, int cp_size, int src_size) {
  const Quiet quiet;
  const uintptr_t pc = uintptr_t(__builtin_return_address(0));
  const uintptr_t d = uintptr_t(dst), s = uintptr_t(src);
  Fiber& f = current();
  if (cp_size != 4 && cp_size != 8 && cp_size != 16) {
    bad_operand("issues a cp.async with cp-size " + std::to_string(cp_size), pc);
  }
  if (src_size < 0 || src_size > cp_size) {
    bad_operand("issues a cp.async with src-size " + std::to_string(src_size) + " > cp-size", pc);
  }
  if (!is_shared(d)) bad_operand("issues a cp.async whose destination is not shared memory", pc);
  if (is_shared(s)) bad_operand("issues a cp.async whose source is shared memory", pc);
  if (d % uintptr_t(cp_size) != 0 || s % uintptr_t(cp_size) != 0) {
    bad_operand("issues a cp.async with an address not aligned to its cp-size", pc);
  }
  // The source is read when the copy lands, but must be valid now; with
  // src-size 0 nothing is read, yet the address must still be a valid one
  // (CUDA_FACTS 3: unconfirmed whether the hardware needs it, so it is held to it).
  global_access(false, s, size_t(src_size > 0 ? src_size : 1), pc);
  shared_begin_async_write(f.tid, d, size_t(cp_size), pc);
  f.uncommitted.push_back(AsyncCopy{static_cast<unsigned char*>(dst),
                                    static_cast<const unsigned char*>(src), cp_size, src_size, pc});
}

void cp_async_commit() {
  const Quiet quiet;
  Fiber& f = current();
  f.groups.push_back(std::move(f.uncommitted));
  f.uncommitted.clear();
}

void cp_async_wait(int pending) {
  const Quiet quiet;
  Fiber& f = current();
  while (int(f.groups.size()) > pending) {
    for (const AsyncCopy& c : f.groups.front()) land(f.tid, c);
    f.groups.pop_front();
  }
}

namespace {

struct LdmatrixOperands {
  const unsigned char* row;  // the row address this lane gives
  uint32_t* regs;            // its destination registers
  int num;
  bool trans;
};

void complete_ldmatrix(void* const* ops, unsigned, const uintptr_t* pcs, int warp) {
  const auto* first = static_cast<LdmatrixOperands*>(ops[0]);
  const int num = first->num;
  uint16_t m[4][8][8];  // matrix, stored row, column
  for (int i = 0; i < num; ++i) {
    for (int r = 0; r < 8; ++r) {
      const int lane = 8 * i + r;
      const auto* o = static_cast<LdmatrixOperands*>(ops[lane]);
      const uintptr_t a = uintptr_t(o->row);
      const int tid = warp * kWarpSize + lane;
      if (a % 16 != 0 || !is_shared(a)) {
        fail(thread_tag(tid) + " gives ldmatrix at " + pc_tag(pcs[lane]) +
             " a row address that is not 16-byte aligned shared memory");
      }
      shared_access(tid, false, a, 16, pcs[lane]);
      std::memcpy(m[i][r], o->row, 16);
    }
  }
  for (int l = 0; l < kWarpSize; ++l) {
    auto* o = static_cast<LdmatrixOperands*>(ops[l]);
    const int row = l / 4, col = 2 * (l % 4);
    for (int i = 0; i < num; ++i) {
      const uint16_t lo = o->trans ? m[i][col][row] : m[i][row][col];
      const uint16_t hi = o->trans ? m[i][col + 1][row] : m[i][row][col + 1];
      o->regs[i] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
  }
}

struct MmaOperands {
  float* d;  // in: C, out: D
  const uint32_t* a;
  const uint32_t* b;
  MmaType type;
};

float element(uint32_t reg, int half, MmaType type) {
  const uint16_t bits = uint16_t(half ? reg >> 16 : reg & 0xffffu);
  return type == MmaType::F16 ? half_bits_to_float(bits) : bf16_bits_to_float(bits);
}

void complete_mma(void* const* ops, unsigned, const uintptr_t*, int) {
  const MmaType type = static_cast<MmaOperands*>(ops[0])->type;
  float A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < kWarpSize; ++l) {
    const auto* o = static_cast<MmaOperands*>(ops[l]);
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < 8; ++i) {
      const int row = g + ((i & 2) ? 8 : 0), col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = element(o->a[i / 2], i & 1, type);
    }
    for (int i = 0; i < 4; ++i) {
      const int k = 2 * t + (i & 1) + (i >= 2 ? 8 : 0);
      B[k][g] = element(o->b[i / 2], i & 1, type);
    }
    for (int i = 0; i < 4; ++i) C[g + (i >= 2 ? 8 : 0)][2 * t + (i & 1)] = o->d[i];
  }
  for (int l = 0; l < kWarpSize; ++l) {
    auto* o = static_cast<MmaOperands*>(ops[l]);
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
      double sum = C[row][col];
      for (int k = 0; k < 16; ++k) sum += double(A[row][k]) * double(B[k][col]);
      o->d[i] = float(sum);
    }
  }
}

}  // namespace

void ldmatrix(uint32_t* regs, int num, bool trans, const void* row_addr) {
  const Quiet quiet;
  const uintptr_t pc = uintptr_t(__builtin_return_address(0));
  if (num != 1 && num != 2 && num != 4) {
    bad_operand("calls ldmatrix with .num " + std::to_string(num), pc);
  }
  LdmatrixOperands o{static_cast<const unsigned char*>(row_addr), regs, num, trans};
  warp_collective(Collective{Op::Ldmatrix, 0xffffffffu, num * 2 + int(trans), &o}, pc,
                  &complete_ldmatrix);
}

void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, MmaType type) {
  const Quiet quiet;
  MmaOperands o{d, a, b, type};
  warp_collective(Collective{Op::Mma, 0xffffffffu, int(type), &o},
                  uintptr_t(__builtin_return_address(0)), &complete_mma);
}

}  // namespace simt
