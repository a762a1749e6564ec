// The index file format, CRC-32C, and save / load (mmap).
//
// File layout, version 1 (all integers little-endian):
//   offset  size  field
//        0     8  magic "CLVXIDX1"
//        8     4  format version (1)
//       12     4  dtype code (0 float32, 1 float16, 2 bfloat16)
//       16     8  dim
//       24     8  count (number of vectors)
//       32     8  next_id (the id the next sequentially added vector gets)
//       40     8  vectors offset (64)
//       48     8  ids offset (vectors offset + count * dim * elem, rounded up to 64)
//       56     4  payload CRC-32C: every byte from offset 64 to the end of the file
//       60     4  header CRC-32C: bytes 0..59
//       64        vectors (count, dim) row-major, zero padding to the ids offset,
//                 ids (count) int64
// The file size must equal ids offset + 8 * count exactly. load() checks, in order: size >= 64,
// magic, version, header checksum, dtype / dim / offsets, size, then (verify) the payload
// checksum, and only then touches the payload; nothing is ever read past the end of the file.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <vector>

#include "flat_index_impl.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#include <nmmintrin.h>
#endif

namespace clinvla {
namespace detail {
namespace {

constexpr char kMagic[8] = {'C', 'L', 'V', 'X', 'I', 'D', 'X', '1'};
constexpr uint32_t kVersion = 1;
constexpr size_t kHeaderBytes = 64;
constexpr uint32_t kPolyReflected = 0x82F63B78u;  // CRC-32C (Castagnoli), bit-reversed

// ---- CRC-32C ---------------------------------------------------------------------------------
// "raw" = the register update without the initial / final inversion, which is linear in both the
// register and the data, so chunks can be computed in parallel and joined with a shift.

struct CrcTable {
  uint32_t t[256];
  CrcTable() {
    for (uint32_t b = 0; b < 256; ++b) {
      uint32_t r = b;
      for (int i = 0; i < 8; ++i) r = (r & 1u) ? (r >> 1) ^ kPolyReflected : r >> 1;
      t[b] = r;
    }
  }
};

uint32_t raw_soft(uint32_t reg, const uint8_t* p, size_t n) {
  static const CrcTable table;
  for (size_t i = 0; i < n; ++i) reg = table.t[(reg ^ p[i]) & 0xffu] ^ (reg >> 8);
  return reg;
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("sse4.2"))) uint32_t raw_hw(uint32_t reg, const uint8_t* p, size_t n) {
  uint64_t r = reg;
  while (n && (reinterpret_cast<uintptr_t>(p) & 7u)) { r = _mm_crc32_u8(uint32_t(r), *p++); --n; }
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    r = _mm_crc32_u64(r, w);
  }
  uint32_t r32 = uint32_t(r);
  for (; n; --n) r32 = _mm_crc32_u8(r32, *p++);
  return r32;
}

bool have_sse42() {
  static const bool ok = [] { __builtin_cpu_init(); return bool(__builtin_cpu_supports("sse4.2")); }();
  return ok;
}
#endif

uint32_t raw_update(uint32_t reg, const uint8_t* p, size_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (have_sse42()) return raw_hw(reg, p, n);
#endif
  return raw_soft(reg, p, n);
}

// Product of two polynomials modulo the CRC polynomial, in the reflected bit order (bit 31 holds
// the coefficient of x^0).
uint32_t gf2_mulmod(uint32_t a, uint32_t b) {
  uint32_t product = 0;
  for (int i = 0; i < 32; ++i) {
    if (a & (0x80000000u >> i)) product ^= b;  // a has x^i: add b * x^i
    b = (b & 1u) ? (b >> 1) ^ kPolyReflected : b >> 1;  // b *= x
  }
  return product;
}

// x^(8 * nbytes) mod P: shifting a register over nbytes zero bytes multiplies it by this.
uint32_t x_pow_8n(uint64_t nbytes) {
  uint32_t result = 0x80000000u;  // 1
  uint32_t sq = 0x00800000u;      // x^8 (bit 31 - 8)
  for (uint64_t e = nbytes; e; e >>= 1) {
    if (e & 1u) result = gf2_mulmod(result, sq);
    sq = gf2_mulmod(sq, sq);
  }
  return result;
}

uint32_t shift_register(uint32_t reg, uint64_t nbytes) { return gf2_mulmod(x_pow_8n(nbytes), reg); }

}  // namespace

uint32_t crc32c_update(uint32_t crc, const void* data, size_t n) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  const uint32_t reg0 = ~crc;
  constexpr size_t kParallelMin = size_t(1) << 20;
  int parts = 1;
#ifdef _OPENMP
  if (n >= 2 * kParallelMin) parts = int(std::min<size_t>(size_t(omp_get_max_threads()), n / kParallelMin));
#endif
  if (parts <= 1) return ~raw_update(reg0, p, n);
  std::vector<uint32_t> raw(static_cast<size_t>(parts));
  const size_t chunk = (n + size_t(parts) - 1) / size_t(parts);
