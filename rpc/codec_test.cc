// Tensor decoding and .npy reading refuse shapes whose sizes overflow
// (a wrapped-around product would let a huge shape pass with little data).
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>

#include "rpc/npy.h"
#include "rpc/tensor_codec.h"

namespace ringtree {
namespace {

TEST(TensorCodec, ShapeWhoseByteCountOverflowsIsInvalidArgument) {
  for (auto shape : {std::vector<int64_t>{int64_t{1} << 32, int64_t{1} << 32, 1},
                     std::vector<int64_t>{int64_t{1} << 62, 1, 1}, std::vector<int64_t>{3, 3074457345618258603, 1}}) {
    v1::Tensor t;
    t.set_dtype(v1::FLOAT32);
    for (int64_t d : shape) t.add_shape(d);
    auto decoded = FromProto(t, "Test", "q");
    ASSERT_FALSE(decoded.ok()) << ShapeString(shape);
    EXPECT_EQ(decoded.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(decoded.status().message().find("[Test] q.shape"), std::string::npos) << decoded.status().message();
    EXPECT_NE(decoded.status().message().find("overflows"), std::string::npos) << decoded.status().message();
  }
  v1::Tensor fine;
  fine.set_dtype(v1::FLOAT16);
  fine.add_shape(2);
  fine.add_shape(3);
  fine.set_data(std::string(12, '\0'));
  auto decoded = FromProto(fine, "Test", "q");
  ASSERT_TRUE(decoded.ok()) << decoded.status().message();
  EXPECT_EQ(decoded->elements(), 6);
}

std::string WriteHeaderOnly(const std::string& shape) {
  std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + ", }";
  dict.append((64 - (10 + dict.size() + 1) % 64) % 64, ' ');
  dict += '\n';
  char name[] = "/tmp/rpc-npy-XXXXXX";
  const int fd = mkstemp(name);
  close(fd);
  std::ofstream out(name, std::ios::binary);
  out.write("\x93NUMPY\x01\x00", 8);
  out.put(static_cast<char>(dict.size() & 0xff));
  out.put(static_cast<char>(dict.size() >> 8));
  out << dict;
  return name;
}

TEST(Npy, ShapeWhoseByteCountOverflowsIsRefused) {
  // Header only: 2^32 * 2^32 * 4 bytes wraps to 0 and would match the empty data.
  for (const std::string shape : {"(4294967296, 4294967296)", "(4611686018427387904,)",
                                  "(99999999999999999999999,)"}) {
    const std::string path = WriteHeaderOnly(shape);
    auto read = ReadNpy(path);
    std::remove(path.c_str());
    ASSERT_FALSE(read.ok()) << shape;
    EXPECT_EQ(read.status().code(), StatusCode::kInvalidArgument) << read.status().message();
    EXPECT_NE(read.status().message().find("too large"), std::string::npos) << read.status().message();
  }
  const std::string path = WriteHeaderOnly("(0, 3)");
  auto empty = ReadNpy(path);
  std::remove(path.c_str());
  ASSERT_TRUE(empty.ok()) << empty.status().message();
  EXPECT_EQ(empty->elements(), 0);
}

// ParseNpy (ReadNpy's parser) converts '<f8' to float32 and refuses data of
// the wrong length either way.
TEST(Npy, Float64IsReadAsFloat32) {
  const double values[3] = {0.5, -1.25, 3.0};
  std::string dict = "{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }";
  dict.append((64 - (10 + dict.size() + 1) % 64) % 64, ' ');
  dict += '\n';
  std::string file = std::string("\x93NUMPY\x01\x00", 8);
  file += static_cast<char>(dict.size() & 0xff);
  file += static_cast<char>(dict.size() >> 8);
  file += dict;
  file.append(reinterpret_cast<const char*>(values), sizeof(values));
  auto read = ParseNpy("f8.npy", file);
  ASSERT_TRUE(read.ok()) << read.status().message();
  EXPECT_EQ(read->dtype, DType::kFloat32);
  EXPECT_EQ(read->shape, std::vector<int64_t>{3});
  EXPECT_EQ(read->ToFloat32(), (std::vector<float>{0.5f, -1.25f, 3.0f}));
  for (size_t cut : {size_t{1}, size_t{8}}) {
    auto short_file = ParseNpy("f8.npy", file.substr(0, file.size() - cut));
    EXPECT_FALSE(short_file.ok()) << cut;
  }
  EXPECT_FALSE(ParseNpy("f8.npy", file + std::string(8, '\0')).ok());
}

}  // namespace
}  // namespace ringtree
