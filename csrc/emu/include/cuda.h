// Driver API header: nothing of it is used by host-only CuTe (no __CUDACC_VER_MAJOR__).
#pragma once
#include "cuda_runtime_api.h"
