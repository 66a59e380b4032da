// AMX probe (2026-11-29, Intel Xeon with AMX, 2 threads; see bench/results/HISTORY.md): not part of the build.
// The products of cpu_linear_q4_1x16 (Q4_1 blocks packed 16 rows a register, activations rounded to int16) over the
// default large model's 30 layers, as csrc/cpu_linear.cpp's VNNI kernel does them (groups_x16) beside AMX tiles: each
// int16 activation split into a signed high and an unsigned low byte (x = 256 * (x >> 8) + (x & 255)), tdpbsud and
// tdpbuud against the unpacked 4-bit weights, the two int32 sums recombined: the same integers, so the same float
// epilogue gives the same bits (same=1). Here the weights are unpacked two blocks ahead and each block's
// sums are read back one block later (two sets of accumulator tiles).
//   g++ -O3 -fopenmp pipelined.cpp -o probe && OMP_NUM_THREADS=2 ./probe
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <vector>
#include <chrono>
#include <random>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>
#define X16 __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni,avx512vbmi")))
#define AMX __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni,avx512vbmi,amx-tile,amx-int8")))

template <int M>
X16 void groups_x16(const int16_t* xq, const float* dx, const float* sx, int64_t K, const uint8_t* pk,
                    const float* dm, float* y, int64_t ldy, int64_t g0) {
  const int64_t nb = K / 32;
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi32(0x000F000F);
  for (int64_t b = 0; b < nb; ++b) {
    __m512i is[M];
    for (int m = 0; m < M; ++m) is[m] = _mm512_setzero_si512();
    for (int t = 0; t < 4; ++t) {
      __m512i v = _mm512_loadu_si512(pk + (g0 * nb + b) * 256 + t * 64);
      for (int s = 0; s < 4; ++s) {
        const __m512i w = _mm512_and_si512(s == 0 ? v : _mm512_srli_epi32(v, 4 * s), low);
        for (int m = 0; m < M; ++m) {
          int32_t pair; std::memcpy(&pair, xq + m * K + b * 32 + 8 * t + 2 * s, 4);
          is[m] = _mm512_dpwssd_epi32(is[m], w, _mm512_set1_epi32(pair));
        }
      }
    }
    const float* d = dm + (g0 * nb + b) * 32;
    const __m512 dv = _mm512_loadu_ps(d), mv = _mm512_loadu_ps(d + 16);
    for (int m = 0; m < M; ++m) {
      const __m512 scale = _mm512_mul_ps(dv, _mm512_set1_ps(dx[m * nb + b]));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[m]), scale, acc[m]);
      acc[m] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sx[m * nb + b]), acc[m]);
    }
  }
  for (int m = 0; m < M; ++m) _mm512_storeu_ps(y + m * ldy + g0 * 16, acc[m]);
}

struct alignas(64) TileCfg { uint8_t palette, start; uint8_t pad[14]; uint16_t colsb[16]; uint8_t rows[16]; };


