// clinvla_engine._C: pybind11 bindings of the C++ core.
//
// Arrays come in as DLPack capsules (NumPy, PyTorch, CuPy; the Python side calls __dlpack__) or,
// for NumPy arrays DLPack cannot export (read-only on older NumPy), through the buffer protocol;
// neither copies. Every array is checked for shape, dtype, device, contiguity and writability, and
// a refusal says what was expected and what was given:
//   "queries must be (n, 128) float16 on cuda:0, got (4, 64) float32 on cpu".
// The GIL is released while the core works; DLPack deleters run after it is taken back.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <functional>
#include <string>
#include <vector>

#include "../core/internal.hpp"
#include "clinvla/index.hpp"

namespace py = pybind11;
using clinvla::DType;

namespace {

// ---- DLPack ABI (https://dmlc.github.io/dlpack/latest/c_api.html), declared here to stay
// independent of any framework's copy of dlpack.h.
struct DLDev { int32_t device_type; int32_t device_id; };
struct DLDType { uint8_t code; uint8_t bits; uint16_t lanes; };
struct DLTensorABI {
  void* data; DLDev device; int32_t ndim; DLDType dtype; int64_t* shape; int64_t* strides; uint64_t byte_offset;
};
struct DLManaged { DLTensorABI dl_tensor; void* manager_ctx; void (*deleter)(DLManaged*); };
struct DLVersion { uint32_t major; uint32_t minor; };
struct DLManagedVersioned {
  DLVersion version; void* manager_ctx; void (*deleter)(DLManagedVersioned*); uint64_t flags; DLTensorABI dl_tensor;
};
constexpr int kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3, kDLCUDAManaged = 13;
constexpr int kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4, kDLBool = 6;
constexpr uint64_t kDLReadOnly = 1;

// A borrowed view of one array argument.
struct ArrayView {
  std::string name;
  void* data = nullptr;
  int device_type = kDLCPU;
  int device_id = 0;
  int code = kDLFloat, bits = 32;
  std::vector<int64_t> shape;
  bool contiguous = true;
  bool readonly = false;
  std::function<void()> release;
  std::unique_ptr<py::buffer_info> buffer;
  ArrayView() = default;
  ArrayView(const ArrayView&) = delete;
  ArrayView& operator=(const ArrayView&) = delete;
  ArrayView(ArrayView&& o) noexcept { *this = std::move(o); }
  ArrayView& operator=(ArrayView&& o) noexcept {
    if (this != &o) {
      if (release) release();
      name = std::move(o.name); data = o.data; device_type = o.device_type; device_id = o.device_id;
      code = o.code; bits = o.bits; shape = std::move(o.shape); contiguous = o.contiguous; readonly = o.readonly;
      release = std::move(o.release); buffer = std::move(o.buffer);
      o.release = nullptr;  // a moved-from std::function is not guaranteed empty
    }
    return *this;
  }
  ~ArrayView() { if (release) release(); }

