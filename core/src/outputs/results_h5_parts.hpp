#pragma once
// The two halves under results_h5.cpp's public functions (private to core/src/outputs/; the write
// protocol and the thread-safety rules are described at the top of results_h5.cpp): writing a
// result file (results_h5_write.cpp) and reading one (results_h5_read.cpp). They throw Failure;
// the public functions add the file name.
#include <filesystem>

#include "ptqlab/outputs/results.hpp"
#include "results_h5_io.hpp"

namespace ptqlab::h5io {

// Validates `r`, then writes it to `path` atomically: a file at the path only ever exists complete.
// Takes the HDF5 lock itself, only while the file image is built.
void write_result_file(const std::filesystem::path& path, const ArmResult& r);

// Opens a result file and checks that it is complete and of this schema version; its Failures
// are complete sentences. The caller holds the HDF5 lock.
Id open_result(const std::filesystem::path& path);

// Everything in a file opened by open_result. The caller holds the HDF5 lock.
ArmResult read_contents(hid_t file);

}  // namespace ptqlab::h5io