// xh [M, K] int8 (x >> 8), xl [M, K] uint8 (x & 255). Pipelined: B unpacked 2 blocks ahead into a ring of 4,
// C double-buffered in tiles (even blocks 4/5, odd 6/7), each block's epilogue one block later.
AMX inline void unpack_b(const uint8_t* p, uint8_t* B, __m512i idx_e, __m512i idx_o, __m512i nib) {
  for (int t = 0; t < 4; ++t) {
    const __m512i v = _mm512_loadu_si512(p + t * 64);
    const __m512i lo = _mm512_and_si512(v, nib), hi = _mm512_and_si512(_mm512_srli_epi32(v, 4), nib);
    _mm512_store_si512(B + (2 * t) * 64, _mm512_permutex2var_epi8(lo, idx_e, hi));
    _mm512_store_si512(B + (2 * t + 1) * 64, _mm512_permutex2var_epi8(lo, idx_o, hi));
  }
}
AMX inline void epilogue(int M, const int32_t* ch, const int32_t* cl, const float* d, const float* dx, const float* sx,
                         int64_t nb, int64_t b, __m512* acc) {
  const __m512 dv = _mm512_loadu_ps(d), mv = _mm512_loadu_ps(d + 16);
  for (int m = 0; m < M; ++m) {
    const __m512i is = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(ch + m * 16), 8), _mm512_load_si512(cl + m * 16));
    const __m512 scale = _mm512_mul_ps(dv, _mm512_set1_ps(dx[m * nb + b]));
    acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), scale, acc[m]);
    acc[m] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sx[m * nb + b]), acc[m]);
  }
}
AMX void amx_range(int M, const int8_t* xh, const uint8_t* xl, const float* dx, const float* sx, int64_t K,
                   const uint8_t* pk, const float* dm, float* y, int64_t ldy, int64_t gb, int64_t ge) {
  TileCfg cfg{}; cfg.palette = 1;
  for (int t : {0, 1}) { cfg.rows[t] = M; cfg.colsb[t] = 32; }
  for (int t : {2, 3}) { cfg.rows[t] = 8; cfg.colsb[t] = 64; }
  for (int t : {4, 5, 6, 7}) { cfg.rows[t] = M; cfg.colsb[t] = 64; }
  _tile_loadconfig(&cfg);
  const int64_t nb = K / 32;
  alignas(64) uint8_t B[4][512];
  alignas(64) int32_t C[2][2][256];  // [parity][hi/lo]
  alignas(64) uint8_t ie[64], io[64];
  for (int n = 0; n < 16; ++n) {
    ie[4*n+0] = 4*n+0; ie[4*n+1] = 4*n+2; ie[4*n+2] = 64+4*n+0; ie[4*n+3] = 64+4*n+2;
    io[4*n+0] = 4*n+1; io[4*n+1] = 4*n+3; io[4*n+2] = 64+4*n+1; io[4*n+3] = 64+4*n+3;
  }
  const __m512i idx_e = _mm512_load_si512(ie), idx_o = _mm512_load_si512(io);
  const __m512i nib = _mm512_set1_epi8(0x0F);
  for (int64_t g = gb; g < ge; ++g) {
    __m512 acc[16];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    const uint8_t* p = pk + g * nb * 256;
    const float* dmg = dm + g * nb * 32;
    unpack_b(p, B[0], idx_e, idx_o, nib);
    unpack_b(p + 256, B[1], idx_e, idx_o, nib);
    for (int64_t b = 0; b < nb; b += 2) {  // nb even
      // block b (even)
      _tile_loadd(2, B[b & 3], 64);
      _tile_loadd(0, xh + b * 32, K);
      _tile_loadd(1, xl + b * 32, K);
      _tile_zero(4); _tile_zero(5);
      _tile_dpbsud(4, 0, 2);
      _tile_dpbuud(5, 1, 2);
      if (b + 2 < nb) unpack_b(p + (b + 2) * 256, B[(b + 2) & 3], idx_e, idx_o, nib);
      if (b > 0) epilogue(M, C[1][0], C[1][1], dmg + (b - 1) * 32, dx, sx, nb, b - 1, acc);
      _tile_stored(4, C[0][0], 64);
      _tile_stored(5, C[0][1], 64);
      // block b + 1 (odd)
      _tile_loadd(3, B[(b + 1) & 3], 64);
      _tile_loadd(0, xh + (b + 1) * 32, K);
      _tile_loadd(1, xl + (b + 1) * 32, K);
      _tile_zero(6); _tile_zero(7);
      _tile_dpbsud(6, 0, 3);
      _tile_dpbuud(7, 1, 3);
      if (b + 3 < nb) unpack_b(p + (b + 3) * 256, B[(b + 3) & 3], idx_e, idx_o, nib);
      epilogue(M, C[0][0], C[0][1], dmg + b * 32, dx, sx, nb, b, acc);
      _tile_stored(6, C[1][0], 64);
      _tile_stored(7, C[1][1], 64);
    }
    epilogue(M, C[1][0], C[1][1], dmg + (nb - 1) * 32, dx, sx, nb, nb - 1, acc);
    for (int m = 0; m < M; ++m) _mm512_storeu_ps(y + m * ldy + g * 16, acc[m]);
  }
  _tile_release();
}

