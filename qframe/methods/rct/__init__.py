"""RCT: memory-lean training that keeps only a quantized copy of the weights.

After RCT (Huang et al., "RCT: Resource Constrained Training for Edge AI", 2021) and APT: every
Conv2d / Linear weight exists only as integer codes of a per-layer bit width with per-channel
scales (:mod:`.storage`); updates are applied to the codes with stochastic rounding and a
controller moves each layer's bit width during training (:mod:`.optimizer`); parameter and
optimizer-state bytes are measured from the tensors that exist (:mod:`.accounting`) and the
energy saved is estimated per operation (:mod:`.energy`).
"""

from qframe.methods.rct.accounting import measure_training, reachable_tensors, training_state_bytes
from qframe.methods.rct.energy import training_step_energy
from qframe.methods.rct.method import final_bits, prepare_rct, rct, to_fake_quant
from qframe.methods.rct.optimizer import RCTConfig, RCTOptimizer
from qframe.methods.rct.storage import RCTConv2d, RCTLayer, RCTLinear, requantize, rct_layers

__all__ = ["RCTConfig", "RCTOptimizer", "RCTConv2d", "RCTLinear", "RCTLayer", "prepare_rct", "rct", "to_fake_quant",
           "final_bits", "requantize", "rct_layers", "measure_training", "training_state_bytes",
           "reachable_tensors", "training_step_energy"]
