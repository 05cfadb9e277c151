// Emulator shadow: TMA (sm_90+) is neither used by the kernels nor emulated;
// its host half needs the CUDA driver API, which a host-only build lacks.
#pragma once
