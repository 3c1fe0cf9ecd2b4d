/* A cblas_sgemm that times every call and sums the time per product shape.
 *
 * Preloaded (LD_PRELOAD) into a Python process, it takes MLX's cblas_sgemm calls and passes
 * each to a BLAS library loaded privately (RTLD_LOCAL | RTLD_DEEPBIND, as blas_switch.c
 * does), timing it with the monotonic clock. blas_trace.py reads the table through the
 * functions below: how much of a decoding step each kind of matrix product costs.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);

#define MAX_SHAPES 512

struct shape {
    int m, n, k, trans_a, trans_b;
    long calls;
    double seconds;
};

static sgemm_fn real_sgemm = NULL;
static struct shape shapes[MAX_SHAPES];
static int num_shapes = 0;
static long untraced = 0; /* calls past MAX_SHAPES distinct shapes */

/* 0 on success; call once, before the first product. */
int blas_trace_load(const char *path) {
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
    if (lib == NULL) {
        fprintf(stderr, "blas_trace: %s\n", dlerror());
        return -1;
    }
    real_sgemm = (sgemm_fn)dlsym(lib, "cblas_sgemm");
    if (real_sgemm == NULL) fprintf(stderr, "blas_trace: %s has no cblas_sgemm\n", path);
    return real_sgemm != NULL ? 0 : -1;
}

void blas_trace_reset(void) {
    num_shapes = 0;
    untraced = 0;
}

int blas_trace_count(void) { return num_shapes; }

long blas_trace_untraced(void) { return untraced; }

/* Shape i: dims = (M, N, K, trans_a, trans_b); 0 on success. */
int blas_trace_get(int i, int *dims, long *calls, double *seconds) {
    if (i < 0 || i >= num_shapes) return -1;
    dims[0] = shapes[i].m;
    dims[1] = shapes[i].n;
    dims[2] = shapes[i].k;
    dims[3] = shapes[i].trans_a;
    dims[4] = shapes[i].trans_b;
    *calls = shapes[i].calls;
    *seconds = shapes[i].seconds;
    return 0;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* MLX runs its kernels on one worker thread, so the table needs no lock. */
void cblas_sgemm(int order, int trans_a, int trans_b, int M, int N, int K, float alpha,
                 const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    if (real_sgemm == NULL) {
        fprintf(stderr, "blas_trace: cblas_sgemm called before blas_trace_load succeeded\n");
        abort();
    }
    double start = now();
    real_sgemm(order, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    double elapsed = now() - start;
    int i = 0;
    while (i < num_shapes && !(shapes[i].m == M && shapes[i].n == N && shapes[i].k == K &&
                               shapes[i].trans_a == trans_a && shapes[i].trans_b == trans_b))
        i++;
    if (i == num_shapes) {
        if (num_shapes == MAX_SHAPES) {
            untraced++;
            return;
        }
        shapes[i] = (struct shape){M, N, K, trans_a, trans_b, 0, 0.0};
        num_shapes++;
    }
    shapes[i].calls++;
    shapes[i].seconds += elapsed;
}
