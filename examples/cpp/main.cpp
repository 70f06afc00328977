// selfattn from C++: loads the extension libraries given on the command line
// (selfattn._C, then the CPU kernel module; see selfattn_libs.py), runs the
// fused forward and backward ops through the dispatcher and checks them
// against plain libtorch math (softmax(q kᵀ · scale + causal mask) v and its
// autograd gradients), then once more with a soft-cap and ALiBi slopes.
// Prints the errors; exits non-zero when they are large.
#include <torch/torch.h>

#include <cstdio>
#include <selfattn/selfattn.h>

namespace {

// Plain libtorch attention in (B, S, H, D) layout, bottom-right causal, with
// an optional soft-cap (0 = off) and ALiBi slopes (H,).
at::Tensor naive_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           double scale, double softcap = 0.0,
                           const std::optional<at::Tensor>& slopes = std::nullopt) {
  const int64_t Sq = q.size(1), Sk = k.size(1);
  auto scores = torch::einsum("bqhd,bkhd->bhqk", {q, k}) * scale;
  if (softcap > 0) scores = softcap * torch::tanh(scores / softcap);
  if (slopes) {
    auto i = torch::arange(Sq, torch::kDouble).view({-1, 1}) + double(Sk - Sq);
    auto distance = (i - torch::arange(Sk, torch::kDouble).view({1, -1})).abs();
    scores = scores - slopes->to(torch::kDouble).view({-1, 1, 1}) * distance;
  }
  auto hidden = torch::ones({Sq, Sk}, torch::kBool).triu(Sk - Sq + 1);
  auto probs = scores.masked_fill(hidden, -std::numeric_limits<double>::infinity()).softmax(-1);
  return torch::einsum("bhqk,bkhd->bqhd", {probs, v});
}

double max_err(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

}  // namespace

int run(int n_libraries, char** libraries) {
  for (int i = 0; i < n_libraries; ++i) selfattn::load_library(libraries[i]);
  torch::manual_seed(0);
  const int64_t B = 2, Sq = 7, Sk = 9, H = 4, D = 16;
  auto opts = torch::TensorOptions().dtype(torch::kDouble);
  auto q = torch::randn({B, Sq, H, D}, opts).requires_grad_();
  auto k = torch::randn({B, Sk, H, D}, opts).requires_grad_();
  auto v = torch::randn({B, Sk, H, D}, opts).requires_grad_();
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));

  // Forward: out (B, Sq, H, D) and lse (B, H, Sq); causal = window right 0,
  // bottom-right aligned (diag_offset Sk - Sq).
  selfattn::Options opts_causal;
  opts_causal.scale = scale;
  opts_causal.window_right = 0;
  opts_causal.diag_offset = Sk - Sq;
  at::Tensor out, lse;
  {
    torch::NoGradGuard no_grad;
    std::tie(out, lse) = selfattn::attention_forward(q, k, v, opts_causal);
  }
  auto expected = naive_attention(q, k, v, scale);
  const double fwd_err = max_err(out, expected);
  const double conv_err = max_err(selfattn::attention(q.detach(), k.detach(), v.detach(), true),
                                  expected.detach());

  // Backward: the op's gradients against libtorch autograd on the naive math.
  auto dout = torch::randn_like(out);
  auto grads = torch::autograd::grad({expected}, {q, k, v}, {dout});
  auto [dq, dk, dv, dmask] = selfattn::attention_backward(dout, q.detach(), k.detach(),
                                                          v.detach(), out, lse, opts_causal,
                                                          false);
  const double bwd_err =
      std::max({max_err(dq, grads[0]), max_err(dk, grads[1]), max_err(dv, grads[2])});

  // Soft-capping and ALiBi, forward and backward.
  selfattn::Options opts_mod = opts_causal;
  opts_mod.softcap = 2.0;
  opts_mod.alibi_slopes = torch::tensor({0.5, 0.25, 0.125, 0.0625}, torch::kFloat);
  at::Tensor out_mod, lse_mod;
  {
    torch::NoGradGuard no_grad;
    std::tie(out_mod, lse_mod) = selfattn::attention_forward(q, k, v, opts_mod);
  }
  auto expected_mod = naive_attention(q, k, v, scale, opts_mod.softcap, opts_mod.alibi_slopes);
  auto grads_mod = torch::autograd::grad({expected_mod}, {q, k, v}, {dout});
  auto [dq_m, dk_m, dv_m, dmask_m] = selfattn::attention_backward(
      dout, q.detach(), k.detach(), v.detach(), out_mod, lse_mod, opts_mod, false);
  const double mod_err = std::max({max_err(out_mod, expected_mod), max_err(dq_m, grads_mod[0]),
                                   max_err(dk_m, grads_mod[1]), max_err(dv_m, grads_mod[2])});

  std::printf("selfattn C++ example: forward error %.3g, attention() error %.3g, "
              "backward error %.3g, soft-cap + ALiBi error %.3g\n", fwd_err, conv_err, bwd_err,
              mod_err);
  const bool ok = fwd_err < 1e-10 && conv_err < 1e-10 && bwd_err < 1e-10 && mod_err < 1e-10;
  std::printf("%s\n", ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s selfattn/_C.so selfattn/_cpu_*.so (see selfattn_libs.py)\n",
                 argv[0]);
    return 2;
  }
  try {
    return run(argc - 1, argv + 1);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "selfattn C++ example: %s\n", e.what());
    return 1;
  }
}
