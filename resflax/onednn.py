"""oneDNN's convolutions (what PyTorch runs on CPU) as XLA custom calls, optional.

    pip install -e '.[onednn]'    # the oneDNN wheel (libdnnl.so); g++ builds the shim at first use

Three float32 calls on one convolution's geometry (strides `s`, padding `p`, kernel dilation `r`;
x `[B, H, W, Ci]`, w `[kh, kw, Ci, Co]`, y `[B, H', W', Co]`, all row-major NHWC / HWIO):

    forward(x, w)          = y   = conv(x, w)
    backward_data(g, w)    = dx  = (d conv / d x)^T g      [B, H, W, Ci]
    backward_weights(x, g) = dw  = (d conv / d w)^T g      [kh, kw, Ci, Co]

`resflax.conv` lowers `conv_p` and its two transposes to these on CPU when `available()`.
The C++ shim (`onednn_conv.cc`, its own declarations of oneDNN's C API: the wheel has no headers)
is compiled once into `$RESFLAX_CACHE` (default `~/.cache/resflax`) against the first
`libdnnl.so` found in `$RESFLAX_ONEDNN_LIB`, `<sys.prefix>/lib`, the directories of
`LD_LIBRARY_PATH`. Set `RESFLAX_ONEDNN=0` to never use it. Without libdnnl, `available()` is
False silently; with it but without g++, or when the shim fails to load, one warning says why.
XLA's own convolutions run then.

Threads: oneDNN runs its own pool (OpenMP or TBB/SYCL, per its build) with one thread per core;
the XLA thread that issues the call waits meanwhile, so the two pools do not run at once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np

ENV_SWITCH = "RESFLAX_ONEDNN"
_SOURCE = os.path.join(os.path.dirname(__file__), "onednn_conv.cc")
_TARGETS = {
    "forward": "ResflaxOnednnConvForward",
    "backward_data": "ResflaxOnednnConvBackwardData",
    "backward_weights": "ResflaxOnednnConvBackwardWeights",
}


def _libdnnl_dir() -> str | None:
    dirs = [os.environ.get("RESFLAX_ONEDNN_LIB", ""), os.path.join(sys.prefix, "lib")]
    dirs += os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)
    for d in dirs:
        if d and os.path.exists(os.path.join(d, "libdnnl.so")):
            return os.path.abspath(d)
    return None


def _sycl_cpu_device(lib_dir: str) -> None:
    """oneDNN builds with the SYCL CPU runtime (the `onednn` wheel since 2024) find their CPU
    device through the OpenCL ICD that the wheel installs under `<prefix>/etc`, not `/etc`."""
    icd = os.path.join(os.path.dirname(lib_dir), "etc", "OpenCL", "vendors", "intel-cpu.icd")
    ocl = os.path.join(lib_dir, "libintelocl.so")
    if os.path.exists(icd) and os.path.exists(ocl):
        os.environ.setdefault("OCL_ICD_FILENAMES", ocl)


def _build(lib_dir: str) -> str:
    """Path of the compiled shim for this source, jaxlib and libdnnl; compiles when missing."""
    include = jax.ffi.include_dir()
    with open(_SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + include.encode() + lib_dir.encode()).hexdigest()[:16]
    cache = os.environ.get("RESFLAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                         "resflax"))
    out = os.path.join(cache, f"onednn_conv-{key}.so")
    if os.path.exists(out):
        return out
    gxx = shutil.which(os.environ.get("CXX", "g++"))
    if gxx is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX)")
    os.makedirs(cache, exist_ok=True)
    tmp = f"{out}.{os.getpid()}.tmp"
    # DT_RPATH (not RUNPATH) so that libdnnl's own dependencies (TBB, SYCL) resolve from its
    # directory too; libdnnl's optional SYCL symbols are left to load time.
    cmd = [gxx, "-O2", "-std=c++17", "-shared", "-fPIC", f"-I{include}", _SOURCE, "-o", tmp,
           f"-L{lib_dir}", "-Wl,--disable-new-dtags", f"-Wl,-rpath,{lib_dir}",
           "-Wl,--allow-shlib-undefined", "-ldnnl"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"g++ failed: {proc.stderr[-2000:]}")
    os.replace(tmp, out)
    return out


@functools.lru_cache(maxsize=None)
def _library():
    """The loaded shim with its FFI targets registered, or None (and why, logged once)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    lib_dir = _libdnnl_dir()
    if lib_dir is None:  # The extra is not installed: nothing to say above INFO.
        logging.info("resflax.onednn: libdnnl.so not found; XLA's convolutions run")
        return None
    try:
        _sycl_cpu_device(lib_dir)
        lib = ctypes.CDLL(_build(lib_dir))
        version = (ctypes.c_int * 4)()
        if not lib.resflax_onednn_version(version):
            raise RuntimeError(f"oneDNN {list(version)[:3]}: no CPU engine")
        for name, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(
                f"resflax_onednn_{name}", jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu"
            )
        lib.resflax_onednn_impl.restype = ctypes.c_char_p
        lib.version = tuple(version)
        return lib
    except Exception as e:  # pylint: disable=broad-except
        logging.warning("resflax.onednn: oneDNN in %s not used (%s); XLA's convolutions run",
                        lib_dir, e)
        return None


