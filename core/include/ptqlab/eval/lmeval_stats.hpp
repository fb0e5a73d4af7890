#pragma once
// lm-evaluation-harness's aggregation and standard errors, bit for bit
// (research/evaluation.md §1.6): closed-form stderr of means, and the bootstrap stderr of
// perplexity with CPython's `random` (MT19937 seeded by init_by_array, random() from two draws).
#include "ptqlab/support/internal.hpp"  // not part of the plugin SDK
#include <cstdint>
#include <span>
#include <vector>

namespace ptqlab {

// CPython's random.Random: seed(n) for n >= 0, random(), getrandbits(k <= 32), randbelow, randint.
class PyRandom {
 public:
  explicit PyRandom(std::uint64_t seed);
  std::uint32_t next_u32();
  double random();                    // [0, 1) with 53 random bits
  std::uint32_t getrandbits(int k);   // 1 <= k <= 32
  std::uint64_t randbelow(std::uint64_t n);  // n in [1, 2^32]
  std::int64_t randint(std::int64_t a, std::int64_t b) { return a + static_cast<std::int64_t>(randbelow(b - a + 1)); }

 private:
  void init_genrand(std::uint32_t s);
  void init_by_array(std::span<const std::uint32_t> key);
  std::uint32_t mt_[624];
  int index_ = 625;
};

// Python's sum(xs) / len(xs), summed left to right.
double py_mean(std::span<const double> xs);
// lm-eval sample_stddev: sqrt(sum((x - mean)^2) / (n - 1)); NaN for n <= 1.
double sample_stddev(std::span<const double> xs);
// lm-eval mean_stderr: sample_stddev / sqrt(n); NaN ("N/A") for n <= 1.
double mean_stderr(std::span<const double> xs);
// lm-eval perplexity aggregation: exp(-mean(lls)).
double lmeval_perplexity(std::span<const double> lls);
// lm-eval bootstrap_stderr of perplexity: iters // c chunks of c = min(1000, iters) resamples, chunk
// i with Random(i), each resample n draws of floor(random() * n). NaN when n <= 1 or iters == 0.
// `first_values` (optional) receives the first resampled statistics, for tests.
double bootstrap_perplexity_stderr(std::span<const double> lls, long long iters,
                                   std::vector<double>* first_values = nullptr);

}  // namespace ptqlab
