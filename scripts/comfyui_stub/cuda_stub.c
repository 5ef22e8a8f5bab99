/*
 * CUDA symbol stubs for running ComfyUI's test server on a CPU-only torch.
 *
 * PyPI's torchvision and torchaudio wheels are CUDA builds: their extension modules list
 * libc10_cuda.so and libtorch_cuda.so as DT_NEEDED and reference 23 symbols from them
 * (22 functions and one variable). A CPU build of torch ships neither library, so importing
 * torchvision fails, and ComfyUI imports torchvision at start-up.
 *
 * This file is compiled twice (see build.sh): once with -DSTUB_C10_CUDA and the soname
 * libc10_cuda.so, once with -DSTUB_TORCH_CUDA and the soname libtorch_cuda.so. Preloaded
 * with LD_PRELOAD, the dynamic loader matches the DT_NEEDED entries by soname and resolves
 * the symbols here. On a CPU-only machine none of them should ever be called: every function
 * except c10::cuda::device_count() (which truthfully answers 0) aborts with a message.
 *
 * This is a trick for the local test server ONLY. The pack itself never relies on it.
 *
 * C++ symbols are defined under their Itanium-mangled names; the comment above each gives
 * the demangled signature.
 */

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define STUB_VISIBLE __attribute__((visibility("default")))

static void stub_abort(const char *name) __attribute__((noreturn));

static void stub_abort(const char *name)
{
    fprintf(stderr,
            "comfyui cuda stub: %s was called, but this process runs a CPU-only torch with "
            "stubbed CUDA libraries (test server only)\n",
            name);
    fflush(stderr);
    abort();
}

#define STUB_FN(mangled, pretty) \
    STUB_VISIBLE void mangled(void) { stub_abort(pretty); }

#if defined(STUB_C10_CUDA)

/* c10::DeviceIndex c10::cuda::device_count() -- no CUDA device here. */
STUB_VISIBLE int8_t _ZN3c104cuda12device_countEv(void) { return 0; }

/* std::atomic<c10::cuda::CUDACachingAllocator::CUDAAllocator*> allocator */
STUB_VISIBLE void *_ZN3c104cuda20CUDACachingAllocator9allocatorE = NULL;

STUB_FN(_ZN3c104cuda14current_deviceEv, "c10::cuda::current_device()")
STUB_FN(_ZN3c104cuda14ExchangeDeviceEa, "c10::cuda::ExchangeDevice(signed char)")
STUB_FN(_ZN3c104cuda14MaybeSetDeviceEa, "c10::cuda::MaybeSetDevice(signed char)")
STUB_FN(_ZN3c104cuda9GetDeviceEPa, "c10::cuda::GetDevice(signed char*)")
STUB_FN(_ZN3c104cuda9SetDeviceEab, "c10::cuda::SetDevice(signed char, bool)")
STUB_FN(_ZN3c104cuda17getStreamFromPoolEba, "c10::cuda::getStreamFromPool(bool, signed char)")
STUB_FN(_ZN3c104cuda17getStreamFromPoolEia, "c10::cuda::getStreamFromPool(int, signed char)")
STUB_FN(_ZN3c104cuda20getCurrentCUDAStreamEa, "c10::cuda::getCurrentCUDAStream(signed char)")
STUB_FN(_ZN3c104cuda20getDefaultCUDAStreamEa, "c10::cuda::getDefaultCUDAStream(signed char)")
STUB_FN(_ZN3c104cuda20setCurrentCUDAStreamENS0_10CUDAStreamE,
        "c10::cuda::setCurrentCUDAStream(c10::cuda::CUDAStream)")
STUB_FN(_ZN3c104cuda29c10_cuda_check_implementationEiPKcS2_jb,
        "c10::cuda::c10_cuda_check_implementation(int, char const*, char const*, unsigned int, bool)")
STUB_FN(_ZNK3c104cuda10CUDAStream11synchronizeEv, "c10::cuda::CUDAStream::synchronize() const")
STUB_FN(_ZNK3c104cuda10CUDAStream5queryEv, "c10::cuda::CUDAStream::query() const")
STUB_FN(_ZNK3c104cuda10CUDAStream6streamEv, "c10::cuda::CUDAStream::stream() const")

#elif defined(STUB_TORCH_CUDA)

STUB_FN(_ZN2at4cuda26getCurrentDevicePropertiesEv, "at::cuda::getCurrentDeviceProperties()")
STUB_FN(aoti_torch_get_current_cuda_stream, "aoti_torch_get_current_cuda_stream")
STUB_FN(torch_c10_cuda_check_msg, "torch_c10_cuda_check_msg")
STUB_FN(torch_c10_cuda_free_error_msg, "torch_c10_cuda_free_error_msg")
STUB_FN(torch_cuda_stream_synchronize, "torch_cuda_stream_synchronize")
STUB_FN(torch_get_cuda_stream_from_pool, "torch_get_cuda_stream_from_pool")
STUB_FN(torch_set_current_cuda_stream, "torch_set_current_cuda_stream")

#else
#error "define STUB_C10_CUDA or STUB_TORCH_CUDA"
#endif
