"""The LoRA-kernel benchmark (`lorabench bench-kernels`, bench_kernels.py), the bars its figures are
held to (kernel_targets.py), the kernels' and the decoder's correctness on a device (correctness.py),
and the device, date and versions every such result carries (provenance.py).
"""
