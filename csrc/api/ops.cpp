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
  m.def(
      "compressed_attn_bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k_cmp, Tensor v_cmp, "
      "Tensor o, Tensor lse, Tensor? cu_seqlens, int max_seqlen, int cmp_block_size, "
      "int cmp_stride, float scale) -> (Tensor, Tensor, Tensor)");

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
      "int slc_block_size, float scale) -> (Tensor, Tensor, Tensor)");

  m.def(
      "window_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens, int max_seqlen, "
      "int window_size, float scale) -> (Tensor, Tensor)");
  m.def(
      "window_attn_bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor o, "
      "Tensor lse, Tensor? cu_seqlens, int max_seqlen, int window_size, float scale) "
      "-> (Tensor, Tensor, Tensor)");
}
