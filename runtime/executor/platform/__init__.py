"""The platform a model runs on, chosen once (`choose_platform`): torch on any device,
CUDA with Triton, or x86 with kubellm's C kernels. It supplies what the model leaves
open: the attention backend, the layer ops (with a whole layer's decode step where it has
one), the kernel quantized weights multiply through and how they are prepared for it, the
KV cache's dtype, and whether decode steps are captured as CUDA graphs."""

from kubellm.runtime.executor.platform.base import Platform
from kubellm.runtime.executor.platform.choice import choose_platform

__all__ = ["Platform", "choose_platform"]
