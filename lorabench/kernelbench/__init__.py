"""The LoRA-kernel benchmark (`lorabench bench-kernels`, bench_kernels.py) and the bars its figures
are held to (kernel_targets.py).
"""
