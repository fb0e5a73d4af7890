#include "ptqlab/quant/calibration.hpp"

#ifdef __GLIBC__
#include <malloc.h>
#endif

#include <chrono>
#include <cmath>
#include <optional>
#include <random>
#include <utility>

#include <fmt/format.h>
#include <tbb/parallel_for.h>
#include <tbb/partitioner.h>

#include "ptqlab/engine/layer_checkpoint.hpp"
#include "ptqlab/nn/forward.hpp"
#include "ptqlab/quant/gptq.hpp"
#include "ptqlab/quant/linear_context.hpp"
#include "ptqlab/support/error.hpp"
#include "ptqlab/support/fault.hpp"

namespace ptqlab {

using Eigen::Index;

std::vector<std::vector<int>> draw_calibration_windows(const std::vector<int>& stream, int nsamples, int seq_len,
                                                       std::uint64_t seed) {
  if (seq_len < 2) throw Error(fmt::format("calibration seq_len must be at least 2, got {}", seq_len));
  if (static_cast<long long>(stream.size()) < seq_len)
    throw Error(fmt::format("the calibration text has {} tokens, fewer than one window of {} (calibration.seq_len)",
                            stream.size(), seq_len));
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<std::size_t> start(0, stream.size() - static_cast<std::size_t>(seq_len));
  std::vector<std::vector<int>> windows(nsamples);
  for (auto& w : windows) {
    const std::size_t s = start(rng);
    w.assign(stream.begin() + static_cast<long>(s), stream.begin() + static_cast<long>(s) + seq_len);
  }
  return windows;
}

void accumulate_gram(const Matrix& x, Eigen::MatrixXd& sum) {
  const Index n = x.cols();
  if (sum.rows() != n || sum.cols() != n) throw std::logic_error("accumulate_gram: sum does not match x");
  constexpr Index kTile = 256;
  if (n <= kTile) {
    Eigen::MatrixXf xtx(n, n);
    xtx.noalias() = x.transpose() * x;
    sum += xtx.cast<double>();
    return;
  }
  const Index tiles = (n + kTile - 1) / kTile;
  tbb::parallel_for(
      tbb::blocked_range<Index>(0, tiles * (tiles + 1) / 2, 1),
      [&](const tbb::blocked_range<Index>& r) {
        Eigen::MatrixXf t(kTile, kTile);
        for (Index task = r.begin(); task < r.end(); ++task) {
          Index i = 0;
          while ((i + 1) * (i + 2) / 2 <= task) ++i;
          const Index j = task - i * (i + 1) / 2;
          const Index i0 = i * kTile, j0 = j * kTile;
          const Index ri = std::min(kTile, n - i0), rj = std::min(kTile, n - j0);
          const auto xi = x.middleCols(i0, ri);
          if (i == j) {
            t.resize(ri, ri);
            t.setZero();
            t.selfadjointView<Eigen::Lower>().rankUpdate(xi.transpose());  // lower triangle only
            auto s = sum.block(i0, i0, ri, ri);
            s.triangularView<Eigen::Lower>() += t.cast<double>();
            s.triangularView<Eigen::StrictlyUpper>() += t.transpose().cast<double>();
          } else {
            t.resize(ri, rj);
            t.noalias() = xi.transpose() * x.middleCols(j0, rj);
            sum.block(i0, j0, ri, rj) += t.cast<double>();
            sum.block(j0, i0, rj, ri) += t.transpose().cast<double>();
          }
        }
      },
      tbb::simple_partitioner());
}

namespace {

// sqrt(Σ num / Σ den) over blocks of 64 output rows run in parallel: `block(r0, nr)` returns one
// block's (num, den) in double; the blocks are added in order, so the value does not depend on
// the thread count.
template <class BlockSums>
double ratio_over_row_blocks(Index rows, BlockSums block) {
  constexpr Index kRows = 64;
  const Index blocks = (rows + kRows - 1) / kRows;
  std::vector<std::pair<double, double>> sums(static_cast<std::size_t>(blocks));
  tbb::parallel_for(tbb::blocked_range<Index>(0, blocks, 1), [&](const tbb::blocked_range<Index>& r) {
    for (Index b = r.begin(); b < r.end(); ++b)
      sums[static_cast<std::size_t>(b)] = block(b * kRows, std::min(kRows, rows - b * kRows));
  }, tbb::simple_partitioner());
  double num = 0, den = 0;
  for (const auto& [n, d] : sums) {
    num += n;
    den += d;
  }
  return den > 0 ? std::sqrt(std::max(0.0, num) / den) : 0.0;
}

// relative_output_error above 256 inputs (LLaMA-7B's linears: 4.6 TFLOP of double GEMMs per
// layer done the small-shape way, single-threaded, and 1.1 GB of temporaries at down_proj): the
// two quadratic forms in float32 products against a float32 copy of H, in parallel row blocks,
// each row's sums in double. Float32 products change it in about the 6th digit (a diagnostic).
double relative_output_error_blocked(const Matrix& w, const Matrix& wq, const Eigen::MatrixXd& h) {
  const Index n = w.cols();
  const Eigen::MatrixXf hf = h.cast<float>();
  return ratio_over_row_blocks(w.rows(), [&](Index r0, Index nr) {
    const Eigen::MatrixXf d = wq.middleRows(r0, nr) - w.middleRows(r0, nr);
    Eigen::MatrixXf dh(nr, n), wh(nr, n);
    dh.noalias() = d * hf;
    wh.noalias() = w.middleRows(r0, nr) * hf;
    double sn = 0, sd = 0;
    for (Index i = 0; i < nr; ++i)
      for (Index j = 0; j < n; ++j) {
        sn += static_cast<double>(dh(i, j)) * d(i, j);
        sd += static_cast<double>(wh(i, j)) * w(r0 + i, j);
      }
    return std::pair<double, double>{sn, sd};
  });
}

// Windows are pushed through the layers in batches of about 4096 tokens.
int windows_per_batch(int seq_len) { return std::max(1, 4096 / seq_len); }

class StatsObserver : public ForwardObserver {
 public:
  explicit StatsObserver(ModelInputStats& stats) : stats_(stats) {}
  void on_linear_input(int layer, LinearInput which, const Matrix& x, BatchShape) override {
    auto& s = stats_[layer][static_cast<int>(which)];
    if (s.tokens == 0) {
      s.max_abs = Eigen::VectorXf::Zero(x.cols());
      s.mean_abs = Eigen::VectorXf::Zero(x.cols());  // holds the sum until finished
    }
    s.max_abs = s.max_abs.cwiseMax(x.cwiseAbs().colwise().maxCoeff().transpose());
    s.mean_abs += x.cwiseAbs().colwise().sum().transpose();
    s.tokens += x.rows();
  }

