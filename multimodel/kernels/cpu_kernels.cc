// XLA FFI handlers for the CPU, built and loaded by multimodel/kernels/__init__.py: the image
// stem's depthwise 3x3 convolution, 3x3/2 max pool and layer norm, forward and backward, over
// NHWC float32.
//
// Depthwise 3x3 convolution (stride 1, zero padding 1):
//
//   forward:  y[b, h, w, c] = bias[c] + sum_t k[t, c] * x[b, h + dy - 1, w + dx - 1, c],
//             t = 3 * dy + dx (zero outside the image)
//   backward: dx[b, i, j, c] = sum_t k[t, c] * g[b, i - dy + 1, j - dx + 1, c]
//             dk[t, c]       = sum_{b, h, w} x[b, h + dy - 1, w + dx - 1, c] * g[b, h, w, c]
//             dbias[c]       = sum_{b, h, w} g[b, h, w, c]
//
// XLA's CPU backend computes dk as nine shifted copies of the input, each reduced on its own
// (docs/performance.md); this does all of it in one pass over rows of g, split into fixed chunks
// that run on XLA's intra-op thread pool. Each chunk sums its own partial dk and dbias and the
// partials are added in chunk order, so the result does not depend on the number of threads.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRowsPerChunk = 4;

// Runs work(i) for i in [0, n) on the pool and the calling thread; returns when all are done.
// Chunks are claimed from a shared counter, so the caller never waits for a chunk that has not
// started: a pool with no free thread only makes the caller do more of them itself.
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const std::function<void(int64_t)>& work) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mutex;
    std::condition_variable finished;
  };
  auto state = std::make_shared<State>();
  const std::function<void(int64_t)>* body = &work;
  auto run = [state, body, n] {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      (*body)(i);
      if (state->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(state->mutex);
        state->finished.notify_all();
      }
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t h = 0; h < helpers; ++h) {
    auto copy = run;
    pool.Schedule(std::move(copy));
  }
  run();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->finished.wait(lock, [&] { return state->done.load() == n; });
}

// Fixed chunks of kRowsPerChunk rows of each of B images of H rows: their number, and
// work(chunk, b, first row, end row) run over all of them by ParallelFor.
int64_t RowChunks(int64_t B, int64_t H) { return B * ((H + kRowsPerChunk - 1) / kRowsPerChunk); }

template <typename F>
void ForRowChunks(ffi::ThreadPool& pool, int64_t B, int64_t H, F&& work) {
  const int64_t per_image = (H + kRowsPerChunk - 1) / kRowsPerChunk;
  ParallelFor(pool, B * per_image, [&](int64_t chunk) {
    const int64_t b = chunk / per_image, h0 = (chunk % per_image) * kRowsPerChunk;
    work(chunk, b, h0, std::min(H, h0 + kRowsPerChunk));
  });
}

