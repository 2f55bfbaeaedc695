#include <gtest/gtest.h>

#include "base/base64.h"
#include "base/hash.h"
#include "ir/tensor.h"
#include "kiln/half.h"

using namespace kiln;

TEST(Half, RoundTrip) {
  for (float f : {0.0f, 1.0f, -2.5f, 65504.0f, 6.1035156e-05f, 5.9604645e-08f}) {
    EXPECT_EQ(half_to_float(float_to_half(f)), f);
  }
  EXPECT_EQ(float_to_half(1e6f), 0x7c00);
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.5f)), 1.5f);
}

TEST(Tensor, CreateRejectsHostileShapes) {
  EXPECT_FALSE(Tensor::create(DataType::kFloat, {-1, 3}).is_ok());
  EXPECT_FALSE(Tensor::create(DataType::kFloat, {int64_t{1} << 62, 4}).is_ok());
  EXPECT_FALSE(Tensor::create(DataType::kFloat, {int64_t{1} << 40, int64_t{1} << 40}).is_ok());
  auto t = Tensor::create(DataType::kInt64, {2, 3});
  ASSERT_TRUE(t.is_ok());
  EXPECT_EQ(t->numel(), 6);
  EXPECT_EQ(t->nbytes(), 48u);
}

TEST(Hash, Deterministic) {
  EXPECT_EQ(hash_bytes("abc", 3), hash_bytes("abc", 3));
  EXPECT_NE(hash_bytes("abc", 3), hash_bytes("abd", 3));
}

TEST(Base64, RoundTripAndRfc4648Vectors) {
  // RFC 4648 section 10.
  const std::pair<const char*, const char*> vectors[] = {{"", ""},
                                                         {"f", "Zg=="},
                                                         {"fo", "Zm8="},
                                                         {"foo", "Zm9v"},
                                                         {"foob", "Zm9vYg=="},
                                                         {"fooba", "Zm9vYmE="},
                                                         {"foobar", "Zm9vYmFy"}};
  for (auto [plain, enc] : vectors) {
    EXPECT_EQ(base64_encode(plain), enc);
    auto d = base64_decode(enc);
    ASSERT_TRUE(d.has_value()) << enc;
    EXPECT_EQ(*d, plain);
  }
  std::string bytes;
  for (int i = 0; i < 1000; ++i) bytes += static_cast<char>((i * 131 + 7) & 255);
  for (size_t n : {size_t{1}, size_t{2}, size_t{3}, size_t{254}, size_t{1000}}) {
    auto d = base64_decode(base64_encode(bytes.substr(0, n)));
    ASSERT_TRUE(d.has_value());
    EXPECT_EQ(*d, bytes.substr(0, n));
  }
}

TEST(Base64, RejectsWhatIsNotBase64) {
  for (const char* bad : {"Zg=", "Zm9", "Z===", "Zm9v!A==", "Zg==Zm8=", "=Zg=", "Zm\t8"})
    EXPECT_FALSE(base64_decode(bad).has_value()) << bad;
}
