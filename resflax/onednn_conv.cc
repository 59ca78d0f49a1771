// oneDNN convolutions as XLA FFI custom calls: forward, backward-data (dx) and backward-weights
// (dw) of one NHWC x HWIO float32 convolution, for `resflax.onednn` (built by it at first use).
//
// oneDNN's wheel ships libdnnl.so without headers, so the few C API functions and enum values
// used here are declared below, copied from oneDNN v3.13's include/oneapi/dnnl/dnnl.h,
// dnnl_common.h and dnnl_types.h (enum values checked against a build with those headers; the
// C API is stable within v3.x).
//
// Per call: look up (or create once, per shape and kind) the primitive, reorder the weights when
// oneDNN prefers a blocked layout for them, execute with a per-thread scratchpad. Activations
// stay NHWC (what XLA holds); weights are HWIO for XLA and `any` for oneDNN.

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

extern "C" {
typedef int dnnl_status_t;
typedef int64_t dnnl_dim_t;
typedef dnnl_dim_t dnnl_dims_t[12];  // DNNL_MAX_NDIMS
typedef struct dnnl_engine* dnnl_engine_t;
typedef struct dnnl_stream* dnnl_stream_t;
typedef struct dnnl_memory_desc* dnnl_memory_desc_t;
typedef const struct dnnl_memory_desc* const_dnnl_memory_desc_t;
typedef struct dnnl_memory* dnnl_memory_t;
typedef struct dnnl_primitive_desc* dnnl_primitive_desc_t;
typedef const struct dnnl_primitive_desc* const_dnnl_primitive_desc_t;
typedef struct dnnl_primitive* dnnl_primitive_t;
typedef const struct dnnl_primitive* const_dnnl_primitive_t;
typedef struct dnnl_primitive_attr* dnnl_primitive_attr_t;
typedef const struct dnnl_primitive_attr* const_dnnl_primitive_attr_t;
typedef struct {
  int arg;
  dnnl_memory_t memory;
} dnnl_exec_arg_t;
typedef struct {
  int major, minor, patch;
  const char* hash;
  unsigned cpu_runtime, gpu_runtime;
} dnnl_version_t;

dnnl_status_t dnnl_engine_create(dnnl_engine_t*, int kind, size_t index);
dnnl_status_t dnnl_stream_create(dnnl_stream_t*, dnnl_engine_t, unsigned flags);
dnnl_status_t dnnl_stream_wait(dnnl_stream_t);
dnnl_status_t dnnl_memory_desc_create_with_tag(dnnl_memory_desc_t*, int ndims,
                                               const dnnl_dims_t dims, int data_type, int tag);
dnnl_status_t dnnl_memory_desc_destroy(dnnl_memory_desc_t);
int dnnl_memory_desc_equal(const_dnnl_memory_desc_t, const_dnnl_memory_desc_t);
size_t dnnl_memory_desc_get_size(const_dnnl_memory_desc_t);
dnnl_status_t dnnl_memory_desc_clone(dnnl_memory_desc_t*, const_dnnl_memory_desc_t);
dnnl_status_t dnnl_memory_create(dnnl_memory_t*, const_dnnl_memory_desc_t, dnnl_engine_t,
                                 void* handle);
dnnl_status_t dnnl_memory_destroy(dnnl_memory_t);
dnnl_status_t dnnl_primitive_attr_create(dnnl_primitive_attr_t*);
dnnl_status_t dnnl_primitive_attr_destroy(dnnl_primitive_attr_t);
dnnl_status_t dnnl_primitive_attr_set_scratchpad_mode(dnnl_primitive_attr_t, int mode);
dnnl_status_t dnnl_convolution_forward_primitive_desc_create(
    dnnl_primitive_desc_t*, dnnl_engine_t, int prop_kind, int alg_kind,
    const_dnnl_memory_desc_t src, const_dnnl_memory_desc_t weights,
    const_dnnl_memory_desc_t bias, const_dnnl_memory_desc_t dst, const dnnl_dims_t strides,
    const dnnl_dims_t dilates, const dnnl_dims_t padding_l, const dnnl_dims_t padding_r,
    const_dnnl_primitive_attr_t);
dnnl_status_t dnnl_convolution_backward_data_primitive_desc_create(
    dnnl_primitive_desc_t*, dnnl_engine_t, int alg_kind, const_dnnl_memory_desc_t diff_src,
    const_dnnl_memory_desc_t weights, const_dnnl_memory_desc_t diff_dst,
    const dnnl_dims_t strides, const dnnl_dims_t dilates, const dnnl_dims_t padding_l,
    const dnnl_dims_t padding_r, const_dnnl_primitive_desc_t hint_fwd,
    const_dnnl_primitive_attr_t);
dnnl_status_t dnnl_convolution_backward_weights_primitive_desc_create(
    dnnl_primitive_desc_t*, dnnl_engine_t, int alg_kind, const_dnnl_memory_desc_t src,
    const_dnnl_memory_desc_t diff_weights, const_dnnl_memory_desc_t diff_bias,
    const_dnnl_memory_desc_t diff_dst, const dnnl_dims_t strides, const dnnl_dims_t dilates,
    const dnnl_dims_t padding_l, const dnnl_dims_t padding_r,
    const_dnnl_primitive_desc_t hint_fwd, const_dnnl_primitive_attr_t);
dnnl_status_t dnnl_reorder_primitive_desc_create(dnnl_primitive_desc_t*,
                                                 const_dnnl_memory_desc_t src, dnnl_engine_t,
                                                 const_dnnl_memory_desc_t dst, dnnl_engine_t,
                                                 const_dnnl_primitive_attr_t);
const_dnnl_memory_desc_t dnnl_primitive_desc_query_md(const_dnnl_primitive_desc_t, int what,
                                                      int index);
dnnl_status_t dnnl_primitive_desc_query(const_dnnl_primitive_desc_t, int what, int index,
                                        void* result);
dnnl_status_t dnnl_primitive_desc_destroy(dnnl_primitive_desc_t);
dnnl_status_t dnnl_primitive_create(dnnl_primitive_t*, const_dnnl_primitive_desc_t);
dnnl_status_t dnnl_primitive_execute(const_dnnl_primitive_t, dnnl_stream_t, int nargs,
                                     const dnnl_exec_arg_t* args);
const dnnl_version_t* dnnl_version(void);
}

