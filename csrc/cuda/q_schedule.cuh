// Query schedules of the KV-side backward (dk, dv): the transpose of the KV
// schedules of kv_schedule.cuh. A CTA owns the keys [kb, ke) of one (sequence,
// kv head) and visits the queries that see any of them, as a list of query
// positions pos in [0, n_pos); position pos is token token(pos) (-1: skip) and
// expands to the G query heads of the group (flattened row pos * G + g, like the
// forward's rows). key_range(t, lo, hi): the keys [lo, hi) token t sees (the
// branch's mask, like the forward schedules' row_range).
//   key_tiles(p)     host: CTAs per (sequence, kv head) along grid x
//   init(...)        false when the CTA owns no key row
//   tail_begin(p)    varlen: first key row owned by no sequence (zeroed)
#pragma once

#include "cuda/common.cuh"

namespace nsa::cuda {

// Branch 1: query t sees compressed key i iff t >= i*d + l - 1, i.e. the tokens
// [kb*d + l - 1, len) see some key of the tile. At batch 1 that is few CTAs with a
// triangular load (64k tokens, d = 16, 64 keys per CTA: 64 tiles per kv head, the
// first visiting every token), so a tile's queries are split into chunks of
// ws.dkv_chunk_pos positions, one CTA each (kSplits; plan_dkv_split): CTA x is
// chunk c of tile j, in tile order. A tile of several chunks writes partial sums
// to its slots (slot >= 0), which the reduce kernel adds up in chunk order.
template <int kBlockN>
struct CompressedQuerySchedule {
  static constexpr bool kSplits = true;
  int64_t kb, ke, key_row0, t_first, n_pos, l, d;
  int64_t slot = -1;   // this CTA's partial slot; -1: it writes dk, dv itself
  int64_t qchunks = 1;  // query chunks of this CTA's key tile

  __host__ __device__ static int64_t key_tiles(const AttnBwdParams& p) {
    // Batch mode: every k_cmp row (rows past Tc(T) get zero gradients);
    // varlen: the longest sequence's blocks (padding rows: the tail CTAs).
    const int64_t rows = p.cu_seqlens == nullptr
                             ? p.k_rows
                             : num_cmp_blocks(p.seqlen, p.cmp_block_size, p.cmp_stride);
    return (rows + kBlockN - 1) / kBlockN;
  }
  // Chunks of key tile j: its query positions in the longest sequence, split.
  __host__ __device__ static int64_t chunks(const AttnBwdParams& p, int64_t chunk_pos, int64_t j) {
    const int64_t pos = p.seqlen - (j * kBlockN * p.cmp_stride + p.cmp_block_size - 1);
    return chunk_pos <= 0 || pos <= chunk_pos ? 1 : (pos + chunk_pos - 1) / chunk_pos;
  }
  // CTA x -> (tile j, chunk c) and the slot of (j, 0) (-1: a one-chunk tile); with
  // x = -1, the same for chunk 0 of tile `j` (the reduce kernel). Host: x = total
  // CTAs gives the CTA and slot counts (j = tiles, slot0 = slots).
  __host__ __device__ static void locate(const AttnBwdParams& p, int64_t chunk_pos, int64_t x,
                                         int64_t& j, int64_t& c, int64_t& slot0) {
    const int64_t tiles = key_tiles(p);
    const int64_t want_j = j;
    int64_t first = 0, slots = 0;
    for (j = 0; j < tiles; ++j) {
      const int64_t n = chunks(p, chunk_pos, j);
      if (x >= 0 ? x < first + n : j == want_j) break;
      first += n;
      if (n > 1) slots += n;
    }
    c = x >= 0 ? x - first : 0;
    slot0 = j < tiles && chunks(p, chunk_pos, j) == 1 ? -1 : slots;
    if (j == tiles) c = first;  // the totals
  }
  // Host: the CTAs along x and the partial slots per (sequence, kv head) of a split
  // into chunks of chunk_pos positions; nothing to plan on the device.
  static void split_size(const AttnBwdParams& p, int64_t chunk_pos, int64_t& ctas, int64_t& slots) {
    int64_t j = 0;
    locate(p, chunk_pos, INT64_MAX, j, ctas, slots);
  }
  static void plan_split(const AttnBwdParams&, AttnBwdWorkspace&, cudaStream_t) {}
  __device__ static SeqInfo seq(const AttnBwdParams& p, int64_t s) {
    return nsa::seq_info(p.cu_seqlens, s, p.seqlen, p.cmp_block_size, p.cmp_stride);
  }
  __device__ static int64_t tail_begin(const AttnBwdParams& p) {
    return packed_cmp_row_begin(p.cu_seqlens, p.num_seqs, p.cmp_block_size, p.cmp_stride);
  }

