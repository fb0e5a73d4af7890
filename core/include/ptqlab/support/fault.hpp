#pragma once
// Fault injection for the crash tests (docs/errors.md, "Fault injection").
//
// With the environment variable PTQLAB_FAULT=<point>:<n>, the process kills itself with SIGKILL the
// n-th time (1-based) it reaches fault_point("<point>"), process-wide. Without the variable a fault
// point costs a string comparison. Points:
//   calibration           quantize_layerwise, after a decoder layer's Hessians were accumulated
//   quantizer             quantize_layerwise, after the quantizer finished one linear (or one layer)
//   layer-checkpoint      the runner, after an arm's layer-level checkpoint of one decoder layer is
//                         durable (docs/slurm.md, "Layer-level resume")
//   result-before-rename  the HDF5 writer, after the temporary file is written and fsync'ed, just
//                         before it is renamed onto <arm>.h5
// A SIGKILL cannot be caught, so this is exactly what a killed cluster job looks like.
#include "ptqlab/support/internal.hpp"  // not part of the plugin SDK
namespace ptqlab {

void fault_point(const char* point);

}  // namespace ptqlab
