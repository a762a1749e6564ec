// A sanity check of a compressed frame's header before Orthanc decodes it.
//
// Orthanc 1.10's decoders abort the whole server on some malformed streams (seen here: an assertion
// in GDCM's JPEG codec on an SOF with precision 0, a crash on an RLE frame whose header is zeros),
// and the plugin decodes every stored radiograph unattended, so a single crafted C-STORE could take
// the PACS down. Frames of the JPEG family, JPEG-LS and RLE are read as far as their headers and
// refused unless those are consistent; other transfer syntaxes pass (Orthanc decides).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace clinvla_orthanc {

// True when `ts` is a transfer syntax this check reads (so its raw frame should be fetched).
bool frame_check_applies(const std::string& ts);

// "" when the frame's header is plausible for `ts`, else why not.
std::string check_compressed_frame(const std::string& ts, const uint8_t* data, size_t size);

}  // namespace clinvla_orthanc
