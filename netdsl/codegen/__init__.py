"""Code generation: checked, fused graph IR -> Python source.

`triton_module.generate` writes Triton kernels and nn.Modules that run them;
`torch_module.generate` writes the same networks in plain PyTorch (the test
oracle, with the same state_dict keys).  Both share `layers.init_lines`, so
their parameters are registered identically.
"""
