#include "rpc/npy.h"

#include <utility>
#include <vector>

#include "dist/npy_format.h"

namespace ringtree {
namespace {

HostTensor ToHostTensor(NpyArray array) {
  HostTensor t;
  t.dtype = array.dtype;
  t.shape = std::move(array.shape);
  t.data = std::move(array.data);
  return t;
}

}  // namespace

Result<HostTensor> ReadNpy(const std::string& path) {
  RINGTREE_ASSIGN_OR_RETURN(NpyArray array, ReadNpyArray(path));
  return ToHostTensor(std::move(array));
}

Result<HostTensor> ParseNpy(const std::string& name, const std::string& contents) {
  RINGTREE_ASSIGN_OR_RETURN(NpyArray array, ParseNpyArray(name, contents));
  return ToHostTensor(std::move(array));
}

Status WriteNpy(const std::string& path, const HostTensor& tensor) {
  NpyArray array{tensor.dtype, tensor.shape, tensor.data};
  if (tensor.dtype == DType::kBFloat16) {  // NumPy has no bfloat16
    const std::vector<float> values = tensor.ToFloat32();
    array = NpyArray{
        DType::kFloat32, tensor.shape,
        std::string(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float))};
  }
  return WriteNpyArray(path, array);
}

}  // namespace ringtree
