"""The compiled parts: the trusted app's C kernels - restore / push and Freivalds' check (tee_sim/
ta_shadownet_kernels.c) - and the secure world's fast path (tee_sim/secure_world_fast.c); plain C, loaded
with ctypes. Everything else is configured in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tee_sim._ta_shadownet_kernels",
            sources=["tee_sim/ta_shadownet_kernels.c"],
            # -O3 for the vector loops; IEEE semantics kept (no -ffast-math): results stay comparable with
            # LiteRT's float kernels, and NaN/inf behave as in numpy.
            libraries=["m"],
            extra_compile_args=["-O3", "-std=c11", "-ffp-contract=fast", "-fno-math-errno", "-Wno-psabi"],
        ),
        # The secure world's fast path for prepared step commands (tee_sim/secure_world_fast.c).
        Extension("tee_sim._secure_world_fast", sources=["tee_sim/secure_world_fast.c"],
                  extra_compile_args=["-O2", "-std=c11"]),
    ],
)
