// Micro-benchmark of matvec_tile on the weight shapes of one Qwen3-30B-A3B
// layer at T = 1, each kernel launched 200 times with programmatic dependent
// launch inside one CUDA graph (as the runtime's graph mode), over rotating
// copies of its weights (1 GiB, so each launch reads HBM), beside a plain read
// of the same bytes (the ceiling at this size). Prints microseconds per launch.
// Build and run: bash tools/matvec_micro.sh (nvcc, an sm_90 GPU).
#include <cstdio>
#include <vector>
#include <cuda_runtime.h>
#define uint64_t tf_u64
#define int64_t tf_i64
#include "matvec.cuh"
#undef uint64_t
#undef int64_t
using tf::bf16;
static cudaStream_t g_stream;
// Times `body` (200 launches) replayed as one CUDA graph: microseconds per launch.
template <class B> double graph_time(B body) {
    cudaGraph_t g;
    cudaGraphExec_t ge;
    cudaStreamBeginCapture(g_stream, cudaStreamCaptureModeGlobal);
    for (int i = 0; i < 200; ++i) body(i);
    cudaStreamEndCapture(g_stream, &g);
    cudaGraphInstantiate(&ge, g, 0);
    cudaGraphLaunch(ge, g_stream);
    cudaStreamSynchronize(g_stream);
    cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
    cudaEventRecord(a, g_stream);
    for (int r = 0; r < 5; ++r) cudaGraphLaunch(ge, g_stream);
    cudaEventRecord(b, g_stream); cudaEventSynchronize(b);
    float ms; cudaEventElapsedTime(&ms, a, b);
    cudaGraphExecDestroy(ge); cudaGraphDestroy(g);
    return ms * 1e3 / 1000.0;
}
template <class F, class... A> void launch(F f, int grid, int smem, A... a) {
    cudaLaunchConfig_t cfg = {};
    cfg.stream = g_stream;
    cfg.gridDim = dim3(grid);
    cfg.blockDim = dim3(256);
    cfg.dynamicSmemBytes = smem;
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = at;
    cfg.numAttrs = 1;
    cudaLaunchKernelEx(&cfg, f, a...);
}


template <class C, class W, int MB>
__global__ __launch_bounds__(256, MB) void kern(const bf16* x, const bf16* gamma, W w, bf16* y, int N) {
    extern __shared__ __align__(16) char smem[];
    tf::grid_dependency_wait();
    tf::launch_dependents();
    tf::matvec_tile<C>(blockIdx.x, x, 0, 1, gamma, 1e-6f, w, N,
                       [&](int t, int n, float a) { y[n] = tf::from_float<bf16>(a); }, smem);
}

template <class C, class W, int MB>
void bench(const char* name, int N, long wbytes, W (*mk)(char*, long), char* pool, long pool_bytes) {
    constexpr int K = C::k;
    int smem = tf::matvec_smem_bytes<C, bf16, W>();
    auto f = kern<C, W, MB>;
    cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    int copies = (int)(pool_bytes / wbytes);
    bf16 *x, *g, *y;
    cudaMalloc(&x, K * 2); cudaMalloc(&g, K * 2); cudaMalloc(&y, N * 2);
    cudaMemset(x, 0x3c, K * 2); cudaMemset(g, 0x3c, K * 2);
    int tiles = (N + C::rows - 1) / C::rows;
    double us = graph_time([&](int i) { launch(f, tiles, smem, (const bf16*)x, (const bf16*)g, mk(pool, (long)(i % copies) * wbytes), y, N); });
    int occ = 0; cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, f, 256, smem);
    printf("%-28s tiles %4d smem %6d occ %d  %7.2f us  %6.0f GB/s  err=%s\n", name, tiles, smem, occ, us, wbytes / us / 1e3,
           cudaGetErrorString(cudaGetLastError()));
}

