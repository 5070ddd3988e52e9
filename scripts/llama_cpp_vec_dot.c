/* llama.cpp's own CPU dot products for one MoE layer's E experts, one activation row each (a decode step), one
   thread: the vec_dot of the weights' type (libggml-cpu of the shared llama-cpp-python wheel) over gate_up
   [2F rows of D] and down [D rows of F] of each expert, the activation rounded to the type's vec_dot_type first,
   as llama.cpp's mul_mat_id does without its threading and scheduling. Weights: random values quantized by
   ggml's own quantizer (an importance matrix of ones, which IQ2_XXS requires). Prints the best of 7 rounds in ms
   of CPU time, for the same shape as `scripts/iq_experts_ab.py --threads 1` (moe-local's experts_ggml).

   L=$(python -c "import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__) + '/lib')")
   cc -O2 scripts/llama_cpp_vec_dot.c -o /tmp/llama_cpp_vec_dot -L$L -lggml-cpu -lggml-base -Wl,-rpath,$L
   /tmp/llama_cpp_vec_dot TYPE D F E   # TYPE: ggml's number (2 Q4_0, 12 Q4_K, 16 IQ2_XXS, 18 IQ3_XXS) */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

typedef void (*vec_dot_t)(int n, float* s, size_t bs, const void* x, size_t bx, const void* y, size_t by, int nrc);
typedef void (*from_float_t)(const float* x, void* y, int64_t k);
struct traits { from_float_t from_float; vec_dot_t vec_dot; int vec_dot_type; int64_t nrows; }; /* ggml-cpu.h's ggml_type_traits_cpu */
const struct traits* ggml_get_type_traits_cpu(int type);
void ggml_cpu_init(void);
void ggml_quantize_init(int type);
size_t ggml_quantize_chunk(int type, const float* src, void* dst, int64_t start, int64_t nrows, int64_t n_per_row, const float* imatrix);
size_t ggml_row_size(int type, int64_t ne);

static double cpu_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}

int main(int argc, char** argv) {
    if (argc != 5) return fprintf(stderr, "usage: %s TYPE D F E\n", argv[0]), 1;
    const int type = atoi(argv[1]), D = atoi(argv[2]), F = atoi(argv[3]), E = atoi(argv[4]);
    ggml_cpu_init();
    ggml_quantize_init(type);
    const struct traits* weights = ggml_get_type_traits_cpu(type);
    const from_float_t round_row = ggml_get_type_traits_cpu(weights->vec_dot_type)->from_float;
    const size_t row_d = ggml_row_size(type, D), row_f = ggml_row_size(type, F);
    float* w = malloc(sizeof(float) * (size_t)D * 2 * F);
    float* ones = malloc(sizeof(float) * D);
    for (int i = 0; i < D; i++) ones[i] = 1.f;
    srand(1);
    for (size_t i = 0; i < (size_t)D * 2 * F; i++) w[i] = (rand() / (float)RAND_MAX - 0.5f) * 0.05f;
    uint8_t *gate_up = malloc(row_d * 2 * F * E), *down = malloc(row_f * D * E);
    for (int e = 0; e < E; e++) {
        ggml_quantize_chunk(type, w, gate_up + row_d * 2 * F * e, 0, 2 * F, D, ones);
        ggml_quantize_chunk(type, w, down + row_f * D * e, 0, D, F, ones);
    }
    float *x = malloc(sizeof(float) * D), *h = malloc(sizeof(float) * 2 * F), *y = malloc(sizeof(float) * D);
    for (int i = 0; i < D; i++) x[i] = rand() / (float)RAND_MAX - 0.5f;
    uint8_t *xq = malloc(ggml_row_size(weights->vec_dot_type, D)), *hq = malloc(ggml_row_size(weights->vec_dot_type, F));
    double best = 1e30;
    for (int round = 0; round < 7; round++) {
        const double start = cpu_ms();
        for (int repeat = 0; repeat < 10; repeat++)
            for (int e = 0; e < E; e++) {
                round_row(x, xq, D);
                for (int n = 0; n < 2 * F; n++) weights->vec_dot(D, h + n, 0, gate_up + row_d * (2 * F * e + n), 0, xq, 0, 1);
                round_row(h, hq, F); /* (gate's values stand in for silu(gate) * up: the same rounding work) */
                for (int n = 0; n < D; n++) weights->vec_dot(F, y + n, 0, down + row_f * (D * e + n), 0, hq, 0, 1);
            }
        const double ms = (cpu_ms() - start) / 10;
        best = ms < best ? ms : best;
    }
    printf("%.2f\n", best);
    return 0;
}
