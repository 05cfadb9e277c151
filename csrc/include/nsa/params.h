// Plain parameter structs filled once in csrc/api/ and read by every kernel.
// Kernels never see a torch type: raw pointers, 64-bit element strides, ints.
#pragma once

#include <cstdint>

namespace nsa {

// The three attention branches share one mainloop; the branch picks the KV
// schedule (which keys a query row visits) and the mask.
enum class Branch : int32_t {
  kCompressed = 0,  // keys: compressed rows [0, nc(t)) of sequence's k_cmp
  kSelected = 1,    // keys: s <= t with s // slc_block in block_indices[t, h / G]
  kWindow = 2,      // keys: [max(0, t - window + 1), t]
};

// Layout: q/o [B, T, H, D] ("bshd"), lse [B, Hq, T]; in varlen mode B == 1 in
// memory, `num_seqs` sequences packed along T with offsets cu_seqlens.
struct AttnFwdParams {
  Branch branch;
  // Inputs. q [B, T, Hq, Dk]; k [B, Tk, Hkv, Dk]; v [B, Tk, Hkv, Dv], where Tk is T
  // for the selected/window branches and the compressed row count for kCompressed.
  const void* q;
  const void* k;
  const void* v;
  // Outputs. o [B, T, Hq, Dv] in q's dtype; lse [B, Hq, T] in the accumulate type
  // (float32, float64 for fp64 inputs).
  void* o;
  void* lse;

  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int64_t lse_batch_stride, lse_head_stride;  // row stride 1

  // kSelected: block_indices [B, T, Hkv, slc_num_blocks] int32 (-1 or out of
  // range = unused slot).
  const int32_t* block_indices;
  int64_t bi_batch_stride, bi_row_stride, bi_head_stride;

  // Varlen: cu_seqlens [num_seqs + 1] (nullptr in batch mode).
  const int32_t* cu_seqlens;
  // Decode (KV cache): seqlens_k [B], the keys of batch entry b are rows
  // [0, seqlens_k[b]) of k/v, and its `seqlen` query rows are the last positions,
  // seqlens_k[b] - seqlen + i (nullptr outside decode; never with cu_seqlens).
  const int32_t* seqlens_k;
  // Decode, compressed branch (compressed_select_decode): where the kernel also
  // leaves its scores scale * log2(e) * q.k (-inf where masked) for the selection,
  // [B][Hkv][seqlen * G rows r = i * G + g][k_rows] fp32; nullptr: not kept. A
  // backend that keeps none (the CPU) gets nullptr.
  float* cmp_scores;

  int64_t num_seqs;     // B, or the number of packed sequences
  int64_t seqlen;       // T in batch mode; max_seqlen in varlen mode; new tokens in decode
  int64_t k_rows;       // rows of k/v per batch entry (all packed rows in varlen; capacity in decode)
  int64_t num_heads_q;  // Hq
  int64_t num_heads_kv; // Hkv
  int64_t group;        // G = Hq / Hkv
  int64_t head_dim_qk;  // Dk
  int64_t head_dim_v;   // Dv
  double scale;  // double: the fp64 CPU path needs it exact; CUDA kernels round it once

