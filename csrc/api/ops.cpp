// Op schemas of the nsa_cuda library. Backends register kernels under these
// names (cpu_ops.cpp, cuda_ops.cpp); Python adds fake kernels and autograd
// (nsa_cuda/ops.py). Forward ops are functional: they return fresh tensors.
#include <torch/library.h>

TORCH_LIBRARY(nsa_cuda, m) {
  m.def("mean_compress(Tensor x, Tensor? cu_seqlens, int cmp_block_size, int cmp_stride) -> Tensor");
  m.def(
      "mean_compress_bwd(Tensor grad_cmp, Tensor x, Tensor? cu_seqlens, int cmp_block_size, "
      "int cmp_stride) -> Tensor");

  m.def(
      "compressed_attn_fwd(Tensor q, Tensor k_cmp, Tensor v_cmp, Tensor? cu_seqlens, int max_seqlen, "
      "int cmp_block_size, int cmp_stride, float scale) -> (Tensor, Tensor)");
  // The *_attn_bwd ops return (dq, dk, dv); dq_in, dk_in, dv_in (like q, k, v) are
  // added to them, so sparse_attn's backward sums its branches inside the kernels.
  // delta (like lse): rowsum(o * dout) when the caller has it; the op skips its pass.
  // dout_scale (like a gate, [B, T, Hq]): the gradient of o is dout_scale * dout, so
  // sparse_attn's branches share one d o and no g * d o is written per branch.
  m.def(
      "compressed_attn_bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k_cmp, Tensor v_cmp, "
      "Tensor o, Tensor lse, Tensor? cu_seqlens, int max_seqlen, int cmp_block_size, "
      "int cmp_stride, float scale, Tensor? dq_in=None, Tensor? dk_in=None, Tensor? dv_in=None, "
      "Tensor? delta=None, Tensor? dout_scale=None) "
      "-> (Tensor, Tensor, Tensor)");

  m.def(
      "select_blocks(Tensor q, Tensor k_cmp, Tensor lse_cmp, Tensor? cu_seqlens, int max_seqlen, "
      "int cmp_block_size, int cmp_stride, int slc_block_size, int slc_num_blocks, "
      "int slc_init_blocks, int slc_local_blocks, float scale) -> Tensor");

  m.def(
      "selected_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor block_indices, Tensor? cu_seqlens, "
      "int max_seqlen, int slc_block_size, float scale) -> (Tensor, Tensor)");
  m.def(
      "selected_attn_bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, "
      "Tensor block_indices, Tensor o, Tensor lse, Tensor? cu_seqlens, int max_seqlen, "
      "int slc_block_size, float scale, Tensor? dq_in=None, Tensor? dk_in=None, "
      "Tensor? dv_in=None, Tensor? delta=None, Tensor? dout_scale=None) "
      "-> (Tensor, Tensor, Tensor)");

  m.def(
      "window_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens, int max_seqlen, "
      "int window_size, float scale) -> (Tensor, Tensor)");
  m.def(
      "window_attn_bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor o, "
      "Tensor lse, Tensor? cu_seqlens, int max_seqlen, int window_size, float scale, "
      "Tensor? dq_in=None, Tensor? dk_in=None, Tensor? dv_in=None, Tensor? delta=None, "
      "Tensor? dout_scale=None) -> (Tensor, Tensor, Tensor)");

  // Decode with a KV cache: q [B, S, Hq, D] holds the last S positions of each
  // batch entry, whose keys are rows [0, seqlens_k[b]) of the caches (k, v
  // [B, capacity, Hkv, D]; k_cmp, v_cmp [B, cmp capacity, Hkv, D]). Forward only.
  m.def(
      "compressed_attn_decode(Tensor q, Tensor k_cmp, Tensor v_cmp, Tensor seqlens_k, "
      "int cmp_block_size, int cmp_stride, float scale) -> (Tensor, Tensor)");
  m.def(
      "select_blocks_decode(Tensor q, Tensor k_cmp, Tensor lse_cmp, Tensor seqlens_k, "
      "int cmp_block_size, int cmp_stride, int slc_block_size, int slc_num_blocks, "
      "int slc_init_blocks, int slc_local_blocks, float scale) -> Tensor");
  // compressed_attn_decode and select_blocks_decode in one call: the same results
  // (up to rounding), and on CUDA the selection reuses the attention's q.k_cmp
  // scores instead of reading k_cmp again.
  m.def(
      "compressed_select_decode(Tensor q, Tensor k_cmp, Tensor v_cmp, Tensor seqlens_k, "
      "int cmp_block_size, int cmp_stride, int slc_block_size, int slc_num_blocks, "
      "int slc_init_blocks, int slc_local_blocks, float scale) -> (Tensor, Tensor, Tensor)");
  m.def(
      "selected_attn_decode(Tensor q, Tensor k, Tensor v, Tensor block_indices, "
      "Tensor seqlens_k, int slc_block_size, float scale) -> (Tensor, Tensor)");
  m.def(
      "window_attn_decode(Tensor q, Tensor k, Tensor v, Tensor seqlens_k, int window_size, "
      "float scale) -> (Tensor, Tensor)");
  // One decode step: the branches whose gate is given, and their gated sum
  // (k_slc/v_slc and k_win/v_win may be the same caches, or the separate ones of a
  // layer with independent KV per branch)
  // g_cmp * o_cmp + g_slc * o_slc + g_win * o_win ([B, S, Hq, Dv]). Without
  // block_indices (and with g_slc) the blocks are selected from the compressed
  // scores. On CUDA the branches' KV splits and the gates are merged by one kernel.
  m.def(
      "sparse_attn_decode(Tensor q, Tensor k_slc, Tensor v_slc, Tensor k_win, Tensor v_win, "
      "Tensor k_cmp, Tensor v_cmp, "
      "Tensor seqlens_k, Tensor? g_cmp, Tensor? g_slc, Tensor? g_win, Tensor? block_indices, "
      "int cmp_block_size, int cmp_stride, int slc_block_size, int slc_num_blocks, "
      "int slc_init_blocks, int slc_local_blocks, int window_size, float scale) -> Tensor");
  // sparse_attn's gated sum over the branches that are on, o = sum_j gates[j] *
  // outputs[j] (outputs [B, T, Hq, Dv], gates [B, T, Hq]), and its gradient: the
  // outputs' gradients (unless output_grads is false: the branch backward then takes
  // d o and the gate as dout_scale), then the gates', then with row_dots
  // rowsum(o_j * d o_j) as [B, Hq, T] (the attention backward's delta for that branch).
  m.def("gate_combine(Tensor[] outputs, Tensor[] gates) -> Tensor");
  m.def("gate_combine_bwd(Tensor grad, Tensor[] outputs, Tensor[] gates, bool row_dots=False, "
        "bool output_grads=True) -> Tensor[]");
  // Writes k_new / v_new [B, S, Hkv, D] into k_cache / v_cache [B, capacity, Hkv, D]
  // at rows cache_seqlens[b] + i, in one kernel on CUDA. With the compressed caches,
  // also the blocks that complete (as update_cmp_cache after it), in the same kernel.
  m.def(
      "append_kv_to_cache(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, "
      "Tensor k_new, Tensor v_new, Tensor(c!)? k_cmp_cache=None, Tensor(d!)? v_cmp_cache=None, "
      "int cmp_block_size=0, int cmp_stride=0) -> ()");
  // Writes the mean of every compressed block that completes as batch entry b
  // grows from cache_seqlens[b] to cache_seqlens[b] + num_new tokens.
  m.def(
      "update_cmp_cache(Tensor x, Tensor(a!) x_cmp, Tensor cache_seqlens, int num_new, "
      "int cmp_block_size, int cmp_stride) -> ()");
}
