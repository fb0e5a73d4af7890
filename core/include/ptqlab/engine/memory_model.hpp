#pragma once
// The memory model (docs/architecture.md, "Memory model"): what `ptqlab run` and `ptqlab ppl`
// will hold at their peak, predicted from the shapes before any compute, printed, and compared
// with the memory available (MemAvailable, or the cgroup limit when lower; --memory-limit
// overrides). Counted: anonymous memory the process owns (RssAnon). Mapped checkpoint pages are
// file cache and are not counted.
#include "ptqlab/support/internal.hpp"  // not part of the plugin SDK
#include <cstddef>
#include <string>
#include <vector>

#include "ptqlab/model/model.hpp"

namespace ptqlab {

struct MemoryItem {
  std::string what;
  double bytes = 0;
};

struct MemoryEstimate {
  std::vector<MemoryItem> shared;  // held once for the whole run
  struct Arm {
    std::string name;
    std::vector<MemoryItem> items;  // at the arm's peak
    double bytes() const;
  };
  std::vector<Arm> arms;
  int jobs = 1;  // arms at a time: the `jobs` largest arm peaks are summed
  double shared_bytes() const;
  double total_bytes() const;
  // "predicted peak memory 2.31 GB: shared (...) + arm x (...) ..." over several lines.
  std::string describe() const;
};

// What the evaluation of `windows` windows of `seq_len` needs beyond the weights the model holds:
// one stored layer widened, the head widened, hidden states of a group, one layer's temporaries,
// logits of the sequences computed at once.
std::vector<MemoryItem> eval_memory(const LlamaModel& model, long long windows, int seq_len, int batch_windows,
                                    std::size_t activation_budget);

// Bytes of memory available to this process: MemAvailable of /proc/meminfo, or the cgroup's
// memory.max minus its current usage when that is lower. 0 when unknown.
double available_memory_bytes();

// "6G", "6GB", "512M", "1.5GiB", "123456" (bytes). Throws ptqlab::Error naming `option`.
double parse_memory_size(const std::string& text, const std::string& option);
std::string format_bytes(double bytes);  // "2.31 GB"

}  // namespace ptqlab
