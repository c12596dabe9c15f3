"""Weight-only integer quantization: RTN and GPTQ as layer methods, and their exports.

Importing this package registers the methods ``rtn`` and ``gptq``.
"""

from compress.methods.quantize.config import GPTQConfig, QuantizeConfig, RTNConfig  # noqa: F401
from compress.methods.quantize.gptq import GPTQ  # noqa: F401
from compress.methods.quantize.gptq_method import GPTQMethod  # noqa: F401
from compress.methods.quantize.grid import QuantParams  # noqa: F401
from compress.methods.quantize.rtn import RTN  # noqa: F401