namespace {

// Enum values of oneDNN v3.x (dnnl_types.h, dnnl_common_types.h).
constexpr int kSuccess = 0, kCpu = 1, kF32 = 3, kAny = 1, kNhwc = 22, kHwio = 28;
constexpr int kForwardTraining = 64, kConvolutionDirect = 1, kScratchpadUser = 1;
constexpr int kStreamDefault = 1;
constexpr int kQueryImplInfoStr = 8, kQueryWeightsMd = 131, kQueryDiffWeightsMd = 132,
              kQueryScratchpadMd = 136;
constexpr int kArgSrc = 1, kArgDst = 17, kArgWeights = 33, kArgScratchpad = 80,
              kArgDiffSrc = 129, kArgDiffDst = 145, kArgDiffWeights = 161, kArgFrom = 1,
              kArgTo = 17;

enum Kind { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };

// Geometry of one convolution: x [n, h, w, c], kernel [kh, kw, c, o], y [n, ho, wo, o].
struct Geometry {
  int64_t n, h, w, c, o, kh, kw, ho, wo;
  int64_t sh, sw, dh, dw, plh, plw, prh, prw;
  auto tie() const {
    return std::tie(n, h, w, c, o, kh, kw, ho, wo, sh, sw, dh, dw, plh, plw, prh, prw);
  }
  bool operator<(const Geometry& other) const { return tie() < other.tie(); }
};

struct MdDeleter {
  void operator()(dnnl_memory_desc* md) const { dnnl_memory_desc_destroy(md); }
};
using Md = std::unique_ptr<dnnl_memory_desc, MdDeleter>;

struct Primitive {
  dnnl_primitive_t conv = nullptr;
  dnnl_primitive_t reorder = nullptr;  // hwio <-> oneDNN's weights layout; null when equal.
  Md user_weights, conv_weights, scratch;
  size_t weights_bytes = 0, scratch_bytes = 0;
  std::string impl;
};

struct Globals {
  dnnl_engine_t engine = nullptr;
  std::mutex mutex;
  std::map<std::pair<int, Geometry>, std::unique_ptr<Primitive>> cache;
};

Globals& globals() {
  static Globals* g = [] {
    auto* g = new Globals;
    if (dnnl_engine_create(&g->engine, kCpu, 0) != kSuccess) g->engine = nullptr;
    return g;
  }();
  return *g;
}

Md make_md(std::initializer_list<int64_t> dims, int tag) {
  dnnl_dims_t d = {};
  int i = 0;
  for (int64_t v : dims) d[i++] = v;
  dnnl_memory_desc_t md = nullptr;
  if (dnnl_memory_desc_create_with_tag(&md, i, d, kF32, tag) != kSuccess) return Md();
  return Md(md);
}

// Creates the primitive of `kind` for `g`; returns an error string, empty on success.
std::string create(int kind, const Geometry& g, Primitive* p) {
  dnnl_engine_t engine = globals().engine;
  if (engine == nullptr) return "oneDNN: no CPU engine";
  // oneDNN's logical orders: activations (N, C, H, W), weights (O, I, H, W).
  Md x = make_md({g.n, g.c, g.h, g.w}, kNhwc);
  Md y = make_md({g.n, g.o, g.ho, g.wo}, kNhwc);
  Md w_any = make_md({g.o, g.c, g.kh, g.kw}, kAny);
  p->user_weights = make_md({g.o, g.c, g.kh, g.kw}, kHwio);
  if (!x || !y || !w_any || !p->user_weights) return "oneDNN: memory descriptor";
  dnnl_dims_t strides = {g.sh, g.sw}, dilates = {g.dh - 1, g.dw - 1};
  dnnl_dims_t pad_l = {g.plh, g.plw}, pad_r = {g.prh, g.prw};
  dnnl_primitive_attr_t attr = nullptr;
  dnnl_primitive_attr_create(&attr);
  dnnl_primitive_attr_set_scratchpad_mode(attr, kScratchpadUser);
  dnnl_primitive_desc_t fwd = nullptr, pd = nullptr;
  dnnl_status_t s = dnnl_convolution_forward_primitive_desc_create(
      &fwd, engine, kForwardTraining, kConvolutionDirect, x.get(), w_any.get(), nullptr,
      y.get(), strides, dilates, pad_l, pad_r, attr);
  if (s == kSuccess && kind == kFwd) {
    pd = fwd;
    fwd = nullptr;
  } else if (s == kSuccess && kind == kBwdData) {
    s = dnnl_convolution_backward_data_primitive_desc_create(
        &pd, engine, kConvolutionDirect, x.get(), w_any.get(), y.get(), strides, dilates,
        pad_l, pad_r, fwd, attr);
  } else if (s == kSuccess) {
    s = dnnl_convolution_backward_weights_primitive_desc_create(
        &pd, engine, kConvolutionDirect, x.get(), w_any.get(), nullptr, y.get(), strides,
        dilates, pad_l, pad_r, fwd, attr);
  }
  dnnl_primitive_attr_destroy(attr);
  if (fwd != nullptr) dnnl_primitive_desc_destroy(fwd);
  if (s != kSuccess) return "oneDNN: convolution primitive descriptor, status " +
                            std::to_string(s);
  const char* impl = nullptr;
  dnnl_primitive_desc_query(pd, kQueryImplInfoStr, 0, &impl);
  p->impl = impl ? impl : "";
  dnnl_memory_desc_t chosen = nullptr;
  dnnl_memory_desc_clone(
      &chosen,
      dnnl_primitive_desc_query_md(pd, kind == kBwdWeights ? kQueryDiffWeightsMd : kQueryWeightsMd,
                                   0));
  p->conv_weights = Md(chosen);
  dnnl_memory_desc_t scratch = nullptr;
  dnnl_memory_desc_clone(&scratch, dnnl_primitive_desc_query_md(pd, kQueryScratchpadMd, 0));
  p->scratch = Md(scratch);
  p->scratch_bytes = dnnl_memory_desc_get_size(scratch);
  s = dnnl_primitive_create(&p->conv, pd);
  dnnl_primitive_desc_destroy(pd);
  if (s != kSuccess) return "oneDNN: convolution primitive, status " + std::to_string(s);
  if (!dnnl_memory_desc_equal(p->user_weights.get(), p->conv_weights.get())) {
    p->weights_bytes = dnnl_memory_desc_get_size(p->conv_weights.get());
    dnnl_primitive_desc_t rpd = nullptr;
    // dw: oneDNN's layout -> HWIO after the convolution; fwd, dx: HWIO -> oneDNN's before.
    const_dnnl_memory_desc_t from = p->user_weights.get(), to = p->conv_weights.get();
    if (kind == kBwdWeights) std::swap(from, to);
    s = dnnl_reorder_primitive_desc_create(&rpd, from, engine, to, engine, nullptr);
    if (s == kSuccess) {
      s = dnnl_primitive_create(&p->reorder, rpd);
      dnnl_primitive_desc_destroy(rpd);
    }
    if (s != kSuccess) return "oneDNN: weights reorder, status " + std::to_string(s);
  }
  return "";
}

Primitive* lookup(int kind, const Geometry& g, std::string* error) {
  Globals& gl = globals();
  std::lock_guard<std::mutex> lock(gl.mutex);
  auto& slot = gl.cache[{kind, g}];
  if (!slot) {
    auto p = std::make_unique<Primitive>();
    *error = create(kind, g, p.get());
    if (!error->empty()) {
      gl.cache.erase({kind, g});
      return nullptr;
    }
    slot = std::move(p);
  }
  return slot.get();
}

struct Memory {
  dnnl_memory_t m = nullptr;
  Memory(const_dnnl_memory_desc_t md, void* data) {
    dnnl_memory_create(&m, md, globals().engine, data);
  }
  ~Memory() {
    if (m) dnnl_memory_destroy(m);
  }
};

// Buffers per thread: XLA may run two custom calls at once; primitives are then safe to share
// (user-managed scratchpad), streams and buffers are not.
struct ThreadState {
  dnnl_stream_t stream = nullptr;
  std::vector<char> scratch, weights;
};

ThreadState& thread_state() {
  thread_local ThreadState t = [] {
    ThreadState t;
    dnnl_stream_create(&t.stream, globals().engine, kStreamDefault);
    return t;
  }();
  return t;
}

ffi::Error run(int kind, const Geometry& g, float* x, float* w, float* y) {
  std::string error;
  Primitive* p = lookup(kind, g, &error);
  if (p == nullptr) return ffi::Error::Internal(error);
  ThreadState& t = thread_state();
  if (t.scratch.size() < p->scratch_bytes) t.scratch.resize(p->scratch_bytes);
  if (t.weights.size() < p->weights_bytes) t.weights.resize(p->weights_bytes);
  Md x_md = make_md({g.n, g.c, g.h, g.w}, kNhwc);
  Md y_md = make_md({g.n, g.o, g.ho, g.wo}, kNhwc);
  Memory xm(x_md.get(), x), ym(y_md.get(), y), wm(p->user_weights.get(), w);
  Memory cw(p->conv_weights.get(), p->reorder ? t.weights.data() : static_cast<void*>(w));
  Memory scratch(p->scratch.get(), t.scratch.data());
  dnnl_status_t s = kSuccess;
  if (p->reorder && kind != kBwdWeights) {
    dnnl_exec_arg_t args[] = {{kArgFrom, wm.m}, {kArgTo, cw.m}};
    s = dnnl_primitive_execute(p->reorder, t.stream, 2, args);
  }
  if (s == kSuccess) {
    dnnl_exec_arg_t args[4];
    if (kind == kFwd) {
      args[0] = {kArgSrc, xm.m}, args[1] = {kArgWeights, cw.m}, args[2] = {kArgDst, ym.m};
    } else if (kind == kBwdData) {
      args[0] = {kArgDiffSrc, xm.m}, args[1] = {kArgWeights, cw.m}, args[2] = {kArgDiffDst, ym.m};
    } else {
      args[0] = {kArgSrc, xm.m}, args[1] = {kArgDiffWeights, cw.m}, args[2] = {kArgDiffDst, ym.m};
    }
    args[3] = {kArgScratchpad, scratch.m};
    s = dnnl_primitive_execute(p->conv, t.stream, p->scratch_bytes ? 4 : 3, args);
  }
  if (s == kSuccess && p->reorder && kind == kBwdWeights) {
    dnnl_exec_arg_t args[] = {{kArgFrom, cw.m}, {kArgTo, wm.m}};
    s = dnnl_primitive_execute(p->reorder, t.stream, 2, args);
  }
  if (s == kSuccess) s = dnnl_stream_wait(t.stream);
  if (s != kSuccess) return ffi::Error::Internal("oneDNN: execute, status " + std::to_string(s));
  return ffi::Error::Success();
}

Geometry geometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> k,
                  ffi::Span<const int64_t> y, ffi::Span<const int64_t> strides,
                  ffi::Span<const int64_t> padding, ffi::Span<const int64_t> dilation) {
  return Geometry{x[0], x[1], x[2], x[3], k[3], k[0], k[1], y[1], y[2],
                  strides[0], strides[1], dilation[0], dilation[1],
                  padding[0], padding[2], padding[1], padding[3]};
}

