// CudaFlatIndex for builds without CUDA (CLINVLA_NO_CUDA=1 or no nvcc): every entry point says so.
#include "internal.hpp"

namespace clinvla {

struct CudaFlatIndex::Impl {};

namespace {
[[noreturn]] void not_built() {
  detail::fail(ErrorCode::Unsupported,
               "this build of the ClinVLA core has no CUDA support: rebuild with nvcc on the PATH "
               "(and without CLINVLA_NO_CUDA=1), e.g. `pip install -e .`");
}
}  // namespace

CudaFlatIndex::CudaFlatIndex(int64_t, DType, const Options&) { not_built(); }
CudaFlatIndex::CudaFlatIndex(FlatIndex&&, const Options&) { not_built(); }
CudaFlatIndex::~CudaFlatIndex() = default;
bool CudaFlatIndex::built() { return false; }
int CudaFlatIndex::device_count() { return 0; }
int CudaFlatIndex::device() const { not_built(); }
int64_t CudaFlatIndex::dim() const { not_built(); }
DType CudaFlatIndex::dtype() const { not_built(); }
int64_t CudaFlatIndex::size() const { not_built(); }
const FlatIndex& CudaFlatIndex::host() const { not_built(); }
void CudaFlatIndex::add(int64_t, const void*, DType, const int64_t*, int64_t*, bool) { not_built(); }
int64_t CudaFlatIndex::remove(int64_t, const int64_t*) { not_built(); }
void CudaFlatIndex::search(int64_t, const void*, int64_t, float*, int64_t*, const AllowList&, void*) { not_built(); }
void CudaFlatIndex::save(const std::string&) const { not_built(); }

}  // namespace clinvla
