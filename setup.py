"""Build the compiled kernels.

Environment variables (all optional):

* ``NNFAST_OPENMP=0``  build without OpenMP (serial kernels). By default OpenMP is
  used when a small test program compiles and links with ``-fopenmp``; otherwise the
  build warns and falls back to the serial build.
* ``NNFAST_NATIVE=1``  add ``-march=native`` (faster hand loops, non-portable binary).
* ``NNFAST_DEBUG=1``   Cython bounds checks and wraparound on, ``-O0 -g``.
"""
import os
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


def _openmp_works(compiler="cc"):
    """Compile and link a tiny OpenMP program; True when that succeeds."""
    src = "#include <omp.h>\nint main(void){int n=0;\n#pragma omp parallel reduction(+:n)\nn+=1;\nreturn n>0?0:1;}\n"
    tmp = tempfile.mkdtemp()
    try:
        c_file = os.path.join(tmp, "t.c")
        with open(c_file, "w") as f:
            f.write(src)
        cc = os.environ.get("CC", compiler)
        res = subprocess.run([cc, "-fopenmp", c_file, "-o", os.path.join(tmp, "t")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return res.returncode == 0
    except OSError:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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

extensions = [
    Extension(
        "nnfast._kernels",
        ["nnfast/_kernels.pyx"],
        include_dirs=[numpy.get_include()],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
]

setup(
    ext_modules=cythonize(extensions, compiler_directives=directives),
)