// y = conv(x, w): x [n, h, w, c], w [kh, kw, c, o] -> y [n, ho, wo, o].
ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, ffi::Span<const int64_t> strides,
                   ffi::Span<const int64_t> padding, ffi::Span<const int64_t> dilation) {
  Geometry g =
      geometry(x.dimensions(), w.dimensions(), y->dimensions(), strides, padding, dilation);
  return run(kFwd, g, x.typed_data(), w.typed_data(), y->typed_data());
}

// dx = (d conv / d x)^T g: g [n, ho, wo, o], w -> dx [n, h, w, c].
ffi::Error BackwardData(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> dx, ffi::Span<const int64_t> strides,
                        ffi::Span<const int64_t> padding, ffi::Span<const int64_t> dilation) {
  Geometry geo =
      geometry(dx->dimensions(), w.dimensions(), g.dimensions(), strides, padding, dilation);
  return run(kBwdData, geo, dx->typed_data(), w.typed_data(), g.typed_data());
}

// dw = (d conv / d w)^T g: x, g -> dw [kh, kw, c, o].
ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                           ffi::ResultBuffer<ffi::F32> dw, ffi::Span<const int64_t> strides,
                           ffi::Span<const int64_t> padding, ffi::Span<const int64_t> dilation) {
  Geometry geo =
      geometry(x.dimensions(), dw->dimensions(), g.dimensions(), strides, padding, dilation);
  return run(kBwdWeights, geo, x.typed_data(), dw->typed_data(), g.typed_data());
}

}  // namespace