ffi::Error Depthwise3x3Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> bias,
                               ffi::ResultBuffer<ffi::F32> y) {
  auto dims = x.dimensions();
  if (dims.size() != 4) {
    return ffi::Error::InvalidArgument("depthwise3x3_forward: x must be [B, H, W, C]");
  }
  const int64_t B = dims[0], H = dims[1], W = dims[2], C = dims[3];
  if (kernel.dimensions().size() != 2 || kernel.dimensions()[0] != 9 ||
      kernel.dimensions()[1] != C || bias.dimensions().size() != 1 || bias.dimensions()[0] != C) {
    return ffi::Error::InvalidArgument("depthwise3x3_forward: kernel must be [9, C], bias [C]");
  }
  const float* xs = x.typed_data();
  const float* ks = kernel.typed_data();
  const float* bs = bias.typed_data();
  float* ys = y->typed_data();
  const int64_t row = W * C, image = H * row;

  ForRowChunks(pool, B, H, [&](int64_t, int64_t b, int64_t h0, int64_t h1) {
    const float* xb = xs + b * image;
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t w = 0; w < W; ++w) {
        float* __restrict out = ys + b * image + h * row + w * C;
        std::memcpy(out, bs, sizeof(float) * C);
        for (int dy = 0; dy < 3; ++dy) {
          const int64_t hx = h + dy - 1;
          if (hx < 0 || hx >= H) continue;
          for (int dxo = 0; dxo < 3; ++dxo) {
            const int64_t wx = w + dxo - 1;
            if (wx < 0 || wx >= W) continue;
            const float* __restrict xv = xb + hx * row + wx * C;
            const float* __restrict kt = ks + (3 * dy + dxo) * C;
            for (int64_t c = 0; c < C; ++c) out[c] += kt[c] * xv[c];
          }
        }
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error Depthwise3x3Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> grad,
                                ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dkernel,
                                ffi::ResultBuffer<ffi::F32> dbias) {
  auto dims = x.dimensions();
  if (dims.size() != 4 || grad.dimensions().size() != 4) {
    return ffi::Error::InvalidArgument("depthwise3x3_backward: x and grad must be [B, H, W, C]");
  }
  const int64_t B = dims[0], H = dims[1], W = dims[2], C = dims[3];
  for (int i = 0; i < 4; ++i) {
    if (grad.dimensions()[i] != dims[i]) {
      return ffi::Error::InvalidArgument("depthwise3x3_backward: grad's shape differs from x's");
    }
  }
  if (kernel.dimensions().size() != 2 || kernel.dimensions()[0] != 9 ||
      kernel.dimensions()[1] != C) {
    return ffi::Error::InvalidArgument("depthwise3x3_backward: kernel must be [9, C]");
  }
  const float* xs = x.typed_data();
  const float* ks = kernel.typed_data();
  const float* gs = grad.typed_data();
  float* dxs = dx->typed_data();
  const int64_t row = W * C, image = H * row;
  const int64_t chunks = RowChunks(B, H);
  std::vector<float> partial(chunks * 10 * C);  // Per chunk: dk [9, C], then dbias [C].

  ForRowChunks(pool, B, H, [&](int64_t chunk, int64_t b, int64_t h0, int64_t h1) {
    const float* xb = xs + b * image;
    const float* gb = gs + b * image;
    float* acc = partial.data() + chunk * 10 * C;
    std::memset(acc, 0, sizeof(float) * 10 * C);
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t w = 0; w < W; ++w) {
        const float* __restrict gv = gb + h * row + w * C;
        float* __restrict out = dxs + b * image + h * row + w * C;  // dx at (h, w)
        std::memset(out, 0, sizeof(float) * C);
        float* __restrict db = acc + 9 * C;
        for (int64_t c = 0; c < C; ++c) db[c] += gv[c];
        for (int dy = 0; dy < 3; ++dy) {
          const int64_t hx = h + dy - 1;  // x's row that meets g at (h, w) under tap dy
          const int64_t hg = h - dy + 1;  // g's row that reaches dx at (h, w) under tap dy
          for (int dxo = 0; dxo < 3; ++dxo) {
            const int t = 3 * dy + dxo;
            const int64_t wx = w + dxo - 1, wg = w - dxo + 1;
            if (hx >= 0 && hx < H && wx >= 0 && wx < W) {
              const float* __restrict xv = xb + hx * row + wx * C;
              float* __restrict dk = acc + t * C;
              for (int64_t c = 0; c < C; ++c) dk[c] += xv[c] * gv[c];
            }
            if (hg >= 0 && hg < H && wg >= 0 && wg < W) {
              const float* __restrict gn = gb + hg * row + wg * C;
              const float* __restrict kt = ks + t * C;
              for (int64_t c = 0; c < C; ++c) out[c] += kt[c] * gn[c];
            }
          }
        }
      }
    }
  });

  float* dks = dkernel->typed_data();
  float* dbs = dbias->typed_data();
  std::memset(dks, 0, sizeof(float) * 9 * C);
  std::memset(dbs, 0, sizeof(float) * C);
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {  // In chunk order: deterministic.
    const float* acc = partial.data() + chunk * 10 * C;
    for (int64_t i = 0; i < 9 * C; ++i) dks[i] += acc[i];
    for (int64_t c = 0; c < C; ++c) dbs[c] += acc[9 * C + c];
  }
  return ffi::Error::Success();
}

