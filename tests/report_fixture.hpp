#pragma once
// A fixed set of result files for the report and plot tests: two models; fp, gptq (2 bits, two
// seeds on stories260K, one on llama2xs-279K), billm failed on llama2xs-279K, rtn missing the
// wikitext2 cell.
#include <filesystem>
#include <map>
#include <string>

#include "ptqlab/outputs/results.hpp"

namespace ptqlab::test {

inline ArmResult arm(const std::string& name, const std::string& model, const std::string& quantizer_yaml, double bits,
              double all_in, std::map<std::string, double> ppl) {
  ArmResult r;
  r.arm = name;
  r.experiment = "golden";
  r.config_yaml = "experiment: golden\nmodel: /models/" + model + "\nseed: 0\narm:\n  name: " + name +
                  "\n  preprocess: []\n  quantizer: " + quantizer_yaml + "\n";
  r.config_hash = "h-" + name + model;
  r.total_bits.weights = 1000;
  r.total_bits.paper = bits * 1000;
  r.total_bits.payload = all_in * 1000;
  for (const auto& [ds, v] : ppl) r.metrics["perplexity"][ds]["ppl"] = v;
  return r;
}

inline void write_fixture(const std::filesystem::path& dir) {
  const std::string fp = "{name: fp}", g2 = "{name: gptq, params: {bits: 2, group_size: -1}}",
                    g3 = "{name: gptq, params: {bits: 3, group_size: -1}}", bi = "{name: billm, params: {mode: faithful}}",
                    rtn = "{name: rtn, params: {bits: 2, group_size: -1}}";
  std::filesystem::create_directories(dir / "s" );
  std::filesystem::create_directories(dir / "x");
  write_arm_result(dir / "s/fp.h5", arm("fp", "stories260K", fp, 16, 16, {{"tinystories", 5.2872}, {"wikitext2", 119.3718}}));
  write_arm_result(dir / "s/gptq-w2-seed0.h5", arm("gptq-w2-seed0", "stories260K", g2, 2, 2.238, {{"tinystories", 40.0}, {"wikitext2", 400.0}}));
  write_arm_result(dir / "s/gptq-w2-seed1.h5", arm("gptq-w2-seed1", "stories260K", g2, 2, 2.238, {{"tinystories", 44.0}, {"wikitext2", 420.0}}));
  write_arm_result(dir / "s/gptq-w3.h5", arm("gptq-w3", "stories260K", g3, 3, 3.252, {{"tinystories", 9.5}, {"wikitext2", 150.25}}));
  write_arm_result(dir / "s/rtn-w2.h5", arm("rtn-w2", "stories260K", rtn, 2, 2.238, {{"tinystories", 573.59}}));
  write_arm_result(dir / "x/fp.h5", arm("fp", "llama2xs-279K", fp, 16, 16, {{"tinystories", 6.5}, {"wikitext2", 250.0}}));
  write_arm_result(dir / "x/gptq-w2-seed0.h5", arm("gptq-w2-seed0", "llama2xs-279K", g2, 2, 2.241, {{"tinystories", 80.0}, {"wikitext2", 1234567.0}}));
  auto failed = arm("billm", "llama2xs-279K", bi, 1.1, 2.9, {});
  failed.status = "failed";
  failed.failure = "layer 3: non-finite activations after quantization";
  write_arm_result(dir / "x/billm.h5", failed);
}

}  // namespace ptqlab::test
