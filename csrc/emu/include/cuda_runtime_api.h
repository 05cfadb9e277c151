#pragma once
#include "emu/cuda_api.h"
