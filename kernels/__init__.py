"""Fast paths, installed as `encodec_fast.kernels`: Triton kernels (`rvq`, `conv`, `stft`, their launch
configurations in `tuning`) and the C++ arithmetic coder (`_arith`, built by setup.py from `arith/`).

Model code reaches them only through `encodec_fast.ops`, which holds each op's PyTorch reference and
picks the kernel when it applies.

This folder is never the top-level module `kernels`: that name belongs to PyPI's `kernels` (a
dependency of transformers 5.x). Python finds this folder under that name only when the repository
root is on `sys.path` (running from it: `python -m pytest`, `python -m bench`); then the import below
steps aside and hands over the installed `kernels`, or fails as if this folder were not there.
"""

if __name__ == "kernels":
    import importlib
    import os
    import sys

    def _is_repository_root(entry: str, root: str = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))):
        return os.path.realpath(entry or os.curdir) == root

    _saved_path = list(sys.path)
    sys.path[:] = [entry for entry in sys.path if not _is_repository_root(entry)]
    del sys.modules[__name__]
    try:
        # The import system returns whatever sys.modules holds under the name once this body ends.
        sys.modules[__name__] = importlib.import_module(__name__)
    finally:
        sys.path[:] = _saved_path