#pragma omp parallel for num_threads(parts) schedule(static, 1)
  for (int i = 0; i < parts; ++i) {
    const size_t b = size_t(i) * chunk, e = std::min(n, b + chunk);
    raw[size_t(i)] = b < e ? raw_update(0, p + b, e - b) : 0;
  }
  // reg(A||B) = shift(reg(A), |B|) ^ raw0(B); the start register itself shifts over all n bytes.
  uint32_t reg = shift_register(reg0, n);
  uint32_t acc = 0;
  for (int i = 0; i < parts; ++i) {
    const size_t b = size_t(i) * chunk, e = std::min(n, b + chunk);
    if (b >= e) break;
    acc = shift_register(acc, e - b) ^ raw[size_t(i)];
  }
  return ~(reg ^ acc);
}

namespace {

void put32(uint8_t* p, uint32_t v) { for (int i = 0; i < 4; ++i) p[i] = uint8_t(v >> (8 * i)); }
void put64(uint8_t* p, uint64_t v) { for (int i = 0; i < 8; ++i) p[i] = uint8_t(v >> (8 * i)); }
uint32_t get32(const uint8_t* p) { uint32_t v = 0; for (int i = 3; i >= 0; --i) v = (v << 8) | p[i]; return v; }
uint64_t get64(const uint8_t* p) { uint64_t v = 0; for (int i = 7; i >= 0; --i) v = (v << 8) | p[i]; return v; }

bool little_endian() { const uint16_t one = 1; uint8_t b; std::memcpy(&b, &one, 1); return b == 1; }

std::string errno_text() { return std::strerror(errno); }

struct Fd {
  int fd = -1;
  ~Fd() { if (fd >= 0) ::close(fd); }
};

struct Mapping {
  void* addr = nullptr;
  size_t size = 0;
  ~Mapping() { if (addr && size) ::munmap(addr, size); }
};

void write_all(int fd, const void* data, size_t n, const std::string& path) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  while (n) {
    const ssize_t w = ::write(fd, p, std::min<size_t>(n, size_t(1) << 30));
    if (w < 0) {
      if (errno == EINTR) continue;
      fail(ErrorCode::IO, "cannot write index file '", path, "': ", errno_text());
    }
    p += w;
    n -= size_t(w);
  }
}

}  // namespace
}  // namespace detail

void FlatIndex::save(const std::string& path) const {
  using namespace detail;
  const Impl& m = *impl_;
  std::shared_lock<std::shared_mutex> lock(m.mu);
  if (!little_endian()) fail(ErrorCode::Unsupported, "index files are little-endian; this host is not");
  const uint64_t vec_bytes = uint64_t(m.count) * m.row_bytes();
  const uint64_t ids_offset = (kHeaderBytes + vec_bytes + 63) / 64 * 64;
  const uint64_t pad = ids_offset - kHeaderBytes - vec_bytes;
  const uint64_t id_bytes = uint64_t(m.count) * 8;
  static const uint8_t zeros[64] = {};

  uint32_t crc = crc32c_update(0, m.vec_ptr, size_t(vec_bytes));
  crc = crc32c_update(crc, zeros, size_t(pad));
  crc = crc32c_update(crc, m.id_ptr, size_t(id_bytes));

  uint8_t header[kHeaderBytes] = {};
  std::memcpy(header, kMagic, 8);
  put32(header + 8, kVersion);
  put32(header + 12, uint32_t(m.dtype));
  put64(header + 16, uint64_t(m.dim));
  put64(header + 24, uint64_t(m.count));
  put64(header + 32, uint64_t(m.next_id));
  put64(header + 40, kHeaderBytes);
  put64(header + 48, ids_offset);
  put32(header + 56, crc);
  put32(header + 60, crc32c_update(0, header, 60));

  // A unique temporary name (mkstemp), so that two writers of one path never share a file: each
  // writes a whole file and the last rename wins.
  std::vector<char> tmp_name(path.begin(), path.end());
  const char suffix[] = ".tmp-XXXXXX";
  tmp_name.insert(tmp_name.end(), suffix, suffix + sizeof(suffix));  // with the terminating NUL
  Fd f;
  f.fd = ::mkstemp(tmp_name.data());
  const std::string tmp(tmp_name.data());
  if (f.fd < 0) fail(ErrorCode::IO, "cannot create index file '", tmp, "': ", errno_text());
  try {
    if (::fchmod(f.fd, 0644) != 0) fail(ErrorCode::IO, "cannot set the mode of '", tmp, "': ", errno_text());
    write_all(f.fd, header, kHeaderBytes, tmp);
    write_all(f.fd, m.vec_ptr, size_t(vec_bytes), tmp);
    write_all(f.fd, zeros, size_t(pad), tmp);
    write_all(f.fd, m.id_ptr, size_t(id_bytes), tmp);
    if (::fsync(f.fd) != 0) fail(ErrorCode::IO, "cannot flush index file '", tmp, "': ", errno_text());
  } catch (...) {
    ::unlink(tmp.c_str());
    throw;
  }
  ::close(f.fd);
  f.fd = -1;
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = errno_text();
    ::unlink(tmp.c_str());
    fail(ErrorCode::IO, "cannot move '", tmp, "' to '", path, "': ", why);
  }
}