  int64_t cmp_block_size;  // l
  int64_t cmp_stride;      // d
  int64_t slc_block_size;  // l'
  int64_t slc_num_blocks;  // n
  int64_t window_size;     // w
};

struct AttnBwdParams : AttnFwdParams {
  // do [B, T, Hq, Dv] like o; dlse [B, Hq, T] like lse (may be nullptr: zero).
  const void* dout;
  const void* dlse;
  int64_t do_batch_stride, do_row_stride, do_head_stride;
  // Gradients: dq like q, dk like k, dv like v (contiguous, same shapes).
  void* dq;
  void* dk;
  void* dv;
  int64_t dq_batch_stride, dq_row_stride, dq_head_stride;
  int64_t dk_batch_stride, dk_row_stride, dk_head_stride;
  int64_t dv_batch_stride, dv_row_stride, dv_head_stride;
  // Gradients that other branches left, added to this branch's (nullptr: none), so
  // sparse_attn's backward sums the branches without a pass of its own: like dq,
  // dk, dv (same shapes and strides), read only. Every row gets its value, rows
  // this branch sends nothing to included.
  const void* dq_in;
  const void* dk_in;
  const void* dv_in;
  // delta = rowsum(o * dout) - dlse per row, 0 where lse = -inf, when the caller has
  // it (sparse_attn: the gate backward's row dots); nullptr: the backward computes it.
  // lse's dtype, layout and strides.
  const void* delta_in;
  // Row scales of the output gradient (nullptr: 1): the gradient of o is
  // dout_scale[b, t, h] * dout, so sparse_attn's backward hands every branch the one
  // do and the branch's gate instead of writing g * do per branch. [B, T, Hq] like a
  // gate, the accumulation type (float on CUDA), any strides. delta (given or
  // computed) is that of the scaled gradient.
  const void* dout_scale;
  int64_t ds_batch_stride, ds_row_stride, ds_head_stride;
};

// Block selection: q [B, T, Hq, Dk], k_cmp [B, Tc, Hkv, Dk], lse_cmp [B, Hq, T].
// Output block_indices [B, T, Hkv, n] int32, ascending, -1 padded.
struct SelectParams {
  const void* q;
  const void* k_cmp;
  const void* lse_cmp;
  int32_t* block_indices;
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t lse_batch_stride, lse_head_stride;
  int64_t bi_batch_stride, bi_row_stride, bi_head_stride;
  const int32_t* cu_seqlens;
  const int32_t* seqlens_k;  // decode, as in AttnFwdParams
  // Decode: the compressed attention's scores (AttnFwdParams::cmp_scores) to read
  // instead of recomputing q.k_cmp; nullptr: recompute.
  const float* cmp_scores;
  int64_t num_seqs, seqlen, k_rows, num_heads_q, num_heads_kv, group, head_dim_qk;
  double scale;  // double: the fp64 CPU path needs it exact; CUDA kernels round it once
  int64_t cmp_block_size, cmp_stride, slc_block_size, slc_num_blocks, slc_init_blocks,
      slc_local_blocks;
};

// The gated sum that ends sparse_attn, o = sum over the branches that are on of
// g_b * o_b, and its gradient, d o_b = g_b * d o and d g_b = sum_c d o[c] * o_b[c],
// each in one pass over memory. Rows (b, t, h) of [B, T, Hq, Dv] tensors whose
// last dim is contiguous; the gates [B, T, Hq] hold the accumulation type (float;
// double for float64 on the CPU), any strides.
struct GateBranch {
  const void* o;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  const void* gate;
  int64_t gate_batch_stride, gate_row_stride, gate_head_stride;
  // backward: [B, T, Hq, Dv] contiguous, o's dtype (written); nullptr: not written
  // (the branch backward then scales do by the gate itself)
  void* d_o;
  void* d_gate;  // backward: [B, T, Hq] contiguous, the gates' type (written)
  // backward, optional (nullptr: skip): rowsum(o * d_o), the attention backward's
  // delta, [B, Hq, T] contiguous (lse's layout), the gates' type: with d_o as
  // written, or without d_o g * d_gate unrounded
  void* row_dot;
};

constexpr int kMaxGateBranches = 3;

struct GateParams {
  void* out;  // forward: o, contiguous (written); backward: d o (read, the strides below)
  int64_t out_batch_stride, out_row_stride, out_head_stride;
  int64_t batch, seqlen, num_heads, head_dim;
  GateBranch branches[kMaxGateBranches];
  int32_t num_branches;
};

// Decode (sparse_attn_decode): o = sum over the branches of g * o_branch in one
// pass. A branch is final (o_branch already in q's dtype, o_* strides) or the
// normalised partials of decode_attn's KV splits, merged here as decode_combine
// would merge them (o_part [splits][B][S][Hq][Dv] fp32, lse_part [splits][B][S][Hq]).
struct DecodeGateBranch {
  const void* gate;  // [B, S, Hq] float
  int64_t gate_batch_stride, gate_row_stride, gate_head_stride;
  const void* o;  // final branch output [B, S, Hq, Dv], or nullptr for partials
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  const float* o_part;
  const float* lse_part;
  int32_t num_splits;
};

constexpr int kMaxDecodeBranches = 3;

struct DecodeGateParams {
  void* o;  // [B, S, Hq, Dv] in q's dtype
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int64_t num_seqs, seqlen, num_heads_q, head_dim_v;
  int64_t head_dim_qk;  // only picks the build's (Dk, Dv, dtype) instance
  DecodeGateBranch branches[kMaxDecodeBranches];
  int32_t num_branches;
};

// Mean compression: x [B, T, H, D] -> out [B, rows_out, H, D]; block i of a
// sequence is the mean of its rows [i*d, i*d + l). Varlen packs sequence m's
// blocks from row packed_cmp_row_begin(m). The gradient uses the same struct
// with the roles swapped (x <- dx, out <- d out).
struct CompressParams {
  const void* x;
  void* out;
  int64_t x_batch_stride, x_row_stride, x_head_stride;
  int64_t out_batch_stride, out_row_stride, out_head_stride;
  const int32_t* cu_seqlens;  // nullptr in batch mode
  int64_t num_seqs;           // B, or the number of packed sequences
  int64_t seqlen;             // T per batch entry (total in varlen mode)
  int64_t batch;              // B in memory (1 in varlen mode)
  int64_t rows_out;           // output rows per batch entry
  int64_t num_heads, head_dim;
  int64_t cmp_block_size, cmp_stride;
  // KV-cache update (update_cmp_cache): x is the token cache [B, capacity, H, D],
  // out the compressed cache [B, rows_out, H, D]. Batch entry b grows from
  // cache_seqlens[b] to cache_seqlens[b] + num_new tokens and only the blocks that
  // complete on the way are written. nullptr outside the update.
  const int32_t* cache_seqlens;
  int64_t num_new;
};

// KV-cache append, k and v in one launch: side s's new [B, S, H, D] goes to rows
// cache_seqlens[b] + i of its cache [B, capacity, H, D]; rows outside
// [0, capacity) are dropped (the eager API raises before that; under graph capture
// the step's output is then unspecified).
struct CacheAppendParams {
  struct Side {  // the k cache, then the v cache
    const void* src;
    void* dst;
    int64_t src_batch_stride, src_row_stride, src_head_stride;
    int64_t dst_batch_stride, dst_row_stride, dst_head_stride;
    int64_t head_dim;
  } sides[2];
  const int32_t* cache_seqlens;
  int64_t batch, num_new, capacity, num_heads;
  // Optional (cmp[s].out non-null for both sides, or for neither): the compressed
  // caches, written as update_cmp_cache would write them after the append, in the
  // same launch. cmp[s].x is side s's token cache; the kernel reads the rows this
  // call appends from sides[s].src, since other CTAs are writing them to the cache.
  CompressParams cmp[2];
};

// The rows of one sequence: where it starts in the packed (or batched) tensors
// and how long it is. Shared by the CPU and CUDA kernels. Outside decode the
// queries are the sequence's tokens (q_row0 == row0, q_len == len, q_pos0 == 0);
// in decode they are its last q_len positions.
struct SeqInfo {
  int64_t batch;    // batch index into *_batch_stride (0 in varlen mode)
  int64_t row0;     // first key (token) row of the sequence
  int64_t len;      // its length: keys 0 .. len - 1
  int64_t cmp_row0; // first compressed row of the sequence
  int64_t q_row0;   // first row of its queries in q, o, lse and block_indices
  int64_t q_len;    // number of query rows
  int64_t q_pos0;   // position of query row 0 (negative rows see no key)
};

}  // namespace nsa
