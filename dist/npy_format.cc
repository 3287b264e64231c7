#include "dist/npy_format.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

namespace ringtree {

namespace {

constexpr char kMagic[] = "\x93NUMPY";

Status Bad(const std::string& name, const std::string& what) {
  return Status::InvalidArgument("[npy] " + name + ": " + what);
}

// Finds the value text after 'key': in a Python dict literal.
bool FindValue(const std::string& dict, const std::string& key, size_t* pos) {
  for (const char* quote : {"'", "\""}) {
    const std::string k = std::string(quote) + key + quote;
    size_t p = dict.find(k);
    if (p == std::string::npos) continue;
    p = dict.find(':', p + k.size());
    if (p == std::string::npos) return false;
    ++p;
    while (p < dict.size() && dict[p] == ' ') ++p;
    *pos = p;
    return true;
  }
  return false;
}

std::string HeaderDict(const std::vector<int64_t>& shape, DType dtype) {
  std::string s = std::string("{'descr': '") + (dtype == DType::kFloat16 ? "<f2" : "<f4") +
                  "', 'fortran_order': False, 'shape': (";
  for (size_t i = 0; i < shape.size(); ++i) {
    s += std::to_string(shape[i]);
    if (shape.size() == 1 || i + 1 < shape.size()) s += ",";
    if (i + 1 < shape.size()) s += " ";
  }
  s += "), }";
  return s;
}

}  // namespace

std::string EncodeNpyHeader(const std::vector<int64_t>& shape, DType dtype) {
  std::string dict = HeaderDict(shape, dtype);
  const bool v2 = dict.size() + 11 > 65535;
  const size_t prefix = v2 ? 12 : 10;
  size_t total = prefix + dict.size() + 1;
  total = (total + 63) / 64 * 64;
  dict.append(total - prefix - dict.size() - 1, ' ');
  dict += '\n';
  std::string out(kMagic, 6);
  out += static_cast<char>(v2 ? 2 : 1);
  out += static_cast<char>(0);
  const uint32_t len = static_cast<uint32_t>(dict.size());
  out += static_cast<char>(len & 0xff);
  out += static_cast<char>((len >> 8) & 0xff);
  if (v2) {
    out += static_cast<char>((len >> 16) & 0xff);
    out += static_cast<char>((len >> 24) & 0xff);
  }
  return out + dict;
}

int64_t NpyHeader::elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

int64_t NpyHeader::row_elements() const {
  int64_t n = 1;
  for (size_t i = 1; i < shape.size(); ++i) n *= shape[i];
  return n;
}

int64_t NpyHeader::element_bytes() const {
  return float64 ? 8 : static_cast<int64_t>(DTypeSize(dtype));
}

std::string NpyHeader::ShapeString() const {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    s += std::to_string(shape[i]);
    if (i + 1 < shape.size()) s += ", ";
  }
  return s + (shape.size() == 1 ? ",)" : ")");
}

namespace {

// The header dictionary of a .npy file and the offset of its first data byte.
Status ReadNpyDict(const std::string& name, const uint8_t* data, size_t size, std::string* dict_out,
                   size_t* data_offset) {
  if (size < 10 || std::memcmp(data, kMagic, 6) != 0)
    return Bad(name, "not a .npy file (bad magic)");
  const int major = data[6];
  size_t prefix, dict_len;
  if (major == 1) {
    prefix = 10;
    dict_len = data[8] | (data[9] << 8);
  } else if (major == 2 || major == 3) {
    if (size < 12) return Bad(name, "header truncated");
    prefix = 12;
    dict_len = static_cast<size_t>(data[8]) | (static_cast<size_t>(data[9]) << 8) |
               (static_cast<size_t>(data[10]) << 16) | (static_cast<size_t>(data[11]) << 24);
  } else {
    return Bad(name, "format version " + std::to_string(major) + "." + std::to_string(data[7]) +
                         " not supported (want 1.0, 2.0 or 3.0)");
  }
  if (prefix + dict_len > size)
    return Bad(name, "header truncated (" + std::to_string(prefix + dict_len) +
                         " header bytes, file has " + std::to_string(size) + ")");
  dict_out->assign(reinterpret_cast<const char*>(data) + prefix, dict_len);
  *data_offset = prefix + dict_len;
  return Status::Ok();
}

// The 'descr' string of a header dictionary.
Status ReadDescr(const std::string& name, const std::string& dict, std::string* descr) {
  size_t p;
  if (!FindValue(dict, "descr", &p) || p >= dict.size() || (dict[p] != '\'' && dict[p] != '"'))
    return Bad(name, "header field 'descr' missing or malformed");
  const size_t end = dict.find(dict[p], p + 1);
  if (end == std::string::npos) return Bad(name, "header field 'descr' malformed");
  *descr = dict.substr(p + 1, end - p - 1);
  return Status::Ok();
}

}  // namespace

