// HDF5 result files (docs/results-schema.md).
//
// Writing: everything is validated first, then the file is built in memory with every HDF5 return
// code checked and the root attribute complete=1 written last; its image is written to
// ".<name>.tmp-<pid>-<n>" in the target directory, fsync'ed, renamed onto the target, and the
// directory is fsync'ed. Any failure removes the temporary file, so a file at the target path only
// ever exists complete.
//
// libhdf5 as Debian ships it (serial) is not thread-safe: every sequence of HDF5 calls in
// results_h5*.cpp runs under one process-wide mutex (Hdf5Lock).
//
// Below this file: results_h5_io (the lock, failures, HDF5 primitives), results_h5_write
// (validation, the in-memory image, the atomic write) and results_h5_read (checked reading).
#include "ptqlab/outputs/results.hpp"

#include <hdf5.h>

#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <utility>

#include <fmt/format.h>

#include "ptqlab/support/error.hpp"
#include "results_h5_io.hpp"
#include "results_h5_parts.hpp"

namespace ptqlab {
namespace {

namespace fs = std::filesystem;
using h5io::Failure;
using h5io::Hdf5Lock;
using h5io::Id;
using h5io::one_line;

Error write_error(const fs::path& path, const std::string& why) {
  return Error(one_line(fmt::format("{}: cannot write result: {}", path.string(), why)));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public functions.

void write_arm_result(const std::filesystem::path& path, const ArmResult& result) {
  try {
    h5io::write_result_file(path, result);
  } catch (const Failure& f) {
    throw write_error(path, f.what());
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw write_error(path, e.what());
  }
}

ArmResult read_arm_result(const std::filesystem::path& path) {
  Hdf5Lock lock;
  Id file;
  try {
    file = h5io::open_result(path);
  } catch (const Failure& f) {
    throw Error(one_line(fmt::format("{}: {}", path.string(), f.what())));
  }
  try {
    return h5io::read_contents(file);
  } catch (const Failure& f) {
    throw Error(one_line(fmt::format("{}: cannot read result: {}", path.string(), f.what())));
  } catch (const std::exception& e) {
    throw Error(one_line(fmt::format("{}: cannot read result: {}", path.string(), e.what())));
  }
}

std::optional<std::string> read_config_hash(const std::filesystem::path& path) {
  try {
    Hdf5Lock lock;
    Id file = h5io::open_result(path);
    return h5io::read_attr_string(file, "/", "config_hash");
  } catch (...) {
    return std::nullopt;
  }
}

std::string hdf5_version() {
  Hdf5Lock lock;
  unsigned major = 0, minor = 0, release = 0;
  if (H5get_libversion(&major, &minor, &release) < 0) {
    H5Eclear2(H5E_DEFAULT);
    return "unknown";
  }
  return fmt::format("{}.{}.{}", major, minor, release);
}

// ---------------------------------------------------------------------------------------------
// ResultWriter: one thread, a FIFO queue.

struct ResultWriter::Impl {
  struct Job {
    std::filesystem::path path;
    ArmResult result;
    std::promise<void> done;
  };

  std::mutex mutex;
  std::condition_variable wake;
  std::deque<Job> queue;
  bool stopping = false;
  std::thread thread;

  void run() {
    for (;;) {
      Job job;
      {
        std::unique_lock lock(mutex);
        wake.wait(lock, [&] { return stopping || !queue.empty(); });
        if (queue.empty()) return;  // stopping and drained
        job = std::move(queue.front());
        queue.pop_front();
      }
      try {
        write_arm_result(job.path, job.result);
        job.done.set_value();
      } catch (...) {
        job.done.set_exception(std::current_exception());
      }
    }
  }
};

ResultWriter::ResultWriter() : impl_(std::make_unique<Impl>()) {
  Impl* impl = impl_.get();
  impl->thread = std::thread([impl] { impl->run(); });
}

ResultWriter::~ResultWriter() {
  {
    std::lock_guard lock(impl_->mutex);
    impl_->stopping = true;
  }
  impl_->wake.notify_all();
  if (impl_->thread.joinable()) impl_->thread.join();
}

std::future<void> ResultWriter::submit(std::filesystem::path path, ArmResult result) {
  Impl::Job job{std::move(path), std::move(result), {}};
  auto future = job.done.get_future();
  {
    std::lock_guard lock(impl_->mutex);
    impl_->queue.push_back(std::move(job));
  }
  impl_->wake.notify_one();
  return future;
}

}  // namespace ptqlab
