#include "commands.hpp"

#include <chrono>
#include <cstdio>
#include <iostream>
#include <memory>
#include <optional>

#include <boost/program_options.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <tbb/global_control.h>

#include "ptqlab/engine/memory_model.hpp"
#include "ptqlab/eval/perplexity.hpp"
#include "ptqlab/model/model.hpp"
#include "ptqlab/model/tokenizer.hpp"
#include "ptqlab/nn/generate.hpp"
#include "ptqlab/support/build_info.hpp"
#include "ptqlab/support/error.hpp"
#include "ptqlab/support/progress.hpp"
#include "ptqlab/support/text_file.hpp"
#include "ptqlab/support/utf8.hpp"

namespace po = boost::program_options;

namespace ptqlab::cli {
namespace {

// Parses `args` against `desc`; returns nullopt after printing help when --help was given.
std::optional<po::variables_map> parse(const std::string& command, const std::string& usage,
                                       po::options_description& desc, const Args& args) {
  desc.add_options()("help,h", "show this help");
  po::variables_map vm;
  po::store(po::command_line_parser(args).options(desc).run(), vm);
  if (vm.count("help")) {
    fmt::print("usage: ptqlab {} {}\n\n", command, usage);
    std::cout << desc << std::endl;
    return std::nullopt;
  }
  po::notify(vm);
  return vm;
}

// --threads N caps the TBB worker count for the whole process (0: all cores).
std::unique_ptr<tbb::global_control> limit_threads(int threads) {
  if (threads < 0) throw Error(fmt::format("--threads must be >= 0, got {}", threads));
  if (threads == 0) return nullptr;
  return std::make_unique<tbb::global_control>(tbb::global_control::max_allowed_parallelism, threads);
}

Tokenizer load_tokenizer(const std::string& model_dir) {
  return Tokenizer(std::filesystem::path(model_dir) / "tokenizer.model");
}

}  // namespace

int cmd_ppl(const Args& args) {
  std::string model_dir, text_path, memory_limit;
  int seq_len = 0, threads = 0, batch_windows = 0;
  long long max_windows = 0;
  po::options_description desc("ptqlab ppl options");
  desc.add_options()
      ("model", po::value(&model_dir)->required(), "Hugging Face LLaMA model directory")
      ("text", po::value(&text_path)->required(), "text file, read whole")
      ("seq-len", po::value(&seq_len)->default_value(0), "window length (0: max_position_embeddings)")
      ("max-windows", po::value(&max_windows)->default_value(0), "evaluate only the first K windows (0: all)")
      ("batch-windows", po::value(&batch_windows)->default_value(0), "windows per forward call (0: ~4096 tokens)")
      ("threads", po::value(&threads)->default_value(0), "worker threads (0: all cores)")
      ("memory-limit", po::value(&memory_limit), "memory it may use (e.g. 3G; default: what is available)")
      ("json", "print one JSON object instead of text");
  auto vm = parse("ppl", "--model DIR --text FILE [--seq-len N] [--max-windows K] [--json]", desc, args);
  if (!vm) return 0;
  if (max_windows < 0) throw Error(fmt::format("--max-windows must be >= 0, got {}", max_windows));
  if (batch_windows < 0) throw Error(fmt::format("--batch-windows must be >= 0, got {}", batch_windows));
  auto thread_limit = limit_threads(threads);

  const auto model = open_model(model_dir);
  const auto tokenizer = load_tokenizer(model_dir);
  const auto text = read_utf8_text_file(text_path);
  const auto t0 = std::chrono::steady_clock::now();
  const auto stream = perplexity_stream(tokenizer, text, model.config.bos_token_id);
  const double tokenize_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  // Checked here, not only in evaluate_perplexity, so that the message names the text file.
  const int window = seq_len > 0 ? seq_len : model.config.max_position_embeddings;
  if (window >= 2 && window <= model.config.max_position_embeddings && static_cast<long long>(stream.size()) < window)
    throw Error(fmt::format("{}: the text has {} tokens, fewer than one window of {} (--seq-len)", text_path,
                            stream.size(), window));

  PerplexityOptions options;
  options.seq_len = seq_len;
  options.max_windows = max_windows;
  options.batch_windows = batch_windows;

  // The memory model, before the forward passes (docs/architecture.md, "Memory model").
  MemoryEstimate estimate;
  if (window >= 2 && window <= model.config.max_position_embeddings) {
    long long windows = static_cast<long long>(stream.size()) / window;
    if (max_windows > 0) windows = std::min(windows, max_windows);
    estimate.shared = eval_memory(model, windows, window, batch_windows, 0);
    estimate.shared.push_back({"token stream", static_cast<double>(stream.size()) * sizeof(int)});
    estimate.shared.push_back({"model held in memory", static_cast<double>(model.resident_bytes())});
  }
  const double limit = memory_limit.empty() ? available_memory_bytes() : parse_memory_size(memory_limit, "--memory-limit");
  if (limit > 0 && estimate.total_bytes() > limit)
    throw Error(fmt::format("{}: predicted peak memory {} exceeds the {} available{}; lower --batch-windows or "
                            "--seq-len, or set --memory-limit",
                            model_dir, format_bytes(estimate.total_bytes()), format_bytes(limit),
                            memory_limit.empty() ? "" : " (--memory-limit)"));
  if (!vm->count("json")) fmt::print("memory    {}\n", estimate.describe());
  std::fflush(stdout);
  const auto r = evaluate_perplexity(model, stream, options);

  if (vm->count("json")) {
    nlohmann::json j = {
        {"ppl", r.ppl},
        {"nll", r.mean_nll},
        {"tokens", r.tokens},
        {"predicted_tokens", r.predicted_tokens},
        {"windows", r.windows},
        {"seq_len", r.seq_len},
        {"stream_tokens", r.stream_tokens},
        {"tokens_per_s", r.tokens_per_s},
        {"eval_s", r.seconds},
        {"tokenize_s", tokenize_s},
        {"protocol", kPerplexityProtocol},
        {"predicted_peak_bytes", estimate.total_bytes()},
        {"model", model_dir},
        {"text", text_path},
    };
    fmt::print("{}\n", j.dump());
  } else {
    fmt::print("model     {}\ntext      {}\nprotocol  {}\n", model_dir, text_path, kPerplexityProtocol);
    fmt::print("PPL       {:.4f}   (mean NLL {:.6f})\n", r.ppl, r.mean_nll);
    fmt::print("tokens    {} in {} windows of {} ({} scored; text has {} tokens with BOS)\n", r.tokens, r.windows,
               r.seq_len, r.predicted_tokens, r.stream_tokens);
    fmt::print("speed     {:.0f} tokens/s ({} forward, {:.2f} s tokenizing)\n", r.tokens_per_s,
               format_duration(r.seconds), tokenize_s);
  }
  return 0;
}

int cmd_generate(const Args& args) {
  std::string model_dir, prompt;
  int max_new = 200, threads = 0;
  float temperature = 0.0f;
  std::uint64_t seed = 0;
  po::options_description desc("ptqlab generate options");
  desc.add_options()
      ("model", po::value(&model_dir)->required(), "Hugging Face LLaMA model directory")
      ("prompt", po::value(&prompt)->required(), "text to continue (BOS is put in front)")
      ("max-new-tokens", po::value(&max_new)->default_value(200), "stop after this many new tokens")
      ("temperature", po::value(&temperature)->default_value(0.0f), "0: greedy; > 0: sample from softmax(logits/T)")
      ("seed", po::value(&seed)->default_value(0), "random seed for sampling")
      ("threads", po::value(&threads)->default_value(0), "worker threads (0: all cores)");
  auto vm = parse("generate", "--model DIR --prompt TEXT [--max-new-tokens N]", desc, args);
  if (!vm) return 0;
  if (max_new < 0) throw Error(fmt::format("--max-new-tokens must be >= 0, got {}", max_new));
  if (temperature < 0) throw Error(fmt::format("--temperature must be >= 0, got {}", temperature));
  auto thread_limit = limit_threads(threads);

  const auto model = open_model(model_dir);
  const auto tokenizer = load_tokenizer(model_dir);
  std::vector<int> ids = {model.config.bos_token_id};
  const auto prompt_ids = tokenizer.encode(prompt);
  ids.insert(ids.end(), prompt_ids.begin(), prompt_ids.end());

  GenerateOptions options;
  options.max_new_tokens = max_new;
  options.temperature = temperature;
  options.seed = seed;
  // llama2.c-trained models mark a new story with BOS and never emit EOS; stop on either.
  options.stop_ids = {model.config.bos_token_id, model.config.eos_token_id};
  const auto out = generate(model, ids, options);
  std::vector<int> all = prompt_ids;
  all.insert(all.end(), out.begin(), out.end());
  fmt::print("{}\n", tokenizer.decode(all));
  return 0;
}

int cmd_info(const Args& args) {
  std::string model_dir;
  po::options_description desc("ptqlab info options");
  desc.add_options()("model", po::value(&model_dir)->required(), "Hugging Face LLaMA model directory")(
      "json", "print one JSON object");
  auto vm = parse("info", "--model DIR [--json]", desc, args);
  if (!vm) return 0;
  const auto model = open_model(model_dir);
  const auto& c = model.config;
  if (vm->count("json")) {
    nlohmann::json j = {{"hidden_size", c.hidden_size},     {"intermediate_size", c.intermediate_size},
                        {"num_layers", c.num_layers},       {"num_heads", c.num_heads},
                        {"num_kv_heads", c.num_kv_heads},   {"head_dim", c.head_dim},
                        {"vocab_size", c.vocab_size},       {"max_position_embeddings", c.max_position_embeddings},
                        {"tied_lm_head", c.tie_word_embeddings}, {"dtype", model.source_dtype},
                        {"parameters", model.parameter_count()}};
    fmt::print("{}\n", j.dump());
    return 0;
  }
  fmt::print("model       {}\n", model_dir);
  fmt::print("layers      {} (hidden {}, intermediate {})\n", c.num_layers, c.hidden_size, c.intermediate_size);
  fmt::print("attention   {} heads, {} kv heads (head_dim {}){}\n", c.num_heads, c.num_kv_heads, c.head_dim,
             c.num_kv_heads < c.num_heads ? ", grouped-query" : "");
  fmt::print("vocab       {} ({} lm_head)\n", c.vocab_size, c.tie_word_embeddings ? "tied" : "separate");
  fmt::print("context     {} positions, rope_theta {}, rms_norm_eps {}\n", c.max_position_embeddings, c.rope_theta,
             c.rms_norm_eps);
  fmt::print("weights     {} parameters, stored as {}\n", model.parameter_count(), model.source_dtype);
  return 0;
}

}  // namespace ptqlab::cli
