// An identity XLA cannot fuse through: the array copied as it is, as one
// native call, for XLA:CPU through its FFI.
//
// XLA:CPU fuses a cheap elementwise producer into every consumer, recomputing
// it where a consumer is larger than the producer's output: in per-example
// gradients (a Dense layer under vmap(grad)) the kernel's gradient is the
// outer product of the layer's input and its output gradient, and XLA folded
// the output gradient's own producers (the next layer's activation
// derivative: a bias add, a compare, a select) into the outer product,
// computing them again for every input feature. Passed through this call,
// the output gradient is formed once and read. (XLA's optimization barrier
// does not stop it: XLA:CPU removes barriers before fusion.) The output is
// declared to alias the input, so where nothing else reads the input XLA
// hands the call the same buffer and nothing is copied.

#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error Copy(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> out) {
  if (x.size_bytes() != out->size_bytes())
    return ffi::Error::InvalidArgument("copy: input and output sizes differ");
  if (x.untyped_data() != out->untyped_data())
    std::memcpy(out->untyped_data(), x.untyped_data(), x.size_bytes());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NnlibCopy, Copy,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
