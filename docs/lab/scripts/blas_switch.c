/* A cblas_sgemm that routes each call by its row count to one of two BLAS libraries.
 *
 * Preloaded (LD_PRELOAD) into a Python process, it takes MLX's cblas_sgemm calls: products
 * with M <= the row limit go to the "small" library, the rest to the "large" one. Both are
 * loaded privately (RTLD_LOCAL | RTLD_DEEPBIND), so they coexist in one process and the limit
 * can change between generations: blas_choice.py compares BLAS libraries in one process, on
 * the same weights, with the settings interleaved. Only float32 GEMM is routed.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);

static sgemm_fn small_sgemm = NULL, large_sgemm = NULL;
static int small_rows = -1; /* products with M <= small_rows take the small library */

static sgemm_fn load_sgemm(const char *path) {
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
    if (lib == NULL) {
        fprintf(stderr, "blas_switch: %s\n", dlerror());
        return NULL;
    }
    sgemm_fn f = (sgemm_fn)dlsym(lib, "cblas_sgemm");
    if (f == NULL) fprintf(stderr, "blas_switch: %s has no cblas_sgemm\n", path);
    return f;
}

/* Load one side (0: small, 1: large); 0 on success. A library reads its environment when it
 * loads, so a caller can change the environment between the two sides (blas_timeout.py). */
int blas_switch_load_one(int large, const char *path) {
    sgemm_fn f = load_sgemm(path);
    if (large)
        large_sgemm = f;
    else
        small_sgemm = f;
    return f != NULL ? 0 : -1;
}

/* 0 on success; call once, before the first product. */
int blas_switch_load(const char *small_path, const char *large_path) {
    int small_ok = blas_switch_load_one(0, small_path);
    int large_ok = blas_switch_load_one(1, large_path);
    return (small_ok == 0 && large_ok == 0) ? 0 : -1;
}

void blas_switch_set_rows(int rows) { small_rows = rows; }

void cblas_sgemm(int order, int trans_a, int trans_b, int M, int N, int K, float alpha,
                 const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    sgemm_fn f = (M <= small_rows) ? small_sgemm : large_sgemm;
    if (f == NULL) {
        fprintf(stderr, "blas_switch: cblas_sgemm called before blas_switch_load succeeded\n");
        abort();
    }
    f(order, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