Result<NpyHeader> ParseNpyHeader(const std::string& name, const uint8_t* data, size_t size,
                                 int64_t file_bytes, bool allow_float64) {
  std::string dict, descr;
  size_t offset = 0;
  RINGTREE_RETURN_IF_ERROR(ReadNpyDict(name, data, size, &dict, &offset));
  NpyHeader h;
  h.data_offset = static_cast<int64_t>(offset);
  h.file_bytes = file_bytes;
  RINGTREE_RETURN_IF_ERROR(ReadDescr(name, dict, &descr));

  size_t p;
  if (descr == "<f4") {
    h.dtype = DType::kFloat32;
  } else if (descr == "<f2") {
    h.dtype = DType::kFloat16;
  } else if (descr == "<f8" && allow_float64) {
    h.dtype = DType::kFloat32;
    h.float64 = true;
  } else if (allow_float64) {
    return Bad(name,
               "dtype '" + descr + "' not supported (want '<f4', '<f2' or '<f8', little-endian)");
  } else {
    return Bad(name, "dtype '" + descr +
                         "' not supported (want '<f4' float32 or '<f2' float16, little-endian)");
  }
  if (!FindValue(dict, "fortran_order", &p))
    return Bad(name, "header field 'fortran_order' missing");
  if (dict.compare(p, 4, "True") == 0)
    return Bad(name, "fortran_order True not supported (want C order)");
  if (dict.compare(p, 5, "False") != 0) return Bad(name, "header field 'fortran_order' malformed");
  if (!FindValue(dict, "shape", &p) || p >= dict.size() || dict[p] != '(')
    return Bad(name, "header field 'shape' missing or malformed");
  const size_t close = dict.find(')', p);
  if (close == std::string::npos) return Bad(name, "header field 'shape' malformed");
  std::string dims = dict.substr(p + 1, close - p - 1);
  std::stringstream ss(dims);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t a = item.find_first_not_of(" \t");
    if (a == std::string::npos) continue;
    size_t b = item.find_last_not_of(" \tL");
    item = item.substr(a, b - a + 1);
    char* endp = nullptr;
    errno = 0;
    const long long v = std::strtoll(item.c_str(), &endp, 10);
    if (errno == ERANGE) return Bad(name, "shape dimension " + item + " is too large");
    if (errno != 0 || *endp != '\0' || v < 0)
      return Bad(name, "header field 'shape' has a bad dimension '" + item + "'");
    h.shape.push_back(v);
  }
  // Checked: a header may claim any shape, and a product that wraps around
  // would make a huge array look like one that fits in the file. The row
  // product (row_elements) on its own too: a leading 0 makes the total 0
  // whatever the other dimensions are.
  int64_t row_bytes = h.element_bytes();
  for (size_t i = 1; i < h.shape.size(); ++i) {
    if (__builtin_mul_overflow(row_bytes, h.shape[i], &row_bytes)) {
      return Bad(name, "shape " + h.ShapeString() +
                           " is too large (its row's byte count overflows 64 bits)");
    }
  }
  int64_t need = h.element_bytes();
  for (int64_t d : h.shape) {
    if (__builtin_mul_overflow(need, d, &need)) {
      return Bad(name,
                 "shape " + h.ShapeString() + " is too large (its byte count overflows 64 bits)");
    }
  }
  if (__builtin_add_overflow(need, h.data_offset, &need)) {
    return Bad(name,
               "shape " + h.ShapeString() + " is too large (its byte count overflows 64 bits)");
  }
  if (file_bytes >= 0 && file_bytes < need)
    return Bad(name, "shape " + h.ShapeString() + " needs " + std::to_string(need - h.data_offset) +
                         " data bytes, file has " + std::to_string(file_bytes - h.data_offset) +
                         " (truncated)");
  return h;
}

