#pragma once
#include "emu/cuda_api.h"
#include "emu/runtime.h"
