#pragma once
// PTQ1.61's 1-D structured mask (research/ptq161.md §3.1–3.2): salient input channels chosen by the
// magnitude of their activations in the FP model. Shared by the mask plugin and by the ptq161
// quantizer (which computes it itself when the arm has no mask).
#include <algorithm>
#include <functional>
#include <vector>

#include "ptqlab/engine/plugin.hpp"

namespace ptqlab::ptq161 {

// a = clamp(stat, 1e-5); t = (a sorted descending)[floor(ratio * n)]; salient_j = a_j >= t.
// Without ties that is floor(ratio * n) + 1 channels (820 of 4096 at ratio 0.2). ratio 0: none.
inline SalientMask activation_channel_mask(const Eigen::VectorXf& stat, Eigen::Index rows, double ratio) {
  const Eigen::Index n = stat.size();
  SalientMask m;
  m.shape = SalientMask::Shape::channels;
  m.rows = rows;
  m.cols = n;
  m.salient.assign(static_cast<std::size_t>(n), 0);
  m.storage_bits = static_cast<double>(n);  // one bit per input channel
  if (ratio <= 0.0 || n == 0) return m;
  std::vector<float> a(stat.data(), stat.data() + n);
  for (auto& x : a) x = std::max(x, 1e-5f);
  std::vector<float> sorted = a;
  std::sort(sorted.begin(), sorted.end(), std::greater<float>());
  const auto k = std::min<Eigen::Index>(static_cast<Eigen::Index>(ratio * static_cast<double>(n)), n - 1);
  const float t = sorted[static_cast<std::size_t>(k)];
  for (Eigen::Index j = 0; j < n; ++j) m.salient[j] = a[j] >= t ? 1 : 0;
  return m;
}

// How many channels activation_channel_mask marks among n when the statistics are distinct (bit
// budgets predict from this): floor(ratio * n) + 1, capped at n; none for ratio 0.
inline Eigen::Index predicted_channel_count(Eigen::Index n, double ratio) {
  if (ratio <= 0.0 || n == 0) return 0;
  return std::min<Eigen::Index>(static_cast<Eigen::Index>(ratio * static_cast<double>(n)), n - 1) + 1;
}

inline const Eigen::VectorXf& channel_statistic(const InputStats& s, const std::string& statistic) {
  return statistic == "mean" ? s.mean_abs : s.max_abs;
}

}  // namespace ptqlab::ptq161