  // CTA x, or with x < 0 chunk 0 of tile `tile`.
  __device__ bool init(const AttnBwdParams& p, const AttnBwdWorkspace& ws, const SeqInfo& si,
                       int64_t x, int, int64_t tile = 0) {
    l = p.cmp_block_size, d = p.cmp_stride;
    int64_t j = tile, c, slot0;
    locate(p, ws.dkv_chunk_pos, x, j, c, slot0);
    slot = slot0 < 0 ? -1 : slot0 + c;
    qchunks = chunks(p, ws.dkv_chunk_pos, j);
    int64_t own = p.k_rows - si.cmp_row0;  // rows of k_cmp from the sequence's first
    if (p.cu_seqlens != nullptr) own = min(own, num_cmp_blocks(si.len, l, d));
    kb = j * kBlockN;
    if (kb >= own) return false;
    ke = min(kb + kBlockN, own);
    key_row0 = si.cmp_row0;
    const int64_t first = kb * d + l - 1;  // the tile's first query token
    const int64_t total = max(si.len - first, int64_t(0));
    const int64_t step = ws.dkv_chunk_pos > 0 ? ws.dkv_chunk_pos : total;
    t_first = first + c * step;
    n_pos = max(min(total - c * step, step), int64_t(0));
    return true;
  }
  __device__ int64_t token(int64_t pos) const { return t_first + pos; }
  __device__ void key_range(int64_t t, int64_t& lo, int64_t& hi) const {
    lo = 0;
    hi = num_visible_cmp_blocks(t, l, d);
  }
};

// Branch 3: query t sees key s iff t - w + 1 <= s <= t: the tokens
// [kb, ke - 1 + w - 1] (clipped to the sequence).
template <int kBlockN>
struct WindowQuerySchedule {
  static constexpr bool kSplits = false;
  int64_t kb, ke, key_row0, t_first, n_pos, w;

  static int64_t key_tiles(const AttnBwdParams& p) { return (p.seqlen + kBlockN - 1) / kBlockN; }
  __device__ static SeqInfo seq(const AttnBwdParams& p, int64_t s) {
    return token_seq_info(p.cu_seqlens, s, p.seqlen);
  }
  __device__ static int64_t tail_begin(const AttnBwdParams& p) { return p.cu_seqlens[p.num_seqs]; }

  __device__ bool init(const AttnBwdParams& p, const AttnBwdWorkspace&, const SeqInfo& si,
                       int64_t x, int) {
    w = p.window_size;
    kb = x * kBlockN;
    if (kb >= si.len) return false;
    ke = min(kb + kBlockN, si.len);
    key_row0 = si.row0;
    t_first = kb;
    n_pos = min(ke - 1 + w - 1, si.len - 1) - t_first + 1;
    return true;
  }
  __device__ int64_t token(int64_t pos) const { return t_first + pos; }
  __device__ void key_range(int64_t t, int64_t& lo, int64_t& hi) const {
    lo = window_begin(t, w);
    hi = t + 1;
  }
};

// Branch 2: the tokens that selected block j, read from the sorted inverse-index
// keys (launch.h, run_slc_inverse_keys): the run of keys in
// [base, base + R) with base = ((b * Hkv + h) * R + row0 + j*l') * R. A block of
// l' > kBlockN keys is split over ceil(l' / kBlockN) key tiles. A token that listed
// the block twice appears twice in a row: the second copy is skipped, as the
// forward counts the block once.
// Split (kSplits): every token selects the forced initial block, and popular blocks
// draw many more tokens than the average l' * n, so a tile's run is cut into chunks
// of ws.dkv_chunk_pos positions. The chunk counts depend on the keys: slc_dkv_plan_kernel
// scans them into ws.dkv_plan (each tile's first CTA and partial slot), and CTA x
// finds its tile there by binary search. The host sizes the grid and the slots from
// a bound: at most seqlen * n keys per (sequence, kv head), so at most
// seqlen * n * key_chunks / chunk_pos chunks beyond one per tile.
template <int kBlockN>
struct SelectedQuerySchedule {
  static constexpr bool kSplits = true;
  int64_t kb, ke, key_row0, n_pos, lo, run_lo, rows, row0;
  int64_t slot = -1, qchunks = 1;  // as CompressedQuerySchedule's
  const int64_t* keys;

