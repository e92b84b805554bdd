/* Force-included (-include) into llama.cpp's C++ sources by scripts/setup.sh when it builds llama-cpp-python.
 *
 * GCC before 13.2 declares two AMX intrinsics wrongly (amxtileintrin.h): _tile_loadconfig tells the compiler that
 * `ldtilecfg` reads 8 bytes of the 64-byte tile configuration, and _tile_loadd that `tileloadd` reads no memory at
 * all. With optimisation on, the stores that fill llama.cpp's stack-allocated tile configuration
 * (ggml-cpu/amx/mmq.cpp, ggml_tile_config_init) are removed as dead, `ldtilecfg` loads stack garbage, the CPU raises
 * #GP and the process dies with SIGSEGV inside llama_decode on the first prompt — on any AMX Xeon (Sapphire Rapids
 * and later) when built with Debian 12's GCC 12.2. Stores into A/B tile buffers read only by `tileloadd` are just as
 * exposed. This header re-declares both with their real memory operands; compilers whose intrinsics are right
 * (GCC >= 13.2 uses builtins, clang) keep their own.
 *
 * zhiwen_amx_tilecfg_fix() marks the libraries as built with this header. It is not enough for llama.cpp's AMX
 * kernels inside Zhiwen: llama.cpp loads the tile configuration once per thread, and torch's oneDNN releases it on
 * the same threads (SIGILL), so llm/llamacpp_backend.py uses them only in a build also marked zhiwen_amx_tile_reload
 * (docs/benchmarks.md §8b). */
#if defined(__cplusplus) && defined(__x86_64__)
extern "C" int zhiwen_amx_tilecfg_fix(void);
extern "C" __attribute__((weak, visibility("default"))) int zhiwen_amx_tilecfg_fix(void) { return 1; }

#if defined(__GNUC__) && !defined(__clang__) && (__GNUC__ < 13 || (__GNUC__ == 13 && __GNUC_MINOR__ < 2))
#include <immintrin.h>
#undef _tile_loadd_internal
#define _tile_loadd_internal(dst, base, stride)                                                          \
    __asm__ volatile("{tileloadd\t(%0,%1,1), %%tmm" #dst "|tileloadd\t%%tmm" #dst ", [%0+%1*1]}"         \
                     :: "r"((const void *) (base)), "r"((long) (stride)) : "memory")
#undef _tile_stream_loadd_internal
#define _tile_stream_loadd_internal(dst, base, stride)                                                   \
    __asm__ volatile("{tileloaddt1\t(%0,%1,1), %%tmm" #dst "|tileloaddt1\t%%tmm" #dst ", [%0+%1*1]}"     \
                     :: "r"((const void *) (base)), "r"((long) (stride)) : "memory")
struct zhiwen_amx_tilecfg_bytes { unsigned char b[64]; };
static inline __attribute__((always_inline)) void zhiwen_tile_loadconfig(const void * cfg) {
    __asm__ volatile("ldtilecfg\t%X0" :: "m"(*(const zhiwen_amx_tilecfg_bytes *) cfg));
}
static inline __attribute__((always_inline)) void zhiwen_tile_storeconfig(void * cfg) {
    __asm__ volatile("sttilecfg\t%X0" : "=m"(*(zhiwen_amx_tilecfg_bytes *) cfg));
}
#define _tile_loadconfig(cfg) zhiwen_tile_loadconfig(cfg)
#define _tile_storeconfig(cfg) zhiwen_tile_storeconfig(cfg)
#endif
#endif
