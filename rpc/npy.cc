#include "rpc/npy.h"

#include <cstring>
#include <fstream>
#include <sstream>

namespace ringtree {
namespace {

Status NpyError(const std::string& path, const std::string& what) {
  return Status::InvalidArgument("[npy] " + path + ": " + what);
}

// Value of 'key': ... in the header dict (a crude but sufficient parser for
// the headers NumPy writes).
std::string HeaderValue(const std::string& header, const std::string& key) {
  size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) return {};
  at = header.find(':', at);
  if (at == std::string::npos) return {};
  ++at;
  while (at < header.size() && header[at] == ' ') ++at;
  if (at >= header.size()) return {};
  if (header[at] == '(') {
    size_t end = header.find(')', at);
    return header.substr(at, end == std::string::npos ? std::string::npos : end - at + 1);
  }
  size_t end = header.find_first_of(",}", at);
  return header.substr(at, end == std::string::npos ? std::string::npos : end - at);
}

}  // namespace

Result<HostTensor> ReadNpy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::NotFound("[npy] " + path + ": cannot open");
  std::string contents((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return ParseNpy(path, contents);
}

Result<HostTensor> ParseNpy(const std::string& path, const std::string& contents) {
  if (contents.size() < 10 || contents.compare(0, 6, "\x93NUMPY") != 0) {
    return NpyError(path, "not a .npy file");
  }
  const int major = static_cast<unsigned char>(contents[6]);
  size_t header_len = 0, header_start = 0;
  if (major == 1) {
    header_len = static_cast<unsigned char>(contents[8]) | (static_cast<unsigned char>(contents[9]) << 8);
    header_start = 10;
  } else {
    if (contents.size() < 12) return NpyError(path, "truncated header");
    uint32_t len;
    std::memcpy(&len, contents.data() + 8, 4);
    header_len = len;
    header_start = 12;
  }
  if (header_start + header_len > contents.size()) return NpyError(path, "truncated header");
  const std::string header = contents.substr(header_start, header_len);
  std::string descr = HeaderValue(header, "descr");
  std::string fortran = HeaderValue(header, "fortran_order");
  std::string shape_text = HeaderValue(header, "shape");
  if (fortran.find("True") != std::string::npos) return NpyError(path, "fortran_order arrays not supported");
  HostTensor t;
  bool from_f8 = false;
  if (descr.find("<f4") != std::string::npos) t.dtype = DType::kFloat32;
  else if (descr.find("<f2") != std::string::npos) t.dtype = DType::kFloat16;
  else if (descr.find("<f8") != std::string::npos) { t.dtype = DType::kFloat32; from_f8 = true; }
  else return NpyError(path, "dtype " + descr + " not supported (use <f4, <f2 or <f8)");
  // Dimensions and their products are checked: a header may claim any shape.
  std::string digits;
  auto dimension = [&]() -> Status {
    if (digits.size() > 18) return NpyError(path, "shape dimension " + digits + " is too large");
    t.shape.push_back(std::stoll(digits));
    digits.clear();
    return Status::Ok();
  };
  for (char c : shape_text) {
    if (c >= '0' && c <= '9') digits += c;
    else if (!digits.empty()) RINGTREE_RETURN_IF_ERROR(dimension());
  }
  if (!digits.empty()) RINGTREE_RETURN_IF_ERROR(dimension());
  const int64_t elem = from_f8 ? 8 : static_cast<int64_t>(DTypeSize(t.dtype));
  int64_t n = 1, bytes = elem;
  for (int64_t d : t.shape) {
    if (__builtin_mul_overflow(n, d, &n) || __builtin_mul_overflow(bytes, d, &bytes)) {
      return NpyError(path, "shape " + ShapeString(t.shape) + " is too large (its byte count overflows 64 bits)");
    }
  }
  const size_t data_start = header_start + header_len;
  if (contents.size() - data_start != static_cast<uint64_t>(bytes)) {
    return NpyError(path, "data size does not match shape " + ShapeString(t.shape));
  }
  if (from_f8) {
    std::vector<float> values(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      double d;
      std::memcpy(&d, contents.data() + data_start + i * 8, 8);
      values[i] = static_cast<float>(d);
    }
    return HostTensor::FromFloat32(values.data(), t.shape, DType::kFloat32);
  }
  t.data = contents.substr(data_start);
  return t;
}

Status WriteNpy(const std::string& path, const HostTensor& tensor) {
  HostTensor out = tensor;
  if (tensor.dtype == DType::kBFloat16) {
    std::vector<float> values = tensor.ToFloat32();
    out = HostTensor::FromFloat32(values.data(), tensor.shape, DType::kFloat32);
  }
  std::ostringstream dict;
  dict << "{'descr': '" << (out.dtype == DType::kFloat16 ? "<f2" : "<f4")
       << "', 'fortran_order': False, 'shape': (";
  for (size_t i = 0; i < out.shape.size(); ++i) dict << out.shape[i] << (out.shape.size() == 1 || i + 1 < out.shape.size() ? "," : "");
  dict << "), }";
  std::string header = dict.str();
  const size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::ofstream file(path, std::ios::binary);
  if (!file) return Status::IoError("[npy] " + path + ": cannot create");
  const uint16_t len = static_cast<uint16_t>(header.size());
  file.write("\x93NUMPY\x01\x00", 8);
  file.put(static_cast<char>(len & 0xff));
  file.put(static_cast<char>(len >> 8));
  file << header;
  file.write(out.data.data(), static_cast<std::streamsize>(out.data.size()));
  if (!file) return Status::IoError("[npy] " + path + ": write failed");
  return Status::Ok();
}

}  // namespace ringtree