// 3x3 max pool, stride 2, padding 1 (padding never wins), over NHWC float32:
//   y[b, i, j, c] = max_t x[b, 2i + dy - 1, 2j + dx - 1, c], t = 3 * dy + dx
// and the tap that won (the first in t order on ties; a NaN wins and stays), for the backward
// pass, which hands each output's gradient to the input its tap points at.
ffi::Error MaxPool3x3s2Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::U8> taps) {
  auto dims = x.dimensions();
  if (dims.size() != 4) {
    return ffi::Error::InvalidArgument("max_pool3x3s2_forward: x must be [B, H, W, C]");
  }
  const int64_t B = dims[0], H = dims[1], W = dims[2], C = dims[3];
  const int64_t Ho = (H - 1) / 2 + 1, Wo = (W - 1) / 2 + 1;
  const float* xs = x.typed_data();
  float* ys = y->typed_data();
  uint8_t* ts = taps->typed_data();
  ParallelFor(pool, B * Ho, [&](int64_t chunk) {
    const int64_t b = chunk / Ho, i = chunk % Ho;
    for (int64_t j = 0; j < Wo; ++j) {
      float* __restrict out = ys + ((b * Ho + i) * Wo + j) * C;
      uint8_t* __restrict tap = ts + ((b * Ho + i) * Wo + j) * C;
      bool first = true;
      for (int dy = 0; dy < 3; ++dy) {
        const int64_t h = 2 * i + dy - 1;
        if (h < 0 || h >= H) continue;
        for (int dxo = 0; dxo < 3; ++dxo) {
          const int64_t w = 2 * j + dxo - 1;
          if (w < 0 || w >= W) continue;
          const float* __restrict xv = xs + ((b * H + h) * W + w) * C;
          const uint8_t t = static_cast<uint8_t>(3 * dy + dxo);
          if (first) {
            std::memcpy(out, xv, sizeof(float) * C);
            std::memset(tap, t, C);
            first = false;
            continue;
          }
          for (int64_t c = 0; c < C; ++c) {
            const bool wins = (xv[c] > out[c] || xv[c] != xv[c]) && out[c] == out[c];
            out[c] = wins ? xv[c] : out[c];
            tap[c] = wins ? t : tap[c];
          }
        }
      }
    }
  });
  return ffi::Error::Success();
}

