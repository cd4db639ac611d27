/* Reductions the compiler may vectorise: `omp simd reduction` licenses reassociation
 * (enabled by -fopenmp or -fopenmp-simd; without either the loops stay scalar). */
#ifndef NNFAST_SIMD_H
#define NNFAST_SIMD_H
static inline float nnf_sdot(const float *a, const float *b, long n) {
    float s = 0.0f;
    #pragma omp simd reduction(+:s)
    for (long i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}
static inline double nnf_ddot(const double *a, const double *b, long n) {
    double s = 0.0;
    #pragma omp simd reduction(+:s)
    for (long i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}
/* y += alpha * x */
static inline void nnf_saxpy(float *y, float alpha, const float *x, long n) {
    #pragma omp simd
    for (long i = 0; i < n; i++) y[i] += alpha * x[i];
}
static inline void nnf_daxpy(double *y, double alpha, const double *x, long n) {
    #pragma omp simd
    for (long i = 0; i < n; i++) y[i] += alpha * x[i];
}
#endif
