// Host-side caches of kernel and device attributes, so that a launch does not query the CUDA
// runtime each time.
//
// A small model (a GAN generator at batch 1) is bound by host time: every fused site paid
// cudaFuncGetAttributes (~5 us) once or twice, cudaFuncSetAttribute and two or three
// cudaDeviceGetAttribute per launch. The values they return do not change between launches:
//   * a kernel's static shared memory is a property of its compiled code;
//   * the dynamic shared memory a kernel is opted in to stays set in its device's context (a
//     larger value than before is set again; a smaller one needs no call);
//   * the opt-in limit and the compute capability are properties of the device.
// Each cache is a map under a mutex (launches may come from several host threads); the inline
// functions' statics are one object per process (one definition across translation units).
#pragma once

#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <utility>

namespace ct3d {

namespace host_detail {
inline std::mutex& mutex() {
  static std::mutex m;
  return m;
}
}  // namespace host_detail

// Static shared memory of `kernel` in bytes (cudaFuncGetAttributes on the first call only).
inline cudaError_t kernel_static_smem(const void* kernel, int* bytes) {
  static std::map<const void*, int> cache;
  {
    std::lock_guard<std::mutex> lock(host_detail::mutex());
    const auto it = cache.find(kernel);
    if (it != cache.end()) {
      *bytes = it->second;
      return cudaSuccess;
    }
  }
  cudaFuncAttributes a;
  const cudaError_t e = cudaFuncGetAttributes(&a, kernel);
  if (e != cudaSuccess) return e;
  *bytes = static_cast<int>(a.sharedSizeBytes);
  std::lock_guard<std::mutex> lock(host_detail::mutex());
  cache[kernel] = *bytes;
  return cudaSuccess;
}

// Sets cudaFuncAttributeMaxDynamicSharedMemorySize of `kernel` on the current device to at
// least `dynamic` bytes; calls the runtime only when no earlier call on this device set as much.
inline cudaError_t opt_in_dynamic_smem(const void* kernel, int dynamic) {
  static std::map<std::pair<const void*, int>, int> set;
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  const std::pair<const void*, int> key(kernel, dev);
  {
    std::lock_guard<std::mutex> lock(host_detail::mutex());
    const auto it = set.find(key);
    if (it != set.end() && it->second >= dynamic) return cudaSuccess;
  }
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dynamic);
  if (e != cudaSuccess) return e;
  std::lock_guard<std::mutex> lock(host_detail::mutex());
  int& v = set[key];
  if (dynamic > v) v = dynamic;
  return cudaSuccess;
}

// cudaDeviceGetAttribute(attr) of the current device, queried once per (device, attribute);
// false when a query fails.
inline bool current_device_attribute(cudaDeviceAttr attr, int* value) {
  static std::map<std::pair<int, int>, int> cache;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  const std::pair<int, int> key(dev, static_cast<int>(attr));
  {
    std::lock_guard<std::mutex> lock(host_detail::mutex());
    const auto it = cache.find(key);
    if (it != cache.end()) {
      *value = it->second;
      return true;
    }
  }
  if (cudaDeviceGetAttribute(value, attr, dev) != cudaSuccess) return false;
  std::lock_guard<std::mutex> lock(host_detail::mutex());
  cache[key] = *value;
  return true;
}

// Shared memory a CTA may opt into on the current device (48 KB when the query fails).
inline int max_smem_optin() {
  int v = 0;
  return current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, &v) ? v : 48 * 1024;
}

template <class Kernel>
inline cudaError_t kernel_static_smem(Kernel* kernel, int* bytes) {
  return kernel_static_smem(reinterpret_cast<const void*>(kernel), bytes);
}

template <class Kernel>
inline cudaError_t opt_in_dynamic_smem(Kernel* kernel, int dynamic) {
  return opt_in_dynamic_smem(reinterpret_cast<const void*>(kernel), dynamic);
}

}  // namespace ct3d