Result<NpyHeader> ReadNpyHeaderFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in)
    return Status::NotFound("[npy] " + path + ": cannot open (" + std::strerror(errno) + ")");
  in.seekg(0, std::ios::end);
  const int64_t file_bytes = static_cast<int64_t>(in.tellg());
  in.seekg(0);
  std::vector<uint8_t> buf(static_cast<size_t>(std::min<int64_t>(file_bytes, 1 << 20)));
  in.read(reinterpret_cast<char*>(buf.data()), static_cast<std::streamsize>(buf.size()));
  if (!in) return Status::IoError("[npy] " + path + ": read of header failed");
  return ParseNpyHeader(path, buf.data(), buf.size(), file_bytes);
}

Result<NpyArray> ParseNpyArray(const std::string& name, const std::string& contents) {
  const auto* bytes = reinterpret_cast<const uint8_t*>(contents.data());
  RINGTREE_ASSIGN_OR_RETURN(
      NpyHeader h,
      ParseNpyHeader(name, bytes, contents.size(), static_cast<int64_t>(contents.size()), true));
  const int64_t n = h.elements();  // checked by the parse (it fits in the file)
  if (static_cast<int64_t>(contents.size()) - h.data_offset != n * h.element_bytes()) {
    return Bad(name, "data size does not match shape " + h.ShapeString() + " (" +
                         std::to_string(static_cast<int64_t>(contents.size()) - h.data_offset) +
                         " data bytes)");
  }
  NpyArray a;
  a.dtype = h.dtype;
  a.shape = h.shape;
  if (!h.float64) {
    a.data = contents.substr(static_cast<size_t>(h.data_offset));
    return a;
  }
  std::vector<float> values(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    double d;
    std::memcpy(&d, contents.data() + h.data_offset + i * 8, 8);
    values[static_cast<size_t>(i)] = static_cast<float>(d);
  }
  a.data.resize(values.size() * sizeof(float));
  if (!values.empty())
    std::memcpy(a.data.data(), values.data(), a.data.size());  // (no memcpy from null)
  return a;
}

Result<NpyArray> ReadNpyArray(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::NotFound("[npy] " + path + ": cannot open");
  std::string contents((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return ParseNpyArray(path, contents);
}

Status WriteNpyArray(const std::string& path, const NpyArray& array) {
  if (array.dtype != DType::kFloat32 && array.dtype != DType::kFloat16)
    return Status::InvalidArgument("[npy] " + path + ": can only write float32 or float16");
  const std::string header = EncodeNpyHeader(array.shape, array.dtype);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out)
    return Status::IoError("[npy] " + path + ": cannot create (" + std::strerror(errno) + ")");
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(array.data.data(), static_cast<std::streamsize>(array.data.size()));
  if (!out) return Status::IoError("[npy] " + path + ": write failed");
  return Status::Ok();
}

Status WriteNpyFile(const std::string& path, const float* data, const std::vector<int64_t>& shape,
                    DType dtype) {
  if (dtype != DType::kFloat32 && dtype != DType::kFloat16)
    return Status::InvalidArgument("[npy] " + path + ": can only write float32 or float16");
  const std::string header = EncodeNpyHeader(shape, dtype);
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out)
    return Status::IoError("[npy] " + path + ": cannot create (" + std::strerror(errno) + ")");
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  if (dtype == DType::kFloat32) {
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(n * sizeof(float)));
  } else {
    std::vector<uint16_t> half(static_cast<size_t>(n));
    ConvertFromFloat32(data, DType::kFloat16, half.data(), static_cast<size_t>(n));
    out.write(reinterpret_cast<const char*>(half.data()), static_cast<std::streamsize>(n * 2));
  }
  if (!out) return Status::IoError("[npy] " + path + ": write failed");
  return Status::Ok();
}