  bool on_cpu() const { return device_type == kDLCPU || device_type == kDLCUDAHost; }
  bool on_cuda() const { return device_type == kDLCUDA || device_type == kDLCUDAManaged; }
  int64_t numel() const { int64_t n = 1; for (int64_t s : shape) n *= s; return n; }
};

std::string dtype_str(int code, int bits) {
  switch (code) {
    case kDLFloat: return "float" + std::to_string(bits);
    case kDLBfloat: return bits == 16 ? "bfloat16" : "bfloat" + std::to_string(bits);
    case kDLInt: return "int" + std::to_string(bits);
    case kDLUInt: return "uint" + std::to_string(bits);
    case kDLBool: return "bool";
    default: return "dtype(code " + std::to_string(code) + ", " + std::to_string(bits) + " bits)";
  }
}

std::string device_str(int type, int id) {
  if (type == kDLCPU) return "cpu";
  if (type == kDLCUDA) return "cuda:" + std::to_string(id);
  if (type == kDLCUDAHost) return "cpu (pinned)";
  if (type == kDLCUDAManaged) return "cuda:" + std::to_string(id) + " (managed)";
  return "device type " + std::to_string(type) + ":" + std::to_string(id);
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

bool c_contiguous(int ndim, const int64_t* shape, const int64_t* strides_elems) {
  if (!strides_elems) return true;
  for (int i = 0; i < ndim; ++i)
    if (shape[i] == 0) return true;  // an empty array has no layout to get wrong
  int64_t expect = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    if (shape[i] != 1 && strides_elems[i] != expect) return false;
    expect *= shape[i];
  }
  return true;
}

ArrayView view_of(py::handle obj, const char* name) {
  ArrayView v;
  v.name = name;
  PyObject* o = obj.ptr();
  if (PyCapsule_CheckExact(o)) {
    const char* cname = PyCapsule_GetName(o);
    const DLTensorABI* t = nullptr;
    if (cname && std::string(cname) == "dltensor_versioned") {
      auto* m = static_cast<DLManagedVersioned*>(PyCapsule_GetPointer(o, cname));
      if (!m) throw py::error_already_set();
      if (m->version.major != 1)
        throw py::value_error(std::string(name) + ": DLPack major version " + std::to_string(m->version.major) +
                              " is not supported (expected 1)");
      PyCapsule_SetName(o, "used_dltensor_versioned");
      v.release = [m] { if (m->deleter) m->deleter(m); };
      v.readonly = (m->flags & kDLReadOnly) != 0;
      t = &m->dl_tensor;
    } else if (cname && std::string(cname) == "dltensor") {
      auto* m = static_cast<DLManaged*>(PyCapsule_GetPointer(o, cname));
      if (!m) throw py::error_already_set();
      PyCapsule_SetName(o, "used_dltensor");
      v.release = [m] { if (m->deleter) m->deleter(m); };
      t = &m->dl_tensor;
    } else {
      throw py::type_error(std::string(name) + ": expected a DLPack capsule, got a capsule named '" +
                           (cname ? cname : "") + "' (already consumed?)");
    }
    v.data = static_cast<char*>(t->data) + t->byte_offset;
    v.device_type = t->device.device_type;
    v.device_id = t->device.device_id;
    v.code = t->dtype.code;
    v.bits = t->dtype.bits * (t->dtype.lanes ? t->dtype.lanes : 1);
    v.shape.assign(t->shape, t->shape + t->ndim);
    v.contiguous = c_contiguous(t->ndim, t->shape, t->strides);
    return v;
  }
  if (PyObject_CheckBuffer(o)) {
    auto buf = py::reinterpret_borrow<py::buffer>(obj);
    v.buffer = std::make_unique<py::buffer_info>(buf.request());
    const py::buffer_info& b = *v.buffer;
    v.data = b.ptr;
    v.readonly = b.readonly;
    v.shape.assign(b.shape.begin(), b.shape.end());
    std::vector<int64_t> strides;
    bool ok_strides = true;
    for (size_t i = 0; i < b.strides.size(); ++i) {
      if (b.strides[i] % b.itemsize) ok_strides = false;
      strides.push_back(b.strides[i] / b.itemsize);
    }
    v.contiguous = ok_strides && c_contiguous(int(b.ndim), v.shape.data(), strides.data());
    std::string f = b.format;
    while (!f.empty() && (f[0] == '<' || f[0] == '=' || f[0] == '@' || f[0] == '!')) f.erase(0, 1);
    const char c = f.size() == 1 ? f[0] : '\0';
    v.bits = int(b.itemsize) * 8;
    switch (c) {
      case 'f': case 'd': case 'e': v.code = kDLFloat; break;
      case 'b': case 'h': case 'i': case 'l': case 'q': v.code = kDLInt; break;
      case 'B': case 'H': case 'I': case 'L': case 'Q': v.code = kDLUInt; break;
      case '?': v.code = kDLBool; break;
      default:
        throw py::type_error(std::string(name) + ": unsupported buffer format '" + b.format + "'");
    }
    return v;
  }
  throw py::type_error(std::string(name) + " must be a NumPy, PyTorch or CuPy array (DLPack), got " +
                       std::string(py::str(py::type::of(obj).attr("__name__"))));
}

struct Want {
  std::vector<std::string> dims;  // "n" for any, or a number
  std::vector<int64_t> fixed;     // -1 for any
  std::vector<std::pair<int, int>> dtypes;  // (code, bits)
  int device_type = kDLCPU;       // kDLCPU or kDLCUDA; -1: either
  int device_id = 0;
  bool writable = false;
};

std::string want_str(const Want& w) {
  std::string dims = "(";
  for (size_t i = 0; i < w.dims.size(); ++i) dims += (i ? ", " : "") + w.dims[i];
  dims += w.dims.size() == 1 ? ",)" : ")";
  std::string dts;
  for (size_t i = 0; i < w.dtypes.size(); ++i)
    dts += (i ? (i + 1 == w.dtypes.size() ? " or " : ", ") : "") + dtype_str(w.dtypes[i].first, w.dtypes[i].second);
  const std::string dev = w.device_type < 0 ? "cpu or " + device_str(kDLCUDA, w.device_id) : device_str(w.device_type, w.device_id);
  return dims + " " + dts + " on " + dev;
}

void check(const ArrayView& a, const Want& w) {
  bool ok = a.shape.size() == w.fixed.size();
  for (size_t i = 0; ok && i < w.fixed.size(); ++i) ok = w.fixed[i] < 0 || a.shape[i] == w.fixed[i];
  bool dt_ok = false;
  for (auto& d : w.dtypes) dt_ok |= (a.code == d.first && a.bits == d.second);
  bool dev_ok;
  if (w.device_type == kDLCPU) dev_ok = a.on_cpu();
  else if (w.device_type == kDLCUDA) dev_ok = a.on_cuda() && a.device_id == w.device_id;
  else dev_ok = a.on_cpu() || (a.on_cuda() && a.device_id == w.device_id);
  std::string extra;
  if (!a.contiguous) extra += ", not contiguous (use np.ascontiguousarray / .contiguous())";
  if (w.writable && a.readonly) extra += ", read-only";
  if (ok && dt_ok && dev_ok && extra.empty()) return;
  throw py::value_error(a.name + " must be " + (a.contiguous ? "" : "contiguous ") + want_str(w) + ", got " +
                        shape_str(a.shape) + " " + dtype_str(a.code, a.bits) + " on " +
                        device_str(a.device_type, a.device_id) + extra);
}

int dl_code(DType d) { return d == DType::BFloat16 ? kDLBfloat : kDLFloat; }
int dl_bits(DType d) { return d == DType::Float32 ? 32 : 16; }

DType parse_dtype(const std::string& s) {
  if (s == "float32" || s == "fp32" || s == "float") return DType::Float32;
  if (s == "float16" || s == "fp16" || s == "half") return DType::Float16;
  if (s == "bfloat16" || s == "bf16") return DType::BFloat16;
  throw py::value_error("dtype must be 'float32', 'float16' or 'bfloat16', got '" + s + "'");
}

// Vectors for add(): any of the three float dtypes (converted), or uint16 holding bfloat16 bits.
DType vector_dtype(const ArrayView& v, bool bf16_bits) {
  if (bf16_bits && v.code == kDLUInt && v.bits == 16) return DType::BFloat16;
  if (v.code == kDLFloat && v.bits == 32) return DType::Float32;
  if (v.code == kDLFloat && v.bits == 16) return DType::Float16;
  return DType::BFloat16;
}

// Reinterprets uint16 arrays flagged as bfloat16 bits (NumPy has no bfloat16 of its own).
void apply_bf16_bits(ArrayView& v, bool bf16_bits) {
  if (bf16_bits && v.code == kDLUInt && v.bits == 16) v.code = kDLBfloat;
}

Want float_matrix(int64_t dim, std::vector<DType> dts, int dev_type, int dev_id) {
  Want w;
  w.dims = {"n", std::to_string(dim)};
  w.fixed = {-1, dim};
  for (DType d : dts) w.dtypes.push_back({dl_code(d), dl_bits(d)});
  w.device_type = dev_type;
  w.device_id = dev_id;
  return w;
}

Want id_vector(int64_t n, int dev_type, int dev_id) {
  Want w;
  w.dims = {n < 0 ? std::string("n") : std::to_string(n)};
  w.fixed = {n};
  w.dtypes = {{kDLInt, 64}};
  w.device_type = dev_type;
  w.device_id = dev_id;
  return w;
}

struct Outputs {
  ArrayView scores, ids;
};

Outputs outputs(py::handle scores, py::handle ids, int64_t nq, int64_t k, int dev_type, int dev_id) {
  Outputs o{view_of(scores, "scores"), view_of(ids, "ids")};
  Want ws;
  ws.dims = {std::to_string(nq), std::to_string(k)};
  ws.fixed = {nq, k};
  ws.dtypes = {{kDLFloat, 32}};
  ws.device_type = dev_type;
  ws.device_id = dev_id;
  ws.writable = true;
  check(o.scores, ws);
  ws.dtypes = {{kDLInt, 64}};
  check(o.ids, ws);
  return o;
}

// allow: a packed uint8 bitmap (1-D shared, 2-D per query) or a bool mask (one byte per id).
struct AllowArg {
  ArrayView view;
  clinvla::AllowList list;
};

std::unique_ptr<AllowArg> allow_of(py::handle obj, int64_t nq, int dev_type, int dev_id) {
  if (obj.is_none()) return nullptr;
  auto a = std::make_unique<AllowArg>();
  a->view = view_of(obj, "allow");
  ArrayView& v = a->view;
  const bool is_bool = v.code == kDLBool && v.bits == 8;
  const bool is_u8 = v.code == kDLUInt && v.bits == 8;
  const bool dev_ok = dev_type == kDLCPU ? v.on_cpu() : (v.on_cuda() && v.device_id == dev_id);
  const bool shape_ok = v.shape.size() == 1 || (v.shape.size() == 2 && v.shape[0] == nq);
  if (!(is_bool || is_u8) || !dev_ok || !shape_ok || !v.contiguous) {
    throw py::value_error(std::string("allow must be a contiguous bool mask indexed by id, or a uint8 bitmap "
                                      "(numpy.packbits(mask, bitorder='little')), shaped (ids,) or (") +
                          std::to_string(nq) + ", ids), on " + device_str(dev_type, dev_id) + ", got " +
                          shape_str(v.shape) + " " + dtype_str(v.code, v.bits) + " on " +
                          device_str(v.device_type, v.device_id) + (v.contiguous ? "" : ", not contiguous"));
  }
  const int64_t width = v.shape.back();
  a->list.data = static_cast<const uint8_t*>(v.data);
  a->list.packed = is_u8;
  a->list.n_ids = is_u8 ? width * 8 : width;
  a->list.stride_bytes = v.shape.size() == 2 ? width : 0;
  return a;
}

py::array_t<int64_t> copy_ids(const int64_t* p, int64_t n) {
  py::array_t<int64_t> out(n);
  if (n) std::memcpy(out.mutable_data(), p, size_t(n) * 8);
  return out;
}

// ---- CPU index ----

void index_add(clinvla::FlatIndex& self, py::handle vectors, py::handle ids_obj, bool bf16_bits,
               py::array_t<int64_t>& assigned) {
  ArrayView v = view_of(vectors, "vectors");
  apply_bf16_bits(v, bf16_bits);
  check(v, float_matrix(self.dim(), {DType::Float32, DType::Float16, DType::BFloat16}, kDLCPU, 0));
  const int64_t n = v.shape[0];
  std::unique_ptr<ArrayView> idv;
  if (!ids_obj.is_none()) {
    idv = std::make_unique<ArrayView>(view_of(ids_obj, "ids"));
    check(*idv, id_vector(n, kDLCPU, 0));
  }
  assigned = py::array_t<int64_t>(n);
  int64_t* out = assigned.mutable_data();
  const DType src = vector_dtype(v, false);
  {
    py::gil_scoped_release nogil;
    self.add(n, v.data, src, idv ? static_cast<const int64_t*>(idv->data) : nullptr, out);
  }
}

// remove() of either index: the ids are a host int64 vector for both
template <class Index>
int64_t index_remove(Index& self, py::handle ids_obj) {
  ArrayView v = view_of(ids_obj, "ids");
  check(v, id_vector(-1, kDLCPU, 0));
  py::gil_scoped_release nogil;
  return self.remove(v.shape[0], static_cast<const int64_t*>(v.data));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ClinVLA C++/CUDA core: exact top-k search over a flat inner-product index";
  m.attr("__version__") = clinvla::version();

  // Argument errors surface as ValueError, file problems as OSError, the rest as RuntimeError.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const clinvla::Error& e) {
      switch (e.code()) {
        case clinvla::ErrorCode::Invalid: PyErr_SetString(PyExc_ValueError, e.what()); return;
        case clinvla::ErrorCode::IO: case clinvla::ErrorCode::Format: PyErr_SetString(PyExc_OSError, e.what()); return;
        case clinvla::ErrorCode::OutOfMemory: PyErr_SetString(PyExc_MemoryError, e.what()); return;
        default: PyErr_SetString(PyExc_RuntimeError, e.what()); return;
      }
    }
  });

  m.def("build_info", [] {
    py::dict d;
    d["version"] = clinvla::version();
    d["cpu"] = true;
    d["cuda"] = clinvla::CudaFlatIndex::built();
#ifdef CLINVLA_CUDA_ARCH_STR
    d["cuda_arch"] = CLINVLA_CUDA_ARCH_STR;
#else
    d["cuda_arch"] = py::none();
#endif
    d["cuda_devices"] = clinvla::CudaFlatIndex::device_count();
    d["openmp"] = clinvla::openmp_enabled();
    d["simd"] = clinvla::cpu_isa();
    d["max_k"] = clinvla::FlatIndex::kMaxK;
    d["max_k_cuda"] = clinvla::CudaFlatIndex::kMaxK;
    return d;
  });
  m.def("cpu_isa", [] { return std::string(clinvla::cpu_isa()); });
  m.def("set_cpu_isa", [](const std::string& name) { clinvla::set_cpu_isa(name); });
  m.def("cuda_device_count", [] { return clinvla::CudaFlatIndex::device_count(); });
  m.def("crc32c", [](py::bytes data, uint32_t crc) {
    std::string s = data;
    return clinvla::detail::crc32c_update(crc, s.data(), s.size());
  }, py::arg("data"), py::arg("crc") = 0);

  py::class_<clinvla::FlatIndex>(m, "FlatIndex")
      .def(py::init([](int64_t dim, const std::string& dtype) { return clinvla::FlatIndex(dim, parse_dtype(dtype)); }),
           py::arg("dim"), py::arg("dtype"))
      .def_property_readonly("dim", &clinvla::FlatIndex::dim)
      .def_property_readonly("dtype", [](const clinvla::FlatIndex& s) { return std::string(clinvla::dtype_name(s.dtype())); })
      .def_property_readonly("next_id", &clinvla::FlatIndex::next_id)
      .def("__len__", &clinvla::FlatIndex::size)
      .def("add", [](clinvla::FlatIndex& self, py::handle vectors, py::handle ids, bool bf16_bits) {
             py::array_t<int64_t> assigned;
             index_add(self, vectors, ids, bf16_bits, assigned);
             return assigned;
           }, py::arg("vectors"), py::arg("ids") = py::none(), py::arg("bf16_bits") = false)
      .def("remove", &index_remove<clinvla::FlatIndex>, py::arg("ids"))
      .def("__contains__", &clinvla::FlatIndex::contains)
      .def("search", [](const clinvla::FlatIndex& self, py::handle queries, int64_t k, py::handle scores,
                        py::handle ids, py::handle allow, int threads, bool bf16_bits) {
             ArrayView q = view_of(queries, "queries");
             apply_bf16_bits(q, bf16_bits);
             check(q, float_matrix(self.dim(), {self.dtype()}, kDLCPU, 0));
             if (k < 0) throw py::value_error("k must be >= 0, got " + std::to_string(k));
             const int64_t nq = q.shape[0];
             Outputs o = outputs(scores, ids, nq, k, kDLCPU, 0);
             auto a = allow_of(allow, nq, kDLCPU, 0);
             clinvla::SearchOptions opt;
             opt.num_threads = threads;
             py::gil_scoped_release nogil;
             self.search(nq, q.data, self.dtype(), k, static_cast<float*>(o.scores.data),
                         static_cast<int64_t*>(o.ids.data), a ? a->list : clinvla::AllowList(), opt);
           }, py::arg("queries"), py::arg("k"), py::arg("scores"), py::arg("ids"), py::arg("allow") = py::none(),
           py::arg("threads") = 0, py::arg("bf16_bits") = false)
      .def("save", [](const clinvla::FlatIndex& self, const std::string& path) {
             py::gil_scoped_release nogil;
             self.save(path);
           }, py::arg("path"))
      .def_static("load", [](const std::string& path, bool verify) {
             py::gil_scoped_release nogil;
             return clinvla::FlatIndex::load(path, verify);
           }, py::arg("path"), py::arg("verify") = true)
      .def("ids", [](const clinvla::FlatIndex& self) { return copy_ids(self.ids(), self.size()); })
      .def("vectors", [](const clinvla::FlatIndex& self) {
             // A copy: float32 as float32, float16 as float16, bfloat16 as its uint16 bits.
             const int64_t n = self.size(), d = self.dim();
             py::dtype dt = self.dtype() == DType::Float32 ? py::dtype("float32")
                            : self.dtype() == DType::Float16 ? py::dtype("float16") : py::dtype("uint16");
             py::array out(dt, std::vector<int64_t>{n, d});
             if (n) std::memcpy(out.mutable_data(), self.vectors(), size_t(n * d) * clinvla::dtype_size(self.dtype()));
             return out;
           });

  py::class_<clinvla::CudaFlatIndex>(m, "CudaFlatIndex")
      .def(py::init([](int64_t dim, const std::string& dtype, int device, int64_t shard_rows, int64_t max_device_bytes,
                       int64_t workspace_bytes) {
             clinvla::CudaFlatIndex::Options o;
             o.device = device; o.shard_rows = shard_rows; o.max_device_bytes = max_device_bytes;
             o.workspace_bytes = workspace_bytes;
             return std::make_unique<clinvla::CudaFlatIndex>(dim, parse_dtype(dtype), o);
           }), py::arg("dim"), py::arg("dtype"), py::arg("device") = 0, py::arg("shard_rows") = 0,
           py::arg("max_device_bytes") = -1, py::arg("workspace_bytes") = int64_t(1) << 30)
      .def_static("load", [](const std::string& path, bool verify, int device, int64_t shard_rows,
                             int64_t max_device_bytes, int64_t workspace_bytes) {
             clinvla::CudaFlatIndex::Options o;
             o.device = device; o.shard_rows = shard_rows; o.max_device_bytes = max_device_bytes;
             o.workspace_bytes = workspace_bytes;
             py::gil_scoped_release nogil;
             return std::make_unique<clinvla::CudaFlatIndex>(clinvla::FlatIndex::load(path, verify), o);
           }, py::arg("path"), py::arg("verify") = true, py::arg("device") = 0, py::arg("shard_rows") = 0,
           py::arg("max_device_bytes") = -1, py::arg("workspace_bytes") = int64_t(1) << 30)
      .def_property_readonly("dim", &clinvla::CudaFlatIndex::dim)
      .def_property_readonly("device", &clinvla::CudaFlatIndex::device)
      .def_property_readonly("dtype", [](const clinvla::CudaFlatIndex& s) { return std::string(clinvla::dtype_name(s.dtype())); })
      .def_property_readonly("next_id", [](const clinvla::CudaFlatIndex& s) { return s.host().next_id(); })
      .def("__len__", &clinvla::CudaFlatIndex::size)
      .def("__contains__", [](const clinvla::CudaFlatIndex& s, int64_t id) { return s.host().contains(id); })
      .def("add", [](clinvla::CudaFlatIndex& self, py::handle vectors, py::handle ids_obj, bool bf16_bits) {
             ArrayView v = view_of(vectors, "vectors");
             apply_bf16_bits(v, bf16_bits);
             check(v, float_matrix(self.dim(), {DType::Float32, DType::Float16, DType::BFloat16}, -1, self.device()));
             const int64_t n = v.shape[0];
             std::unique_ptr<ArrayView> idv;
             if (!ids_obj.is_none()) {
               idv = std::make_unique<ArrayView>(view_of(ids_obj, "ids"));
               check(*idv, id_vector(n, kDLCPU, 0));
             }
             py::array_t<int64_t> assigned(n);
             int64_t* out = assigned.mutable_data();
             const DType src = vector_dtype(v, false);
             const bool on_dev = v.on_cuda();
             {
               py::gil_scoped_release nogil;
               self.add(n, v.data, src, idv ? static_cast<const int64_t*>(idv->data) : nullptr, out, on_dev);
             }
             return assigned;
           }, py::arg("vectors"), py::arg("ids") = py::none(), py::arg("bf16_bits") = false)
      .def("remove", &index_remove<clinvla::CudaFlatIndex>, py::arg("ids"))
      .def("search", [](clinvla::CudaFlatIndex& self, py::handle queries, int64_t k, py::handle scores,
                        py::handle ids, py::handle allow, uintptr_t stream, bool bf16_bits) {
             ArrayView q = view_of(queries, "queries");
             apply_bf16_bits(q, bf16_bits);
             check(q, float_matrix(self.dim(), {self.dtype()}, kDLCUDA, self.device()));
             if (k < 0 || k > clinvla::CudaFlatIndex::kMaxK)
               throw py::value_error("k must be between 0 and " + std::to_string(clinvla::CudaFlatIndex::kMaxK) +
                                     " on CUDA, got " + std::to_string(k));
             const int64_t nq = q.shape[0];
             Outputs o = outputs(scores, ids, nq, k, kDLCUDA, self.device());
             auto a = allow_of(allow, nq, kDLCUDA, self.device());
             py::gil_scoped_release nogil;
             self.search(nq, q.data, k, static_cast<float*>(o.scores.data), static_cast<int64_t*>(o.ids.data),
                         a ? a->list : clinvla::AllowList(), reinterpret_cast<void*>(stream));
           }, py::arg("queries"), py::arg("k"), py::arg("scores"), py::arg("ids"), py::arg("allow") = py::none(),
           py::arg("stream") = 0, py::arg("bf16_bits") = false)
      .def("save", [](const clinvla::CudaFlatIndex& self, const std::string& path) {
             py::gil_scoped_release nogil;
             self.save(path);
           }, py::arg("path"))
      .def("ids", [](const clinvla::CudaFlatIndex& self) { return copy_ids(self.host().ids(), self.size()); });
}
