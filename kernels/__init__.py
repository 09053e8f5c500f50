"""Fast paths (Triton kernels, C++ extensions), installed as `encodec_fast.kernels`.

Nothing here yet: the kernels arrive with later work; model code reaches them only through
`encodec_fast.ops` dispatch.
"""
