#pragma once
// Parameter rows that several components take with the same meaning, declared once (the schemas
// of docs/config-reference.md). A component lists them in its schema next to its own rows:
//   schema.params = {param_rows::bits(), param_rows::weight_group_size(), {"act_order", ...}};
// A row whose meaning differs in one component (hessian-salience's per-column encoding, the
// evaluators' max_windows) stays written out in that component.
#include <cstdint>
#include <string>

#include "ptqlab/engine/params.hpp"

namespace ptqlab::param_rows {

// Uniform grids (rtn, gptq).
inline ParamSpec bits() { return {"bits", ParamType::integer, std::int64_t{4}, "bits per weight", 1.0, 16.0, {}}; }
inline ParamSpec weight_group_size() {
  return {"group_size", ParamType::integer, std::int64_t{-1},
          "input columns sharing one scale/zero; -1: the whole row (per-channel)", -1.0, 1048576.0, {}};
}

// The inverse-Hessian factor (gptq, pbllm, billm, arbllm, the Hessian masks).
inline ParamSpec percdamp() {
  return {"percdamp", ParamType::real, 0.01, "dampening of H before inversion, as a fraction of mean(diag H)", 0.0, 10.0,
          {}};
}
// BiLLM-style block loops (billm, arbllm).
inline ParamSpec disable_gptq() {
  return {"disable_gptq", ParamType::boolean, false, "no error propagation to later blocks (--disable_gptq)", {}, {}, {}};
}

// Element-wise salient masks with one threshold per column group (magnitude, hessian-elementwise).
inline ParamSpec element_salient_ratio() {
  return {"ratio", ParamType::real, 0.1,
          "salient fraction (PB-LLM's 1 - low_frac): threshold at sorted position floor(n * (1 - ratio)), salient = "
          "score > threshold",
          0.0, 1.0, {}};
}
inline ParamSpec threshold_group_size() {
  return {"group_size", ParamType::integer, std::int64_t{-1},
          "input columns sharing one threshold; -1: the whole matrix (PB-LLM's groupsize)", -1.0, 1048576.0, {}};
}
inline ParamSpec element_mask_encoding() {
  return {"encoding", ParamType::string, std::string("bitmap"),
          "storage counted in the ledger: bitmap (1 bit per weight) or csr (column indices + row pointers)", {}, {},
          {"bitmap", "csr"}};
}

// Evaluation windows (perplexity, kl-divergence).
inline ParamSpec window_seq_len() {
  return {"seq_len", ParamType::integer, std::int64_t{0}, "window length; 0: the model's max_position_embeddings", 0.0,
          1048576.0, {}};
}

}  // namespace ptqlab::param_rows
