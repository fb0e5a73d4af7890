#include "ptqlab/error.hpp"

namespace ptqlab {

Error::~Error() = default;

}  // namespace ptqlab
