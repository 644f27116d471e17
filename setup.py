"""The one compiled part: the trusted app's C kernels - restore / push and Freivalds' check (plain C, loaded
with ctypes; see tee_sim/ta_shadownet_kernels.c). Everything else is configured in pyproject.toml."""

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
        )
    ],
)
