// Base64 (RFC 4648, standard alphabet, '=' padding) for binary blobs kept in text files: the
// timing cache's serialized cuDNN plans.
#pragma once
#include <optional>
#include <string>
#include <string_view>

namespace kiln {

std::string base64_encode(std::string_view bytes);
// nullopt when `text` is not canonical base64 (a length that is not a multiple of 4, a character
// outside the alphabet, padding anywhere but at the end).
std::optional<std::string> base64_decode(std::string_view text);

}  // namespace kiln