#define RESFLAX_BIND                                        \
  ffi::Ffi::Bind()                                          \
      .Arg<ffi::Buffer<ffi::F32>>()                         \
      .Arg<ffi::Buffer<ffi::F32>>()                         \
      .Ret<ffi::Buffer<ffi::F32>>()                         \
      .Attr<ffi::Span<const int64_t>>("window_strides")     \
      .Attr<ffi::Span<const int64_t>>("padding")            \
      .Attr<ffi::Span<const int64_t>>("rhs_dilation")

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResflaxOnednnConvForward, Forward, RESFLAX_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResflaxOnednnConvBackwardData, BackwardData, RESFLAX_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResflaxOnednnConvBackwardWeights, BackwardWeights,
                              RESFLAX_BIND);

// The implementation oneDNN chose for (kind, geometry), for benchmarks; creates the primitive.
extern "C" const char* resflax_onednn_impl(int kind, const int64_t* v) {
  Geometry g{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8],
             v[9], v[10], v[11], v[12], v[13], v[14], v[15], v[16]};
  std::string error;
  Primitive* p = lookup(kind, g, &error);
  static thread_local std::string out;
  out = p ? p->impl + (p->reorder ? " (+weights reorder)" : "") : error;
  return out.c_str();
}

extern "C" int resflax_onednn_version(int* major_minor_patch_runtime) {
  const dnnl_version_t* v = dnnl_version();
  major_minor_patch_runtime[0] = v->major;
  major_minor_patch_runtime[1] = v->minor;
  major_minor_patch_runtime[2] = v->patch;
  major_minor_patch_runtime[3] = static_cast<int>(v->cpu_runtime);
  return globals().engine != nullptr;
}
