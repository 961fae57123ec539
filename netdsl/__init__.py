"""netdsl: declarative CNN specs compiled to fused Triton kernels.

The front end (parsing, elaboration, shape inference, `netdsl check`) imports
neither torch nor triton.
"""
from .compiler import check_file, check_text, checked_net
from .diagnostics import Diagnostic, NetdslError

__all__ = ["check_file", "check_text", "checked_net", "Diagnostic", "NetdslError"]
__version__ = "0.1.0"
