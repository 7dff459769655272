// The 14 fusion parameters, in FusionParams order: the C++ side's one table, read by the named fields
// of FusionParamTensors, the packing and the argument checks (fusion_api.h / .cpp). Python's is
// params.py's _PARAM_TABLE; tests/test_cuda_host.py compares the two through the ops param_names
// and param_shapes, so that they cannot drift apart.
//
// GK_PARAM(field, published name, rank, a0, b0, a1, b1): dimension i is a_i * C + b_i (unused
// dimensions of rank-1 entries are 0, 0). Direction 0 is modality 0 querying modality 1.
#pragma once

#define GK_FUSION_PARAMS(GK_PARAM)                                                  \
  GK_PARAM(fc1_weight, "relation_judger.0.fc1.weight", 2, 1, 0, 2, 0)               \
  GK_PARAM(fc1_bias, "relation_judger.0.fc1.bias", 1, 1, 0, 0, 0)                   \
  GK_PARAM(fc2_weight, "relation_judger.0.fc2.weight", 2, 1, 0, 1, 0)               \
  GK_PARAM(fc2_bias, "relation_judger.0.fc2.bias", 1, 1, 0, 0, 0)                   \
  GK_PARAM(k_noise, "k_noise.weight", 2, 0, 2, 1, 0)                                \
  GK_PARAM(v_noise, "v_noise.weight", 2, 0, 2, 1, 0)                                \
  GK_PARAM(in_proj_weight_0, "cross_attn_0_to_1.in_proj_weight", 2, 3, 0, 1, 0)     \
  GK_PARAM(in_proj_bias_0, "cross_attn_0_to_1.in_proj_bias", 1, 3, 0, 0, 0)         \
  GK_PARAM(out_proj_weight_0, "cross_attn_0_to_1.out_proj.weight", 2, 1, 0, 1, 0)   \
  GK_PARAM(out_proj_bias_0, "cross_attn_0_to_1.out_proj.bias", 1, 1, 0, 0, 0)       \
  GK_PARAM(in_proj_weight_1, "cross_attn_1_to_0.in_proj_weight", 2, 3, 0, 1, 0)     \
  GK_PARAM(in_proj_bias_1, "cross_attn_1_to_0.in_proj_bias", 1, 3, 0, 0, 0)         \
  GK_PARAM(out_proj_weight_1, "cross_attn_1_to_0.out_proj.weight", 2, 1, 0, 1, 0)   \
  GK_PARAM(out_proj_bias_1, "cross_attn_1_to_0.out_proj.bias", 1, 1, 0, 0, 0)