// The ceiling: a plain read of the same bytes by 2 CTAs per SM, 8 16-byte loads in flight per thread.
__global__ __launch_bounds__(256, 2) void stream_read(const uint4* p, long n16, unsigned* out) {
    tf::grid_dependency_wait();
    tf::launch_dependents();
    unsigned acc = 0;
    const long stride = (long)gridDim.x * blockDim.x;
    for (long i = blockIdx.x * blockDim.x + threadIdx.x; i < n16; i += 8 * stride) {
        uint4 v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) v[u] = tf::ld_stream_v4(p + min(i + u * stride, n16 - 1));
#pragma unroll
        for (int u = 0; u < 8; ++u) acc ^= v[u].x ^ v[u].w;
    }
    if (acc == 0x12345678u) out[0] = acc;
}
void ceiling(const char* name, long wbytes, char* pool, long pool_bytes) {
    int copies = (int)(pool_bytes / wbytes);
    unsigned* o; cudaMalloc(&o, 4);
    double us = graph_time([&](int i) { launch(stream_read, 264, 0, (const uint4*)(pool + (i % copies) * wbytes), wbytes / 16, o); });
    printf("%-28s %7.2f us  %6.0f GB/s\n", name, us, wbytes / us / 1e3);
}
__global__ void empty() {}

constexpr long POOL = 1l << 30;
tf::WBf16 mk_bf16(char* p, long off) { return tf::WBf16{reinterpret_cast<const bf16*>(p + off)}; }
template <int N, int K> tf::WMx mk_mx(char* p, long off) {
    return tf::WMx{reinterpret_cast<const uint8_t*>(p + off), reinterpret_cast<const uint8_t*>(p + off + (long)N * K / 2)};
}

int main() {
    cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking);
    char* pool; cudaMalloc(&pool, POOL); cudaMemset(pool, 0x11, POOL);
    {
        printf("empty kernel: %.2f us per launch\n", graph_time([&](int) { launch(empty, 132, 0); }));
        ceiling("ceiling 21 MB", 5120l * 2048 * 2, pool, POOL);
        ceiling("ceiling 16.8 MB", 2048l * 4096 * 2, pool, POOL);
        ceiling("ceiling 13.4 MB", 12288l * 2048 * 17 / 32, pool, POOL);
        ceiling("ceiling 6.7 MB", 16384l * 768 * 17 / 32, pool, POOL);
    }
#define QKV(U, MB) bench<tf::MvCfg<1, 16, 256, 2048, true, tf::MvPath::Auto, U>, tf::WBf16, MB>("qkv U" #U " mb" #MB, 5120, 5120l * 2048 * 2, mk_bf16, pool, POOL);
#define OP(U, MB) bench<tf::MvCfg<1, 16, 256, 4096, false, tf::MvPath::Auto, U>, tf::WBf16, MB>("o U" #U " mb" #MB, 2048, 2048l * 4096 * 2, mk_bf16, pool, POOL);
#define UP(R, U, MB) bench<tf::MvCfg<1, R, 256, 2048, false, tf::MvPath::Auto, U>, tf::WMx, MB>("up r" #R " U" #U " mb" #MB, 12288, 12288l * 2048 * 17 / 32, mk_mx<12288, 2048>, pool, POOL);
#define DN(R, U, MB) bench<tf::MvCfg<1, R, 256, 768, false, tf::MvPath::Auto, U>, tf::WMx, MB>("dn r" #R " U" #U " mb" #MB, 16384, 16384l * 768 * 17 / 32, mk_mx<16384, 768>, pool, POOL);
    QKV(4, 2) QKV(2, 2) QKV(2, 3) QKV(1, 4) QKV(8, 2)
    OP(4, 2) OP(2, 2) OP(2, 3) OP(8, 2) OP(16, 1)
    UP(64, 4, 2) UP(32, 4, 2) UP(32, 2, 2) UP(32, 2, 3) UP(32, 1, 4) UP(16, 2, 3) UP(16, 1, 4) UP(64, 2, 3)
    DN(16, 4, 2) DN(16, 2, 3) DN(16, 1, 4) DN(32, 2, 3)
    return 0;
}
