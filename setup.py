"""Build the compiled kernels.

Environment variables (all optional):

* ``NNFAST_OPENMP=0``  build without OpenMP (serial kernels). By default OpenMP is
  used when a small test program compiles and links with ``-fopenmp``; otherwise the
  build warns and falls back to the serial build.
* ``NNFAST_NATIVE=1``  add ``-march=native`` (faster hand loops, non-portable binary).
* ``NNFAST_DEBUG=1``   Cython bounds checks and wraparound on, ``-O0 -g``.
* ``NNFAST_AVX2=0``    skip the AVX2+FMA build of the kernels. By default, on x86-64
  with a compiler that takes ``-mavx2 -mfma``, the kernels are compiled twice:
  ``nnfast._kernels`` for any CPU and ``nnfast._kernels_avx2``, which
  ``nnfast._compiled`` picks at import when the CPU runs AVX2 and FMA.
* ``NNFAST_AVX512=0``  skip the third build, ``nnfast._kernels_avx512`` (``-mavx512f
  -mavx512dq -mavx512bw -mavx512vl`` as well), picked over the AVX2 one on CPUs that
  run those (its hand matrix products use 512-bit tiles).
"""
import glob
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings

import numpy
import scipy  # noqa: F401  (cython_blas .pxd ships with SciPy)
from Cython.Build import cythonize
from setuptools import Extension, setup


def _env_flag(name, default):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def _compiles(src, flags, compiler="cc"):
    """Compile and link a tiny C program with ``flags``; True when that succeeds."""
    tmp = tempfile.mkdtemp()
    try:
        c_file = os.path.join(tmp, "t.c")
        with open(c_file, "w") as f:
            f.write(src)
        cc = os.environ.get("CC", compiler)
        res = subprocess.run([cc, *flags, c_file, "-o", os.path.join(tmp, "t")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return res.returncode == 0
    except OSError:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _openmp_works():
    src = ("#include <omp.h>\nint main(void){int n=0;\n#pragma omp parallel reduction(+:n)\n"
           "n+=1;\nreturn n>0?0:1;}\n")
    return _compiles(src, ["-fopenmp"])


def _avx2_works():
    """x86-64 and a compiler that builds AVX2+FMA code (running it is decided at import)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    src = ("#include <immintrin.h>\nint main(void){__m256 a=_mm256_set1_ps(1.f);"
           "a=_mm256_fmadd_ps(a,a,a);return (int)_mm256_cvtss_f32(a)-3;}\n")
    return _compiles(src, ["-mavx2", "-mfma"])


use_openmp = _env_flag("NNFAST_OPENMP", True)
if use_openmp and not _openmp_works():
    warnings.warn("nnfast: OpenMP not found (a test program failed to build with -fopenmp); "
                  "building the serial kernels.")
    use_openmp = False
if not use_openmp:
    print("nnfast: building WITHOUT OpenMP (serial kernels)", file=sys.stderr)

debug = _env_flag("NNFAST_DEBUG", False)
native = _env_flag("NNFAST_NATIVE", False)

compile_args = ["-O0", "-g"] if debug else ["-O3"]
link_args = []
if native:
    compile_args.append("-march=native")
if use_openmp:
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")
else:
    compile_args.append("-fopenmp-simd")  # SIMD pragmas only: no OpenMP runtime needed

directives = {
    "language_level": 3,
    "boundscheck": debug,
    "wraparound": debug,
    "cdivision": True,
    "initializedcheck": debug,
    "nonecheck": debug,
}



def _kernels_extension(name, extra_args=()):
    return Extension(
        f"nnfast.{name}",
        [f"nnfast/{name}.pyx"],
        # the C helpers and the shared kernel source: edits to them rebuild every build
        depends=["nnfast/_kernels.pyx", *sorted(glob.glob("nnfast/_kernels_*.pxi")),
                 "nnfast/_simd.h", "nnfast/_smallgemm.h", "nnfast/_omp_shim.h",
                 "nnfast/_hugealloc.h"],
        include_dirs=[numpy.get_include()],
        extra_compile_args=compile_args + list(extra_args),
        extra_link_args=link_args,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )


AVX512_FLAGS = ["-mavx2", "-mfma", "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl"]


def _avx512_works():
    """A compiler that builds the AVX-512 kernels (x86-64-v4's subsets)."""
    src = ("#include <immintrin.h>\nint main(void){__m512 a=_mm512_set1_ps(1.f);"
           "a=_mm512_fmadd_ps(a,a,a);return (int)_mm512_reduce_add_ps(a)-48;}\n")
    return _compiles(src, AVX512_FLAGS)


extensions = [_kernels_extension("_kernels")]
if _env_flag("NNFAST_AVX2", True) and not native:
    if _avx2_works():
        extensions.append(_kernels_extension("_kernels_avx2", ["-mavx2", "-mfma"]))
        if _env_flag("NNFAST_AVX512", True) and _avx512_works():
            extensions.append(_kernels_extension("_kernels_avx512", AVX512_FLAGS))
    else:
        print("nnfast: not building the AVX2 kernels (not x86-64, or the compiler "
              "refused -mavx2 -mfma)", file=sys.stderr)

setup(
    ext_modules=cythonize(extensions, compiler_directives=directives),
)
