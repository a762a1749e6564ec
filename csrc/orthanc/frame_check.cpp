#include "frame_check.hpp"

namespace clinvla_orthanc {
namespace {

bool starts_with(const std::string& s, const char* prefix) { return s.rfind(prefix, 0) == 0; }

bool is_jpeg(const std::string& ts) {
  // 1.2.840.10008.1.2.4.50 ... .70 (baseline, extended, lossless) and .80 / .81 (JPEG-LS)
  if (!starts_with(ts, "1.2.840.10008.1.2.4.")) return false;
  const std::string tail = ts.substr(20);
  return tail == "50" || tail == "51" || tail == "57" || tail == "70" || tail == "80" || tail == "81";
}

uint16_t be16(const uint8_t* p) { return uint16_t((p[0] << 8) | p[1]); }
uint32_t le32(const uint8_t* p) { return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24; }

std::string check_jpeg(const uint8_t* d, size_t n) {
  if (n < 4 || d[0] != 0xFF || d[1] != 0xD8) return "the JPEG frame does not start with an SOI marker";
  size_t pos = 2;
  while (pos + 4 <= n) {
    if (d[pos] != 0xFF) return "the JPEG frame has no marker where one is due";
    while (pos < n && d[pos] == 0xFF) ++pos;  // fill bytes
    if (pos >= n) break;
    const uint8_t m = d[pos++];
    if (m == 0x01 || (m >= 0xD0 && m <= 0xD7)) continue;  // no length
    if (m == 0xD9 || m == 0xDA) return "the JPEG frame has no frame header (SOF) before its scan";
    if (pos + 2 > n) break;
    const uint16_t len = be16(d + pos);
    if (len < 2 || pos + len > n) return "a JPEG segment runs past the end of the frame";
    const bool sof = (m >= 0xC0 && m <= 0xCF && m != 0xC4 && m != 0xC8 && m != 0xCC) || m == 0xF7;
    if (sof) {
      if (len < 8) return "the JPEG frame header is too short";
      const uint8_t precision = d[pos + 2];
      const uint16_t rows = be16(d + pos + 3), cols = be16(d + pos + 5);
      const uint8_t components = d[pos + 7];
      if (precision < 2 || precision > 16) return "the JPEG frame header has precision " + std::to_string(precision);
      if (rows == 0 || cols == 0) return "the JPEG frame header has a zero size";
      if (components < 1 || components > 4 || len < 8 + 3u * components) return "the JPEG frame header has a bad component count";
      return "";
    }
    pos += len;
  }
  return "the JPEG frame ends before its frame header (SOF)";
}

std::string check_rle(const uint8_t* d, size_t n) {
  if (n < 64) return "the RLE frame is shorter than its 64-byte header";
  const uint32_t segments = le32(d);
  if (segments < 1 || segments > 15) return "the RLE header announces " + std::to_string(segments) + " segments";
  uint32_t previous = 63;
  for (uint32_t i = 0; i < segments; ++i) {
    const uint32_t offset = le32(d + 4 + 4 * i);
    if (offset <= previous || offset >= n) return "the RLE header has segment offsets out of order or past the frame";
    previous = offset;
  }
  if (le32(d + 4) != 64) return "the first RLE segment does not follow the header";
  return "";
}

}  // namespace

bool frame_check_applies(const std::string& ts) { return is_jpeg(ts) || ts == "1.2.840.10008.1.2.5"; }

std::string check_compressed_frame(const std::string& ts, const uint8_t* data, size_t size) {
  if (is_jpeg(ts)) return check_jpeg(data, size);
  if (ts == "1.2.840.10008.1.2.5") return check_rle(data, size);
  return "";
}

}  // namespace clinvla_orthanc