Status ReadNpyFile(const std::string& path, std::vector<float>* data, std::vector<int64_t>* shape) {
  RINGTREE_ASSIGN_OR_RETURN(NpyHeader h, ReadNpyHeaderFile(path));
  std::ifstream in(path, std::ios::binary);
  in.seekg(h.data_offset);
  const int64_t n = h.elements();
  std::vector<uint8_t> raw(static_cast<size_t>(n * DTypeSize(h.dtype)));
  in.read(reinterpret_cast<char*>(raw.data()), static_cast<std::streamsize>(raw.size()));
  if (!in) return Status::IoError("[npy] " + path + ": short read");
  data->resize(static_cast<size_t>(n));
  ConvertToFloat32(h.dtype, raw.data(), data->data(), static_cast<size_t>(n));
  *shape = h.shape;
  return Status::Ok();
}

Result<std::vector<int64_t>> ReadNpyIntegers(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in)
    return Status::NotFound("[npy] " + path + ": cannot open (" + std::strerror(errno) + ")");
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)),
                             std::istreambuf_iterator<char>());
  return ParseNpyIntegers(path, bytes);
}

Result<std::vector<int64_t>> ParseNpyIntegers(const std::string& path,
                                              const std::vector<uint8_t>& bytes) {
  std::string dict, descr;
  size_t offset = 0;
  RINGTREE_RETURN_IF_ERROR(ReadNpyDict(path, bytes.data(), bytes.size(), &dict, &offset));
  RINGTREE_RETURN_IF_ERROR(ReadDescr(path, dict, &descr));
  size_t width = 0;
  if (descr == "<i8" || descr == "<u8")
    width = 8;
  else if (descr == "<i4" || descr == "<u4")
    width = 4;
  else
    return Bad(path,
               "dtype '" + descr + "' not supported (want integers: '<i8', '<i4', '<u8' or '<u4')");
  // The 1-D shape: "(n,)".
  size_t p;
  if (!FindValue(dict, "shape", &p) || p >= dict.size() || dict[p] != '(')
    return Bad(path, "header field 'shape' missing or malformed");
  char* endp = nullptr;
  errno = 0;
  const long long n = std::strtoll(dict.c_str() + p + 1, &endp, 10);
  if (errno != 0 || n < 0 || endp == dict.c_str() + p + 1 || (*endp != ',' && *endp != ')') ||
      (*endp == ',' && dict.find_first_not_of(" ", endp - dict.c_str() + 1) != dict.find(')', p)))
    return Bad(path, "shape must be one-dimensional (n,)");
  if ((bytes.size() - offset) / width < static_cast<size_t>(n))
    return Bad(path, "shape (" + std::to_string(n) + ",) needs " + std::to_string(n * width) +
                         " data bytes, file has " + std::to_string(bytes.size() - offset) +
                         " (truncated)");
  std::vector<int64_t> out(static_cast<size_t>(n));
  for (long long i = 0; i < n; ++i) {
    const uint8_t* e = bytes.data() + offset + i * width;
    if (width == 8) {
      int64_t v;
      std::memcpy(&v, e, 8);
      if (descr == "<u8" && v < 0)
        return Bad(path, "element " + std::to_string(i) + " exceeds int64");
      out[static_cast<size_t>(i)] = v;
    } else if (descr == "<i4") {
      int32_t v;
      std::memcpy(&v, e, 4);
      out[static_cast<size_t>(i)] = v;
    } else {
      uint32_t v;
      std::memcpy(&v, e, 4);
      out[static_cast<size_t>(i)] = v;
    }
  }
  return out;
}

}  // namespace ringtree
