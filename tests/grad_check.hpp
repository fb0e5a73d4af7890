#pragma once
// Finite-difference helpers shared by the backward tests (test_backward.cpp, test_model_backward.cpp,
// test_lora.cpp): central differences, index sampling, and GradCheck (see test_backward.cpp's
// file comment for the pass criterion).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <Eigen/Core>

namespace ptqlab {

using Eigen::Index;

// Central differences. A double variable is stepped by h; a float one by h rounded to float,
// dividing by the step actually taken.
template <class F>
double central(double& x, double h, F&& f) {
  const double x0 = x;
  x = x0 + h;
  const double fp = f();
  x = x0 - h;
  const double fm = f();
  x = x0;
  return (fp - fm) / (2 * h);
}

template <class F>
double central(float& x, double h, F&& f) {
  const float x0 = x;
  const float xp = static_cast<float>(x0 + h), xm = static_cast<float>(x0 - h);
  x = xp;
  const double fp = f();
  x = xm;
  const double fm = f();
  x = x0;
  return (fp - fm) / (static_cast<double>(xp) - static_cast<double>(xm));
}

// Up to k distinct indices of [0, n), all of them when n <= k.
inline std::vector<Index> pick(Index n, Index k, std::uint64_t seed) {
  std::vector<Index> idx(static_cast<std::size_t>(n));
  std::iota(idx.begin(), idx.end(), Index{0});
  if (n <= k) return idx;
  std::mt19937_64 rng(seed);
  std::shuffle(idx.begin(), idx.end(), rng);
  idx.resize(static_cast<std::size_t>(k));
  return idx;
}

// Analytic gradient entries next to their finite differences.
struct GradCheck {
  explicit GradCheck(std::string n) : name(std::move(n)) {}
  std::string name;
  std::vector<double> analytic, fd;
  void add(double a, double f) {
    analytic.push_back(a);
    fd.push_back(f);
  }
  // Expects every entry within rtol (see the file comment) and prints the worst errors.
  void expect(double rtol = 1e-3) const {
    ASSERT_FALSE(fd.empty()) << name;
    double max_fd = 0;
    for (double f : fd) max_fd = std::max(max_fd, std::abs(f));
    ASSERT_GT(max_fd, 0.0) << name << ": all finite differences are zero, the check checks nothing";
    const double floor = 1e-2 * max_fd;
    double worst = 0, worst_abs = 0;
    std::size_t worst_i = 0;
    for (std::size_t i = 0; i < fd.size(); ++i) {
      const double err = std::abs(analytic[i] - fd[i]);
      worst_abs = std::max(worst_abs, err);
      const double rel = err / std::max(std::abs(fd[i]), floor);
      if (rel > worst) {
        worst = rel;
        worst_i = i;
      }
    }
    std::printf("[fd] %-34s %5zu entries  max|g| %.3e  max err/max|g| %.2e  max rel err %.2e\n", name.c_str(),
                fd.size(), max_fd, worst_abs / max_fd, worst);
    EXPECT_LE(worst, rtol) << name << ": entry " << worst_i << " analytic " << analytic[worst_i] << " fd "
                           << fd[worst_i];
  }
};

}  // namespace ptqlab
