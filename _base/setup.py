"""Build hook: compile oneside's NVSHMEM shim at install time where CUDA and NVSHMEM are visible.

Everything else is in pyproject.toml. Without CUDA headers or the nvidia-nvshmem-cu13 wheel in
the build environment (e.g. CPU machines, or pip's isolated builds), nothing is compiled and the
shim is built on first use instead.
"""
import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithShim(build_py):
    def run(self) -> None:
        super().run()
        here = Path(__file__).resolve().parent / "oneside" / "native" / "_build.py"
        spec = importlib.util.spec_from_file_location("_oneside_native_build", here)
        try:
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            so = mod.compile_into(Path(self.build_lib) / "oneside" / "native")
            print(f"oneside: built the NVSHMEM shim at install: {so}")
        except Exception as e:  # never fail the install for the optional GPU shim
            print(f"oneside: NVSHMEM shim not built at install ({e}); it builds on first use")


setup(cmdclass={"build_py": BuildPyWithShim})
