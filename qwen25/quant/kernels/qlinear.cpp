// The C API of the int8/int4 kernels (qlinear.h) for QuantLinear's forward, via ctypes.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "pool.h"
#include "qlinear.h"

extern "C" {

// 1 if this CPU runs the kernels (AVX-512 F/BW/VL/DQ), else 0.
int q25q_supported() { return q25q::cpu_ok(); }

// y [M, N] fp32 = x [M, K] fp32 @ dequant(W)^T. 0 on success, 1 for arguments the kernel
// does not cover (the caller then uses the PyTorch path).
int q25q_linear(int bits, const float* x, int64_t M, int64_t K, const uint8_t* qweight, const float* scales,
                const uint8_t* zeros, int64_t gs, int64_t N, float* y, int nthreads) {
  if (!q25q::cpu_ok() || M <= 0 || !q25q::supported(bits, gs, K)) return 1;
  std::vector<float> xs;
  q25q::prepare_inputs(x, M, K, bits == 4, [](const float* p, int64_t i) { return p[i]; }, xs);
  const q25q::QProj q = {bits, gs, qweight, scales, zeros};
  // ~256 KiB of codes per work item: enough items to balance the threads, long runs of
  // memory per item for the prefetcher. A row is always done by one thread.
  const int64_t row_bytes = bits == 8 ? K : K / 2;
  const int64_t step = std::max<int64_t>(1, (int64_t(256) << 10) / row_bytes);
  const int64_t items = (N + step - 1) / step;
  q25::parallel_for(items, nthreads, [&](int64_t i, int) {
    const int64_t n0 = i * step, n1 = std::min(N, n0 + step);
    q25q::qrows(q, K, xs.data(), M, y, N, n0, n1);
  });
  return 0;
}

}  // extern "C"
