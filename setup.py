"""The compiled parts: the trusted app's C kernels - restore / push (tee_sim/ta_shadownet_kernels.c, its
linear maps in ta_shadownet_linear_map.h),
Freivalds' check (ta_shadownet_freivalds.c, ta_shadownet_freivalds_check.c and ta_shadownet_lanes.h), max
pool, depthwise convolution and the small ops (ta_shadownet_max_pool.c, ta_shadownet_depthwise.c,
ta_shadownet_small_ops.c), what its pool refills compute
(ta_shadownet_pool.c), sharing ta_shadownet_kernels.h - and the secure world's fast path
(tee_sim/secure_world_fast.c); plain C, loaded with ctypes. Everything else is configured in pyproject.toml.

On x86-64 the kernels are built three times: for the baseline (SSE2), for AVX2 with FMA and for AVX-512,
each with its own vector width (SN_VL); tee_sim.ta_shadownet_kernels loads the best one this CPU runs, as
the baseline build reports it. (GCC's function clones cannot vary a vector type's width, and a 16-float
vector compiled for AVX2 ran the restores 3x slower than 8-float ones.)"""

import platform

from setuptools import Extension, setup

# -O3 for the vector loops; IEEE semantics kept (no -ffast-math): results stay comparable with LiteRT's
# float kernels, and NaN/inf behave as in numpy.
KERNEL_FLAGS = ["-O3", "-std=c11", "-ffp-contract=fast", "-fno-math-errno", "-Wno-psabi"]
KERNEL_SOURCES = tuple(f"tee_sim/ta_shadownet_{name}.c" for name in
                       ("kernels", "freivalds", "freivalds_check", "max_pool", "depthwise", "small_ops",
                        "pool"))
KERNEL_HEADERS = ["tee_sim/ta_shadownet_kernels.h", "tee_sim/ta_shadownet_lanes.h",
                  "tee_sim/ta_shadownet_linear_map.h"]
AVX2 = ["-mavx2", "-mfma"]  # what sn_cpu_level checks
AVX512 = [*AVX2, "-mavx512f", "-mavx512bw", "-mavx512cd", "-mavx512dq", "-mavx512vl"]


def kernels(suffix: str, flags: list[str], lanes: int) -> Extension:
    return Extension(f"tee_sim._ta_shadownet_kernels{suffix}", sources=list(KERNEL_SOURCES),
                     depends=KERNEL_HEADERS, libraries=["m"], define_macros=[("SN_VL", str(lanes))],
                     extra_compile_args=[*KERNEL_FLAGS, *flags])


extensions = [kernels("", [], 4)]
if platform.machine().lower() in ("x86_64", "amd64"):
    extensions += [kernels("_avx2", AVX2, 8), kernels("_avx512", AVX512, 16)]

setup(
    ext_modules=[
        *extensions,
        # The secure world's fast path for prepared step commands (tee_sim/secure_world_fast.c).
        Extension("tee_sim._secure_world_fast", sources=["tee_sim/secure_world_fast.c"],
                  extra_compile_args=["-O2", "-std=c11"]),
    ],
)