 private:
  ModelInputStats& stats_;
};

// Accumulates Σ XᵀX of the four inputs of one layer (float GEMM per batch, double across batches).
// With keep_below > 0 it also keeps the inputs X of every input with more than keep_below columns
// (the records' output error is cheaper on X than on H when there are fewer tokens than inputs).
// An input whose X is kept and whose components do not use a Hessian (needed[k] false: RTN with no
// mask) gets no Hessian at all: at 7B that is 1.37 GB of float64 per layer nobody reads.
class HessianObserver : public ForwardObserver {
 public:
  std::array<Eigen::MatrixXd, 4> sum;
  std::array<std::vector<Matrix>, 4> inputs;
  std::array<bool, 4> needed{true, true, true, true};
  std::int64_t tokens = 0;
  Index keep_below = 0;

  void on_linear_input(int, LinearInput which, const Matrix& x, BatchShape) override {
    const int k = static_cast<int>(which);
    const bool keep_x = keep_below > 0 && x.cols() > keep_below;
    if (needed[k] || !keep_x) {
      auto& h = sum[k];
      if (h.size() == 0) h = Eigen::MatrixXd::Zero(x.cols(), x.cols());
      accumulate_gram(x, h);
    }
    if (keep_x) inputs[k].push_back(x);
    if (which == LinearInput::attn_in) tokens += x.rows();
  }
};

std::vector<int> flatten(const std::vector<std::vector<int>>& windows, std::size_t first, std::size_t n) {
  std::vector<int> out;
  for (std::size_t i = first; i < first + n; ++i) out.insert(out.end(), windows[i].begin(), windows[i].end());
  return out;
}

bool all_finite(const Matrix& m) { return m.allFinite(); }

}  // namespace

// relative_output_error on the inputs themselves: ||X Dᵀ||² / ||X Wᵀ||² over the batches (the
// Hessian's 2/n cancels), float32 products in parallel row blocks, sums in double. The same
// quantity as from H, at 2·tokens·rows·n flops instead of 2·rows·n².
double relative_output_error_on_inputs(const Matrix& w, const Matrix& wq, const std::vector<Matrix>& xs) {
  return ratio_over_row_blocks(w.rows(), [&](Index r0, Index nr) {
    const Matrix d = wq.middleRows(r0, nr) - w.middleRows(r0, nr);
    Matrix y;
    double sn = 0, sd = 0;
    for (const Matrix& x : xs) {
      y.noalias() = x * d.transpose();
      sn += y.cast<double>().squaredNorm();
      y.noalias() = x * w.middleRows(r0, nr).transpose();
      sd += y.cast<double>().squaredNorm();
    }
    return std::pair<double, double>{sn, sd};
  });
}

// ||X Dᵀ||_F / ||X Wᵀ||_F from H ∝ XᵀX: sqrt(tr(D H Dᵀ) / tr(W H Wᵀ)).
double relative_output_error(const Matrix& w, const Matrix& wq, const Eigen::MatrixXd& h) {
  if (w.cols() > 256) return relative_output_error_blocked(w, wq, h);
  const Eigen::MatrixXd wd = w.cast<double>();
  const Eigen::MatrixXd d = wq.cast<double>() - wd;
  const double num = ((d * h).cwiseProduct(d)).sum();
  const double den = ((wd * h).cwiseProduct(wd)).sum();
  return den > 0 ? std::sqrt(std::max(0.0, num) / den) : 0.0;
}

ModelInputStats collect_input_stats(const LlamaModel& model, const std::vector<std::vector<int>>& windows) {
  ModelInputStats stats(model.config.num_layers);
  if (windows.empty()) return stats;
  const int seq_len = static_cast<int>(windows[0].size());
  const int per_batch = windows_per_batch(seq_len);
  StatsObserver observer(stats);
  // Layer by layer over all batches: one layer's float32 weights at a time. The observer sees each
  // layer's batches in batch order, as before, so the statistics are unchanged.
  std::vector<Matrix> hidden;
  std::vector<BatchShape> shapes;
  for (std::size_t first = 0; first < windows.size(); first += per_batch) {
    const auto n = std::min<std::size_t>(per_batch, windows.size() - first);
    hidden.push_back(embed_tokens(model, flatten(windows, first, n)));
    shapes.push_back(BatchShape{static_cast<int>(n), seq_len});
  }
  decoder_forward_layer_major(model, hidden, shapes, &observer);
  for (auto& layer : stats)
    for (auto& s : layer)
      if (s.tokens > 0) s.mean_abs /= static_cast<float>(s.tokens);
  return stats;
}

std::vector<LinearRecord> quantize_layerwise(LlamaModel& model, const std::vector<std::vector<int>>& windows,
                                             const LayerwiseOptions& options) {
  return quantize_layerwise_resumable(model, windows, options, LayerwiseResume{});
}

std::vector<LinearRecord> quantize_layerwise_resumable(LlamaModel& model, const std::vector<std::vector<int>>& windows,
                                                       const LayerwiseOptions& options, const LayerwiseResume& resume) {
  if (options.quantizer == nullptr && options.plan.empty()) throw std::logic_error("quantize_layerwise: no quantizer");
  if (!options.plan.empty() && static_cast<int>(options.plan.size()) != model.config.num_layers)
    throw std::logic_error("quantize_layerwise: the plan does not cover every layer");
  if (windows.empty()) throw Error("quantization needs calibration windows (calibration.nsamples >= 1)");
  const auto& c = model.config;
  const int seq_len = static_cast<int>(windows[0].size());
  const int per_batch = windows_per_batch(seq_len);
  const RopeTable rope(c.head_dim, c.rope_theta, seq_len);

  // Which quantizer and mask each linear gets: the arm's, or the allocation plan's.
  auto choice = [&options](int l, std::size_t i) {
    return options.plan.empty() ? LayerwiseOptions::LinearChoice{options.quantizer, options.mask} : options.plan[l][i];
  };
  auto per_layer_at = [&](int l) {
    return choice(l, 0).quantizer->granularity() == Quantizer::Granularity::decoder_layer;
  };
  bool keep_fp_stream = false;
  for (int l = 0; l < c.num_layers; ++l)
    keep_fp_stream = keep_fp_stream || (per_layer_at(l) && choice(l, 0).quantizer->needs_fp_stream());

  // The calibration streams, batch by batch: hidden states entering the current layer. The FP
  // stream is kept only for quantizers that train against it.
  LayerStreams streams{ActivationBatches(options.stream_dtype), ActivationBatches(options.stream_dtype), {}};
  if (resume.streams != nullptr) {
    streams = std::move(*resume.streams);
    if (keep_fp_stream && streams.fp.size() != streams.quant.size())
      throw std::logic_error("quantize_layerwise: resumed without the FP stream");
    if (streams.quant.dtype() != options.stream_dtype)
      throw std::logic_error("quantize_layerwise: resumed with another stream dtype");
  } else {
    for (std::size_t first = 0; first < windows.size(); first += per_batch) {
      const auto n = std::min<std::size_t>(per_batch, windows.size() - first);
      streams.quant.push_back(embed_tokens(model, flatten(windows, first, n)));
      streams.shapes.push_back(BatchShape{static_cast<int>(n), seq_len});
    }
    if (keep_fp_stream) streams.fp = streams.quant;
  }

  auto stats_of = [&options](int l, Linear which) -> const InputStats& {
    if (options.input_stats == nullptr || options.input_stats->empty())
      throw Error(fmt::format("layer {} {}: input statistics were not collected", l, linear_name(which)));
    return (*options.input_stats)[l][static_cast<int>(input_of(which))];
  };

  // Fewer calibration tokens than inputs (e.g. 4 x 512 at 7B): the records use X, not H. Never at
  // the shipped models' sizes (256 inputs at most), whose records stay the double-H ones.
  const Index keep_inputs_above = std::max<Index>(256, static_cast<Index>(windows.size() * windows[0].size()));

  std::vector<LinearRecord> records = resume.records;
  for (int l = resume.start_layer; l < c.num_layers; ++l) {
    if (options.on_layer) options.on_layer(l, c.num_layers);
    // The layer's float32 weights exist only while it is quantized: the copy the quantizer changes
    // and, for decoder-layer quantizers and the FP stream, the original (their target). Per-linear
    // quantizers keep only the linear being quantized, for its record.
    DecoderLayer layer = model.layer_copy(l);
    const bool per_layer = per_layer_at(l);
    std::optional<DecoderLayer> original;
    if (per_layer || keep_fp_stream) original = layer;

    // 1. Hessians of the inputs the FP layer sees on the quantized stream.
    HessianObserver hess;
    hess.keep_below = keep_inputs_above;
    // An input's Hessian is needed by a decoder-layer quantizer (it may read any), by a mask (the
    // magnitude mask reads its diagonal), or by a quantizer that declares it.
    hess.needed.fill(false);
    for (std::size_t i = 0; i < kAllLinears.size(); ++i) {
      const auto& ch = choice(l, i);
      const int k = static_cast<int>(input_of(kAllLinears[i]));
      hess.needed[k] = hess.needed[k] || per_layer || ch.mask != nullptr || ch.quantizer->needs_hessian();
    }
    auto phase = [&options](const std::string& what) {
      if (options.on_phase) options.on_phase(what);
    };
    phase("Hessians");
    for (std::size_t b = 0; b < streams.quant.size(); ++b) {
      Matrix h = streams.quant.get(b);
      decoder_layer_forward(c, layer, rope, streams.shapes[b], h, l, &hess);
    }
    for (auto& h : hess.sum) h *= 2.0 / static_cast<double>(hess.tokens);
    fault_point("calibration");
    auto hessian_of = [&hess, l](Linear which) -> const Eigen::MatrixXd& {
      const auto& h = hess.sum[static_cast<int>(input_of(which))];
      if (h.size() == 0)
        throw std::logic_error(fmt::format("layer {} {}: a component read a Hessian it did not declare (needs_hessian)",
                                           l, linear_name(which)));
      return h;
    };
    // One inverse-Hessian factor per input and dampening, shared by the layer's masks and linears.
    InverseFactorCache factors;

    // 2. Masks, then quantization: linear by linear, or the whole layer at once.
    std::array<SalientMask, 7> masks;
    std::array<BitCount, 7> bits;
    std::array<double, 7> seconds{};
    auto linear_context = [&](Linear which) {
      return layer_linear_context(c, l, which, options.seed, options.log, hessian_of, factors, stats_of);
    };
    for (std::size_t i = 0; i < kAllLinears.size(); ++i)
      if (Mask* m = choice(l, i).mask) masks[i] = m->select(linear_context(kAllLinears[i]), layer.linear(kAllLinears[i]));

    // 3. Records: errors against the original weights, on this layer's quantized-stream inputs.
    auto record = [&](std::size_t i, const Matrix& w0) {
      const Linear which = kAllLinears[i];
      const Matrix& w = layer.linear(which);
      if (!all_finite(w))
        throw Error(fmt::format("layer {} {}: the quantizer produced non-finite weights", l, linear_name(which)));
      LinearRecord rec;
      rec.bits = bits[i];
      if (choice(l, i).mask != nullptr) rec.bits.masks += masks[i].storage_bits;
      rec.seconds = seconds[i];
      rec.layer = l;
      rec.linear = linear_name(which);
      const double norm = w0.norm();
      rec.weight_error = norm > 0 ? (w - w0).norm() / norm : 0.0;
      const auto& xs = hess.inputs[static_cast<int>(input_of(which))];
      rec.output_error = xs.empty() ? relative_output_error(w0, w, hessian_of(which))
                                    : relative_output_error_on_inputs(w0, w, xs);
      records.push_back(rec);
    };

    if (per_layer) {
      LayerContext ctx;
      ctx.config = &c;
      ctx.layer = l;
      ctx.seed = options.seed;
      ctx.fp_layer = &*original;
      ctx.inputs = &streams;
      ctx.rope = &rope;
      ctx.input_stats = [&stats_of, l](Linear which) -> const InputStats& { return stats_of(l, which); };
      ctx.hessian = hessian_of;
      for (std::size_t i = 0; i < kAllLinears.size(); ++i)
        if (choice(l, i).mask != nullptr) ctx.masks[i] = &masks[i];
      ctx.log = options.log;
      ctx.log_prefix = fmt::format("layer{}", l);
      phase("quantize the layer");
      const auto t0 = std::chrono::steady_clock::now();
      bits = choice(l, 0).quantizer->quantize_layer(ctx, layer);
      fault_point("quantizer");
      seconds.fill(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / kAllLinears.size());
      phase("records");
      for (std::size_t i = 0; i < kAllLinears.size(); ++i) record(i, original->linear(kAllLinears[i]));
    } else {
      for (std::size_t i = 0; i < kAllLinears.size(); ++i) {
        const Linear which = kAllLinears[i];
        auto ctx = linear_context(which);
        if (choice(l, i).mask != nullptr) ctx.mask = &masks[i];
        phase(fmt::format("quantize {}", linear_name(which)));
        const Matrix w0 = original ? Matrix() : layer.linear(which);
        const auto t0 = std::chrono::steady_clock::now();
        bits[i] = choice(l, i).quantizer->quantize_linear(ctx, layer.linear(which));
        fault_point("quantizer");
        seconds[i] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        // The input's last linear (kAllLinears keeps an input's linears together): its factors go
        // before the record is taken and its Hessian after, so that at most one input's (down_proj's
        // 11008² at 7B) is held with its factor.
        const auto input = input_of(which);
        const bool last_of_input = i + 1 == kAllLinears.size() || input_of(kAllLinears[i + 1]) != input;
        if (last_of_input) factors.release(static_cast<int>(input));
        phase(fmt::format("record {}", linear_name(which)));
        record(i, original ? original->linear(which) : w0);
        if (last_of_input) {
          hess.sum[static_cast<int>(input)] = Eigen::MatrixXd();
          hess.inputs[static_cast<int>(input)].clear();
          hess.inputs[static_cast<int>(input)].shrink_to_fit();
        }
      }
    }

    // 4. The quantized layer produces the next layer's quantized stream; the FP layer the FP stream.
    phase("forward");
    for (std::size_t b = 0; b < streams.quant.size(); ++b) {
      Matrix x = streams.quant.take(b);
      decoder_layer_forward(c, layer, rope, streams.shapes[b], x);
      if (!streams.quant.put(b, std::move(x)))
        throw Error(fmt::format("layer {}: non-finite activations after quantization{}", l,
                                options.stream_dtype == StreamDType::f16 ? " (or beyond F16's range: stream_dtype bf16)" : ""));
      if (keep_fp_stream) {
        Matrix y = streams.fp.take(b);
        decoder_layer_forward(c, *original, rope, streams.shapes[b], y);
        streams.fp.put(b, std::move(y));
      }
    }
    phase("keep the layer");
    if (options.keep_layer)
      options.keep_layer(model, l, std::move(layer));
    else
      model.set_layer(l, std::move(layer));
    if (options.after_layer) options.after_layer(l, records);
    phase("checkpoint");
    if (resume.after_layer) resume.after_layer(l, records, streams);
#ifdef __GLIBC__
    // The layer's temporaries (tens of MB each, below glibc's mmap threshold, in the TBB workers'
    // arenas) go back to the system instead of waiting in free lists while the next layer runs.
    ::malloc_trim(0);
#endif
  }
  return records;
}

}  // namespace ptqlab
