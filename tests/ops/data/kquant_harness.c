/* Golden-vector harness for modelkit's K-quantizer tests.
 *
 * Reads float32 values (a whole number of 256-value super-blocks) from stdin and writes, for
 * Q2_K, Q3_K, Q4_K, Q5_K and Q6_K in that order, the bytes of ggml's reference quantizers
 * (quantize_row_qN_K_ref: what llama-quantize uses when no importance matrix is given) to stdout.
 *
 * Build it against ggml's own sources (ggml/src/ggml-quants.c with its headers), e.g.
 *   gcc -O2 -ffp-contract=off -DNDEBUG -Iggml/include -Iggml/src \
 *       kquant_harness.c ggml/src/ggml-quants.c -lm -o kquant_harness
 * The stubs below satisfy the symbols ggml-quants.c refers to outside the functions used here.
 */
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <stddef.h>

#include "ggml-common.h"
#include "ggml-quants.h"

/* ---- stubs for symbols of the wider ggml library (never called by the reference quantizers) */
void ggml_abort(const char *file, int line, const char *fmt, ...) {
    fprintf(stderr, "ggml_abort at %s:%d (%s)\n", file, line, fmt);
    abort();
}
size_t ggml_row_size(enum ggml_type type, int64_t ne) { (void)type; (void)ne; abort(); }
const char *ggml_type_name(enum ggml_type type) { (void)type; return "?"; }
size_t ggml_type_size(enum ggml_type type) { (void)type; abort(); }

int main(void) {
    size_t cap = 1 << 20, n = 0;
    float *x = malloc(cap * sizeof(float));
    size_t got;
    while ((got = fread(x + n, sizeof(float), cap - n, stdin)) > 0) {
        n += got;
        if (n == cap) {
            cap *= 2;
            x = realloc(x, cap * sizeof(float));
        }
    }
    if (n % QK_K != 0) {
        fprintf(stderr, "%zu values: not a whole number of %d-value blocks\n", n, QK_K);
        return 1;
    }
    const int64_t nb = (int64_t)(n / QK_K);
    block_q2_K *q2 = malloc(nb * sizeof(block_q2_K));
    block_q3_K *q3 = malloc(nb * sizeof(block_q3_K));
    block_q4_K *q4 = malloc(nb * sizeof(block_q4_K));
    block_q5_K *q5 = malloc(nb * sizeof(block_q5_K));
    block_q6_K *q6 = malloc(nb * sizeof(block_q6_K));
    quantize_row_q2_K_ref(x, q2, (int64_t)n);
    quantize_row_q3_K_ref(x, q3, (int64_t)n);
    quantize_row_q4_K_ref(x, q4, (int64_t)n);
    quantize_row_q5_K_ref(x, q5, (int64_t)n);
    quantize_row_q6_K_ref(x, q6, (int64_t)n);
    fwrite(q2, sizeof(block_q2_K), nb, stdout);
    fwrite(q3, sizeof(block_q3_K), nb, stdout);
    fwrite(q4, sizeof(block_q4_K), nb, stdout);
    fwrite(q5, sizeof(block_q5_K), nb, stdout);
    fwrite(q6, sizeof(block_q6_K), nb, stdout);
    return 0;
}
