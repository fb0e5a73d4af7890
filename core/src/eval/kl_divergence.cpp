#include "ptqlab/eval/kl_divergence.hpp"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <fstream>
#include <mutex>
#include <optional>

#include <fmt/format.h>
#include <tbb/task_arena.h>

#include "ptqlab/engine/artifact_cache.hpp"
#include "ptqlab/engine/experiment.hpp"
#include "ptqlab/eval/scoring.hpp"
#include "ptqlab/support/error.hpp"
#include "ptqlab/support/progress.hpp"
#include "ptqlab/support/sha256.hpp"
#include "ptqlab/support/stop.hpp"
#include "windows.hpp"

namespace ptqlab {

KldToken kld_token(std::span<const float> b, std::span<const float> q, int target) {
  const double lse_b = log_sum_exp(b), lse_q = log_sum_exp(q);
  KldToken t;
  double kld = 0;
  for (std::size_t v = 0; v < b.size(); ++v) {
    const double lpb = b[v] - lse_b, lpq = q[v] - lse_q;
    kld += std::exp(lpb) * (lpb - lpq);
  }
  t.kld = kld;
  t.nll_base = lse_b - b[target];
  t.nll_q = lse_q - q[target];
  t.dp = std::exp(-t.nll_q) - std::exp(-t.nll_base);
  t.same_top = argmax_first(b) == argmax_first(q);
  return t;
}

double kld_percentile(const std::vector<double>& sorted, double fraction) {
  if (sorted.empty()) return std::nan("");
  if (fraction <= 0) return sorted.front();
  if (fraction >= 1) return sorted.back();
  const double pos = fraction * static_cast<double>(sorted.size() - 1);
  const auto lo = static_cast<std::size_t>(pos);
  const double frac = pos - static_cast<double>(lo);
  if (lo + 1 >= sorted.size()) return sorted[lo];
  return sorted[lo] + frac * (sorted[lo + 1] - sorted[lo]);
}

namespace {

// llama.cpp's running-sum mean and uncertainty: unc = sqrt((E[x²] - E[x]²) / (n - 1)), 0 for n <= 10.
struct Moments {
  double sum = 0, sum2 = 0;
  std::size_t n = 0;
  void add(double x) {
    sum += x;
    sum2 += x * x;
    ++n;
  }
  double mean() const { return sum / static_cast<double>(n); }
  double unc() const {
    const double m = mean(), var = sum2 / static_cast<double>(n) - m * m;
    return var > 0 && n > 10 ? std::sqrt(var / static_cast<double>(n - 1)) : 0.0;
  }
};

void percentiles(std::map<std::string, double>& m, const std::string& prefix, std::vector<double> v,
                 const std::vector<std::pair<const char*, double>>& points) {
  std::sort(v.begin(), v.end());
  for (const auto& [name, f] : points) m[prefix + name] = kld_percentile(v, f);
}

}  // namespace

std::map<std::string, double> kld_statistics(const std::vector<KldToken>& tokens) {
  std::map<std::string, double> m;
  const std::size_t n = tokens.size();
  if (n == 0) return m;
  Moments kld, dp, dp2, nq, nb;
  double sum_qb = 0;
  double dp4 = 0;
  std::size_t same = 0;
  std::vector<double> klds, dps;
  for (const auto& t : tokens) {
    kld.add(t.kld);
    dp.add(t.dp);
    dp2.add(t.dp * t.dp);
    dp4 += t.dp * t.dp * t.dp * t.dp;
    nq.add(t.nll_q);
    nb.add(t.nll_base);
    sum_qb += t.nll_q * t.nll_base;
    same += t.same_top ? 1 : 0;
    klds.push_back(t.kld);
    dps.push_back(t.dp);
  }
  const double dn = static_cast<double>(n);
  m["tokens"] = dn;
  m["kld_mean"] = kld.mean();
  m["kld_mean_unc"] = kld.unc();
  percentiles(m, "kld_", klds,
              {{"max", 1.0}, {"p99.9", 0.999}, {"p99", 0.99}, {"p95", 0.95}, {"p90", 0.90}, {"median", 0.5},
               {"p10", 0.10}, {"p5", 0.05}, {"p1", 0.01}, {"p0.1", 0.001}, {"min", 0.0}});
  m["dp_mean"] = dp.mean();
  m["dp_mean_unc"] = dp.unc();
  percentiles(m, "dp_", dps,
              {{"max", 1.0}, {"p99.9", 0.999}, {"p99", 0.99}, {"p95", 0.95}, {"p90", 0.90}, {"p75", 0.75},
               {"median", 0.5}, {"p25", 0.25}, {"p10", 0.10}, {"p5", 0.05}, {"p1", 0.01}, {"p0.1", 0.001},
               {"min", 0.0}});
  const double rms = std::sqrt(dp2.mean());
  m["dp_rms"] = rms;
  {
    // unc of dp² from the fourth moment, then d sqrt(x) = dx / (2 sqrt x)
    const double mu2 = dp2.mean(), var = dp4 / dn - mu2 * mu2;
    const double unc2 = var > 0 && n > 10 ? std::sqrt(var / (dn - 1)) : 0.0;
    m["dp_rms_unc"] = rms > 0 ? 0.5 / rms * unc2 : 0.0;
  }
  const double f = static_cast<double>(same) / dn;
  m["same_top"] = f;
  m["same_top_unc"] = n > 1 ? std::sqrt(f * (1 - f) / (dn - 1)) : 0.0;

  const double mq = nq.mean(), mb = nb.mean(), uq = nq.unc(), ub = nb.unc();
  const double cov = n >= 10 ? (sum_qb / dn - mq * mb) / (dn - 1) : 0.0;
  const double pq = std::exp(mq), pb = std::exp(mb);
  m["ppl_q"] = pq;
  m["ppl_q_unc"] = pq * uq;
  m["ppl_base"] = pb;
  m["ppl_base_unc"] = pb * ub;
  m["cor_ln_ppl"] = uq > 0 && ub > 0 ? cov / (uq * ub) : 1.0;
  const double ratio = mq - mb;
  const double ratio_unc = std::sqrt(std::max(0.0, uq * uq + ub * ub - 2 * cov));
  m["ln_ppl_ratio"] = ratio;
  m["ln_ppl_ratio_unc"] = ratio_unc;
  m["ppl_ratio"] = std::exp(ratio);
  m["ppl_ratio_unc"] = std::exp(ratio) * ratio_unc;
  m["ppl_diff"] = pq - pb;
  const double pq_unc = pq * uq, pb_unc = pb * ub;
  m["ppl_diff_unc"] = std::sqrt(std::max(0.0, pq_unc * pq_unc + pb_unc * pb_unc - 2 * pq * pb * cov));
  return m;
}

namespace {

constexpr char kLogitsMagic[8] = {'P', 'T', 'Q', 'L', 'O', 'G', 'T', '1'};

// The reference file: magic, u64 key length, key, u64 windows, u64 positions per window, u64
// vocab, then float32 logits [windows][positions][vocab].
std::uint64_t header_bytes(const std::string& key) { return 8 + 8 + key.size() + 3 * 8; }

bool reference_file_ok(const std::filesystem::path& file, const std::string& key, std::uint64_t windows,
                       std::uint64_t positions, std::uint64_t vocab) {
  std::ifstream in(file, std::ios::binary);
  if (!in) return false;
  char magic[8];
  std::uint64_t klen = 0, w = 0, p = 0, v = 0;
  if (!in.read(magic, 8) || std::memcmp(magic, kLogitsMagic, 8) != 0) return false;
  if (!in.read(reinterpret_cast<char*>(&klen), 8) || klen != key.size()) return false;
  std::string stored(klen, '\0');
  if (!in.read(stored.data(), static_cast<std::streamsize>(klen)) || stored != key) return false;
  if (!in.read(reinterpret_cast<char*>(&w), 8) || !in.read(reinterpret_cast<char*>(&p), 8) ||
      !in.read(reinterpret_cast<char*>(&v), 8))
    return false;
  if (w != windows || p != positions || v != vocab) return false;
  std::error_code ec;
  return std::filesystem::file_size(file, ec) == header_bytes(key) + windows * positions * vocab * 4 && !ec;
}

// One process computes a reference file at a time per key; other arms wait, then read it.
std::mutex& reference_mutex() {
  static std::mutex m;
  return m;
}

}  // namespace

KldResult evaluate_kld(const LlamaModel& model, const LlamaModel& reference, std::span<const int> stream,
                       const KldOptions& options) {
  if (reference.config.vocab_size != model.config.vocab_size)
    throw Error("the reference model has another vocabulary");
  const WindowPlan plan =
      plan_windows(model.config, stream.size(), options.seq_len, options.max_windows, 2, "seq_len");
  const int seq_len = plan.seq_len;
  const long long windows = plan.windows;
  const int positions = seq_len - 1;  // position p predicts p + 1
  const std::size_t vocab = static_cast<std::size_t>(model.config.vocab_size);
  const std::size_t row_bytes = vocab * sizeof(float);
  int per_call = options.batch_windows > 0 ? options.batch_windows : std::max(1, 4096 / seq_len);
  if (options.batch_windows <= 0)  // bound the batch's reference logits to 64 MiB
    per_call = static_cast<int>(std::max<std::size_t>(
        1, std::min<std::size_t>(per_call, (64u << 20) / (row_bytes * static_cast<std::size_t>(positions)))));

  KldResult result;
  result.windows = windows;
  result.seq_len = seq_len;
  result.tokens.resize(static_cast<std::size_t>(windows) * positions);

  // The reference's logits of windows [first, first + n), into `out` [n][positions][vocab].
  auto reference_batch = [&](long long first, int n, std::vector<float>& out) {
    out.resize(static_cast<std::size_t>(n) * positions * vocab);
    const auto tokens = stream.subspan(static_cast<std::size_t>(first) * seq_len, static_cast<std::size_t>(n) * seq_len);
    for_each_logits(reference, tokens, BatchShape{n, seq_len}, 0, positions,
                    [&](int w, int p, std::span<const float> logits) {
                      std::copy(logits.begin(), logits.end(),
                                out.begin() + (static_cast<std::size_t>(w) * positions + p) * vocab);
                    });
  };

  // The reference file (content-addressed: reference model, tokens, windows).
  std::optional<std::ifstream> cached;
  if (!options.cache_dir.empty()) {
    const ArtifactCache cache(options.cache_dir);
    const std::string key = fmt::format(
        "kld-reference/v1|model:{}|tokens:{}|seq_len:{}|windows:{}", options.reference_key,
        sha256_hex(std::string(reinterpret_cast<const char*>(stream.data()),
                               static_cast<std::size_t>(windows) * seq_len * sizeof(int))),
        seq_len, windows);
    const auto file = cache.path_of(key, "kld-reference");
    result.reference_file = file;
    std::lock_guard in_process(reference_mutex());
    auto lock = cache.lock(key);
    // Isolated: while this thread waits inside its parallel loops it must not pick up another
    // arm's task, which would then wait for the mutex this thread holds.
    tbb::this_task_arena::isolate([&] {
    if (reference_file_ok(file, key, windows, positions, vocab)) {
      result.reference_from_cache = true;
    } else {
      static std::atomic<unsigned> counter{0};
      std::filesystem::create_directories(file.parent_path());
      const auto tmp = file.parent_path() / fmt::format(".{}.tmp-{}-{}", file.filename().string(), ::getpid(), counter++);
      {
        std::ofstream out(tmp, std::ios::binary);
        if (!out) throw Error(fmt::format("{}: cannot write the KL-divergence reference", tmp.string()));
        const std::uint64_t klen = key.size(), w = windows, p = positions, v = vocab;
        out.write(kLogitsMagic, 8);
        out.write(reinterpret_cast<const char*>(&klen), 8);
        out.write(key.data(), static_cast<std::streamsize>(klen));
        for (std::uint64_t x : {w, p, v}) out.write(reinterpret_cast<const char*>(&x), 8);
        std::optional<Progress> progress;
        if (options.show_progress) progress.emplace(options.label + " FP reference", windows, "windows");
        std::vector<float> buf;
        for (long long first = 0; first < windows; first += per_call) {
          throw_if_stop_requested();
          const int n = static_cast<int>(std::min<long long>(per_call, windows - first));
          reference_batch(first, n, buf);
          out.write(reinterpret_cast<const char*>(buf.data()), static_cast<std::streamsize>(buf.size() * sizeof(float)));
          if (progress) progress->advance(n);
        }
        if (progress) progress->finish();
        if (!out) {
          std::error_code ec;
          std::filesystem::remove(tmp, ec);
          throw Error(fmt::format("{}: cannot write the KL-divergence reference (disk full?)", tmp.string()));
        }
      }
      std::filesystem::rename(tmp, file);
    }
    });
    cached.emplace(file, std::ios::binary);
    cached->seekg(static_cast<std::streamoff>(header_bytes(key)));
    if (!*cached) throw Error(fmt::format("{}: cannot read the KL-divergence reference", file.string()));
  }

  std::optional<Progress> progress;
  if (options.show_progress) progress.emplace(options.label, windows, "windows");
  std::vector<float> base;
  for (long long first = 0; first < windows; first += per_call) {
    throw_if_stop_requested();
    const int n = static_cast<int>(std::min<long long>(per_call, windows - first));
    if (cached) {
      base.resize(static_cast<std::size_t>(n) * positions * vocab);
      if (!cached->read(reinterpret_cast<char*>(base.data()), static_cast<std::streamsize>(base.size() * sizeof(float))))
        throw Error(fmt::format("{}: the KL-divergence reference is truncated", result.reference_file.string()));
    } else {
      reference_batch(first, n, base);
    }
    const auto tokens = stream.subspan(static_cast<std::size_t>(first) * seq_len, static_cast<std::size_t>(n) * seq_len);
    for_each_logits(model, tokens, BatchShape{n, seq_len}, 0, positions, [&](int w, int p, std::span<const float> q) {
      const std::size_t row = static_cast<std::size_t>(w) * positions + p;
      const int target = tokens[static_cast<std::size_t>(w) * seq_len + p + 1];
      result.tokens[static_cast<std::size_t>(first) * positions + row] =
          kld_token(std::span<const float>(base.data() + row * vocab, vocab), q, target);
    });
    if (progress) progress->advance(n);
  }
  if (progress) progress->finish();
  result.metrics = kld_statistics(result.tokens);
  result.metrics["windows"] = static_cast<double>(windows);
  result.metrics["seq_len"] = seq_len;
  return result;
}

}  // namespace ptqlab