  __host__ __device__ static int64_t key_chunks(const AttnBwdParams& p) {
    return (p.slc_block_size + kBlockN - 1) / kBlockN;
  }
  __host__ __device__ static int64_t key_tiles(const AttnBwdParams& p) {
    return num_slc_blocks(p.seqlen, p.slc_block_size) * key_chunks(p);
  }
  static void split_size(const AttnBwdParams& p, int64_t chunk_pos, int64_t& ctas, int64_t& slots) {
    const int64_t extra = chunk_pos > 0 ? p.seqlen * p.slc_num_blocks * key_chunks(p) / chunk_pos : 0;
    ctas = key_tiles(p) + extra;
    slots = 2 * extra;  // a tile of q >= 2 chunks has q <= 2 (q - 1) slots
  }
  static void plan_split(const AttnBwdParams& p, AttnBwdWorkspace& w, cudaStream_t stream);
  __device__ static SeqInfo seq(const AttnBwdParams& p, int64_t s) {
    return token_seq_info(p.cu_seqlens, s, p.seqlen);
  }
  __device__ static int64_t tail_begin(const AttnBwdParams& p) { return p.cu_seqlens[p.num_seqs]; }

  __device__ static int64_t lower_bound(const int64_t* a, int64_t n, int64_t value) {
    int64_t first = 0;
    while (n > 0) {
      const int64_t half = n / 2;
      if (a[first + half] < value) {
        first += half + 1;
        n -= half + 1;
      } else {
        n = half;
      }
    }
    return first;
  }

  // Key tile u of the sequence: its keys [kb, ke) and its run of sorted keys
  // [run_lo, run_lo + count); false when the tile lies past the sequence.
  __device__ bool tile(const AttnBwdParams& p, const AttnBwdWorkspace& ws, const SeqInfo& si, int64_t hkv,
                       int64_t u, int64_t& count) {
    const int64_t lp = p.slc_block_size;
    const int64_t j = u / key_chunks(p), c = u % key_chunks(p);
    kb = j * lp + c * kBlockN;
    if (kb >= si.len) return false;
    ke = min(min(kb + kBlockN, (j + 1) * lp), si.len);
    key_row0 = row0 = si.row0;
    rows = p.k_rows;
    keys = ws.slc_keys;
    const int64_t base = ((si.batch * p.num_heads_kv + hkv) * rows + si.row0 + j * lp) * rows;
    run_lo = lower_bound(keys, ws.slc_key_count, base);
    count = lower_bound(keys, ws.slc_key_count, base + rows) - run_lo;
    return true;
  }