int main() {
  if (syscall(SYS_arch_prctl, 0x1023, 18)) { printf("no AMX permission\n"); return 1; }
  struct Shape { int64_t N, K; } shapes[] = {{960, 576}, {576, 576}, {3072, 576}, {576, 1536}};
  const int L = 30;
  std::mt19937 rng(1);
  struct Mat { int64_t N, K; std::vector<uint8_t> pk; std::vector<float> dm; };
  std::vector<Mat> mats;
  for (int l = 0; l < L; ++l) for (auto s : shapes) {
    Mat m{s.N, s.K}; m.pk.resize(s.N * s.K / 2); m.dm.resize(s.N / 16 * s.K / 32 * 32);
    for (auto& b : m.pk) b = rng(); for (auto& f : m.dm) f = (rng() % 1000) / 1000.0f - 0.5f;
    mats.push_back(std::move(m));
  }
  for (int MM : {1, 2, 3, 4, 8, 16}) {
    const int64_t Kmax = 1536;
    std::vector<int16_t> xq(MM * Kmax); std::vector<int8_t> xh(MM * Kmax); std::vector<uint8_t> xl(MM * Kmax);
    std::vector<float> dx(MM * 48), sx(MM * 48), y1(MM * 3072), y2(MM * 3072);
    for (auto& v : xq) v = (int16_t)(rng() % 65535 - 32767);
    for (auto& v : dx) v = 1e-4f * (rng() % 100); for (auto& v : sx) v = 0.01f * (rng() % 100);
    double tv = 1e9, ta = 1e9; bool same = true;
    for (int rep = 0; rep < 7; ++rep) {
      for (int which = 0; which < 2; ++which) {
        auto t0 = std::chrono::steady_clock::now();
        for (auto& m : mats) {
          const int64_t K = m.K, G = m.N / 16;
          if (which == 1) for (int r = 0; r < MM; ++r) for (int k = 0; k < K; ++k) {
            int16_t v = xq[r * K + k]; xh[r * K + k] = (int8_t)(v >> 8); xl[r * K + k] = (uint8_t)(v & 255); }
          #pragma omp parallel
          {
            int nt = omp_get_num_threads(), id = omp_get_thread_num();
            int64_t gb = G * id / nt, ge = G * (id + 1) / nt;
            if (which == 0) {
              for (int64_t g = gb; g < ge; ++g) switch (MM) {
                case 1: groups_x16<1>(xq.data(), dx.data(), sx.data(), K, m.pk.data(), m.dm.data(), y1.data(), m.N, g); break;
                case 2: groups_x16<2>(xq.data(), dx.data(), sx.data(), K, m.pk.data(), m.dm.data(), y1.data(), m.N, g); break;
                case 3: groups_x16<3>(xq.data(), dx.data(), sx.data(), K, m.pk.data(), m.dm.data(), y1.data(), m.N, g); break;
                case 4: groups_x16<4>(xq.data(), dx.data(), sx.data(), K, m.pk.data(), m.dm.data(), y1.data(), m.N, g); break;
                case 16: groups_x16<16>(xq.data(), dx.data(), sx.data(), K, m.pk.data(), m.dm.data(), y1.data(), m.N, g); break;
                case 8: groups_x16<8>(xq.data(), dx.data(), sx.data(), K, m.pk.data(), m.dm.data(), y1.data(), m.N, g); break;
              }
            } else {
              amx_range(MM, xh.data(), xl.data(), dx.data(), sx.data(), K, m.pk.data(), m.dm.data(), y2.data(), m.N, gb, ge);
            }
          }
        }
        double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() * 1e3;
        if (which == 0) tv = std::min(tv, dt); else ta = std::min(ta, dt);
      }
    }
    // check last matrix equal
    same = std::memcmp(y1.data(), y2.data(), MM * 576 * 4) == 0;
    printf("M=%d vnni %.2f ms amx %.2f ms (x%.2f) same=%d\n", MM, tv, ta, tv / ta, (int)same);
  }
}
