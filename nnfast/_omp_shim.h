/* OpenMP when the build has it, single-thread stand-ins when it does not, so the
 * kernels compile unchanged either way (setup.py decides with -fopenmp). */
#ifndef NNFAST_OMP_SHIM_H
#define NNFAST_OMP_SHIM_H
#ifdef _OPENMP
#include <omp.h>
static int nnf_openmp_enabled(void) { return 1; }
static int nnf_omp_max_threads(void) { return omp_get_max_threads(); }
/* for code that runs in every thread of a team (Cython's `parallel()` block): its
 * thread number, the team's size, and a barrier that binds to the enclosing team.
 * Outside a parallel region they answer 0, 1 and do nothing. */
static int nnf_thread_num(void) { return omp_get_thread_num(); }
static int nnf_team_size(void) { return omp_get_num_threads(); }
static void nnf_barrier(void) {
    #pragma omp barrier
}
#else
static int nnf_openmp_enabled(void) { return 0; }
static int nnf_omp_max_threads(void) { return 1; }
static int nnf_thread_num(void) { return 0; }
static int nnf_team_size(void) { return 1; }
static void nnf_barrier(void) {}
#endif

/* 1 when this CPU (and the OS, which must save the YMM registers) runs AVX2 and FMA
 * code: GCC's and Clang's __builtin_cpu_supports check both. Other compilers and
 * other architectures answer 0, so only the portable kernels are used there. */
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
static int nnf_cpu_has_avx2_fma(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
/* the AVX-512 subsets the _kernels_avx512 build is compiled for (x86-64-v4); GCC's
 * runtime answers no where the OS does not save the 512-bit registers (XCR0) */
static int nnf_cpu_has_avx512(void) {
    __builtin_cpu_init();
    return nnf_cpu_has_avx2_fma() && __builtin_cpu_supports("avx512f")
        && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl");
}
#else
static int nnf_cpu_has_avx2_fma(void) { return 0; }
static int nnf_cpu_has_avx512(void) { return 0; }
#endif

/* the instruction set this translation unit was compiled for */
static const char *nnf_compiled_isa(void) {
#if defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
    return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2";
#else
    return "generic";
#endif
}
#endif
