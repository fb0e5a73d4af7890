#include "ptqlab/eval/lmeval_stats.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace ptqlab {

// The MT19937 of CPython's Modules/_randommodule.c (the reference algorithm of Matsumoto and
// Nishimura), written from the published description.
void PyRandom::init_genrand(std::uint32_t s) {
  mt_[0] = s;
  for (int i = 1; i < 624; ++i) mt_[i] = 1812433253u * (mt_[i - 1] ^ (mt_[i - 1] >> 30)) + static_cast<std::uint32_t>(i);
  index_ = 624;
}

void PyRandom::init_by_array(std::span<const std::uint32_t> key) {
  init_genrand(19650218u);
  std::size_t i = 1, j = 0;
  for (std::size_t k = std::max<std::size_t>(624, key.size()); k > 0; --k) {
    mt_[i] = (mt_[i] ^ ((mt_[i - 1] ^ (mt_[i - 1] >> 30)) * 1664525u)) + key[j] + static_cast<std::uint32_t>(j);
    ++i;
    ++j;
    if (i >= 624) {
      mt_[0] = mt_[623];
      i = 1;
    }
    if (j >= key.size()) j = 0;
  }
  for (std::size_t k = 623; k > 0; --k) {
    mt_[i] = (mt_[i] ^ ((mt_[i - 1] ^ (mt_[i - 1] >> 30)) * 1566083941u)) - static_cast<std::uint32_t>(i);
    ++i;
    if (i >= 624) {
      mt_[0] = mt_[623];
      i = 1;
    }
  }
  mt_[0] = 0x80000000u;
  index_ = 624;
}

PyRandom::PyRandom(std::uint64_t seed) {
  // Python seeds an int with its 32-bit words, least significant first; 0 is the key [0].
  std::vector<std::uint32_t> key;
  do {
    key.push_back(static_cast<std::uint32_t>(seed & 0xffffffffu));
    seed >>= 32;
  } while (seed != 0);
  init_by_array(key);
}

std::uint32_t PyRandom::next_u32() {
  if (index_ >= 624) {
    constexpr std::uint32_t upper = 0x80000000u, lower = 0x7fffffffu, matrix = 0x9908b0dfu;
    for (int k = 0; k < 624; ++k) {
      const std::uint32_t y = (mt_[k] & upper) | (mt_[(k + 1) % 624] & lower);
      mt_[k] = mt_[(k + 397) % 624] ^ (y >> 1) ^ ((y & 1u) ? matrix : 0u);
    }
    index_ = 0;
  }
  std::uint32_t y = mt_[index_++];
  y ^= y >> 11;
  y ^= (y << 7) & 0x9d2c5680u;
  y ^= (y << 15) & 0xefc60000u;
  y ^= y >> 18;
  return y;
}

double PyRandom::random() {
  const std::uint32_t a = next_u32() >> 5, b = next_u32() >> 6;
  return (a * 67108864.0 + b) * (1.0 / 9007199254740992.0);
}

std::uint32_t PyRandom::getrandbits(int k) { return next_u32() >> (32 - k); }

std::uint64_t PyRandom::randbelow(std::uint64_t n) {
  int k = 0;
  while (k < 64 && (n >> k) != 0) ++k;  // n.bit_length()
  std::uint64_t r = getrandbits(k);
  while (r >= n) r = getrandbits(k);
  return r;
}

double py_mean(std::span<const double> xs) {
  double s = 0;
  for (double x : xs) s += x;
  return s / static_cast<double>(xs.size());
}

double sample_stddev(std::span<const double> xs) {
  if (xs.size() <= 1) return std::numeric_limits<double>::quiet_NaN();
  const double mu = py_mean(xs);
  double s = 0;
  for (double x : xs) s += (x - mu) * (x - mu);
  return std::sqrt(s / static_cast<double>(xs.size() - 1));
}

double mean_stderr(std::span<const double> xs) {
  if (xs.size() <= 1) return std::numeric_limits<double>::quiet_NaN();
  return sample_stddev(xs) / std::sqrt(static_cast<double>(xs.size()));
}

double lmeval_perplexity(std::span<const double> lls) { return std::exp(-py_mean(lls)); }

double bootstrap_perplexity_stderr(std::span<const double> lls, long long iters, std::vector<double>* first_values) {
  const std::size_t n = lls.size();
  if (n <= 1 || iters <= 0) return std::numeric_limits<double>::quiet_NaN();
  const long long chunk = std::min(1000LL, iters);
  std::vector<double> stats;
  stats.reserve(static_cast<std::size_t>(iters / chunk * chunk));
  std::vector<double> sample(n);
  for (long long c = 0; c < iters / chunk; ++c) {
    PyRandom rnd(static_cast<std::uint64_t>(c));
    for (long long r = 0; r < chunk; ++r) {
      for (std::size_t i = 0; i < n; ++i)
        sample[i] = lls[static_cast<std::size_t>(std::floor(rnd.random() * static_cast<double>(n)))];
      stats.push_back(lmeval_perplexity(sample));
    }
  }
  if (first_values != nullptr) first_values->assign(stats.begin(), stats.begin() + std::min<std::size_t>(3, stats.size()));
  return sample_stddev(stats);
}

}  // namespace ptqlab
