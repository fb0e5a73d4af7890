// ptqlab synth-model: synthetic checkpoints at real LLaMA shapes (docs/benchmarks.md).
#include <cstdio>

#include <boost/program_options.hpp>
#include <fmt/format.h>

#include "commands.hpp"
#include "ptqlab/model/synth_model.hpp"
#include "ptqlab/support/error.hpp"
#include "ptqlab/support/progress.hpp"

namespace po = boost::program_options;

namespace ptqlab::cli {

DType parse_dtype_option(const std::string& option, const std::string& value) {
  if (value == "f32" || value == "F32") return DType::F32;
  if (value == "f16" || value == "F16") return DType::F16;
  if (value == "bf16" || value == "BF16") return DType::BF16;
  throw Error(fmt::format("{}: unknown dtype '{}' (f32, f16, bf16)", option, value));
}

int cmd_synth_model(const Args& args) {
  SynthModelOptions o;
  std::string dtype = "f16", out, tokenizer = "../shared/models/stories260K/tokenizer.model";
  po::options_description desc("ptqlab synth-model options");
  desc.add_options()
      ("like", po::value(&o.like)->required(), "architecture: llama-2-7b, llama-2-13b or stories260K")
      ("layers", po::value(&o.layers)->default_value(0), "decoder layers (0: as --like)")
      ("vocab", po::value(&o.vocab)->default_value(0), "vocab_size (0: as --like; the tokenizer must fit in it)")
      ("dtype", po::value(&dtype)->default_value("f16"), "stored dtype: f16, bf16 or f32")
      ("shards", po::value(&o.shards)->default_value(1), "safetensors files (> 1: with model.safetensors.index.json)")
      ("seed", po::value(&o.seed)->default_value(0), "random seed of the weights")
      ("tokenizer", po::value(&tokenizer)->default_value(tokenizer), "tokenizer.model to copy in")
      ("out", po::value(&out)->required(), "directory to write (must not hold a checkpoint)");
  auto vm = parse_options("synth-model", "--like NAME --out DIR [--layers N] [--dtype f16] [--shards K] [--seed S]",
                          desc, nullptr, args);
  if (!vm) return 0;
  o.dtype = parse_dtype_option("--dtype", dtype);
  o.out = out;
  o.tokenizer = tokenizer;
  Progress progress(fmt::format("synth-model {}", out), 100, "%");
  long long shown = 0;
  const auto bytes = write_synthetic_model(o, [&](std::size_t done, std::size_t total) {
    const long long pct = total > 0 ? static_cast<long long>(100.0 * static_cast<double>(done) / total) : 100;
    if (pct > shown) {
      progress.advance(pct - shown);
      shown = pct;
    }
  });
  progress.finish();
  fmt::print("wrote {} ({:.2f} GB of {} tensors in {} shard(s))\n", out, static_cast<double>(bytes) / 1e9, dtype, o.shards);
  return 0;
}

}  // namespace ptqlab::cli