def available() -> bool:
    """True when oneDNN's convolutions can run here (shim built and loaded, CPU engine made)."""
    return _library() is not None


def version() -> tuple[int, int, int, int]:
    """(major, minor, patch, cpu_runtime) of the loaded oneDNN; cpu_runtime: 2 OpenMP, 4 TBB,
    512 SYCL."""
    return _library().version


def implementation(kind: str, x_shape, w_shape, y_shape, window_strides, padding,
                   rhs_dilation=(1, 1)) -> str:
    """oneDNN's name of the kernel it runs for `kind` on this geometry (creates it), e.g.
    'brg_conv_fwd:avx512_core (+weights reorder)'."""
    kinds = ("forward", "backward_data", "backward_weights")
    geo = [*x_shape, w_shape[3], w_shape[0], w_shape[1], y_shape[1], y_shape[2],
           *window_strides, *rhs_dilation, padding[0][0], padding[1][0], padding[0][1],
           padding[1][1]]
    return _library().resflax_onednn_impl(kinds.index(kind), (ctypes.c_int64 * 17)(*geo)).decode()


def _attrs(window_strides, padding, rhs_dilation):
    return dict(
        window_strides=np.asarray(window_strides, np.int64),
        padding=np.asarray([padding[0][0], padding[0][1], padding[1][0], padding[1][1]],
                           np.int64),
        rhs_dilation=np.asarray(rhs_dilation, np.int64),
    )


def forward(x, w, y_shape, *, window_strides, padding, rhs_dilation):
    """y [B, H', W', Co] = conv(x, w)."""
    out = jax.ShapeDtypeStruct(tuple(y_shape), x.dtype)
    return jax.ffi.ffi_call("resflax_onednn_forward", out)(
        x, w, **_attrs(window_strides, padding, rhs_dilation))


def backward_data(g, w, x_shape, *, window_strides, padding, rhs_dilation):
    """dx [B, H, W, Ci] = (d conv / d x)^T g."""
    out = jax.ShapeDtypeStruct(tuple(x_shape), g.dtype)
    return jax.ffi.ffi_call("resflax_onednn_backward_data", out)(
        g, w, **_attrs(window_strides, padding, rhs_dilation))


def backward_weights(x, g, w_shape, *, window_strides, padding, rhs_dilation):
    """dw [kh, kw, Ci, Co] = (d conv / d w)^T g."""
    out = jax.ShapeDtypeStruct(tuple(w_shape), x.dtype)
    return jax.ffi.ffi_call("resflax_onednn_backward_weights", out)(
        x, g, **_attrs(window_strides, padding, rhs_dilation))
