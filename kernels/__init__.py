"""distsft Triton kernels (installed as `distsft_kernels`)."""