  // CTA x of sequence blockIdx.z, or with x < 0 chunk 0 of tile `tile_u`.
  __device__ bool init(const AttnBwdParams& p, const AttnBwdWorkspace& ws, const SeqInfo& si,
                       int64_t x, int hkv, int64_t tile_u = 0) {
    int64_t u = x, c = 0;
    if (ws.dkv_plan != nullptr) {
      const int64_t tiles = key_tiles(p);
      const int64_t* first = ws.dkv_plan + (int64_t(blockIdx.z) * p.num_heads_kv + hkv) * 2 * (tiles + 1);
      if (x >= 0) {
        if (x >= first[tiles]) return false;  // past the CTAs the plan uses
        u = lower_bound(first, tiles + 1, x + 1) - 1;  // the last tile starting at or before x
        c = x - first[u];
      } else {
        u = tile_u;
      }
      qchunks = first[u + 1] - first[u];
      if (qchunks > 1) slot = first[tiles + 1 + u] + c;
    }
    int64_t count;
    if (!tile(p, ws, si, hkv, u, count)) return false;
    const int64_t step = ws.dkv_plan != nullptr ? ws.dkv_chunk_pos : count;
    lo = run_lo + c * step;
    n_pos = max(min(count - c * step, step), int64_t(0));
    return true;
  }
  __device__ int64_t token(int64_t pos) const {
    const int64_t i = lo + pos;
    const int64_t key = keys[i];
    if (i > run_lo && keys[i - 1] == key) return -1;
    return key % rows - row0;
  }
  __device__ void key_range(int64_t t, int64_t& lo, int64_t& hi) const {
    lo = 0;  // the CTA's keys all lie in the listed block
    hi = t + 1;
  }
};

// The selected split's plan: one CTA per (kv head, sequence); each thread scans a
// contiguous range of key tiles, the ranges' totals are scanned by thread 0.
template <int kBlockN>
__global__ void __launch_bounds__(256) slc_dkv_plan_kernel(const AttnBwdParams p, const AttnBwdWorkspace ws,
                                                           int64_t* plan) {
  using Schedule = SelectedQuerySchedule<kBlockN>;
  __shared__ int64_t range_ctas[256], range_slots[256];
  const int64_t hkv = blockIdx.x;
  const SeqInfo si = Schedule::seq(p, blockIdx.y);
  const int64_t tiles = Schedule::key_tiles(p);
  int64_t* first = plan + (int64_t(blockIdx.y) * p.num_heads_kv + hkv) * 2 * (tiles + 1);
  int64_t* slot = first + tiles + 1;
  const int64_t per = (tiles + blockDim.x - 1) / blockDim.x;
  const int64_t u0 = min(int64_t(threadIdx.x) * per, tiles), u1 = min(u0 + per, tiles);
  auto chunks_of = [&](int64_t u) {
    Schedule qs;
    int64_t count = 0;
    if (!qs.tile(p, ws, si, hkv, u, count) || count <= ws.dkv_chunk_pos) return int64_t(1);
    return (count + ws.dkv_chunk_pos - 1) / ws.dkv_chunk_pos;
  };
  int64_t ctas = 0, slots = 0;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t q = chunks_of(u);
    ctas += q;
    slots += q > 1 ? q : 0;
  }
  range_ctas[threadIdx.x] = ctas;
  range_slots[threadIdx.x] = slots;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t c = 0, s = 0;
    for (int i = 0; i < int(blockDim.x); ++i) {
      const int64_t nc = range_ctas[i], ns = range_slots[i];
      range_ctas[i] = c, range_slots[i] = s;
      c += nc, s += ns;
    }
    first[tiles] = c, slot[tiles] = s;
  }
  __syncthreads();
  ctas = range_ctas[threadIdx.x], slots = range_slots[threadIdx.x];
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t q = chunks_of(u);
    first[u] = ctas, slot[u] = slots;
    ctas += q;
    slots += q > 1 ? q : 0;
  }
}

template <int kBlockN>
void SelectedQuerySchedule<kBlockN>::plan_split(const AttnBwdParams& p, AttnBwdWorkspace& w,
                                                cudaStream_t stream) {
  const int64_t tiles = key_tiles(p);
  int64_t* plan = static_cast<int64_t*>(
      w.alloc(w.alloc_ctx, p.num_seqs * p.num_heads_kv * 2 * (tiles + 1) * int64_t(sizeof(int64_t))));
  if (p.num_heads_kv > 65535 || p.num_seqs > 65535)
    throw std::runtime_error("nsa_cuda: selected_attn_bwd: problem too large for the grid");
  NSA_LAUNCH(dim3(unsigned(p.num_heads_kv), unsigned(p.num_seqs)), 256, 0, stream,
             slc_dkv_plan_kernel<kBlockN>)(p, w, plan);
  check_launch("selected_attn_bwd (dk/dv plan)");
  w.dkv_plan = plan;
}

}  // namespace nsa::cuda
