"""Quantization methods: PTQ now; QAT and RCT build on the same quantizers."""