// dx[b, h, w, c] = sum of grad[b, i, j, c] over the outputs (i, j) whose winning tap is (h, w):
// a gather per input row (at most 2 x 2 outputs reach an input), so rows run in parallel and
// every sum is added in a fixed order.
ffi::Error MaxPool3x3s2Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> taps,
                                ffi::Buffer<ffi::F32> grad, ffi::ResultBuffer<ffi::F32> dx) {
  auto dims = dx->dimensions();
  if (dims.size() != 4) {
    return ffi::Error::InvalidArgument("max_pool3x3s2_backward: dx must be [B, H, W, C]");
  }
  const int64_t B = dims[0], H = dims[1], W = dims[2], C = dims[3];
  const int64_t Ho = (H - 1) / 2 + 1, Wo = (W - 1) / 2 + 1;
  const int64_t pooled[4] = {B, Ho, Wo, C};
  bool same = grad.dimensions().size() == 4 && taps.dimensions().size() == 4;
  for (int i = 0; same && i < 4; ++i) {
    same = grad.dimensions()[i] == pooled[i] && taps.dimensions()[i] == pooled[i];
  }
  if (!same) {
    return ffi::Error::InvalidArgument("max_pool3x3s2_backward: grad and taps must be the "
                                       "pooled shape of dx");
  }
  const uint8_t* ts = taps.typed_data();
  const float* gs = grad.typed_data();
  float* dxs = dx->typed_data();
  ParallelFor(pool, B * H, [&](int64_t chunk) {
    const int64_t b = chunk / H, h = chunk % H;
    for (int64_t w = 0; w < W; ++w) {
      float* __restrict out = dxs + ((b * H + h) * W + w) * C;
      std::memset(out, 0, sizeof(float) * C);
      // Outputs i with 2i - 1 <= h <= 2i + 1 (i = h / 2 .. (h + 1) / 2), tap row h - 2i + 1;
      // the same for columns.
      for (int64_t i = h / 2; i <= (h + 1) / 2 && i < Ho; ++i) {
        for (int64_t j = w / 2; j <= (w + 1) / 2 && j < Wo; ++j) {
          const uint8_t t = static_cast<uint8_t>(3 * (h - 2 * i + 1) + (w - 2 * j + 1));
          const uint8_t* __restrict tv = ts + ((b * Ho + i) * Wo + j) * C;
          const float* __restrict gv = gs + ((b * Ho + i) * Wo + j) * C;
          for (int64_t c = 0; c < C; ++c) out[c] += tv[c] == t ? gv[c] : 0.0f;
        }
      }
    }
  });
  return ffi::Error::Success();
}

// Layer norm over the last axis of [N, C] float32 rows, as nnx.LayerNorm computes it (mean and
// E[x^2] - mean^2, clipped at 0; y = (x - mean) * (rsqrt(var + eps) * scale) + bias). The
// backward pass recomputes each row's statistics from x rather than keeping them.
constexpr int64_t kNormRowsPerChunk = 256;

inline void RowStats(const float* __restrict x, int64_t C, float eps, float* mean, float* rstd) {
  float sum = 0.0f, sum_sq = 0.0f;
  for (int64_t c = 0; c < C; ++c) {
    sum += x[c];
    sum_sq += x[c] * x[c];
  }
  const float m = sum / C;
  const float var = std::max(0.0f, sum_sq / C - m * m);
  *mean = m;
  *rstd = 1.0f / std::sqrt(var + eps);
}

ffi::Error LayerNormForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                            ffi::ResultBuffer<ffi::F32> y, float eps) {
  auto dims = x.dimensions();
  const int64_t C = dims.back(), N = x.element_count() / std::max<int64_t>(C, 1);
  if (static_cast<int64_t>(scale.element_count()) != C ||
      static_cast<int64_t>(bias.element_count()) != C) {
    return ffi::Error::InvalidArgument("layer_norm_forward: scale and bias must be [C]");
  }
  const float* xs = x.typed_data();
  const float* ss = scale.typed_data();
  const float* bs = bias.typed_data();
  float* ys = y->typed_data();
  ParallelFor(pool, (N + kNormRowsPerChunk - 1) / kNormRowsPerChunk, [&](int64_t chunk) {
    for (int64_t n = chunk * kNormRowsPerChunk; n < std::min(N, (chunk + 1) * kNormRowsPerChunk);
         ++n) {
      const float* __restrict xv = xs + n * C;
      float* __restrict out = ys + n * C;
      float mean, rstd;
      RowStats(xv, C, eps, &mean, &rstd);
      for (int64_t c = 0; c < C; ++c) out[c] = (xv[c] - mean) * (rstd * ss[c]) + bs[c];
    }
  });
  return ffi::Error::Success();
}

