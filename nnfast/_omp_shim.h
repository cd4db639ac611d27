/* OpenMP when the build has it, single-thread stand-ins when it does not, so the
 * kernels compile unchanged either way (setup.py decides with -fopenmp). */
#ifndef NNFAST_OMP_SHIM_H
#define NNFAST_OMP_SHIM_H
#ifdef _OPENMP
#include <omp.h>
static int nnf_openmp_enabled(void) { return 1; }
static int nnf_omp_max_threads(void) { return omp_get_max_threads(); }
#else
static int nnf_openmp_enabled(void) { return 0; }
static int nnf_omp_max_threads(void) { return 1; }
#endif
#endif