FlatIndex FlatIndex::load(const std::string& path, bool verify) {
  using namespace detail;
  if (!little_endian()) fail(ErrorCode::Unsupported, "index files are little-endian; this host is not");
  Fd f;
  f.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (f.fd < 0) fail(ErrorCode::IO, "cannot open index file '", path, "': ", errno_text());
  struct stat st;
  if (::fstat(f.fd, &st) != 0) fail(ErrorCode::IO, "cannot stat index file '", path, "': ", errno_text());
  if (!S_ISREG(st.st_mode)) fail(ErrorCode::IO, "'", path, "' is not a regular file");
  const uint64_t file_size = uint64_t(st.st_size);
  if (file_size < kHeaderBytes)
    fail(ErrorCode::Format, "'", path, "' is not a ClinVLA index file: it has ", file_size,
         " bytes, less than the 64-byte header");

  auto map = std::make_shared<Mapping>();
  map->addr = ::mmap(nullptr, size_t(file_size), PROT_READ, MAP_PRIVATE, f.fd, 0);
  if (map->addr == MAP_FAILED) {
    map->addr = nullptr;
    fail(ErrorCode::IO, "cannot map index file '", path, "': ", errno_text());
  }
  map->size = size_t(file_size);
  const uint8_t* base = static_cast<const uint8_t*>(map->addr);

  if (std::memcmp(base, kMagic, 8) != 0) fail(ErrorCode::Format, "'", path, "' is not a ClinVLA index file (bad magic)");
  const uint32_t version = get32(base + 8);
  if (version != kVersion)
    fail(ErrorCode::Format, "'", path, "' has index format version ", version, "; this build reads version ", kVersion);
  if (crc32c_update(0, base, 60) != get32(base + 60))
    fail(ErrorCode::Format, "'", path, "' is corrupted: header checksum mismatch");
  const uint32_t dtype_code = get32(base + 12);
  const uint64_t dim = get64(base + 16), count = get64(base + 24), next_id = get64(base + 32);
  const uint64_t vec_off = get64(base + 40), ids_off = get64(base + 48);
  if (!valid_dtype(int32_t(dtype_code)) || dim < 1 || dim > (uint64_t(1) << 24) || vec_off != kHeaderBytes ||
      next_id > uint64_t(INT64_MAX) || count > (uint64_t(1) << 40))
    fail(ErrorCode::Format, "'", path, "' has an invalid header (dtype code ", dtype_code, ", dim ", dim, ", count ",
         count, ")");
  const DType dtype = DType(dtype_code);
  uint64_t vec_bytes = 0;  // count <= 2^40, dim <= 2^24: the product can still overflow 64 bits
  if (__builtin_mul_overflow(count, dim, &vec_bytes) ||
      __builtin_mul_overflow(vec_bytes, uint64_t(dtype_size(dtype)), &vec_bytes) || vec_bytes > (uint64_t(1) << 62))
    fail(ErrorCode::Format, "'", path, "' has an invalid header (", count, " vectors of dim ", dim, " overflow)");
  const uint64_t expect_ids_off = (kHeaderBytes + vec_bytes + 63) / 64 * 64;
  const uint64_t expect_size = expect_ids_off + count * 8;
  if (ids_off != expect_ids_off)
    fail(ErrorCode::Format, "'", path, "' has an invalid header (ids offset ", ids_off, ", expected ", expect_ids_off, ")");
  if (file_size != expect_size) {
    fail(ErrorCode::Format, "'", path, "' is ", file_size < expect_size ? "truncated" : "longer than its header says",
         ": the header describes ", with_commas(count), " ", dtype_name(dtype), " vectors of dim ", dim, " (",
         with_commas(expect_size), " bytes) but the file has ", with_commas(file_size), " bytes");
  }
  if (verify) {
    const uint32_t want = get32(base + 56);
    const uint32_t got = crc32c_update(0, base + kHeaderBytes, size_t(file_size - kHeaderBytes));
    if (want != got) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "expected %08x, computed %08x", want, got);
      fail(ErrorCode::Format, "'", path, "' is corrupted: payload checksum mismatch (", buf, ")");
    }
  }
  const int64_t* ids = reinterpret_cast<const int64_t*>(base + ids_off);
  if (verify) {
    for (uint64_t i = 0; i < count; ++i)
      if (ids[i] < 0 || uint64_t(ids[i]) >= next_id)
        fail(ErrorCode::Format, "'", path, "' is inconsistent: id ", ids[i], " at row ", i, " is outside [0, next_id = ",
             next_id, ")");
  }
  auto impl = std::make_unique<Impl>();
  impl->dim = int64_t(dim);
  impl->dtype = dtype;
  impl->elem = dtype_size(dtype);
  impl->count = int64_t(count);
  impl->next_id = int64_t(next_id);
  impl->vec_ptr = base + kHeaderBytes;
  impl->id_ptr = ids;
  impl->mapping = std::shared_ptr<const void>(map, map->addr);
  return FlatIndex(std::move(impl));
}

}  // namespace clinvla