// dx = rstd * (g * scale - mean_c(g * scale) - xhat * mean_c(g * scale * xhat)),
// dscale = sum_n g * xhat, dbias = sum_n g; partial sums per chunk, added in chunk order.
ffi::Error LayerNormBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> grad,
                             ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                             ffi::ResultBuffer<ffi::F32> dbias, float eps) {
  auto dims = x.dimensions();
  const int64_t C = dims.back(), N = x.element_count() / std::max<int64_t>(C, 1);
  if (static_cast<int64_t>(scale.element_count()) != C ||
      grad.element_count() != x.element_count()) {
    return ffi::Error::InvalidArgument("layer_norm_backward: scale must be [C], grad x's shape");
  }
  const float* xs = x.typed_data();
  const float* ss = scale.typed_data();
  const float* gs = grad.typed_data();
  float* dxs = dx->typed_data();
  const int64_t chunks = (N + kNormRowsPerChunk - 1) / kNormRowsPerChunk;
  std::vector<float> partial(chunks * 2 * C);  // Per chunk: dscale [C], then dbias [C].
  ParallelFor(pool, chunks, [&](int64_t chunk) {
    float* __restrict ds = partial.data() + chunk * 2 * C;
    float* __restrict db = ds + C;
    std::memset(ds, 0, sizeof(float) * 2 * C);
    for (int64_t n = chunk * kNormRowsPerChunk; n < std::min(N, (chunk + 1) * kNormRowsPerChunk);
         ++n) {
      const float* __restrict xv = xs + n * C;
      const float* __restrict gv = gs + n * C;
      float* __restrict out = dxs + n * C;
      float mean, rstd;
      RowStats(xv, C, eps, &mean, &rstd);
      float sum_gs = 0.0f, sum_gsx = 0.0f;
      for (int64_t c = 0; c < C; ++c) {
        const float xhat = (xv[c] - mean) * rstd;
        const float gsc = gv[c] * ss[c];
        sum_gs += gsc;
        sum_gsx += gsc * xhat;
        ds[c] += gv[c] * xhat;
        db[c] += gv[c];
      }
      const float a = sum_gs / C, b = sum_gsx / C;
      for (int64_t c = 0; c < C; ++c) {
        out[c] = rstd * (gv[c] * ss[c] - a - (xv[c] - mean) * rstd * b);
      }
    }
  });
  float* dss = dscale->typed_data();
  float* dbs = dbias->typed_data();
  std::memset(dss, 0, sizeof(float) * C);
  std::memset(dbs, 0, sizeof(float) * C);
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const float* acc = partial.data() + chunk * 2 * C;
    for (int64_t c = 0; c < C; ++c) {
      dss[c] += acc[c];
      dbs[c] += acc[C + c];
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MultimodelDepthwise3x3Forward, Depthwise3x3Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [B, H, W, C]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // kernel [9, C]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias [C]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [B, H, W, C]

XLA_FFI_DEFINE_HANDLER_SYMBOL(MultimodelDepthwise3x3Backward, Depthwise3x3Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [B, H, W, C]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // kernel [9, C]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // grad of y [B, H, W, C]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dx [B, H, W, C]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dkernel [9, C]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dbias [C]

XLA_FFI_DEFINE_HANDLER_SYMBOL(MultimodelMaxPool3x3s2Forward, MaxPool3x3s2Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [B, H, W, C]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y [B, H', W', C]
                                  .Ret<ffi::Buffer<ffi::U8>>());  // winning tap [B, H', W', C]

XLA_FFI_DEFINE_HANDLER_SYMBOL(MultimodelMaxPool3x3s2Backward, MaxPool3x3s2Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()    // winning tap [B, H', W', C]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // grad of y [B, H', W', C]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dx [B, H, W, C]

XLA_FFI_DEFINE_HANDLER_SYMBOL(MultimodelLayerNormForward, LayerNormForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [..., C]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale [C]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias [C]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // y [..., C]
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MultimodelLayerNormBackward, LayerNormBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [..., C]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale [C]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // grad of y [..., C]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dx [..., C]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dscale [C]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dbias [C]
                                  .Attr<float>("eps"));
