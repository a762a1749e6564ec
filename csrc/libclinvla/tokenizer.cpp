// The WordPiece tokenizer (tokenizer.hpp has the rules). Text is decoded to code points once,
// normalised into a second buffer, and each word is looked up as UTF-8 bytes (string_view keys
// into the vocabulary's own storage, so a lookup allocates nothing).
#include "tokenizer.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "clinvla/index.hpp"  // clinvla::Error

namespace clinvla {
namespace {

namespace ut = unicode_tables;

template <typename... Args>
[[noreturn]] void fail(ErrorCode code, Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  throw Error(code, os.str());
}

template <typename T>
uint8_t run_value(const ut::PropertyRun* runs, size_t n, T cp) {
  // the last run whose start <= cp (runs[0].start is 0)
  const ut::PropertyRun* it = std::upper_bound(
      runs, runs + n, char32_t(cp), [](char32_t c, const ut::PropertyRun& r) { return c < r.start; });
  return (it - 1)->value;
}

// Flat tables for the Basic Multilingual Plane (where report text lives), built once from the runs.
struct BmpTables {
  uint8_t flags[0x10000];
  uint8_t ccc[0x10000];
  BmpTables() {
    for (char32_t cp = 0; cp < 0x10000; ++cp) {
      flags[cp] = run_value(ut::kFlagRuns, ut::kFlagRunCount, cp);
      ccc[cp] = run_value(ut::kCccRuns, ut::kCccRunCount, cp);
    }
  }
};

const BmpTables& bmp() {
  static const BmpTables tables;
  return tables;
}

inline uint8_t flags_of(char32_t cp) {
  return cp < 0x10000 ? bmp().flags[cp] : run_value(ut::kFlagRuns, ut::kFlagRunCount, cp);
}
inline uint8_t ccc_of(char32_t cp) {
  return cp < 0x10000 ? bmp().ccc[cp] : run_value(ut::kCccRuns, ut::kCccRunCount, cp);
}

const ut::CodeMapping* find_mapping(const ut::CodeMapping* table, size_t n, char32_t cp) {
  const ut::CodeMapping* it =
      std::lower_bound(table, table + n, cp, [](const ut::CodeMapping& m, char32_t c) { return m.cp < c; });
  return (it != table + n && it->cp == cp) ? it : nullptr;
}

bool is_cjk(char32_t cp) {  // tokenizers' BertNormalizer::is_chinese_char
  return (cp >= 0x4E00 && cp <= 0x9FFF) || (cp >= 0x3400 && cp <= 0x4DBF) || (cp >= 0x20000 && cp <= 0x2A6DF) ||
         (cp >= 0x2A700 && cp <= 0x2B73F) || (cp >= 0x2B740 && cp <= 0x2B81F) || (cp >= 0x2B920 && cp <= 0x2CEAF) ||
         (cp >= 0xF900 && cp <= 0xFAFF) || (cp >= 0x2F800 && cp <= 0x2FA1F);
}

void decompose(char32_t cp, std::vector<char32_t>& out) {
  if (cp < 0xC0) {  // nothing below U+00C0 decomposes
    out.push_back(cp);
    return;
  }
  if (cp >= 0xAC00 && cp <= 0xD7A3) {  // Hangul syllables, as Unicode defines them (ch. 3.12)
    const char32_t s = cp - 0xAC00;
    out.push_back(0x1100 + s / 588);
    out.push_back(0x1161 + (s % 588) / 28);
    if (s % 28) out.push_back(0x11A7 + s % 28);
    return;
  }
  const ut::CodeMapping* m = find_mapping(ut::kDecomposition, ut::kDecompositionCount, cp);
  if (!m) {
    out.push_back(cp);
    return;
  }
  out.insert(out.end(), ut::kDecompositionPool + m->offset, ut::kDecompositionPool + m->offset + m->length);
}

void lowercase_into(char32_t cp, std::vector<char32_t>& out) {
  if (cp < 0x80) {
    out.push_back(cp >= 'A' && cp <= 'Z' ? cp + 32 : cp);
    return;
  }
  const ut::CodeMapping* m = find_mapping(ut::kLowercase, ut::kLowercaseCount, cp);
  if (!m) {
    out.push_back(cp);
    return;
  }
  out.insert(out.end(), ut::kLowercasePool + m->offset, ut::kLowercasePool + m->offset + m->length);
}

// Strict UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF). Returns the offset of
// the first bad byte, or npos when the text is valid; cps receives the code points.
size_t decode_utf8(std::string_view s, std::vector<char32_t>& cps) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char b = p[i];
    if (b < 0x80) {
      cps.push_back(b);
      ++i;
      continue;
    }
    int len;
    char32_t cp, min;
    if ((b & 0xE0) == 0xC0) { len = 2; cp = b & 0x1F; min = 0x80; }
    else if ((b & 0xF0) == 0xE0) { len = 3; cp = b & 0x0F; min = 0x800; }
    else if ((b & 0xF8) == 0xF0) { len = 4; cp = b & 0x07; min = 0x10000; }
    else return i;
    if (i + len > n) return i;
    for (int k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    cps.push_back(cp);
    i += len;
  }
  return std::string_view::npos;
}

void append_utf8(char32_t cp, std::string& out) {
  if (cp < 0x80) {
    out.push_back(char(cp));
  } else if (cp < 0x800) {
    out.push_back(char(0xC0 | (cp >> 6)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(char(0xE0 | (cp >> 12)));
    out.push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(char(0xF0 | (cp >> 18)));
    out.push_back(char(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  }
}

std::string describe_byte(std::string_view s, size_t at) {
  std::ostringstream os;
  os << "byte 0x" << std::hex << std::uppercase << int(static_cast<unsigned char>(s[at])) << std::dec
     << " at offset " << at;
  return os.str();
}

}  // namespace

Tokenizer Tokenizer::from_file(const std::string& vocab_path, bool lowercase, int32_t max_length) {
  std::ifstream in(vocab_path, std::ios::binary);
  if (!in) {
    const int err = errno;
    fail(ErrorCode::IO, "cannot open the tokenizer vocabulary '", vocab_path, "': ",
         err ? std::strerror(err) : "unknown error", "; pass the path of a BERT vocab.txt (one token per line)");
  }
  std::ostringstream buf;
  buf << in.rdbuf();
  if (in.bad()) fail(ErrorCode::IO, "cannot read the tokenizer vocabulary '", vocab_path, "'");
  return Tokenizer(buf.str(), lowercase, max_length, "tokenizer vocabulary '" + vocab_path + "'");
}

Tokenizer::Tokenizer(std::string_view text, bool lowercase, int32_t max_length, const std::string& source)
    : max_length_(max_length), lowercase_(lowercase) {
  if (max_length < 2) {
    fail(ErrorCode::Invalid, "max_length must be at least 2 (room for [CLS] and [SEP]), got ", max_length);
  }
  {
    std::vector<char32_t> scratch;
    const size_t bad = decode_utf8(text, scratch);
    if (bad != std::string_view::npos) {
      const size_t line = 1 + std::count(text.begin(), text.begin() + bad, '\n');
      fail(ErrorCode::Format, source, " is not UTF-8 text: ", describe_byte(text, bad), " (line ", line, ")");
    }
  }
  storage_.reset(new char[text.size() + 1]);
  std::memcpy(storage_.get(), text.data(), text.size());
  std::string_view all(storage_.get(), text.size());

  std::vector<std::string_view> lines;
  size_t pos = 0;
  while (pos < all.size()) {
    size_t end = all.find('\n', pos);
    if (end == std::string_view::npos) end = all.size();
    std::string_view line = all.substr(pos, end - pos);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);  // a vocabulary saved on Windows
    lines.push_back(line);
    pos = end + 1;
  }
  while (!lines.empty() && lines.back().empty()) lines.pop_back();  // trailing blank lines: no token
  if (lines.empty()) fail(ErrorCode::Format, source, " holds no tokens; expected one WordPiece token per line");
  for (size_t i = 0; i < lines.size(); ++i) {
    const std::string_view line = lines[i];
    if (line.empty()) {
      // Hugging Face counts a blank line as a token, clinvla's Python Tokenizer skips it: the ids
      // after it would depend on who reads the file
      fail(ErrorCode::Format, source, ": line ", i + 1, " is blank; a vocabulary needs one token on every line");
    }
    // Characters that Python's str.splitlines() also breaks lines at (the Python Tokenizer reads the
    // vocabulary with it): a token holding one would be two tokens there.
    static const char* const kBreaks[] = {"\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\xc2\x85",
                                          "\xe2\x80\xa8", "\xe2\x80\xa9"};
    for (const char* brk : kBreaks) {
      if (line.find(brk) != std::string_view::npos) {
        fail(ErrorCode::Format, source, ": line ", i + 1,
             " holds a line-break character (CR, VT, FF, FS, GS, RS, NEL, LS or PS) inside a token");
      }
    }
    const int32_t id = int32_t(i);
    if (line.size() > 2 && line[0] == '#' && line[1] == '#') {
      const std::string_view rest = line.substr(2);
      suffixes_[rest] = id;  // a repeated token keeps its last id, as Hugging Face does
      max_suffix_bytes_ = std::max(max_suffix_bytes_, rest.size());
    } else {
      words_[line] = id;
      max_word_bytes_ = std::max(max_word_bytes_, line.size());
    }
  }
  vocab_size_ = int64_t(lines.size());
  cls_id_ = token_id("[CLS]");
  sep_id_ = token_id("[SEP]");
  unk_id_ = token_id("[UNK]");
  pad_id_ = token_id("[PAD]");
  for (const char* special : {"[CLS]", "[SEP]", "[PAD]", "[UNK]"}) {
    if (token_id(special) < 0) {
      fail(ErrorCode::Format, source, " has no ", special, " token; a BERT vocabulary has [PAD], [UNK], [CLS] and [SEP]");
    }
  }
  // The special tokens Hugging Face's BertWordPieceTokenizer registers (when in the vocabulary):
  // they are matched in the raw text before any normalisation.
  for (const char* special : {"[UNK]", "[SEP]", "[CLS]", "[PAD]", "[MASK]"}) {
    const int32_t id = token_id(special);
    if (id >= 0) specials_.push_back({special, id});
  }
  std::stable_sort(specials_.begin(), specials_.end(),
                   [](const Special& a, const Special& b) { return a.text.size() > b.text.size(); });
}

int32_t Tokenizer::token_id(std::string_view token) const {
  if (token.size() > 2 && token[0] == '#' && token[1] == '#') {
    const auto it = suffixes_.find(token.substr(2));
    return it == suffixes_.end() ? -1 : it->second;
  }
  const auto it = words_.find(token);
  return it == words_.end() ? -1 : it->second;
}

std::vector<int32_t> Tokenizer::encode(std::string_view utf8) const {
  std::vector<int32_t> ids;
  encode(utf8, ids);
  return ids;
}

void Tokenizer::encode(std::string_view utf8, std::vector<int32_t>& ids) const {
  std::vector<char32_t> cps;
  cps.reserve(utf8.size());
  const size_t bad = decode_utf8(utf8, cps);
  if (bad != std::string_view::npos) {
    fail(ErrorCode::Invalid, "the text is not valid UTF-8: ", describe_byte(utf8, bad),
         "; decode it to UTF-8 before tokenising");
  }
  ids.clear();
  ids.push_back(cls_id_);
  const size_t limit = size_t(max_length_) - 1;  // ids.size() before [SEP]
  // Special tokens written in the text split it into segments; '[' starts every one of them, and
  // as it is ASCII, byte offsets and code-point offsets move together by counting lead bytes.
  size_t seg_cp = 0, cp_at = 0;
  for (size_t i = 0; i < utf8.size() && ids.size() < limit; ++i) {
    const unsigned char b = static_cast<unsigned char>(utf8[i]);
    if (b == '[') {
      const Special* hit = nullptr;
      for (const Special& s : specials_) {
        if (utf8.compare(i, s.text.size(), s.text) == 0) {
          hit = &s;
          break;
        }
      }
      if (hit) {
        encode_segment(cps.data() + seg_cp, cp_at - seg_cp, ids, limit);
        if (ids.size() < limit) ids.push_back(hit->id);
        i += hit->text.size() - 1;
        cp_at += hit->text.size();
        seg_cp = cp_at;
        continue;
      }
    }
    if ((b & 0xC0) != 0x80) ++cp_at;
  }
  if (ids.size() < limit) encode_segment(cps.data() + seg_cp, cps.size() - seg_cp, ids, limit);
  ids.push_back(sep_id_);
}

void Tokenizer::encode_segment(const char32_t* cps, size_t n, std::vector<int32_t>& ids, size_t limit) const {
  if (n == 0) return;
  // 1. clean, space out CJK
  std::vector<char32_t> a;
  a.reserve(n + 8);
  for (size_t i = 0; i < n; ++i) {
    const char32_t cp = cps[i];
    const uint8_t f = flags_of(cp);
    if (f & ut::kDrop) continue;
    if (f & ut::kSpace) {
      a.push_back(' ');
    } else if (cp >= 0x3400 && is_cjk(cp)) {
      a.push_back(' ');
      a.push_back(cp);
      a.push_back(' ');
    } else {
      a.push_back(cp);
    }
  }
  // 2. strip accents (NFD, then drop nonspacing marks) and lowercase
  const std::vector<char32_t>* text = &a;
  std::vector<char32_t> nfd, lower;
  if (lowercase_) {
    nfd.reserve(a.size() + 8);
    for (char32_t cp : a) decompose(cp, nfd);
    // canonical ordering: stable sort of each run of non-zero combining classes
    for (size_t i = 0; i < nfd.size();) {
      if (nfd[i] < 0x300 || ccc_of(nfd[i]) == 0) {
        ++i;
        continue;
      }
      size_t j = i;
      while (j < nfd.size() && nfd[j] >= 0x300 && ccc_of(nfd[j]) != 0) ++j;
      if (j - i > 1) {
        std::stable_sort(nfd.begin() + i, nfd.begin() + j,
                         [](char32_t x, char32_t y) { return ccc_of(x) < ccc_of(y); });
      }
      i = j;
    }
    lower.reserve(nfd.size());
    for (char32_t cp : nfd) {
      if (cp >= 0x300 && (flags_of(cp) & ut::kMark)) continue;
      lowercase_into(cp, lower);
    }
    text = &lower;
  }
  // 3. split on whitespace and around punctuation; 4. WordPiece per word
  const std::vector<char32_t>& t = *text;
  size_t start = 0;
  for (size_t i = 0; i <= t.size() && ids.size() < limit; ++i) {
    const uint8_t f = i < t.size() ? flags_of(t[i]) : uint8_t(ut::kSpace);
    if (f & (ut::kSpace | ut::kPunct)) {
      if (i > start) encode_word(t.data() + start, i - start, ids, limit);
      if ((f & ut::kPunct) && !(f & ut::kSpace) && ids.size() < limit) encode_word(t.data() + i, 1, ids, limit);
      start = i + 1;
    }
  }
}

void Tokenizer::encode_word(const char32_t* cps, size_t n, std::vector<int32_t>& ids, size_t limit) const {
  if (n > size_t(kMaxCharsPerWord)) {
    ids.push_back(unk_id_);
    return;
  }
  std::string word;
  word.reserve(n * 4);
  size_t offsets[kMaxCharsPerWord + 1];  // byte offset of each code point, and the end
  for (size_t i = 0; i < n; ++i) {
    offsets[i] = word.size();
    append_utf8(cps[i], word);
  }
  offsets[n] = word.size();
  const std::string_view w(word);
  const size_t first = ids.size();
  size_t start = 0;  // in code points
  while (start < n) {
    const auto& map = start == 0 ? words_ : suffixes_;
    const size_t max_bytes = start == 0 ? max_word_bytes_ : max_suffix_bytes_;
    size_t end = n;
    while (end > start && offsets[end] - offsets[start] > max_bytes) --end;  // longer than any token
    int32_t found = -1;
    for (; end > start; --end) {
      const auto it = map.find(w.substr(offsets[start], offsets[end] - offsets[start]));
      if (it != map.end()) {
        found = it->second;
        break;
      }
    }
    if (found < 0) {  // some piece is missing: the whole word is unknown
      ids.resize(first);
      ids.push_back(unk_id_);
      return;
    }
    ids.push_back(found);
    start = end;
  }
  if (ids.size() > limit) ids.resize(limit);  // truncation keeps the first pieces
}

}  // namespace clinvla
